"""decompose (Tucker, align, mean), reshape (depth, width consistency) and graft (HF round trip)."""
import json
import shutil

import pytest
import tensorly as tl
import torch
import transformers as tf
from safetensors.torch import load_file
from tensorly.decomposition import tucker as tl_tucker

from conftest import MOE_FAMILIES, assert_user_error
from xpertctl.errors import XpertError
from xpertctl.io import open_checkpoint, provenance
from xpertctl.ops import decompose, reshape
from xpertctl.ops.tucker import reconstruct, tucker
from xpertctl.specs import Target, parse_target


# ---- Tucker -----------------------------------------------------------------------------------

def test_full_rank_tucker_reconstructs_the_stack():
    x = torch.randn(24, 40, 6, generator=torch.Generator().manual_seed(0))
    core, fs, err = tucker(x, [24, 40, 6])
    rec = reconstruct(core, fs)
    assert float((rec - x).norm() / x.norm()) < 1e-5 and err < 1e-5
    for u in fs:  # orthonormal factors
        assert torch.allclose(u.T @ u, torch.eye(u.shape[1]), atol=1e-5)


def test_identical_experts_collapse_to_the_expert_at_rank_one():
    g = torch.Generator().manual_seed(1)
    e = (torch.randn(16, 32, generator=g), torch.randn(16, 32, generator=g), torch.randn(32, 16, generator=g))
    st = decompose.stacks([e] * 5)
    t = {"layers.0.weights": torch.full((5,), 0.2)}
    for m, x in st.items():
        core, (u1, u2, u3), err = tucker(x, [x.shape[0], x.shape[1], 1])
        assert err < 1e-5 and core.shape[2] == 1
        t.update({f"layers.0.{m}.core": core, f"layers.0.{m}.U1": u1, f"layers.0.{m}.U2": u2, f"layers.0.{m}.U3": u3})
    for how in ("mean", "freq", "first"):
        got = reshape.combine_layer(t, 0, how)
        for a, b in zip(got, e):
            assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("ranks", [[12, 20, 1], [6, 10, 3], [12, 5, 4]])
def test_tucker_matches_tensorly_error(ranks):
    """Equal or lower error than tensorly's tucker: both at their defaults, and both run to convergence."""
    x = torch.randn(12, 20, 4, generator=torch.Generator().manual_seed(2)) + 0.5

    def tl_err(**kw):
        with tl.backend_context("pytorch"):
            core, fs = tl_tucker(x, rank=ranks, **kw)
            return float(torch.linalg.vector_norm(x - tl.tucker_to_tensor((core, fs))) / torch.linalg.vector_norm(x))
    assert tucker(x, ranks)[2] <= tl_err() + 1e-6
    assert tucker(x, ranks, tol=1e-9)[2] <= tl_err(tol=1e-8, n_iter_max=500) + 1e-6


def test_align_recovers_a_known_permutation():
    g = torch.Generator().manual_seed(3)
    ref = (torch.randn(32, 16, generator=g), torch.randn(32, 16, generator=g), torch.randn(16, 32, generator=g))
    perm = torch.randperm(32, generator=g)
    shuffled = (ref[0][perm], ref[1][perm], ref[2][:, perm])
    aligned, perms = decompose.align([ref, shuffled])
    assert all(torch.equal(a, b) for a, b in zip(aligned[1], ref))
    assert torch.equal(perm[perms[1]], torch.arange(32))


# ---- decompose on checkpoints -------------------------------------------------------------------

def _selection(tmp_path, ck, experts_per_layer, name="sel.json"):
    doc = {"criterion": "test", "per_layer": len(experts_per_layer), "source": ck.fingerprint,
           "num_experts": ck.num_experts,
           "layers": [{"layer": i, "experts": experts_per_layer,
                       "freq": {"a": [0.5] * len(experts_per_layer)}} for i in ck.moe_layers]}
    p = tmp_path / name
    p.write_text(json.dumps(doc))
    return p


def test_decompose_factors_reconstruct_selected_experts(fx, tmp_path, cli):
    ck = open_checkpoint(fx / "mixtral-fused")
    sel = _selection(tmp_path, ck, [5, 1, 6])
    out = tmp_path / "f.safetensors"
    code, so, err = cli("decompose", fx / "mixtral-fused", sel, "-o", out, "--ranks", "full,full,full", "--no-align")
    assert code == 0, err
    t = load_file(str(out))
    rec = provenance.read(out, "factors")
    assert rec["layers"] == [0, 1] and rec["method"] == "tucker"
    for i in ck.moe_layers:
        experts = ck.experts(i, [5, 1, 6])
        assert t[f"layers.{i}.experts"].tolist() == [5, 1, 6]
        for k, m in enumerate(("gate", "up", "down")):
            rec_x = reconstruct(t[f"layers.{i}.{m}.core"], [t[f"layers.{i}.{m}.U{n}"] for n in (1, 2, 3)])
            stack = torch.stack([e[k] for e in experts], -1)
            assert float((rec_x - stack).norm() / stack.norm()) < 1e-5
            assert float(t[f"layers.{i}.{m}.error"]) < 1e-5


