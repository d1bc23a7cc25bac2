"""The controls of a fair race: the routing rescale is continuous at zero mass, scale-matched controls
(`graft --scale-like`), and scratch with the standard strong output inits (`graft --out-init`)."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import assert_user_error
from test_consolidation import E, LAYERS, build_moe, student_ffns
from xpertctl.io import open_checkpoint

MATS = ("gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """A tiny OLMoE with independent experts (distinct in every layer)."""
    root = tmp_path_factory.mktemp("ctl")
    build_moe(root / "m", kind="independent", seed=3)
    return root / "m"


def _record(out):
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
        return json.loads(f.metadata()["xpertctl"])


def _weights(out):
    w = {}
    for f in sorted(out.glob("*.safetensors")):
        w.update(load_file(str(f)))
    return w


# ---- item 3: the rescale is continuous at zero routing mass -----------------------------------------

def _selection_with_mass(path, src, experts, routed, block=0.6):
    """A selection of `experts` in every layer whose stats gave them the per-expert routing weights
    routed[layer] (per token; the block's whole top-k weight per token is `block`)."""
    ck = open_checkpoint(src)
    doc = {"criterion": "test", "per_layer": len(experts), "source": ck.fingerprint, "num_experts": E, "top_k": 2,
           "layers": [{"layer": i, "experts": list(experts), "freq": {"a": [0.3] * len(experts)},
                       "routed_mass": block, "routed": list(routed[i])} for i in range(LAYERS)]}
    path.write_text(json.dumps(doc))
    return path


def _graft(cli, *args):
    code, _, err = cli("graft", *map(str, args))
    assert code == 0, err
    return err


def test_zero_selected_mass_scales_to_zero_like_a_tiny_one(moe, tmp_path, cli):
    """Layer 0's selected experts got no routing weight, layer 1's 1e-6 per token, layer 2's 0.25: the down
    projections are x0, x1e-6 and x0.25 of the unscaled ones (continuous at 0), the notice names layer 0 on one
    line, and the card and provenance record it. gate and up are untouched."""
    sel = _selection_with_mass(tmp_path / "sel.json", moe, [0, 3], {0: [0.0, 0.0], 1: [1e-6, 0.0], 2: [0.15, 0.1]})
    for path in ("one-shot", "adapted"):
        outs = {}
        for r in ("selected", "none"):
            outs[r] = tmp_path / f"{path}-{r}"
            if path == "one-shot":
                err = _graft(cli, moe, "-t", f"{LAYERS}L", "--selection", sel, "--rescale", r, "--dtype", "float32",
                             "-o", outs[r])
            else:
                f, a = tmp_path / f"f-{r}.safetensors", tmp_path / f"a-{r}.safetensors"
                assert cli("decompose", moe, sel, "-o", f)[0] == 0
                code, _, err = cli("reshape", f, "--target", f"{LAYERS}L", "--rescale", r, "-o", a)
                assert code == 0, err
                _graft(cli, a, "--dtype", "float32", "-o", outs[r])
            if r == "selected":
                lines = [l for l in err.splitlines() if "no routing weight" in l and "zero" in l]
                assert len(lines) == 1 and "[0]" in lines[0], err
        got, none = (student_ffns(outs[r], LAYERS) for r in ("selected", "none"))
        for t, scale in enumerate((0.0, 1e-6, 0.25)):
            assert torch.allclose(got[t][2], none[t][2] * scale, rtol=1e-5, atol=0), (path, t)
            assert all(torch.equal(got[t][k], none[t][k]) for k in (0, 1))
        assert float(got[0][2].abs().max()) == 0.0 and float(none[0][2].abs().max()) > 0
        rec = _record(outs["selected"])
        assert rec["params"]["rescale"] == "selected"
        assert any("[0]" in n and "zero" in n for n in rec["notes"]), rec["notes"]
        card = (outs["selected"] / "README.md").read_text()
        assert "> **Note:**" in card and "no routing weight" in card


def test_zero_mass_with_up_gain_is_not_an_overflow(moe, tmp_path, cli):
    """A down projection scaled to zero by its routing mass is not one that --up-gain made vanish."""
    sel = _selection_with_mass(tmp_path / "sel.json", moe, [1, 2], {0: [0.0, 0.0], 1: [0.1, 0.1], 2: [0.1, 0.2]})
    out = tmp_path / "g"
    _graft(cli, moe, "-t", f"{LAYERS}L", "--selection", sel, "--up-gain", "4", "--dtype", "float32", "-o", out)
    assert float(student_ffns(out, LAYERS)[0][2].abs().max()) == 0.0


def test_select_records_zero_mass_of_experts_never_routed_to(moe, tmp_path, cli):
    """The select side: `--criterion low` picks experts that no token reached; their routing weight is
    recorded as 0 (beside the block's), which the rescale must read as 'x0', not as 'no stats'."""
    from safetensors.torch import save_file
    from xpertctl.io import provenance
    ck = open_checkpoint(moe)
    counts = torch.full((2, LAYERS, E), 40, dtype=torch.int64)
    counts[:, :, 4:] = 0  # experts 4 and 5 never chosen
    routed = counts.float() * 0.3
    rec = provenance.record("stats", [], {}, source=ck.fingerprint, family="olmoe", top_k=2, num_experts=E,
                            layers=list(range(LAYERS)), domains=["a", "b"])
    st = tmp_path / "s.safetensors"
    save_file({"counts": counts, "mass": routed.clone(), "tokens": torch.tensor([80, 80]), "layers": torch.arange(LAYERS),
               "routed": routed}, str(st), metadata={"format": "pt", **provenance.as_metadata(rec)})
    sel = tmp_path / "low.json"
    assert cli("select", st, "--criterion", "low", "-o", sel)[0] == 0
    doc = json.loads(sel.read_text())
    for layer in doc["layers"]:
        assert sorted(layer["experts"]) == [4, 5] and layer["routed"] == [0.0, 0.0] and layer["routed_mass"] > 0
    out, none = tmp_path / "g", tmp_path / "n"
    err = _graft(cli, moe, "-t", f"{LAYERS}L", "--stats", st, "--criterion", "low", "--dtype", "float32", "-o", out)
    assert "zero" in err and "no routing weight" in err
    _graft(cli, moe, "-t", f"{LAYERS}L", "--selection", sel, "--rescale", "none", "--dtype", "float32", "-o", none)
    for t, (g, n) in enumerate(zip(student_ffns(out, LAYERS), student_ffns(none, LAYERS))):
        assert float(g[2].abs().max()) == 0.0 and float(n[2].abs().max()) > 0, t


def test_no_stats_at_all_stays_distinct_from_zero_mass(moe, tmp_path, cli):
    """A selection without routing weights (no stats behind it): the FFNs stay at the experts' scale and the
    notice says why; that is not the x0 of a recorded zero mass."""
    ck = open_checkpoint(moe)
    doc = {"criterion": "test", "per_layer": 2, "source": ck.fingerprint, "num_experts": E,
           "layers": [{"layer": i, "experts": [0, 3], "freq": {"a": [0.3, 0.3]}} for i in range(LAYERS)]}
    sel = tmp_path / "sel.json"
    sel.write_text(json.dumps(doc))
    outs, errs = {}, {}
    for r in ("selected", "none"):
        outs[r] = tmp_path / r
        errs[r] = _graft(cli, moe, "-t", f"{LAYERS}L", "--selection", sel, "--rescale", r, "--dtype", "float32",
                         "-o", outs[r])
    assert "experts' scale" in errs["selected"] and "zero" not in errs["selected"], errs["selected"]
    got, none = (student_ffns(outs[r], LAYERS) for r in ("selected", "none"))
    for t in range(LAYERS):
        assert torch.equal(got[t][2], none[t][2]) and float(got[t][2].abs().max()) > 0
    assert "zero" not in " ".join(_record(outs["selected"])["notes"])


# ---- scale-matched controls: graft --scale-like REF -------------------------------------------------

def _stats(tmp_path, src):
    """Two domains: experts 0 and 1 used in both (min picks them), 2 and 3 in one each, 4 and 5 rarely (low)."""
    from safetensors.torch import save_file
    from xpertctl.io import provenance
    ck = open_checkpoint(src)
    per = torch.tensor([[50, 45, 60, 5, 3, 2], [48, 50, 4, 55, 2, 3]], dtype=torch.int64)
    counts = per[:, None, :].expand(2, LAYERS, E).contiguous()
    rec = provenance.record("stats", [], {}, source=ck.fingerprint, family="olmoe", top_k=2, num_experts=E,
                            layers=list(range(LAYERS)), domains=["a", "b"])
    st = tmp_path / "stats.safetensors"
    save_file({"counts": counts, "mass": counts.float() * 0.3, "tokens": torch.tensor([100, 100]),
               "layers": torch.arange(LAYERS), "routed": counts.float() * 0.3}, str(st),
              metadata={"format": "pt", **provenance.as_metadata(rec)})
    return st


def _selections(cli, tmp_path, st):
    """min, low and a random selection (the first seed whose experts differ from min's in every layer)."""
    out = {}
    for crit in ("min", "low"):
        out[crit] = tmp_path / f"sel-{crit}.json"
        assert cli("select", st, "--criterion", crit, "-o", out[crit])[0] == 0
    chosen = lambda p: [set(l["experts"]) for l in json.loads(p.read_text())["layers"]]
    for seed in range(20):
        p = tmp_path / f"sel-random-{seed}.json"
        assert cli("select", st, "--criterion", "random", "--seed", seed, "-o", p)[0] == 0
        if all(a != b for a, b in zip(chosen(p), chosen(out["min"]))):
            out["random"] = p
            break
    assert all(a.isdisjoint(b) for a, b in zip(chosen(out["low"]), chosen(out["min"])))
    return out


def _fro(w, t, m):
    return float(w[f"model.layers.{t}.mlp.{m}.weight"].double().norm())


def _cos(a, b):
    return float((a.double() * b.double()).sum() / (a.double().norm() * b.double().norm()))


@pytest.fixture(scope="module")
def arms(moe, tmp_path_factory):
    """The XPERT arm (the reference, as a grafted directory and as the adapted file it came from) and the
    selections of the controls."""
    from xpertctl.ops import graft, select
    from xpertctl.specs import Target
    root = tmp_path_factory.mktemp("arms")
    st = _stats(root, moe)
    sels = {}
    for crit, seed in (("min", 0), ("low", 0)):
        doc, p = select.run(st, root / f"sel-{crit}.json", criterion=crit, seed=seed)
        sels[crit] = p
    xpert = graft.run(moe, root / "xpert", target=Target(LAYERS), selection=sels["min"], dtype="float32", seed=2)
    return {"stats": st, "sel": sels, "xpert": xpert, "root": root}


@pytest.mark.parametrize("init", ["xpert-random", "xpert-low", "norm-matched", "scratch"])
def test_scale_like_gives_every_matrix_the_reference_norm_and_keeps_its_own_direction(moe, arms, tmp_path, cli, init):
    """Each FFN matrix of every layer ends at the Frobenius norm of the XPERT arm's matrix of that layer (float
    tolerance), is the unmatched control's own matrix times the recorded factor (its direction, not xpert's),
    and nothing else of the model changes (same seed: every other tensor bit-identical)."""
    sels = dict(arms["sel"], **{"random": _selections(cli, tmp_path, arms["stats"])["random"]})
    kind = init.split("-")[-1]
    args = [moe, "-t", f"{LAYERS}L", "--dtype", "float32", "--seed", 2]
    args += ["--selection", sels[kind]] if init.startswith("xpert") else ["--selection", sels["min"], "--ffn-init", init]
    plain, matched = tmp_path / "plain", tmp_path / "matched"
    _graft(cli, *args, "-o", plain)
    _graft(cli, *args, "--scale-like", arms["xpert"], "-o", matched)
    x, p, m = (_weights(d) for d in (arms["xpert"], plain, matched))
    rec = _record(matched)
    s = rec["params"]["scale_like"]
    assert s["ref"]["sha256"] and s["ref"]["path"] == str(arms["xpert"].resolve()) and s["ref_up_gain"] == 1.0
    assert s["ref"] in rec["inputs"]
    for k in x:
        if ".mlp." not in k:
            assert torch.equal(p[k], m[k]), k
    for t in range(LAYERS):
        for mat in MATS:
            key = f"model.layers.{t}.mlp.{mat}.weight"
            assert _fro(m, t, mat) == pytest.approx(_fro(x, t, mat), rel=1e-5), (t, mat)
            f = s["factors"][t][mat]
            assert f == pytest.approx(_fro(x, t, mat) / _fro(p, t, mat), rel=1e-6)
            assert torch.allclose(m[key], p[key] * f, rtol=1e-6, atol=0)
            assert abs(_cos(m[key], x[key])) < 0.9, (t, mat)  # its own weights, not xpert's
    if init != "norm-matched":  # the norm-matched FFN has xpert's row norms already: factors of 1
        assert any(abs(f - 1) > 0.05 for row in s["factors"] for f in row.values())
    card = (matched / "README.md").read_text()
    assert "Scale match" in card and "--scale-like" in card


def test_norm_matched_matches_xpert_row_norms_at_the_same_up_gain(moe, arms, tmp_path, cli):
    """The norm-matched control is already scale-matched: per row, at the same --up-gain as the XPERT arm."""
    outs = {}
    for init in ("xpert", "norm-matched"):
        outs[init] = tmp_path / init
        _graft(cli, moe, "-t", f"{LAYERS}L", "--selection", arms["sel"]["min"], "--ffn-init", init, "--up-gain", 4,
               "--dtype", "float32", "--seed", 2, "-o", outs[init])
    x, n = (_weights(outs[k]) for k in outs)
    plain = _weights(arms["xpert"])
    for t in range(LAYERS):
        for mat, gain in zip(MATS, (1, 4, 0.25)):
            key = f"model.layers.{t}.mlp.{mat}.weight"
            assert torch.allclose(n[key].norm(dim=1), x[key].norm(dim=1), rtol=1e-5), (t, mat)
            assert torch.allclose(x[key], plain[key] * gain, rtol=1e-6)
            assert abs(_cos(n[key], x[key])) < 0.3


def test_scale_like_composes_with_up_gain(moe, arms, tmp_path, cli):
    """REF's norms are taken at gain 1 (a gained REF's gain undone) and --up-gain applies after the match:
    a control at the XPERT arm's gain has the XPERT arm's norms, at another gain the gained norms."""
    ref4 = tmp_path / "xpert4"
    _graft(cli, moe, "-t", f"{LAYERS}L", "--selection", arms["sel"]["min"], "--up-gain", 4, "--dtype", "float32",
           "--seed", 2, "-o", ref4)
    outs = {}
    for name, ref, gain in (("same", ref4, 4), ("one", ref4, 1), ("plain-ref", arms["xpert"], 4)):
        outs[name] = tmp_path / name
        _graft(cli, moe, "-t", f"{LAYERS}L", "--selection", arms["sel"]["low"], "--up-gain", gain, "--scale-like", ref,
               "--dtype", "float32", "--seed", 2, "-o", outs[name])
    x4, x1 = _weights(ref4), _weights(arms["xpert"])
    same, one, plain_ref = (_weights(outs[k]) for k in ("same", "one", "plain-ref"))
    assert _record(outs["same"])["params"]["scale_like"]["ref_up_gain"] == 4.0
    for t in range(LAYERS):
        for mat in MATS:
            assert _fro(same, t, mat) == pytest.approx(_fro(x4, t, mat), rel=1e-5)
            assert _fro(plain_ref, t, mat) == pytest.approx(_fro(x4, t, mat), rel=1e-5)
            assert _fro(one, t, mat) == pytest.approx(_fro(x1, t, mat), rel=1e-5)


def test_scale_like_reads_an_adapted_file_as_its_grafted_model(moe, arms, tmp_path, cli):
    """REF as the adapted.safetensors of the XPERT arm: the same norms as its grafted directory."""
    f, a = tmp_path / "f.safetensors", tmp_path / "a.safetensors"
    assert cli("decompose", moe, arms["sel"]["min"], "-o", f)[0] == 0
    assert cli("reshape", f, "--target", f"{LAYERS}L", "-o", a)[0] == 0
    outs = {}
    for name, ref in (("dir", arms["xpert"]), ("file", a)):
        outs[name] = tmp_path / name
        _graft(cli, moe, "-t", f"{LAYERS}L", "--selection", arms["sel"]["min"], "--ffn-init", "scratch",
               "--scale-like", ref, "--dtype", "float32", "-o", outs[name])
    d, fl = (_weights(outs[k]) for k in outs)
    for k in d:
        assert torch.allclose(d[k], fl[k], rtol=1e-6, atol=0), k
    assert _record(outs["file"])["params"]["scale_like"]["ref_kind"] == "adapted"
    # and the adapted-file path of graft takes --scale-like too
    g = tmp_path / "from-adapted"
    _graft(cli, a, "--ffn-init", "norm-matched", "--scale-like", arms["xpert"], "--dtype", "float32", "-o", g)
    w, x = _weights(g), _weights(arms["xpert"])
    assert all(_fro(w, t, m) == pytest.approx(_fro(x, t, m), rel=1e-5) for t in range(LAYERS) for m in MATS)


def test_scale_like_refuses_a_reference_of_another_shape(moe, arms, tmp_path, cli):
    refs = {"2L": ["-t", "2L"], "f8": ["-t", f"{LAYERS}L,f8"], "d16": ["-t", f"{LAYERS}L,d16,h4"]}
    for name, t in refs.items():
        _graft(cli, moe, *t, "--selection", arms["sel"]["min"], "--dtype", "float32", "-o", tmp_path / name)
    for name in refs:
        out = tmp_path / f"out-{name}"
        code, _, err = cli("graft", moe, "-t", f"{LAYERS}L", "--selection", arms["sel"]["low"], "--scale-like",
                           tmp_path / name, "-o", out)
        assert_user_error(code, err, "--scale-like", "same shape")
        assert not out.exists()
    for bad in (arms["stats"], moe, arms["sel"]["min"]):  # not a grafted student or an adapted file
        code, _, err = cli("graft", moe, "-t", f"{LAYERS}L", "--scale-like", bad, "-o", tmp_path / "o")
        assert_user_error(code, err, "--scale-like")
        assert not (tmp_path / "o").exists()


def test_scale_like_refuses_a_zero_matrix_it_cannot_scale(moe, arms, tmp_path, cli):
    """Selected experts with a routing mass of 0 give a zero down projection, which no factor brings to REF's
    norm: refused (one line), and with --rescale none (the scale is --scale-like's anyway) it works."""
    sel = _selection_with_mass(tmp_path / "sel.json", moe, [4, 5], {0: [0.0, 0.0], 1: [0.1, 0.1], 2: [0.1, 0.2]})
    out = tmp_path / "g"
    args = [moe, "-t", f"{LAYERS}L", "--selection", sel, "--scale-like", arms["xpert"], "--dtype", "float32"]
    code, _, err = cli("graft", *args, "-o", out)
    assert_user_error(code, err, "--scale-like", "--rescale none")
    assert not out.exists()
    _graft(cli, *args, "--rescale", "none", "-o", out)
    w, x = _weights(out), _weights(arms["xpert"])
    assert _fro(w, 0, "down_proj") == pytest.approx(_fro(x, 0, "down_proj"), rel=1e-5)


# ---- scratch with the standard strong inits: graft --out-init ------------------------------------

@pytest.mark.parametrize("init", ["scratch", "xpert"])
def test_out_init_sets_only_the_output_projections(moe, arms, tmp_path, cli, init):
    """small: std 0.02 / sqrt(2 x layers) (GPT-2); zero: zeros; on every layer's o_proj, and down_proj for a
    fresh (scratch) FFN only. Every other tensor is bit-identical to the default graft of the same seed."""
    outs = {}
    for how in ("default", "small", "zero"):
        outs[how] = tmp_path / how
        _graft(cli, moe, "-t", f"{LAYERS}L", "--selection", arms["sel"]["min"], "--ffn-init", init, "--out-init", how,
               "--dtype", "float32", "--seed", 4, "-o", outs[how])
    w = {k: _weights(o) for k, o in outs.items()}
    named = {f"model.layers.{t}.{p}.weight" for t in range(LAYERS)
             for p in (("self_attn.o_proj", "mlp.down_proj") if init == "scratch" else ("self_attn.o_proj",))}
    for how in ("small", "zero"):
        changed = {k for k in w["default"] if not torch.equal(w["default"][k], w[how][k])}
        assert changed == named, (how, sorted(changed ^ named))
    assert all(not w["zero"][k].any() for k in named)
    small = torch.cat([w["small"][k].flatten() for k in named])
    want = 0.02 / (2 * LAYERS) ** 0.5
    assert float(small.std()) == pytest.approx(want, rel=0.06) and abs(float(small.mean())) < want / 10
    o = _record(outs["small"])["params"]["out_init"]
    assert o["how"] == "small" and o["std"] == pytest.approx(want)
    assert o["tensors"] == (["mlp.down_proj", "self_attn.o_proj"] if init == "scratch" else ["self_attn.o_proj"])
    assert _record(outs["default"])["params"]["out_init"] == "default"
    card = " ".join((outs["small"] / "README.md").read_text().split())
    assert "--out-init small" in card and ("stays" in card) == (init != "scratch")


def test_out_init_refuses_what_it_would_undo(moe, arms, tmp_path, cli):
    out = tmp_path / "o"
    code, _, err = cli("graft", moe, "-t", f"{LAYERS}L", "--inherit", "attention", "--out-init", "zero", "-o", out)
    assert_user_error(code, err, "--out-init", "--inherit attention")
    code, _, err = cli("graft", moe, "-t", f"{LAYERS}L", "--ffn-init", "scratch", "--out-init", "small",
                       "--scale-like", arms["xpert"], "-o", out)
    assert_user_error(code, err, "--out-init", "--scale-like")
    assert not out.exists()


def test_out_init_zero_scratch_with_up_gain(moe, arms, tmp_path, cli):
    """A zero down projection stays zero under --up-gain (no 'vanishes' refusal); up is gained."""
    outs = {}
    for g in ("1", "4"):
        outs[g] = tmp_path / g
        _graft(cli, moe, "-t", f"{LAYERS}L", "--ffn-init", "scratch", "--out-init", "zero", "--up-gain", g,
               "--dtype", "float32", "-o", outs[g])
    a, b = _weights(outs["1"]), _weights(outs["4"])
    for t in range(LAYERS):
        assert not b[f"model.layers.{t}.mlp.down_proj.weight"].any()
        assert torch.allclose(b[f"model.layers.{t}.mlp.up_proj.weight"], 4 * a[f"model.layers.{t}.mlp.up_proj.weight"])


def test_graft_help_names_the_new_options(cli):
    code, out, _ = cli("graft", "--help")
    text = " ".join(out.split())
    assert code == 0 and "--scale-like" in text and "--out-init" in text and "o_proj only" in text
