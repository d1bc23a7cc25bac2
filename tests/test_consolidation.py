"""Consolidation that transfers, judged by function on distinct experts; fidelity and the data-aware fit
against independent computations with transformers' own modules."""
import json

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import assert_user_error, make_fixtures

H, I, E, LAYERS = 32, 16, 6, 3
TEXT = make_fixtures.TEXT  # one window of --seq-len 128: no windowing in the comparisons


def swiglu(x, g, u, d):
    """The oracle FFN, written out here (not imported from the code under test)."""
    return (F.silu(x @ g.T) * (x @ u.T)) @ d.T


def build_moe(out, *, kind: str, noise: float = 0.05, seed: int = 0):
    """A tiny OLMoE whose experts are noisy copies of one common expert per layer (`copies`), the same
    with each copy's neurons shuffled (`shuffled`), or independent experts (`independent`)."""
    cfg = tf.OlmoeConfig(vocab_size=make_fixtures.VOCAB, hidden_size=H, intermediate_size=I, num_experts=E,
                         num_experts_per_tok=2, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    torch.manual_seed(seed)
    model = tf.OlmoeForCausalLM(cfg)
    make_fixtures._init(model, seed)
    g = torch.Generator().manual_seed(seed + 100)
    commons = []
    with torch.no_grad():
        for layer in model.model.layers:
            common = (torch.randn(I, H, generator=g) * 0.3, torch.randn(I, H, generator=g) * 0.3,
                      torch.randn(H, I, generator=g) * 0.3)
            commons.append(common)
            gu, dn = [], []
            for _ in range(E):
                if kind == "independent":
                    e = tuple(torch.randn(m.shape, generator=g) * 0.3 for m in common)
                else:
                    e = tuple(m + noise * torch.randn(m.shape, generator=g) for m in common)
                if kind == "shuffled":
                    p = torch.randperm(I, generator=g)
                    e = (e[0][p], e[1][p], e[2][:, p])
                gu.append(torch.cat([e[0], e[1]]))
                dn.append(e[2])
            layer.mlp.experts.gate_up_proj.copy_(torch.stack(gu))
            layer.mlp.experts.down_proj.copy_(torch.stack(dn))
    model.save_pretrained(out)
    make_fixtures.make_tokenizer().save_pretrained(out)
    return model.eval(), commons


def experts_of(model, layer):
    """(gate, up, down) of every expert, read from transformers' own parameters."""
    ex = model.model.layers[layer].mlp.experts
    return [(ex.gate_up_proj[j, :I], ex.gate_up_proj[j, I:], ex.down_proj[j]) for j in range(E)]


def rel_fn(a, b, seed=0):
    """Relative L2 distance between two FFNs' outputs on random inputs."""
    x = torch.randn(512, H, generator=torch.Generator().manual_seed(seed))
    ya, yb = swiglu(x, *a), swiglu(x, *b)
    return float((ya - yb).norm() / yb.norm())


def student_ffns(path, n):
    w = {}
    for f in path.glob("*.safetensors"):
        w.update(load_file(str(f)))
    return [tuple(w[f"model.layers.{t}.mlp.{m}.weight"].float() for m in ("gate_proj", "up_proj", "down_proj"))
            for t in range(n)]


@pytest.fixture(scope="module")
def moes(tmp_path_factory):
    root = tmp_path_factory.mktemp("moes")
    return {k: (root / k, *build_moe(root / k, kind=k, seed=n)) for n, k in enumerate(("copies", "shuffled", "independent"))}


@pytest.mark.parametrize("kind", ["shuffled", "copies"])
def test_default_one_shot_graft_recovers_the_common_expert(moes, tmp_path, cli, kind):
    src, model, commons = moes[kind]
    out = tmp_path / "g"
    code, _, err = cli("graft", src, "--target", f"{LAYERS}L", "--dtype", "float32", "-o", out)
    assert code == 0, err
    got = student_ffns(out, LAYERS)
    for t in range(LAYERS):
        # a single noisy copy's error (a shuffled copy computes the same function as unshuffled)
        one_copy = min(rel_fn(e, commons[t]) for e in experts_of(model, t))
        err_t = rel_fn(got[t], commons[t])
        # averaging six aligned copies beats any single copy (the noise averages out)
        assert err_t < 0.8 * one_copy, (t, err_t, one_copy)
    if kind == "shuffled":  # and the literal reading (unaligned) mixes unrelated neurons: far off
        lit = tmp_path / "lit"
        code, _, err = cli("graft", src, "--target", f"{LAYERS}L", "--dtype", "float32", "--no-align",
                           "--weighting", "per-matrix", "--ranks", "full,full,1", "--combine", "literal", "-o", lit)
        assert code == 0, err
        assert all(rel_fn(f, commons[t]) > 0.7 for t, f in enumerate(student_ffns(lit, LAYERS)))


def _selection(path, src, ids, freq):
    from xpertctl.io import open_checkpoint
    ck = open_checkpoint(src)
    doc = {"criterion": "test", "per_layer": len(ids), "source": ck.fingerprint, "num_experts": E,
           "layers": [{"layer": i, "experts": ids, "freq": {"a": freq, "b": freq}} for i in range(LAYERS)]}
    path.write_text(json.dumps(doc))
    return path


def _features(e):
    """One row per neuron: its gate row, up row and down column together."""
    return torch.cat([e[0], e[1], e[2].T], dim=1)


def test_aligned_sum_of_independent_experts_moves_whole_neurons(moes, tmp_path, cli):
    """Full ranks, aligned: every neuron of the FFN is sum_j c_j (neuron p_j(r) of expert j) with the usage
    weights c, the same p_j for gate row, up row and down column, each p_j a permutation. The p_j are recovered
    here from the FFN itself (largest projection on each expert's neurons), not taken from the code."""
    src, model, _ = moes["independent"]
    ids, freq = [4, 1, 3], [0.5, 0.3, 0.2]
    c = torch.tensor(freq) / sum(freq)
    sel = _selection(tmp_path / "sel.json", src, ids, freq)
    g = tmp_path / "g"
    assert cli("graft", src, "-t", f"{LAYERS}L", "--selection", sel, "--dtype", "float32", "-o", g)[0] == 0
    for t, f in enumerate(student_ffns(g, LAYERS)):
        ex = [tuple(m.detach() for m in experts_of(model, t)[j]) for j in ids]
        feats = [_features(e) for e in ex]
        got = _features(f)
        want = torch.zeros_like(got)
        for n, fe in enumerate(feats):
            p = (got @ fe.T / (fe * fe).sum(1)).argmax(1)  # which neuron of expert n each FFN neuron holds
            assert sorted(p.tolist()) == list(range(I)), (t, n)  # a permutation: whole neurons, none twice
            want += c[n] * fe[p]
        assert torch.allclose(got, want, atol=1e-5), t


def test_joint_rank_one_is_one_weighting_for_gate_up_down(moes, tmp_path, cli):
    """Unaligned, expert rank 1: with `joint` the weights on the experts (recovered per matrix by least squares)
    are the same for gate, up and down and proportional to the leading eigenvector of the experts' joint Gram
    (numpy); the literal `per-matrix` reading gives each matrix its own weights."""
    import numpy as np
    src, model, _ = moes["independent"]
    ids, freq = [4, 1, 3], [0.5, 0.3, 0.2]
    sel = _selection(tmp_path / "sel.json", src, ids, freq)
    got = {}
    for w in ("joint", "per-matrix"):
        g = tmp_path / w
        code, _, err = cli("graft", src, "-t", f"{LAYERS}L", "--selection", sel, "--no-align", "--ranks", "full,full,1",
                           "--weighting", w, "--rescale", "none", "--dtype", "float32", "-o", g)
        assert code == 0, err
        got[w] = student_ffns(g, LAYERS)
    differs = False
    for t in range(LAYERS):
        ex = [tuple(m.detach().double().numpy() for m in experts_of(model, t)[j]) for j in ids]
        flat = np.stack([np.concatenate([m.ravel() for m in e]) for e in ex])
        v = np.linalg.eigh(flat @ flat.T)[1][:, -1]
        weights = {}
        for w, ffns in got.items():
            weights[w] = [np.linalg.lstsq(np.stack([e[k].ravel() for e in ex], 1), ffns[t][k].double().numpy().ravel(),
                                          rcond=None)[0] for k in range(3)]
        a = weights["joint"]
        assert np.allclose(a[0], a[1], atol=1e-5) and np.allclose(a[0], a[2], atol=1e-5)
        assert abs(abs(float(a[0] @ v)) / np.linalg.norm(a[0]) - 1) < 1e-5  # along the principal component
        assert np.abs(a[0]).sum() == pytest.approx(1, abs=1e-4) and a[0].sum() > 0  # sum |a| = 1, positive sum
        pm = weights["per-matrix"]
        differs |= not (np.allclose(np.abs(pm[0]), np.abs(pm[2]), atol=1e-3))
    assert differs


def _own_capture(model, ids, layers):
    """The MoE blocks' inputs, captured with this test's own hooks; outputs from transformers' own block."""
    xs = {}
    hooks = [model.model.layers[i].mlp.register_forward_pre_hook(
        lambda mod, args, i=i: xs.__setitem__(i, args[0].reshape(-1, H).clone())) for i in layers]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        ys = {i: model.model.layers[i].mlp(xs[i][None]).reshape(-1, H) for i in layers}
    return xs, ys


def _ids(src, text):
    tok = tf.AutoTokenizer.from_pretrained(str(src))
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return torch.tensor([ids])


def test_fidelity_matches_an_independent_computation(moes, tmp_path, cli):
    src, model, _ = moes["independent"]
    sel = _selection(tmp_path / "sel.json", src, [0, 2], [0.4, 0.6])
    g = tmp_path / "g"
    assert cli("graft", src, "-t", "2L,d24,f12", "--selection", sel, "--dtype", "float32", "-o", g)[0] == 0
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    ids = _ids(src, TEXT)
    assert ids.shape[1] <= 128
    out = tmp_path / "fid.json"
    code, so, err = cli("fidelity", src, g, "-d", f"a={text}", "--seq-len", "128", "-o", out)
    assert code == 0, err
    assert so.strip() == str(out)
    doc = json.loads(out.read_text())
    student = tf.AutoModelForCausalLM.from_pretrained(str(g), dtype=torch.float32)
    with safe_open(str(g / "model.safetensors"), "pt") as f:
        rec = json.loads(f.metadata()["xpertctl"])
    ri = torch.tensor(rec["residual_index"])
    xs, ys = _own_capture(model.float(), ids, range(LAYERS))
    for row, group in zip(doc["layers"], rec["layer_map"]):
        mlp = student.model.layers[row["target"]].mlp
        with torch.no_grad():
            s = torch.cat([mlp(xs[i][:, ri]) for i in group])
        y = torch.cat([ys[i][:, ri] for i in group])
        assert row["sources"] == group
        assert row["rel_error"] == pytest.approx(float((s - y).norm() / y.norm()), rel=1e-4)
        assert row["cosine"] == pytest.approx(float((s * y).sum() / (s.norm() * y.norm())), rel=1e-4, abs=1e-6)
        assert row["scale"] == pytest.approx(float((s * y).sum() / (s * s).sum()), rel=1e-4, abs=1e-6)
        assert row["references"]["zero"]["rel_error"] == 1.0
        assert 0.9 < row["references"]["scratch"]["rel_error"] < 1.2
        assert row["tokens"] == ids.shape[1] * len(group)
        # the selected experts' routed mixture, from the router's weight (softmax, top-2, OLMoE: not renormalized)
        parts = []
        for i in group:
            x = xs[i]
            top = (x @ model.model.layers[i].mlp.gate.weight.T).softmax(-1).topk(2, dim=-1)
            mix = torch.zeros_like(x)
            for j in (0, 2):
                w = (top.values * (top.indices == j)).sum(-1, keepdim=True)
                mix += w * swiglu(x, *(m.detach() for m in experts_of(model, i)[j]))
            parts.append(mix[:, ri])
        m = torch.cat(parts).detach()
        ref = row["references"]["selected_mixture"]
        assert ref["rel_error"] == pytest.approx(float((m - y).norm() / y.norm()), rel=1e-4)
        assert ref["cosine"] == pytest.approx(float((m * y).sum() / (m.norm() * y.norm())), rel=1e-4, abs=1e-6)


def test_stats_record_routing_weights_and_rescale_uses_them(moes, tmp_path, cli):
    """routed = the top-k softmax weights the router gave (OLMoE: not renormalized), per expert. --rescale routed
    multiplies each down projection by the block's whole top-k weight per token; --rescale selected (the default)
    by the mean weight per token the *selected* experts receive (both from the router's own logits here)."""
    src, model, _ = moes["independent"]
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    st = tmp_path / "s.safetensors"
    assert cli("stats", src, "-d", f"a={text}", "--seq-len", "128", "-o", st)[0] == 0
    ids = _ids(src, TEXT)
    with torch.no_grad():
        logits = model(input_ids=ids, output_router_logits=True).router_logits
    s = load_file(str(st))
    for n, lg in enumerate(logits):
        top = lg.float().softmax(-1).topk(2, dim=-1).values.sum(-1)  # per token
        assert float(s["routed"][0, n].sum()) == pytest.approx(float(top.sum()), rel=1e-4)
    sel = tmp_path / "sel.json"
    assert cli("select", st, "-o", sel)[0] == 0
    doc = json.loads(sel.read_text())
    outs = {}
    for r in ("default", "selected", "routed", "none"):
        outs[r] = tmp_path / f"g-{r}"
        assert cli("graft", src, "-t", f"{LAYERS}L", "--selection", sel, "--dtype", "float32", "-o", outs[r],
                   *([] if r == "default" else ["--rescale", r]))[0] == 0
    got = {r: student_ffns(o, LAYERS) for r, o in outs.items()}
    for t, lg in enumerate(logits):
        probs = lg.float().softmax(-1)
        top = probs.topk(2, dim=-1)
        mass = float(top.values.sum()) / ids.shape[1]
        chosen = doc["layers"][t]["experts"]
        share = sum(float(top.values[top.indices == j].sum()) for j in chosen) / ids.shape[1]
        assert 0 < share < mass < 1
        none = got["none"][t]
        assert torch.allclose(got["routed"][t][2], none[2] * mass, atol=1e-6, rtol=1e-4)
        assert torch.allclose(got["selected"][t][2], none[2] * share, atol=1e-6, rtol=1e-4)
        assert torch.equal(got["default"][t][2], got["selected"][t][2])
        assert all(torch.equal(got[r][t][k], none[k]) for r in got for k in (0, 1))  # gate, up untouched


def _stats_with_routed(tmp_path, src, routed, top_k=2):
    """A stats file for `src` with the given per-(layer, expert) routing weight sums (one domain, 100 tokens)."""
    from safetensors.torch import save_file
    from xpertctl.io import open_checkpoint, provenance
    ck = open_checkpoint(src)
    counts = torch.full((1, LAYERS, E), 30, dtype=torch.int64)
    counts[0, :, 1] = 60  # expert 1 the most used everywhere
    rec = provenance.record("stats", [], {}, source=ck.fingerprint, family="olmoe", top_k=top_k, num_experts=E,
                            layers=list(range(LAYERS)), domains=["a"])
    p = tmp_path / f"s{top_k}.safetensors"
    save_file({"counts": counts, "mass": counts.float(), "tokens": torch.tensor([100]), "layers": torch.arange(LAYERS),
               "routed": torch.tensor(routed, dtype=torch.float32).expand(1, LAYERS, E).contiguous()}, str(p),
              metadata={"format": "pt", **provenance.as_metadata(rec)})
    return p


def test_zero_routed_mass_leaves_the_ffns_unscaled_and_says_so(moes, tmp_path, cli):
    """A router that returns no weights records routed = 0: that is 'unknown', not 'scale by zero'."""
    src, _, _ = moes["independent"]
    st = _stats_with_routed(tmp_path, src, [0.0] * E)
    outs = {}
    for r in ("selected", "routed", "none"):
        outs[r] = tmp_path / r
        code, _, err = cli("graft", src, "-t", f"{LAYERS}L", "--stats", st, "--rescale", r, "--dtype", "float32",
                           "-o", outs[r])
        assert code == 0, err
        if r != "none":
            assert "no routing weights" in err and "experts' scale" in err
            # the stats were given: the reason is their zero routing weight, not a selection without stats
            assert "without stats" not in err and "routing weight of 0" in err, err
    ffns = {r: student_ffns(o, LAYERS) for r, o in outs.items()}
    for t in range(LAYERS):
        assert float(ffns["selected"][t][2].norm()) > 0
        assert torch.equal(ffns["selected"][t][2], ffns["none"][t][2])
        assert torch.equal(ffns["routed"][t][2], ffns["none"][t][2])


def test_stats_counted_with_another_top_k_do_not_scale(moes, tmp_path, cli):
    """`stats --top-k 3` on a top-2 model: its routing weights are of three experts; the model routes with two."""
    src, _, _ = moes["independent"]
    routed = [5.0 + j for j in range(E)]
    outs = {}
    for k in (2, 3):
        outs[k] = tmp_path / f"k{k}"
        code, _, err = cli("graft", src, "-t", f"{LAYERS}L", "--stats", _stats_with_routed(tmp_path, src, routed, k),
                           "--dtype", "float32", "-o", outs[k])
        assert code == 0, err
        assert ("top-k 3" in err and "routes with 2" in err) == (k == 3)
    none = tmp_path / "none"
    assert cli("graft", src, "-t", f"{LAYERS}L", "--stats", _stats_with_routed(tmp_path, src, routed, 3),
               "--rescale", "none", "--dtype", "float32", "-o", none)[0] == 0
    k2, k3, n = (student_ffns(o, LAYERS) for o in (outs[2], outs[3], none))
    for t in range(LAYERS):
        assert torch.equal(k3[t][2], n[t][2])
        assert not torch.allclose(k2[t][2], n[t][2])


def test_norm_matched_control_keeps_row_norms_not_content(moes, tmp_path, cli):
    src, _, _ = moes["independent"]
    sel = _selection(tmp_path / "sel.json", src, [0, 2], [0.4, 0.6])
    outs = {}
    for init in ("xpert", "norm-matched", "scratch"):
        outs[init] = tmp_path / init
        assert cli("graft", src, "-t", "2L", "--selection", sel, "--ffn-init", init, "--dtype", "float32",
                   "-o", outs[init])[0] == 0
    x, nm = (load_file(str(outs[k] / "model.safetensors")) for k in ("xpert", "norm-matched"))
    scratch = load_file(str(outs["scratch"] / "model.safetensors"))
    for k in x:
        if ".mlp." in k:
            assert torch.allclose(x[k].norm(dim=1), nm[k].norm(dim=1), rtol=1e-5)
            cos = float((x[k] * nm[k]).sum() / (x[k].norm() * nm[k].norm()))
            assert abs(cos) < 0.3 and not torch.equal(nm[k], scratch[k])
        else:
            assert torch.equal(x[k], nm[k])  # everything but the FFN is the same fresh init


@pytest.mark.parametrize("args,needle", [
    (["--fit", "down"], "--calibration"),
    (["--calibration", "a=x.txt"], "--fit down"),
    (["--fit", "all"], "--fit"),
    (["--weighting", "both"], "--weighting"),
    (["--rescale", "max"], "--rescale"),
    (["--combine", "mean"], "--combine"),
    (["--ranks", "full,0.5,1"], "--ranks"),
])
def test_consolidation_options_refuse_bad_values(moes, tmp_path, cli, args, needle):
    src, _, _ = moes["independent"]
    out = tmp_path / "o"
    code, _, err = cli("graft", src, "-t", "2L", *args, "-o", out)
    assert_user_error(code, err, needle)
    assert not out.exists()


def test_fidelity_refuses_what_it_cannot_compare(fx, moes, tmp_path, cli):
    src, _, _ = moes["independent"]
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out = tmp_path / "f.json"
    code, _, err = cli("fidelity", src, fx / "llama", "-d", f"a={text}", "-o", out)
    assert_user_error(code, err, "provenance")
    code, _, err = cli("fidelity", src, src, "-d", f"a={text}", "-o", out)
    assert_user_error(code, err, "MoE checkpoint")
    assert not out.exists()


def _all_experts_selection(path, src):
    from xpertctl.io import open_checkpoint
    ck = open_checkpoint(src)
    doc = {"criterion": "test", "per_layer": ck.num_experts, "source": ck.fingerprint, "num_experts": ck.num_experts,
           "layers": [{"layer": i, "experts": list(range(ck.num_experts))} for i in ck.moe_layers]}
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "deepseek_v2"])
def test_selected_mixture_of_every_expert_is_the_block_itself(fx, tmp_path, cli, family):
    """With every expert selected, the 'selected mixture' reference must be the MoE block's own output
    (transformers' module computes y): shared experts, and Qwen2-MoE's sigmoid gate on them, included."""
    src = fx / family
    sel = _all_experts_selection(tmp_path / "sel.json", src)
    g = tmp_path / "g"
    assert cli("graft", src, "-t", "2L", "--selection", sel, "--dtype", "float32", "-o", g)[0] == 0
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out = tmp_path / "fid.json"
    code, _, err = cli("fidelity", src, g, "-d", f"a={text}", "--seq-len", "128", "-o", out)
    assert code == 0, err
    for row in json.loads(out.read_text())["layers"]:
        ref = row["references"]["selected_mixture"]
        assert ref["rel_error"] < 1e-4 and ref["cosine"] > 0.9999, (row["sources"], ref)