def test_no_tucker_is_the_frequency_weighted_mean(fx, tmp_path):
    ck = open_checkpoint(fx / "olmoe")
    doc = json.loads(_selection(tmp_path, ck, [0, 3]).read_text())
    doc["layers"][0]["freq"] = {"a": [0.3, 0.1], "b": [0.1, 0.1]}  # weights 0.2, 0.1 -> 2/3, 1/3
    t, meta = decompose.compute(ck, doc, "x", no_tucker=True, align_neurons=False)
    e0, e3 = ck.experts(0, [0, 3])
    assert torch.allclose(t["layers.0.gate.mean"], e0[0] * 2 / 3 + e3[0] / 3, atol=1e-6)
    assert meta["method"] == "mean"


def test_decompose_refuses_bad_selections_and_ranks(fx, tmp_path, cli):
    ck = open_checkpoint(fx / "olmoe")
    out = tmp_path / "f.safetensors"
    bad = _selection(tmp_path, ck, [0, 9], "bad.json")
    code, _, err = cli("decompose", fx / "olmoe", bad, "-o", out)
    assert_user_error(code, err, "bad.json", "out of range")
    other = _selection(tmp_path, open_checkpoint(fx / "mixtral"), [0, 1], "other.json")
    code, _, err = cli("decompose", fx / "olmoe", other, "-o", out)
    assert_user_error(code, err, "other.json", "another model")
    good = _selection(tmp_path, ck, [0, 1])
    code, _, err = cli("decompose", fx / "olmoe", good, "-o", out, "--ranks", "full,full,3")
    assert_user_error(code, err, "rank 3 of mode 3 exceeds its size 2")
    code, _, err = cli("decompose", fx / "olmoe", good, "-o", out, "--ranks", "full,1")
    assert_user_error(code, err, "--ranks")
    assert not out.exists()


def test_decompose_refuses_nan_experts(fx, tmp_path, cli):
    from safetensors.torch import save_file
    d = tmp_path / "nan"
    shutil.copytree(fx / "olmoe", d)
    t = load_file(str(d / "model.safetensors"))
    t["model.layers.0.mlp.experts.1.up_proj.weight"][0, 0] = float("nan")
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    sel = _selection(tmp_path, open_checkpoint(d), [0, 1])
    code, _, err = cli("decompose", d, sel, "-o", tmp_path / "f.safetensors")
    assert_user_error(code, err, "expert 1 of layer 0 has NaN")


# ---- reshape -----------------------------------------------------------------------------------

def test_layer_maps():
    src = [1, 2, 3, 4, 5, 6, 7, 8]
    assert reshape.layer_map(src, 4, "uniform") == [[1], [3], [6], [8]]
    assert reshape.layer_map(src, 8, "uniform") == [[s] for s in src]
    assert reshape.layer_map(src, 3, "first") == [[1], [2], [3]]
    assert reshape.layer_map(src, 3, "merge") == [[1, 2, 3], [4, 5, 6], [7, 8]]
    assert reshape.layer_map(src, 10, "uniform")[0] == [1] and len(reshape.layer_map(src, 10, "uniform")) == 10
    with pytest.raises(XpertError, match="first"):
        reshape.layer_map(src, 9, "first")


@pytest.mark.parametrize("spec,parsed", [("12L", Target(12)), ("12L,d2048,f1024", Target(12, 2048, 1024)),
                                         ("8L,h16", Target(8, heads=16))])
def test_target_spec(spec, parsed):
    assert parse_target(spec) == parsed


@pytest.mark.parametrize("spec", ["12", "L12", "12L,x5", "12L,d0", "d2048", "12L,12L", ""])
def test_malformed_target_spec(spec):
    with pytest.raises(XpertError, match="--target"):
        parse_target(spec)


def _factors(fx, tmp_path, name="olmoe", experts=(0, 1, 2), ranks="full,full,full"):
    ck = open_checkpoint(fx / name)
    doc = json.loads(_selection(tmp_path, ck, list(experts)).read_text())
    return decompose.compute(ck, doc, "x", ranks=ranks)


@pytest.mark.parametrize("how", ["norm", "first"])
def test_width_selection_is_index_consistent(fx, tmp_path, how):
    t, meta = _factors(fx, tmp_path)
    out, m2 = reshape.compute(t, meta, Target(3, 20, 10), width_select=how)
    ri = out["residual_index"]
    assert ri.tolist() == sorted(ri.tolist()) and len(ri) == 20
    assert m2["layer_map"] == [[0], [1], [2]]
    for n, (src,) in enumerate(m2["layer_map"]):
        g, u, dn = reshape.combine_layer(t, src, "mean")
        ni = out[f"layers.{n}.neuron_index"]
        # one residual index set for every layer; one neuron set for gate rows, up rows, down columns
        assert torch.equal(out[f"layers.{n}.gate_proj"], g[ni][:, ri])
        assert torch.equal(out[f"layers.{n}.up_proj"], u[ni][:, ri])
        assert torch.equal(out[f"layers.{n}.down_proj"], dn[ri][:, ni])
    if how == "first":
        assert ri.tolist() == list(range(20))


