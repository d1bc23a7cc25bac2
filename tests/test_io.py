"""io/: every family and layout reads exactly what transformers wrote; lazy, sharded, atomic."""
import json

import pytest
import torch
import transformers as tf

from conftest import MOE_FAMILIES, assert_user_error
from xpertctl.errors import XpertError
from xpertctl.io import open_checkpoint, write_model_dir, write_safetensors
from xpertctl.io import files as io_files

LAYOUTS = [f for f in MOE_FAMILIES] + [f + "-fused" for f in MOE_FAMILIES] + ["olmoe-sharded", "bare/olmoe.safetensors"]


def _model_dir(fx, name):
    return fx / ("olmoe" if name.startswith("bare") else name)


@pytest.mark.parametrize("name", LAYOUTS)
def test_experts_equal_transformers_parameters(fx, name):
    ck = open_checkpoint(fx / name)
    model = tf.AutoModelForCausalLM.from_pretrained(_model_dir(fx, name))
    assert ck.moe_layers and ck.num_experts == 8 and ck.expert_ffn == 16 and ck.hidden == 32
    for i in ck.moe_layers:
        mlp = model.model.layers[i].mlp
        inner = ck.expert_ffn
        got = ck.experts(i, list(range(ck.num_experts)))
        for j, (g, u, d) in enumerate(got):
            # transformers' in-memory layout is fused whatever the file layout: compare against it
            assert torch.equal(g, mlp.experts.gate_up_proj[j, :inner])
            assert torch.equal(u, mlp.experts.gate_up_proj[j, inner:])
            assert torch.equal(d, mlp.experts.down_proj[j])
        assert torch.equal(ck.router(i), mlp.gate.weight)
        sh = ck.shared(i)
        if ck.family.shared:
            ref = getattr(mlp, ck.family.shared)
            assert all(torch.equal(a, b.weight) for a, b in zip(sh, (ref.gate_proj, ref.up_proj, ref.down_proj)))
        else:
            assert sh is None


def test_deepseek_dense_layers_are_skipped(fx):
    for name in ("deepseek_v2", "deepseek_v3", "deepseek_v3-fused"):
        ck = open_checkpoint(fx / name)
        assert ck.num_layers == 3 and ck.moe_layers == [1, 2]
        with pytest.raises(XpertError, match="not an MoE layer"):
            ck.expert(0, 0)


def test_bare_file_infers_family_without_config(fx):
    ck = open_checkpoint(fx / "bare" / "olmoe.safetensors")
    assert ck.family.name == "olmoe" and ck.config == {} and ck.top_k is None
    assert (ck.num_layers, ck.num_experts, ck.hidden, ck.expert_ffn) == (3, 8, 32, 16)


@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_key_detection_matches_config(fx, name, tmp_path):
    """Without config.json, key names alone identify every family (fused layouts too)."""
    for variant in (name, name + "-fused"):
        bare = tmp_path / f"{variant}.safetensors"
        bare.write_bytes((fx / variant / "model.safetensors").read_bytes())
        assert open_checkpoint(bare).family.name == name


def test_sharded_read_opens_only_the_holding_shard(fx):
    ck = open_checkpoint(fx / "olmoe-sharded")
    assert len(ck.files) > 2
    wm = json.loads((fx / "olmoe-sharded" / "model.safetensors.index.json").read_text())["weight_map"]
    ck.reader.opened.clear()
    ck.expert(2, 5)
    holders = {wm[f"model.layers.2.mlp.experts.5.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj")}
    assert {p.name for p in ck.reader.opened} == holders
    assert len(ck.reader.opened) == len(holders)  # one open per shard, grouped


def test_fused_slice_read_is_lazy(fx, monkeypatch):
    """A fused layout reads one expert's slice, not the whole [E, 2I, H] tensor."""
    ck = open_checkpoint(fx / "olmoe-fused")
    calls = []
    real = io_files.safe_open

    class Spy:
        def __init__(self, *a, **k):
            self.f = real(*a, **k)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *a):
            return self.f.__exit__(*a)

        def get_tensor(self, name):
            calls.append(("tensor", name))
            return self.f.get_tensor(name)

        def get_slice(self, name):
            calls.append(("slice", name))
            return self.f.get_slice(name)

    monkeypatch.setattr(io_files, "safe_open", Spy)
    ck.expert(1, 3)
    assert calls and all(kind == "slice" for kind, _ in calls)