def _shared_weights(src, i, name):
    w = {}
    for f in src.glob("*.safetensors"):
        w.update(load_file(str(f)))
    return [w[f"model.layers.{i}.mlp.{name}.{m}.weight"].float() for m in ("gate_proj", "up_proj", "down_proj")]


@pytest.mark.parametrize("family,name,fold", [("qwen2_moe", "shared_expert", 0.5), ("deepseek_v2", "shared_experts", 1.0)])
def test_shared_concat_appends_the_shared_expert(fx, tmp_path, cli, family, name, fold):
    """--shared concat: the consolidated routed FFN (as --shared none makes it) with the shared expert's neurons
    appended (read here straight from the safetensors), its down projection times the folded gate (Qwen2-MoE's
    per-token sigmoid as 0.5, DeepSeek's ungated 1)."""
    src = fx / family
    outs = {}
    for sh in ("none", "concat"):
        outs[sh] = tmp_path / sh
        code, _, err = cli("graft", src, "-t", "2L", "--shared", sh, "--dtype", "float32", "--rescale", "none",
                           "-o", outs[sh])
        assert code == 0, err
    from xpertctl.io import open_checkpoint
    ck = open_checkpoint(src)
    none, cat = student_ffns(outs["none"], 2), student_ffns(outs["concat"], 2)
    with safe_open(str(outs["concat"] / "model.safetensors"), "pt") as f:
        rec = json.loads(f.metadata()["xpertctl"])
    assert rec["params"]["shared"] == "concat"
    assert "shared experts | appended" in (outs["concat"] / "README.md").read_text()
    for t, group in enumerate(rec["layer_map"]):
        gs, us, ds = _shared_weights(src, group[0], name)
        I = ck.expert_ffn
        assert cat[t][0].shape[0] == I + gs.shape[0]
        assert torch.equal(cat[t][0][:I], none[t][0]) and torch.equal(cat[t][1][:I], none[t][1])
        assert torch.equal(cat[t][2][:, :I], none[t][2])
        assert torch.equal(cat[t][0][I:], gs) and torch.equal(cat[t][1][I:], us)
        assert torch.allclose(cat[t][2][:, I:], ds * fold)