def test_norm_width_selection_picks_the_planted_high_energy_rows():
    """Independent oracle: dense FFNs whose high-energy residual dimensions and neurons are planted."""
    H, I, d, f = 16, 12, 5, 4
    g0 = torch.Generator().manual_seed(0)
    R = [2, 5, 9, 13, 14]  # residual dimensions with energy in every layer
    N = {0: [1, 4, 7, 10], 1: [0, 3, 8, 11]}  # neurons with energy, per layer
    per_src = {}
    for layer, neurons in N.items():
        g, u, dn = (torch.randn(I, H, generator=g0) * 0.01, torch.randn(I, H, generator=g0) * 0.01,
                    torch.randn(H, I, generator=g0) * 0.01)
        g[:, R] += 1.0; u[:, R] -= 1.0; dn[R, :] += 1.0
        g[neurons, :] += 2.0; u[neurons, :] += 2.0; dn[:, neurons] -= 2.0
        per_src[layer] = (g, u, dn)
    meta = {"hidden": H, "expert_ffn": I, "layers": [0, 1], "source": {}, "family": "olmoe"}
    out, _ = reshape.adapt(per_src, meta, Target(2, d, f), width_select="norm")
    assert out["residual_index"].tolist() == R
    for layer, neurons in N.items():
        assert out[f"layers.{layer}.neuron_index"].tolist() == neurons
        g, u, dn = per_src[layer]
        assert torch.equal(out[f"layers.{layer}.gate_proj"], g[neurons][:, R])
        assert torch.equal(out[f"layers.{layer}.down_proj"], dn[R][:, neurons])


def test_merge_averages_groups_and_full_width_keeps_everything(fx, tmp_path):
    t, meta = _factors(fx, tmp_path)
    out, m2 = reshape.compute(t, meta, Target(1), layer_map_how="merge")
    assert m2["layer_map"] == [[0, 1, 2]] and out["residual_index"].tolist() == list(range(32))
    mats = [reshape.combine_layer(t, i) for i in (0, 1, 2)]
    assert torch.allclose(out["layers.0.gate_proj"], sum(m[0] for m in mats) / 3, atol=1e-6)


def test_reshape_refuses_wider_targets(fx, tmp_path, cli):
    t, meta = _factors(fx, tmp_path)
    with pytest.raises(XpertError, match="hidden 64 is wider"):
        reshape.compute(t, meta, Target(2, 64))
    with pytest.raises(XpertError, match=r"FFN 49 is wider than the selected experts' total 48 \(3 experts of 16\)"):
        reshape.compute(t, meta, Target(2, ffn=49))


# ---- graft ---------------------------------------------------------------------------------------

def _load(out):
    model, info = tf.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model


def test_graft_roundtrip_ffn_equals_adapted(fx, tmp_path, cli):
    t, meta = _factors(fx, tmp_path, ranks="full,full,1")
    from safetensors.torch import save_file
    facts = tmp_path / "f.safetensors"
    rec = provenance.record("factors", [], {}, **meta)
    save_file(t, str(facts), metadata={"format": "pt", **provenance.as_metadata(rec)})
    adapted = tmp_path / "a.safetensors"
    assert cli("reshape", facts, "--target", "2L,d24,f12", "-o", adapted)[0] == 0
    out = tmp_path / "g"
    code, so, err = cli("graft", adapted, "-o", out, "--inherit", "embeddings,norms", "--dtype", "bfloat16",
                        "--shard-size", "20KB")
    assert code == 0, err
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "tokenizer.json").exists()
    assert "Provenance" in (out / "README.md").read_text()
    model = _load(out)
    a = load_file(str(adapted))
    for n in range(2):
        for m in ("gate_proj", "up_proj", "down_proj"):
            w = getattr(model.model.layers[n].mlp, m).weight
            assert w.dtype == torch.bfloat16 and torch.equal(w, a[f"layers.{n}.{m}"].to(torch.bfloat16))
    ck = open_checkpoint(fx / "olmoe")
    ri = a["residual_index"]
    assert torch.equal(model.model.embed_tokens.weight, ck.tensor("model.embed_tokens.weight")[:, ri].bfloat16())
    assert torch.equal(model.model.layers[1].input_layernorm.weight,
                       ck.tensor("model.layers.2.input_layernorm.weight")[ri].bfloat16())
    logits = model(input_ids=torch.tensor([[1, 5, 7, 9]])).logits
    assert logits.shape == (1, 4, 96) and torch.isfinite(logits.float()).all()


