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
