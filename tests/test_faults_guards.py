"""Faults around the input (issue 29, part B): configs that lie about the weights, NaN/Inf weights, two
runs of one recipe at once, eval's task files checked before the model, fingerprints that see a
checkpoint rewritten in place. Each case: one line, exit 2, nothing written (inspect: exit 0, the truth)."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import ROOT, assert_user_error, make_fixtures, stats_file

TEXT = make_fixtures.TEXT
TEACHER = ROOT / "fixtures" / "teacher"


def _text(tmp_path: Path) -> Path:
    p = tmp_path / "text.txt"
    p.write_text("\n\n".join(f"{TEXT} {n}" for n in range(4)))
    return p


def lying(src: Path, tmp_path: Path, **changes) -> Path:
    """A copy of a model directory whose config.json states `changes` (the weights are the same)."""
    d = tmp_path / f"{src.name}-lie"
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    return d


def poisoned(src: Path, tmp_path: Path, keys, value=float("nan"), name=None) -> Path:
    """A copy of a model directory with every tensor in `keys` (a list, or a predicate) set to `value`."""
    d = tmp_path / (name or f"{src.name}-bad")
    shutil.copytree(src, d)
    f = d / "model.safetensors"
    with safe_open(str(f), "pt") as h:
        meta = h.metadata()
    t = load_file(str(f))
    hit = [k for k in t if (keys(k) if callable(keys) else k in keys)]
    assert hit, keys
    for k in hit:
        t[k] = torch.full_like(t[k], value)
    save_file(t, str(f), metadata=meta)
    return d


# ---- configs that lie -------------------------------------------------------------------------------

# (fixture, config change, what the one line must name); the weights say otherwise in each
LIES = [
    ("olmoe", {"hidden_size": 64}, ["hidden_size=64", "[96, 32]"]),
    ("olmoe", {"num_experts_per_tok": 20}, ["num_experts_per_tok=20", "[8, 32]"]),
    ("olmoe", {"vocab_size": 100}, ["vocab_size=100", "[96, 32]"]),
    ("olmoe", {"num_hidden_layers": 5}, ["num_hidden_layers=5", "0-2"]),
    ("olmoe-fused", {"intermediate_size": 8}, ["intermediate_size=8", "gate_up_proj", "[8, 32, 32]"]),
    ("mixtral", {"intermediate_size": 32}, ["intermediate_size=32", "w1.weight", "[16, 32]"]),
    ("mixtral", {"num_key_value_heads": 4}, ["num_key_value_heads=4", "k_proj", "[16, 32]"]),
    ("qwen2_moe", {"moe_intermediate_size": 32}, ["moe_intermediate_size=32", "[16, 32]"]),
    ("qwen2_moe", {"shared_expert_intermediate_size": 12}, ["shared_expert_intermediate_size=12", "[24, 32]"]),
    ("qwen3_moe", {"num_local_experts": 6}, ["num_local_experts=6", "[8, 32]"]),
    ("qwen3_moe", {"head_dim": 16}, ["head_dim=16", "q_norm", "[8]"]),
    ("qwen3_moe", {"num_attention_heads": 8}, ["num_attention_heads=8", "q_proj", "[32, 32]"]),
    ("deepseek_v2", {"moe_intermediate_size": 8}, ["moe_intermediate_size=8", "[16, 32]"]),
    ("deepseek_v2", {"intermediate_size": 40}, ["intermediate_size=40", "model.layers.0.mlp.gate_proj", "[48, 32]"]),
    ("deepseek_v2", {"first_k_dense_replace": 2}, ["first_k_dense_replace=2", "model.layers.1.mlp.gate.weight"]),
    ("deepseek_v3", {"v_head_dim": 4}, ["v_head_dim=4", "[48, 16]"]),
    ("deepseek_v3", {"num_experts_per_tok": 9}, ["num_experts_per_tok=9", "[8, 32]"]),
]


@pytest.mark.parametrize("name,change,needles", LIES, ids=[f"{n}-{next(iter(c))}" for n, c, _ in LIES])
def test_graft_refuses_a_config_that_lies(fx, tmp_path, cli, name, change, needles):
    src = lying(fx / name, tmp_path, **change)
    out = tmp_path / "g"
    code, so, err = cli("graft", src, "-t", "1L", "--dtype", "float32", "-o", out)
    assert_user_error(code, err, str(src / "config.json"), *needles)
    assert not out.exists() and so == ""


@pytest.mark.parametrize("change,needles", [
    ({"hidden_size": 256}, ["hidden_size=256", "[2048, 128]"]),
    ({"num_experts_per_tok": 20}, ["num_experts_per_tok=20", "[16, 128]"]),
    ({"num_hidden_layers": 8}, ["num_hidden_layers=8", "0-5"]),
    ({"num_hidden_layers": 4}, ["num_hidden_layers=4", "0-5"]),
])
def test_stats_refuses_the_teacher_with_a_config_that_lies(tmp_path, cli, change, needles):
    src = lying(TEACHER, tmp_path, **change)
    out = tmp_path / "s.safetensors"
    code, _, err = cli("stats", src, "-d", f"a={_text(tmp_path)}", "--seq-len", "32", "-o", out)
    assert_user_error(code, err, str(src / "config.json"), *needles)
    assert not out.exists()


def test_fidelity_refuses_a_source_whose_config_lies(fx, tmp_path, cli):
    src = lying(TEACHER, tmp_path, hidden_size=256)
    out = tmp_path / "f.json"
    code, _, err = cli("fidelity", src, fx / "llama", "-d", f"a={_text(tmp_path)}", "-o", out)
    assert_user_error(code, err, "hidden_size=256", "[2048, 128]")
    assert not out.exists()


@pytest.mark.parametrize("change,needles", [
    ({"intermediate_size": 40}, ["intermediate_size=40", "[48, 32]"]),
    ({"vocab_size": 100}, ["vocab_size=100", "[96, 32]"]),
    ({"num_attention_heads": 8}, ["num_attention_heads=8", "head_dim=8", "q_proj", "[32, 32]"]),
])
def test_eval_and_train_refuse_a_model_dir_whose_config_lies(fx, tmp_path, cli, change, needles):
    src = lying(fx / "llama", tmp_path, **change)
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"context": "the law", "choices": ["shall", "god"], "label": 0}) + "\n")
    code, _, err = cli("eval", src, "--task", f"mc:{mc}", "-o", tmp_path / "e.json")
    assert_user_error(code, err, str(src / "config.json"), *needles)
    from xpertctl.errors import XpertError
    from xpertctl.train import load_causal_lm
    with pytest.raises(XpertError, match=needles[0]):
        load_causal_lm(src)


@pytest.mark.parametrize("layers,disagree", [(8, "num_hidden_layers=8"), (4, "num_hidden_layers=4")])
def test_inspect_reports_the_weights_and_names_the_disagreement(tmp_path, cli, layers, disagree):
    src = lying(TEACHER, tmp_path, num_hidden_layers=layers)
    code, out, err = cli("inspect", src, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["layers"] == 6 and info["moe_layers"] == "0-5" and info["dense_layers"] == "-"
    assert len(info["config_disagrees"]) == 1 and disagree in info["config_disagrees"][0]
    assert disagree in err and "Traceback" not in err
    code, out, err = cli("inspect", src)
    assert code == 0 and disagree in err
    # the truthful original: nothing to report, and its summary has no such key (unchanged)
    info = json.loads(cli("inspect", TEACHER, "--json")[1])
    assert info["layers"] == 6 and "config_disagrees" not in info


def test_every_fixture_config_agrees_with_its_weights(fx):
    """The check is no false alarm: every family's own config (as transformers wrote it) passes."""
    from xpertctl.io import open_checkpoint
    for d in sorted(p for p in fx.iterdir() if (p / "config.json").is_file()):
        assert open_checkpoint(d).config_disagrees == [], d
    assert open_checkpoint(TEACHER).config_disagrees == []