def test_scratch_differs_only_in_ffn(fx, tmp_path, cli):
    outs = {}
    for init in ("xpert", "scratch"):
        outs[init] = tmp_path / init
        code, _, err = cli("graft", fx / "qwen2_moe", "--target", "3L", "-o", outs[init], "--ffn-init", init,
                           "--seed", "7")
        assert code == 0, err
    a, b = load_file(str(outs["xpert"] / "model.safetensors")), load_file(str(outs["scratch"] / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        same = torch.equal(a[k], b[k])
        assert same != (".mlp." in k), k


@pytest.mark.parametrize("name", MOE_FAMILIES + [f + "-fused" for f in MOE_FAMILIES] + ["olmoe-sharded"])
def test_one_shot_graft_every_family(fx, tmp_path, cli, name):
    out = tmp_path / "g"
    code, so, err = cli("graft", fx / name, "--target", "3L,d24,f8", "-o", out)
    assert code == 0, err
    assert so.strip() == str(out) and "every expert" in err
    model = _load(out)
    assert model.config.num_hidden_layers == 3 and model.config.hidden_size == 24
    assert model.config.intermediate_size == 8
    model(input_ids=torch.tensor([[1, 2, 3]]))


def test_one_shot_graft_bare_file_with_stats(fx, tmp_path, cli):
    bare = fx / "bare" / "olmoe.safetensors"
    code, _, err = cli("graft", bare, "--target", "2L", "-o", tmp_path / "g")
    assert_user_error(code, err, "--heads")
    # stats on the model directory apply to the bare copy of the same weights
    corpus = tmp_path / "c.txt"
    corpus.write_text("the law shall apply\n\nin the beginning god created")
    stats = tmp_path / "s.safetensors"
    assert cli("stats", fx / "olmoe", "-d", f"a={corpus}", "-d", f"b={corpus}", "-o", stats)[0] == 0
    code, _, err = cli("graft", bare, "--target", "2L", "--heads", "4", "--stats", stats, "-o", tmp_path / "g")
    assert code == 0, err
    _load(tmp_path / "g")


def test_inherit_attention_rules(fx, tmp_path, cli):
    code, _, err = cli("graft", fx / "olmoe", "-t", "2L", "-o", tmp_path / "a", "--inherit", "attention")
    assert_user_error(code, err, "full-width QK-norm")
    code, _, err = cli("graft", fx / "deepseek_v3", "-t", "2L", "-o", tmp_path / "b", "--inherit", "attention")
    assert_user_error(code, err, "latent attention")
    code, _, err = cli("graft", fx / "qwen3_moe", "-t", "2L", "-o", tmp_path / "c", "--inherit", "attention")
    assert_user_error(code, err, "--arch qwen3")
    code, _, err = cli("graft", fx / "qwen2_moe", "-t", "2L", "-o", tmp_path / "d", "--inherit", "attention,norms")
    assert code == 0, err
    model = _load(tmp_path / "d")
    ck = open_checkpoint(fx / "qwen2_moe")
    assert torch.equal(model.model.layers[1].self_attn.q_proj.bias, ck.tensor("model.layers.1.self_attn.q_proj.bias"))
    assert torch.equal(model.model.layers[0].self_attn.k_proj.weight, ck.tensor("model.layers.0.self_attn.k_proj.weight"))
    code, _, err = cli("graft", fx / "qwen3_moe", "-t", "2L", "-o", tmp_path / "e", "--inherit", "attention", "--arch", "qwen3")
    assert code == 0, err
    m = _load(tmp_path / "e")
    assert torch.equal(m.model.layers[1].self_attn.q_norm.weight, open_checkpoint(fx / "qwen3_moe").tensor(
        "model.layers.1.self_attn.q_norm.weight"))


@pytest.mark.parametrize("args,needle", [
    (["-t", "2Q"], "--target '2Q'"),
    (["-t", "2L,d64"], "hidden 64 is wider"),
    (["-t", "2L", "--inherit", "brains"], "'brains' is not one of"),
    (["-t", "2L", "--ffn-init", "zeros"], "--ffn-init"),
    ([], "--target is required"),
])
def test_graft_bad_input(fx, tmp_path, cli, args, needle):
    out = tmp_path / "g"
    code, _, err = cli("graft", fx / "mixtral", "-o", out, *args)
    assert_user_error(code, err, needle)
    assert not out.exists() and not list(tmp_path.glob(".g.tmp*"))


def test_graft_refuses_existing_output_and_input_as_output(fx, tmp_path, cli):
    out = tmp_path / "g"
    out.mkdir()
    code, _, err = cli("graft", fx / "mixtral", "-t", "2L", "-o", out)
    assert_user_error(code, err, "already exists", "--force")
    code, _, err = cli("graft", fx / "mixtral", "-t", "2L", "-o", fx / "mixtral")
    assert_user_error(code, err, "overwrite the input")


@pytest.mark.parametrize("dec,com", [(["--ranks", "8,full,2"], []), ([], []), ([], ["--combine", "uniform"])])
def test_one_shot_equals_step_by_step(fx, tmp_path, cli, dec, com):
    """The streamed one-shot graft gives exactly the weights of decompose -> reshape -> graft (at full
    ranks it collapses each layer straight from the aligned experts, without factors)."""
    ck = open_checkpoint(fx / "olmoe")
    sel = _selection(tmp_path, ck, [6, 1, 4])
    steps = [("decompose", fx / "olmoe", sel, "-o", tmp_path / "f.safetensors", *dec),
             ("reshape", tmp_path / "f.safetensors", "-t", "2L,d24,f12", "--layer-map", "merge", *com,
              "-o", tmp_path / "a.safetensors"),
             ("graft", tmp_path / "a.safetensors", "--seed", "3", "-o", tmp_path / "g1")]
    for s in steps:
        code, _, err = cli(*s)
        assert code == 0, err
    code, _, err = cli("graft", fx / "olmoe", "-t", "2L,d24,f12", "--layer-map", "merge", *dec, *com,
                       "--selection", sel, "--seed", "3", "-o", tmp_path / "g2")
    assert code == 0, err
    a, b = load_file(str(tmp_path / "g1" / "model.safetensors")), load_file(str(tmp_path / "g2" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_collapsed_layer_equals_the_factor_reconstruction(fx):
    """At full ranks the one-shot path's weighted sum of aligned experts is the Tucker reconstruction
    G x3 mix (tensorly's mode product) up to float rounding, for every combination it handles."""
    ck = open_checkpoint(fx / "olmoe")
    layer = {"layer": ck.moe_layers[0], "experts": [5, 0, 3, 7], "freq": {"a": [0.4, 0.1, 0.3, 0.2]}}
    t, _ = decompose.layer_factors(ck, layer, ["full", "full", "full"], None, True, False)
    i = layer["layer"]
    for how in ("usage", "uniform", "literal"):
        assert decompose.collapsible(["full", "full", "full"], False, how)
        ffn, errors = decompose.layer_ffn(ck, layer, True, lambda w: reshape.expert_mix(w, torch.eye(w.numel()), how))
        assert set(errors.values()) == {0.0}
        for k, m in enumerate(decompose.MATRICES):
            core, u3 = t[f"layers.{i}.{m}.core"], t[f"layers.{i}.{m}.U3"]
            ref = reconstruct(core, [torch.eye(core.shape[0]), torch.eye(core.shape[1]),
                                     reshape.expert_mix(t[f"layers.{i}.weights"], u3, how)[None]])[:, :, 0]
            assert torch.equal(ffn[k], reshape.combine_layer(t, i, how)[k])
            assert torch.allclose(ffn[k], ref, rtol=1e-6, atol=1e-7)
    assert not decompose.collapsible(["full", "full", 2], False, "usage")
    assert not decompose.collapsible(["full", "full", "full"], True, "usage")
    assert not decompose.collapsible(["full", "full", "full"], False, "first")


def test_joint_gram_in_chunks(monkeypatch):
    g = torch.Generator().manual_seed(4)
    experts = [(torch.randn(12, 20, generator=g), torch.randn(12, 20, generator=g), torch.randn(20, 12, generator=g))
               for _ in range(5)]
    whole = sum((x @ x.T).double() for x in (torch.stack([e[k].reshape(-1) for e in experts]) for k in range(3)))
    assert torch.allclose(decompose.joint_gram(experts), whole, rtol=1e-5, atol=1e-3)
    monkeypatch.setattr(decompose, "GRAM_CHUNK", 5 * 20 * 3)  # 3 rows per chunk, a short last one
    assert torch.allclose(decompose.joint_gram(experts), whole, rtol=1e-5, atol=1e-3)


# ---- options that do what they say (issue 20) --------------------------------------------------

def _doc(fx, tmp_path, ids, freq):
    ck = open_checkpoint(fx / "olmoe")
    doc = json.loads(_selection(tmp_path, ck, list(ids)).read_text())
    for l in doc["layers"]:
        l["freq"] = {"a": list(freq)}
    return ck, doc


def _scaled(ck, i, ids, scales):
    """The selected experts of layer i with each expert's weights multiplied by a distinct scale (distinct norms)."""
    return [tuple(m.float() * s for m in e) for e, s in zip(ck.experts(i, ids), scales)]


def test_per_matrix_energy_fraction_truncates_each_matrix_expert_mode(fx, tmp_path, monkeypatch):
    """`--weighting per-matrix --ranks full,full,F`: each matrix keeps the fewest expert components that hold a
    fraction F of its own stack's energy (computed here from numpy's SVD), not the full rank."""
    import numpy as np
    ids, scales = [0, 3, 5, 6], [3.0, 1.5, 1.0, 0.5]
    ck, doc = _doc(fx, tmp_path, ids, [0.25] * 4)
    monkeypatch.setattr(decompose, "read_layer", lambda ck_, l: _scaled(ck_, l["layer"], l["experts"], scales))
    t, _ = decompose.compute(ck, doc, "x", ranks="full,full,0.8", weighting="per-matrix", align_neurons=False)
    kept = []
    for k, m in enumerate(decompose.MATRICES):
        x = np.stack([e[k].numpy().reshape(-1) for e in _scaled(ck, 0, ids, scales)], axis=1)
        energy = np.linalg.svd(x, compute_uv=False) ** 2
        want = int(np.searchsorted(np.cumsum(energy) / energy.sum(), 0.8 - 1e-12) + 1)
        assert t[f"layers.0.{m}.U3"].shape == (4, want)
        kept.append(want)
    assert max(kept) < 4  # the fraction truncates here (it was silently the full rank)


def test_expert_weights_stay_bounded_when_u3_mixes_signs():
    """A truncated expert factor whose implied weights nearly cancel: |a_j| must not explode (it reached ~500x)."""
    theta = torch.tensor(torch.pi / 4 - 0.001)
    u3 = torch.stack([theta.cos(), -theta.sin()])[:, None]  # one component, opposite signs, almost equal size
    for how in ("usage", "uniform"):
        w = torch.tensor([0.6, 0.4])
        a = u3 @ reshape.expert_mix(w, u3, how)  # the weights on the experts
        assert float(a.abs().sum()) == pytest.approx(1.0, abs=1e-6)
        assert float(a.sum()) >= 0
    for n, seed in ((3, 0), (5, 1)):  # a full expert mode: exactly the usage weights, summing to 1
        w = torch.rand(n, generator=torch.Generator().manual_seed(seed))
        w = w / w.sum()
        assert torch.allclose(reshape.expert_mix(w, torch.eye(n), "usage"), w, atol=1e-7)


def test_rank_one_usage_equals_uniform_and_the_card_says_so(fx, tmp_path):
    ck, doc = _doc(fx, tmp_path, [0, 3, 5], [0.7, 0.2, 0.1])
    t, meta = decompose.compute(ck, doc, "x", ranks="full,full,1")
    outs = {how: reshape.compute(t, meta, Target(2), combine=how) for how in ("usage", "uniform")}
    for k in outs["usage"][0]:
        assert torch.allclose(outs["usage"][0][k].float(), outs["uniform"][0][k].float(), rtol=1e-5, atol=1e-7)
    assert all(any("usage and uniform give the same FFN" in n for n in o[1]["notes"]) for o in outs.values())
    t, meta = decompose.compute(ck, doc, "x", ranks="full,full,2")  # rank 2: c matters, no note
    a, b = (reshape.compute(t, meta, Target(2), combine=how) for how in ("usage", "uniform"))
    assert not torch.allclose(a[0]["layers.0.gate_proj"], b[0]["layers.0.gate_proj"])
    assert not any("same FFN" in n for n in a[1]["notes"])


def test_combine_first_at_full_ranks_is_the_principal_component(fx, tmp_path, monkeypatch):
    """`first` at full ranks: mean(v) * sum_j v_j X_j with v the leading eigenvector of the experts' joint Gram
    (computed here with numpy), not expert 0 divided by n."""
    import numpy as np
    ids, scales = [0, 3, 5], [0.5, 3.0, 1.0]  # expert 3 dominates: the principal component leans on it
    ck, doc = _doc(fx, tmp_path, ids, [1 / 3] * 3)
    monkeypatch.setattr(decompose, "read_layer", lambda ck_, l: _scaled(ck_, l["layer"], l["experts"], scales))
    t, meta = decompose.compute(ck, doc, "x", align_neurons=False)
    out, _ = reshape.compute(t, meta, Target(2, None, None), combine="first", rescale="none")
    ex = _scaled(ck, 0, ids, scales)
    flat = np.stack([np.concatenate([e[k].numpy().ravel() for k in range(3)]) for e in ex])
    v = np.linalg.eigh(flat @ flat.T)[1][:, -1]
    for k, m in enumerate(("gate_proj", "up_proj", "down_proj")):
        want = v.mean() * sum(vj * e[k].numpy() for vj, e in zip(v, ex))
        assert np.allclose(out[f"layers.0.{m}"].numpy(), want, atol=1e-5)
        assert not torch.allclose(out[f"layers.0.{m}"], ex[0][k] / 3, atol=1e-3)


def test_no_tucker_uniform_is_the_plain_mean(fx, tmp_path):
    ck, doc = _doc(fx, tmp_path, [0, 3], [0.9, 0.1])
    t, meta = decompose.compute(ck, doc, "x", no_tucker=True, align_neurons=False)
    e0, e3 = ck.experts(0, [0, 3])
    out = {how: reshape.compute(t, meta, Target(2), combine=how, rescale="none")[0] for how in ("usage", "uniform")}
    assert torch.allclose(out["uniform"]["layers.0.gate_proj"], (e0[0].float() + e3[0].float()) / 2, atol=1e-6)
    assert torch.allclose(out["usage"]["layers.0.gate_proj"], 0.9 * e0[0].float() + 0.1 * e3[0].float(), atol=1e-6)


def _card_params(out):
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        return json.loads(f.metadata()["xpertctl"])["params"]


def test_graft_card_records_the_options_applied(fx, tmp_path, cli):
    src = fx / "olmoe"
    ck = open_checkpoint(src)
    code, _, err = cli("graft", src, "-t", "2L", "-o", tmp_path / "all")  # no stats: every expert, nothing to rescale
    assert code == 0, err
    p = _card_params(tmp_path / "all")
    assert (p["criterion"], p["per_layer"], p["rescale"]) == ("all", ck.num_experts, "none")
    sel = _selection(tmp_path, ck, [6, 1])
    steps = [("decompose", src, sel, "-o", tmp_path / "f.safetensors", "--ranks", "full,full,1", "--no-align"),
             ("reshape", tmp_path / "f.safetensors", "-t", "2L", "--combine", "uniform", "--layer-map", "first",
              "-o", tmp_path / "a.safetensors"),
             ("graft", tmp_path / "a.safetensors", "-o", tmp_path / "g")]
    for s in steps:
        code, _, err = cli(*s)
        assert code == 0, err
    p = _card_params(tmp_path / "g")
    assert (p["ranks"], p["align"], p["combine"], p["layer_map"], p["criterion"]) == \
        ("full,full,1", False, "uniform", "first", "test")
    # options of the steps an adapted file already went through are refused, not silently ignored
    for opt in (["--combine", "first"], ["--no-align"], ["--ranks", "full,full,2"], ["--stats", sel]):
        code, _, err = cli("graft", tmp_path / "a.safetensors", *opt, "-o", tmp_path / "x")
        assert_user_error(code, err, "already consolidated", opt[0].split("/")[0] if opt[0] != "--no-align" else "--align")
        assert not (tmp_path / "x").exists()


def test_fit_with_scratch_ffns_is_refused(fx, tmp_path, cli):
    text = tmp_path / "t.txt"
    text.write_text("the law shall apply")
    code, _, err = cli("graft", fx / "olmoe", "-t", "2L", "--fit", "down", "--calibration", f"a={text}",
                       "--ffn-init", "scratch", "-o", tmp_path / "g")
    assert_user_error(code, err, "--fit down", "--ffn-init scratch")
    assert not (tmp_path / "g").exists()


def test_shared_concat_step_by_step_equals_one_shot(fx, tmp_path, cli):
    src = fx / "qwen2_moe"
    ck = open_checkpoint(src)
    sel = _selection(tmp_path, ck, [6, 1, 4])
    steps = [("decompose", src, sel, "-o", tmp_path / "f.safetensors"),
             ("reshape", tmp_path / "f.safetensors", "-t", "2L,d24,f30", "--shared", "concat", "-o", tmp_path / "a.safetensors"),
             ("graft", tmp_path / "a.safetensors", "--seed", "3", "-o", tmp_path / "g1")]
    for s in steps:
        code, _, err = cli(*s)
        assert code == 0, err
    code, _, err = cli("graft", src, "-t", "2L,d24,f30", "--shared", "concat", "--selection", sel, "--seed", "3",
                       "-o", tmp_path / "g2")
    assert code == 0, err
    a, b = load_file(str(tmp_path / "g1" / "model.safetensors")), load_file(str(tmp_path / "g2" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    code, _, err = cli("graft", src, "-t", "2L", "--selection", sel, "-o", tmp_path / "g3")  # --shared none says so
    assert code == 0 and "shared experts" in err and "--shared concat" in err


def test_scratch_graft_card_records_no_consolidation_options(fx, tmp_path, cli):
    """A scratch baseline's FFNs are fresh: the selection, ranks, combine and rescale were never applied, and
    its card must not say they were (it recorded graft's defaults: criterion, rescale 'routed', ...)."""
    src = fx / "olmoe"
    ck = open_checkpoint(src)
    sel = _selection(tmp_path, ck, [6, 1])
    code, _, err = cli("graft", src, "-t", "2L", "--selection", sel, "--ffn-init", "scratch", "--combine", "uniform",
                       "--rescale", "selected", "-o", tmp_path / "s")
    assert code == 0, err
    p = _card_params(tmp_path / "s")
    assert p["ffn_init"] == "scratch"
    for k in ("criterion", "per_layer", "ranks", "align", "weighting", "combine", "rescale", "width_select", "shared",
              "align_sweeps"):
        assert p[k] is None, (k, p[k])
    assert p["layer_map"] == "uniform"  # still decides which source layer an --inherit'ed weight comes from
    card = (tmp_path / "s" / "README.md").read_text()
    assert "| selection | not used" in card
    # the xpert graft of the same command records them as applied
    code, _, err = cli("graft", src, "-t", "2L", "--selection", sel, "--combine", "uniform", "-o", tmp_path / "x")
    assert code == 0, err
    assert (_card_params(tmp_path / "x")["combine"], _card_params(tmp_path / "x")["criterion"]) == ("uniform", "test")


def _graft_variants(cli, tmp_path, variants: dict) -> dict:
    """{name: graft arguments} -> {name: output directory}, each graft asserted to succeed."""
    outs = {}
    for name, args in variants.items():
        outs[name] = tmp_path / name
        code, _, err = cli("graft", *args, "-o", outs[name])
        assert code == 0, err
    return outs


def test_full_width_scratch_graft_does_not_consolidate(fx, tmp_path, cli, monkeypatch):
    """At the source's width a scratch baseline's FFNs are fresh and its residual dims are all of them, so the
    consolidation (~37 s on an OLMoE-1B-7B-shaped source) was computed and thrown away. The model must be the
    same fresh transformers model, seeded, with the attention inherited unchanged; a selection from another
    model is still refused."""
    src = fx / "mixtral"
    ck = open_checkpoint(src)
    sel = _selection(tmp_path, ck, [1, 0])

    def no_consolidation(*a, **k):
        raise AssertionError("the scratch graft consolidated the experts")
    monkeypatch.setattr(decompose, "compute", no_consolidation)
    code, _, err = cli("graft", src, "-t", "2L", "--selection", sel, "--ffn-init", "scratch", "--inherit", "attention",
                       "--seed", "3", "-o", tmp_path / "s")
    assert code == 0, err
    got = load_file(str(tmp_path / "s" / "model.safetensors"))
    cfg = tf.AutoConfig.from_pretrained(tmp_path / "s")
    torch.manual_seed(3)  # graft's fresh init: the seeded transformers model in the output dtype
    fresh = tf.LlamaForCausalLM._from_config(cfg, dtype=cfg.dtype).state_dict()
    lmap = _card_params(tmp_path / "s")  # layer map recorded; the attention comes from its first source layer
    layers = provenance.read(tmp_path / "s" / "model.safetensors", "grafted")["layer_map"]
    assert lmap["ffn_init"] == "scratch" and len(layers) == 2
    for k, v in got.items():
        if ".self_attn." in k:
            t = int(k.split(".")[2])
            want = ck.tensor(k.replace(f"layers.{t}.", f"layers.{layers[t][0]}.")).to(v.dtype)
        else:
            want = fresh[k].to(v.dtype)
        assert torch.equal(v, want), k
    other = fx / "olmoe"
    code, _, err = cli("graft", other, "-t", "2L", "--selection", sel, "--ffn-init", "scratch", "-o", tmp_path / "o")
    assert code == 2 and not (tmp_path / "o").exists(), err


def test_narrow_scratch_graft_inherits_the_xpert_arms_residual_dims(fx, tmp_path, cli):
    """Narrower than the source, the inherited weights are sliced to the residual dims the consolidated FFNs
    chose: the scratch baseline must slice the same ones as the XPERT graft it is compared with."""
    src = fx / "olmoe"
    ck = open_checkpoint(src)
    sel = _selection(tmp_path, ck, [6, 1])
    outs = _graft_variants(cli, tmp_path, {init: [src, "-t", "2L,d24", "--selection", sel, "--ffn-init", init,
                                                  "--inherit", "embeddings"] for init in ("xpert", "scratch")})
    a, b = (load_file(str(outs[i] / "model.safetensors")) for i in ("xpert", "scratch"))
    full = ck.tensor("model.embed_tokens.weight")
    assert torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert not torch.equal(b["model.embed_tokens.weight"], full[:, :24].to(b["model.embed_tokens.weight"].dtype))


def test_energy_fraction_that_keeps_one_expert_component_says_usage_equals_uniform(fx, tmp_path, cli):
    """`--ranks full,full,0.2` keeps one expert-mode component (the first alone carries >= 1/3 of the energy of
    three experts): as at rank 1, usage and uniform give the same FFN, and the note must say so there too."""
    ck, doc = _doc(fx, tmp_path, [0, 3, 5], [0.7, 0.2, 0.1])
    t, meta = decompose.compute(ck, doc, "x", ranks="full,full,0.2")
    assert all(t[f"layers.{i}.{m}.U3"].shape[1] == 1 for i in ck.moe_layers for m in decompose.MATRICES)
    outs = {how: reshape.compute(t, meta, Target(2), combine=how) for how in ("usage", "uniform")}
    for k in outs["usage"][0]:
        assert torch.allclose(outs["usage"][0][k].float(), outs["uniform"][0][k].float(), rtol=1e-5, atol=1e-7)
    assert all(any("usage and uniform give the same FFN" in n for n in o[1]["notes"]) for o in outs.values())
    t, meta = decompose.compute(ck, doc, "x", ranks="full,full,0.999")  # several components: c matters, no note
    assert not any("same FFN" in n for n in reshape.compute(t, meta, Target(2))[1]["notes"])
    sel = tmp_path / "sel.json"
    sel.write_text(json.dumps(doc))
    code, _, err = cli("graft", fx / "olmoe", "-t", "2L", "--selection", sel, "--ranks", "full,full,0.2",
                       "-o", tmp_path / "g")
    assert code == 0 and "usage and uniform give the same FFN" in err, err


def _swiglu(w, t, x):
    g, u, d = (w[f"model.layers.{t}.mlp.{m}_proj.weight"].double() for m in ("gate", "up", "down"))
    return (torch.nn.functional.silu(x @ g.T) * (x @ u.T)) @ d.T


@pytest.mark.parametrize("init", ["xpert", "scratch", "norm-matched"])
def test_up_gain_moves_the_scale_from_down_to_up_and_keeps_the_function(fx, tmp_path, cli, init):
    """`--up-gain K`: up rows times K, down columns divided by K (silu(g x) * (K u x) / K: the same function,
    computed here directly), for every FFN init; norm-matched takes the gained rows' norms; recorded."""
    src = fx / "mixtral"
    ck = open_checkpoint(src)
    sel = _selection(tmp_path, ck, [1, 0])
    outs = _graft_variants(cli, tmp_path, {k: [src, "-t", "2L", "--selection", sel, "--ffn-init", init, "--up-gain", k,
                                               "--dtype", "float32", "--seed", "5"] for k in ("1", "4")})
    a, b = (load_file(str(outs[k] / "model.safetensors")) for k in ("1", "4"))
    x = torch.randn(64, ck.hidden, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for key in a:
        if ".mlp." not in key:
            assert torch.equal(a[key], b[key]), key
    for t in range(2):
        if init == "norm-matched":  # fresh rows: the norms follow the gain, not the weights
            for m, f in (("up", 4.0), ("down", 0.25), ("gate", 1.0)):
                ka = f"model.layers.{t}.mlp.{m}_proj.weight"
                ra, rb = a[ka].norm(dim=1), b[ka].norm(dim=1)
                assert torch.allclose(rb, f * ra, rtol=1e-4), (t, m)
            continue
        assert torch.allclose(b[f"model.layers.{t}.mlp.up_proj.weight"], 4 * a[f"model.layers.{t}.mlp.up_proj.weight"])
        assert torch.allclose(b[f"model.layers.{t}.mlp.down_proj.weight"], a[f"model.layers.{t}.mlp.down_proj.weight"] / 4)
        assert torch.allclose(_swiglu(a, t, x), _swiglu(b, t, x), rtol=1e-5, atol=1e-9)
    assert _card_params(outs["4"])["up_gain"] == 4.0 and _card_params(outs["1"])["up_gain"] == 1.0


@pytest.mark.parametrize("bad", ["0", "-2", "nan"])
def test_up_gain_must_be_positive(fx, tmp_path, cli, bad):
    code, _, err = cli("graft", fx / "mixtral", "-t", "2L", "--up-gain", bad, "-o", tmp_path / "g")
    assert_user_error(code, err, "--up-gain")
    assert not (tmp_path / "g").exists()


def test_full_width_scratch_graft_still_checks_the_ranks(fx, tmp_path, cli):
    """The scratch arm skips the consolidation, not the checks: --ranks that the XPERT arm beside it refuses
    are refused here too (a recipe grid must not finish one arm and fail the other on the same options)."""
    for init in ("xpert", "scratch"):
        code, _, err = cli("graft", fx / "mixtral", "-t", "2L", "--ranks", "full,full,99", "--ffn-init", init,
                           "-o", tmp_path / init)
        assert_user_error(code, err, "--ranks")
        assert not (tmp_path / init).exists()


def test_up_gain_that_overflows_the_output_dtype_is_refused(fx, tmp_path, cli):
    """float16 holds neither 0.02 * 1e-7 nor 0.02 / 1e-7: the 'same function' would be zeros and infinities."""
    code, _, err = cli("graft", fx / "mixtral", "-t", "2L", "--ffn-init", "scratch", "--up-gain", "1e-7",
                       "--dtype", "float16", "-o", tmp_path / "g")
    assert_user_error(code, err, "--up-gain", "float16")
    assert not (tmp_path / "g").exists()
