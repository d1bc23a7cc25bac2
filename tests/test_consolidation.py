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


def test_independent_experts_one_weighting_no_sign_flips(moes, tmp_path, cli):
    """Unrelated experts: the FFN is sum_j c_j P_j(E_j) with the SAME positive usage weights c for gate, up and
    down, each P_j a permutation of whole neurons: no matrix from another expert, no sign flip."""
    src, model, _ = moes["independent"]
    ids, freq = [4, 1, 3], [0.5, 0.3, 0.2]
    c = torch.tensor(freq) / sum(freq)
    sel = _selection(tmp_path / "sel.json", src, ids, freq)
    fac = tmp_path / "f.safetensors"
    assert cli("decompose", src, sel, "-o", fac)[0] == 0
    t = load_file(str(fac))
    adapted = tmp_path / "a.safetensors"
    assert cli("reshape", fac, "--target", f"{LAYERS}L", "-o", adapted)[0] == 0
    a = load_file(str(adapted))
    for i in range(LAYERS):
        assert torch.equal(t[f"layers.{i}.gate.U3"], t[f"layers.{i}.down.U3"])  # one weighting per layer
        assert torch.equal(t[f"layers.{i}.gate.U3"], t[f"layers.{i}.up.U3"])
        perms = t[f"layers.{i}.perm"]
        ex = experts_of(model, i)
        want = [torch.zeros_like(m) for m in ex[0]]
        for n, j in enumerate(ids):
            p = perms[n]
            assert sorted(p.tolist()) == list(range(I))
            g, u, d = ex[j]
            for k, m in enumerate((g[p], u[p], d[:, p])):
                want[k] += c[n] * m
        got = [a[f"layers.{i}.{m}"] for m in ("gate_proj", "up_proj", "down_proj")]
        for w, x in zip(want, got):
            assert torch.isfinite(x).all()
            assert torch.allclose(x, w, atol=1e-5)
        # scale: a weighted average of unrelated experts, between sqrt(sum c^2) and 1 of an expert's norm
        ratio = float(got[0].norm() / torch.stack([ex[j][0].norm() for j in ids]).mean())
        assert float(c.norm()) * 0.8 < ratio < 1.0
    # the literal reading takes each matrix's weighting on its own: they disagree on unrelated experts
    lit = tmp_path / "lit.safetensors"
    assert cli("decompose", src, sel, "-o", lit, "--no-align", "--weighting", "per-matrix", "--ranks", "full,full,1")[0] == 0
    tl = load_file(str(lit))
    assert any(not torch.allclose(tl[f"layers.{i}.gate.U3"].abs(), tl[f"layers.{i}.down.U3"].abs(), atol=1e-3)
               for i in range(LAYERS))


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


def test_stats_record_routing_weights_and_rescale_uses_them(moes, tmp_path, cli):
    """routed = the top-k softmax weights the router gave (OLMoE: not renormalized), per expert; the
    default --rescale routed multiplies each down projection by the layer's mean total per token."""
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
    for r in ("routed", "none"):
        outs[r] = tmp_path / f"g-{r}"
        assert cli("graft", src, "-t", f"{LAYERS}L", "--selection", sel, "--rescale", r, "--dtype", "float32",
                   "-o", outs[r])[0] == 0
    a, b = student_ffns(outs["routed"], LAYERS), student_ffns(outs["none"], LAYERS)
    for t in range(LAYERS):
        mass = doc["layers"][t]["routed_mass"]
        assert mass == pytest.approx(float(s["routed"][0, t].sum() / s["tokens"][0]), rel=1e-5)
        assert 0 < mass < 1
        assert torch.allclose(a[t][2], b[t][2] * mass, atol=1e-7) and torch.equal(a[t][0], b[t][0])


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