# ---- NaN / Inf in the weights -------------------------------------------------------------------------

NAN_STATS = [
    ("embeddings", lambda k: k == "model.embed_tokens.weight", float("nan"), ["embed"]),
    ("embeddings-inf", lambda k: k == "model.embed_tokens.weight", float("inf"), ["embed"]),
    ("attention", lambda k: k == "model.layers.1.self_attn.q_proj.weight", float("nan"), ["layer 1"]),
    ("norm", lambda k: k == "model.layers.1.post_attention_layernorm.weight", float("nan"), ["layer 1"]),
    ("router", lambda k: k == "model.layers.2.mlp.gate.weight", float("nan"), ["layer 2", "router"]),
    ("expert", lambda k: k.startswith("model.layers.1.mlp.experts."), float("inf"), ["layer 1"]),
]


@pytest.mark.parametrize("what,keys,value,needles", NAN_STATS, ids=[n[0] for n in NAN_STATS])
def test_stats_refuses_non_finite_values_naming_where_they_first_appear(fx, tmp_path, cli, what, keys, value, needles):
    src = poisoned(fx / "olmoe", tmp_path, keys, value)
    out = tmp_path / "s.safetensors"
    code, _, err = cli("stats", src, "-d", f"a={_text(tmp_path)}", "--seq-len", "32", "-o", out)
    assert_user_error(code, err, str(src), "NaN or Inf", *needles)
    assert not out.exists()
    for n in ("0", "2") if needles[0] == "layer 1" else ():  # the first layer where they appear, no other
        assert f"layer {n}" not in err