@pytest.mark.parametrize("name", ["olmoe", "mixtral-fused", "qwen2_moe", "deepseek_v3", "bare/olmoe.safetensors", "llama"])
def test_inspect_numbers(fx, cli, name):
    code, out, err = cli("inspect", fx / name, "--json")
    assert code == 0, err
    info = json.loads(out)
    cfg = json.loads((_model_dir(fx, name) / "config.json").read_text())
    model = tf.AutoModelForCausalLM.from_pretrained(_model_dir(fx, name))
    assert info["parameters"] == sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    assert info["hidden"] == cfg["hidden_size"] and info["vocab"] in (cfg["vocab_size"], None)
    if name == "llama":
        assert info["layout"] == "dense" and info["experts"] == 0 and info["expert_ffn"] == 48
    else:
        assert info["experts"] == 8 and info["expert_ffn"] == 16
        assert info["layout"] == ("fused" if "fused" in name else "per-expert")
    if name == "qwen2_moe":
        assert info["shared_experts"] == 1 and info["shared_ffn"] == 24 and info["top_k"] == 2
    if name == "deepseek_v3":
        assert info["moe_layers"] == "1-2" and info["dense_layers"] == "0"
    code, out, _ = cli("inspect", fx / name)
    assert code == 0 and "family" in out


def _truncated(fx, tmp_path):
    p = tmp_path / "t.safetensors"
    p.write_bytes((fx / "olmoe" / "model.safetensors").read_bytes()[:-100])
    return p


def _lying_header(fx, tmp_path):
    import struct
    raw = (fx / "olmoe" / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    hdr = json.loads(raw[8:8 + n])
    k = sorted(k for k in hdr if k != "__metadata__")[0]
    hdr[k]["data_offsets"][1] += 10**6
    body = json.dumps(hdr).encode()
    p = tmp_path / "lie.safetensors"
    p.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])
    return p


def _missing_shard(fx, tmp_path):
    import shutil
    d = tmp_path / "sh"
    shutil.copytree(fx / "olmoe-sharded", d)
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    return d


def _unknown_family(fx, tmp_path):
    import shutil
    d = tmp_path / "bert"
    shutil.copytree(fx / "olmoe", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "bert"
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("make,needle", [
    (lambda fx, t: t / "nope", "no such file"),
    (lambda fx, t: (t / "empty").mkdir() or t / "empty", "no model.safetensors"),
    (_truncated, "truncated"),
    (_lying_header, "outside the file"),
    (_missing_shard, "missing"),
    (_unknown_family, "unsupported model_type 'bert'"),
])
def test_bad_checkpoints_are_one_line_errors(fx, tmp_path, cli, make, needle):
    src = make(fx, tmp_path)
    code, out, err = cli("inspect", src)
    assert_user_error(code, err, needle)
    assert out == ""


def test_dense_checkpoint_refused_where_moe_needed(fx):
    with pytest.raises(XpertError, match="dense llama checkpoint"):
        open_checkpoint(fx / "llama").require_moe()


def test_write_model_dir_shards_and_refuses_overwrite(tmp_path):
    tensors = {f"w{i}": torch.full((100,), float(i)) for i in range(5)}  # 400 bytes each
    out = write_model_dir(tmp_path / "m", tensors, {"xpertctl": "{}"}, files={"config.json": b"{}"}, shard_size=900)
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(idx["weight_map"].values())) == 3 and idx["metadata"]["total_size"] == 2000
    h = io_files.read_header(out / "model-00001-of-00003.safetensors")
    assert h.metadata["format"] == "pt" and "xpertctl" in h.metadata
    reader = io_files.open_files(sorted(out.glob("model-*.safetensors")), idx["weight_map"])
    assert all(torch.equal(reader.read_one(k), v) for k, v in tensors.items())
    with pytest.raises(XpertError, match="already exists"):
        write_model_dir(out, tensors, {}, files={})
    write_model_dir(out, {"a": torch.zeros(2)}, {}, files={}, force=True)
    assert (out / "model.safetensors").exists() and not (out / "model.safetensors.index.json").exists()


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import xpertctl.io.writer as w

    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(w, "save_file", boom)
    with pytest.raises(XpertError, match="No space left"):
        write_safetensors(tmp_path / "x.safetensors", {"a": torch.zeros(3)}, {})
    assert list(tmp_path.iterdir()) == []