def test_shared_concat_needs_shared_experts(fx, tmp_path, cli):
    code, _, err = cli("graft", fx / "olmoe", "-t", "2L", "--shared", "concat", "-o", tmp_path / "g")
    assert_user_error(code, err, "--shared concat", "no shared experts")
    assert not (tmp_path / "g").exists()


def test_fidelity_refuses_a_student_of_another_model(fx, moes, tmp_path, cli):
    src, other = fx / "olmoe", moes["independent"][0]  # same hidden size and depth, another model
    g = tmp_path / "g"
    assert cli("graft", src, "-t", "2L,d24,f12", "--dtype", "float32", "-o", g)[0] == 0
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out = tmp_path / "f.json"
    code, _, err = cli("fidelity", other, g, "-d", f"a={text}", "--seq-len", "128", "-o", out)
    assert_user_error(code, err, str(g), "made from", "measure it against the model it was grafted from")
    assert not out.exists()


@pytest.mark.parametrize("spec,layer_map,note", [("5L", "uniform", "repeat"), ("2L", "merge", "pools")])
def test_fidelity_counts_each_source_layer_once_and_says_how(moes, tmp_path, cli, spec, layer_map, note):
    src, _, _ = moes["independent"]
    g = tmp_path / "g"
    assert cli("graft", src, "-t", spec, "--layer-map", layer_map, "--dtype", "float32", "-o", g)[0] == 0
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out = tmp_path / "f.json"
    code, _, err = cli("fidelity", src, g, "-d", f"a={text}", "--seq-len", "128", "-o", out)
    assert code == 0, err
    doc = json.loads(out.read_text())
    distinct = {}
    for r in doc["layers"]:
        distinct.setdefault(tuple(r["sources"]), r["rel_error"])
    assert len(distinct) == (LAYERS if layer_map == "uniform" else 2)
    assert doc["summary"]["student"]["rel_error"] == pytest.approx(sum(distinct.values()) / len(distinct))
    assert any(note in n for n in doc["notes"]) and note in err