def test_select_refuses_a_stats_file_with_non_finite_mass(tmp_path, cli):
    p = stats_file(tmp_path, [[[5, 3, 2, 0]], [[1, 4, 4, 1]]], [10, 10])
    t = load_file(str(p))
    with safe_open(str(p), "pt") as h:
        meta = h.metadata()
    t["mass"][0, 0, 1] = float("nan")
    save_file(t, str(p), metadata=meta)
    code, _, err = cli("select", p, "--show")
    assert_user_error(code, err, str(p), "NaN or Inf")


NAN_GRAFT = [
    ("olmoe", "model.embed_tokens.weight", ["--inherit", "embeddings"]),
    ("olmoe", "lm_head.weight", ["--inherit", "embeddings"]),
    ("olmoe", "model.norm.weight", ["--inherit", "norms"]),
    ("olmoe", "model.layers.0.input_layernorm.weight", ["--inherit", "norms"]),
    ("mixtral", "model.layers.0.self_attn.k_proj.weight", ["--inherit", "attention"]),
    ("qwen3_moe", "model.layers.0.self_attn.q_norm.weight", ["--inherit", "attention", "--arch", "qwen3"]),
    ("qwen2_moe", "model.layers.0.mlp.shared_expert.up_proj.weight", ["--shared", "concat"]),
    ("olmoe", "model.layers.0.mlp.experts.3.down_proj.weight", []),  # experts: checked already (decompose)
]


@pytest.mark.parametrize("name,key,extra", NAN_GRAFT, ids=[f"{n}-{k.split('.', 3)[-1]}" for n, k, _ in NAN_GRAFT])
def test_graft_refuses_non_finite_weights_in_what_it_copies(fx, tmp_path, cli, name, key, extra):
    src = poisoned(fx / name, tmp_path, [key])
    out = tmp_path / "g"
    code, _, err = cli("graft", src, "-t", "1L", "--layer-map", "first", "--dtype", "float32", *extra, "-o", out)
    assert_user_error(code, err, str(src), "NaN or Inf")
    assert key in err or ("expert 3 of layer 0" in err and "experts" in key)
    assert not out.exists()


def test_graft_does_not_refuse_weights_it_does_not_copy(fx, tmp_path, cli):
    src = poisoned(fx / "olmoe", tmp_path, ["model.embed_tokens.weight"])
    code, _, err = cli("graft", src, "-t", "1L", "--dtype", "float32", "-o", tmp_path / "g")
    assert code == 0, err


def test_fidelity_refuses_a_source_with_nan_hidden_states(fx, tmp_path, cli):
    src = poisoned(fx / "olmoe", tmp_path, ["model.layers.1.self_attn.v_proj.weight"])
    g = tmp_path / "g"
    assert cli("graft", src, "-t", "2L", "--dtype", "float32", "-o", g)[0] == 0  # copies no attention
    out = tmp_path / "f.json"
    code, _, err = cli("fidelity", src, g, "-d", f"a={_text(tmp_path)}", "--seq-len", "32", "-o", out)
    assert_user_error(code, err, "NaN or Inf", "layer 1")
    assert not out.exists()


def test_fidelity_refuses_a_student_with_nan_weights(fx, tmp_path, cli):
    g = tmp_path / "g"
    assert cli("graft", fx / "olmoe", "-t", "2L", "--dtype", "float32", "-o", g)[0] == 0
    bad = poisoned(g, tmp_path, ["model.layers.1.mlp.down_proj.weight"], float("inf"))
    out = tmp_path / "f.json"
    code, _, err = cli("fidelity", fx / "olmoe", bad, "-d", f"a={_text(tmp_path)}", "--seq-len", "32", "-o", out)
    assert_user_error(code, err, str(bad), "model.layers.1.mlp.down_proj.weight", "NaN or Inf")
    assert not out.exists()


# ---- two runs of one recipe --------------------------------------------------------------------------

# The first runner pauses when its step is about to start (the lock held), until the test says go.
HOLD = """
import pathlib, sys, time
import xpertctl.recipe as r
real = r._begin
ready, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
def held(*a, **k):
    ready.write_text("ready")
    while not go.exists():
        time.sleep(0.05)
    return real(*a, **k)
r._begin = held
from xpertctl.cli import main
sys.argv = ["xpertctl"] + sys.argv[3:]
main()
"""


def _select_recipe(tmp_path: Path) -> tuple[Path, Path]:
    stats = stats_file(tmp_path, [[[5, 3, 2, 0]], [[1, 4, 4, 1]]], [10, 10])
    work = tmp_path / "work"
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({"name": "t", "steps": [
        {"id": "sel", "op": "select", "args": {"stats": str(stats), "out": str(work / "sel.json")}}]}))
    return r, work


@pytest.mark.slow
def test_a_second_run_of_a_recipe_in_progress_is_refused_naming_the_first(tmp_path):
    r, work = _select_recipe(tmp_path)
    ready, go = tmp_path / "ready", tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-c", HOLD, str(ready), str(go), "run", str(r)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 600
        while not ready.exists():
            assert first.poll() is None, first.stderr.read()
            assert time.time() < deadline
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-m", "xpertctl", "run", str(r)], env=env, capture_output=True,
                                text=True, timeout=600)
        assert_user_error(second.returncode, second.stderr, f"process {first.pid}", socket.gethostname(),
                          str(work / ".xpertctl-run.lock"))
        assert not (work / "sel.json").exists()
        go.write_text("go")
        assert first.wait(timeout=600) == 0, first.stderr.read()
    finally:
        go.write_text("go")
        if first.poll() is None:
            first.kill()
    assert (work / "sel.json").is_file() and not (work / ".xpertctl-run.lock").exists()
    again = subprocess.run([sys.executable, "-m", "xpertctl", "run", str(r)], env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0 and "skip (done)" in again.stderr, again.stderr


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_notice(tmp_path, cli):
    r, work = _select_recipe(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    work.mkdir()
    lock = work / ".xpertctl-run.lock"
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "2024-01-01T00:00:00"}))
    code, _, err = cli("run", r)
    assert code == 0, err
    assert f"process {dead.pid}" in err and "note:" in err
    assert (work / "sel.json").is_file() and not lock.exists()


def test_the_lock_is_released_after_a_failed_step_and_names_its_holder_while_held(tmp_path, cli):
    r, work = _select_recipe(tmp_path)
    doc = yaml.safe_load(r.read_text())
    doc["steps"].append({"id": "bad", "op": "select", "args": {"stats": str(tmp_path / "nope.safetensors"),
                                                              "out": str(work / "sel2.json")}})
    (tmp_path / "nope.safetensors").write_bytes(b"not safetensors at all")
    r.write_text(yaml.safe_dump(doc))
    seen = {}
    import xpertctl.recipe as rc
    real = rc._begin

    def spy(*a, **k):  # while a step runs, the lock holds this process's id, host and start time
        seen.update(json.loads((work / ".xpertctl-run.lock").read_text()))
        return real(*a, **k)
    rc._begin = spy
    try:
        code, _, err = cli("run", r)
    finally:
        rc._begin = real
    assert code == 2 and "nope.safetensors" in err.strip().splitlines()[-1] and "Traceback" not in err, err
    assert seen["pid"] == os.getpid() and seen["host"] == socket.gethostname() and seen["started"]
    assert not (work / ".xpertctl-run.lock").exists()


# ---- eval checks every task file before the model ----------------------------------------------------

@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if eval loads the model."""
    import xpertctl.train as tr

    def loaded(*a, **k):
        raise AssertionError("the model was loaded before the task files were checked")
    monkeypatch.setattr(tr, "load_causal_lm", loaded)


@pytest.mark.parametrize("kind,record,needles", [
    ("mc", {"context": "the law", "choices": ["a", "b"], "answer": 0}, ["bad.jsonl:1", "'label'"]),
    ("mc", {"context": "the law", "choices": ["a", "b"], "label": 2}, ["bad.jsonl:1", "label 2"]),
    ("mc", {"context": "the law", "choices": [], "label": 0}, ["bad.jsonl:1", "choices"]),
    ("gen", {"instruction": "say", "answer": "x"}, ["bad.jsonl:1", "'response'"]),
])
def test_eval_checks_every_task_file_before_loading_the_model(fx, tmp_path, cli, no_model, kind, record, needles):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(record) + "\n")
    code, _, err = cli("eval", fx / "llama", "--task", f"ppl:{_text(tmp_path)}", "--task", f"{kind}:{bad}")
    assert_user_error(code, err, *needles)


def test_eval_checks_ppl_split_and_lmeval_files_before_loading_the_model(fx, tmp_path, cli, no_model):
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"context": "the law", "choices": ["a", "b"], "label": 0}) + "\n")
    code, _, err = cli("eval", fx / "llama", "--task", f"mc:{mc}", "--task", f"ppl:{_text(tmp_path)}", "--split", "val")
    assert_user_error(code, err, "--split val", "plain text")
    task = tmp_path / "t.yaml"
    task.write_text("dataset_path: json\n")  # no task: name
    code, _, err = cli("eval", fx / "llama", "--task", f"mc:{mc}", "--task", f"lmeval:{task}")
    assert_user_error(code, err, "t.yaml", "task:")


# ---- fingerprints ------------------------------------------------------------------------------------

def _rewrite_in_place(f: Path, scale: float) -> None:
    """The same tensors, shapes, dtypes and metadata (the same header), other values, at the same path."""
    with safe_open(str(f), "pt") as h:
        meta = h.metadata()
    t = load_file(str(f))
    save_file({k: v * scale if v.is_floating_point() else v for k, v in t.items()}, str(f), metadata=meta)


def test_a_checkpoint_rewritten_in_place_with_the_same_layout_fingerprints_differently(fx, tmp_path):
    from xpertctl.io import open_checkpoint
    src = tmp_path / "olmoe"
    shutil.copytree(fx / "olmoe", src)
    head = (src / "model.safetensors").read_bytes()[:4096]
    before = open_checkpoint(src).fingerprint
    _rewrite_in_place(src / "model.safetensors", 1.5)
    assert (src / "model.safetensors").read_bytes()[:4096] == head  # the header did not change
    after = open_checkpoint(src).fingerprint
    assert after["size"] == before["size"] and after["sha256"] != before["sha256"]
    # a copy (another path, another mtime) is the same weights: the same fingerprint
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    assert open_checkpoint(copy).fingerprint["sha256"] == after["sha256"]


def test_a_big_file_is_fingerprinted_from_samples_and_still_sees_a_change_in_the_middle(tmp_path):
    """A 48 MB tensor: the fingerprint reads a few blocks, not the data; a change inside a sampled block
    is seen, and one elsewhere is seen through the file's mtime (what a recipe compares)."""
    from xpertctl.io import provenance
    f = tmp_path / "big.safetensors"
    save_file({"w": torch.zeros(12 << 20)}, str(f), metadata={"format": "pt"})
    a = provenance.fingerprint(f)
    data_start = 8 + int.from_bytes(f.read_bytes()[:8], "little")
    size = f.stat().st_size
    with open(f, "r+b") as h:  # the middle of the data section (a sampled offset)
        h.seek(data_start + (size - data_start) // 2)
        h.write(b"\x01\x02\x03\x04")
    b = provenance.fingerprint(f, mtime=True)
    assert a["size"] == b["size"] and a["sha256"] != b["sha256"]
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    c = provenance.fingerprint(f, mtime=True)
    assert c["sha256"] == b["sha256"] and c["mtime"] != b["mtime"]


def test_a_recipe_step_runs_again_after_its_input_is_rewritten_in_place(tmp_path, cli):
    r, work = _select_recipe(tmp_path)
    assert cli("run", r)[0] == 0
    first = (work / "sel.json").read_text()
    stats = tmp_path / "s.safetensors"
    t = load_file(str(stats))
    with safe_open(str(stats), "pt") as h:
        meta = h.metadata()
    t["counts"] = t["counts"].flip(-1).contiguous()  # the same header, other counts
    save_file(t, str(stats), metadata=meta)
    code, _, err = cli("run", r)
    assert code == 0 and "sel: run" in err, err
    assert (work / "sel.json").read_text() != first
    code, _, err = cli("run", r)
    assert code == 0 and "skip (done)" in err
