"""Neuron alignment without sweeps (the default since issue 20) is the matching of each expert to the
most-used one, computed here with scipy directly; `--align-sweeps` is opt-in, recorded, and checked."""
import json

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from safetensors import safe_open

from conftest import assert_user_error
from test_consolidation import LAYERS, _selection, build_moe


def test_default_alignment_is_the_matching_to_the_most_used_expert(tmp_path):
    from xpertctl.ops import decompose
    g = torch.Generator().manual_seed(11)
    common = [torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g), torch.randn(8, 16, generator=g)]
    experts = []
    for _ in range(4):
        p = torch.randperm(16, generator=g)
        e = [m + 0.4 * torch.randn(m.shape, generator=g) for m in common]
        experts.append((e[0][p], e[1][p], e[2][:, p]))
    w = torch.tensor([0.2, 0.4, 0.3, 0.1])
    feats = [torch.cat([e[0], e[1], e[2].T], dim=1).double().numpy() for e in experts]
    for j, perm in enumerate(decompose.align_perms(experts, w)):
        rows, cols = linear_sum_assignment(feats[1] @ feats[j].T, maximize=True)  # expert 1 is the most used
        assert perm.tolist() == cols[np.argsort(rows)].tolist()
    swept = decompose.align_perms(experts, w, sweeps=2)
    assert swept[1].tolist() == list(range(16))  # the reference keeps its order either way


def test_align_sweeps_is_opt_in_recorded_and_checked(tmp_path, cli):
    src = tmp_path / "m"
    build_moe(src, kind="shuffled", seed=3)
    sel = _selection(tmp_path / "sel.json", src, [0, 1, 2, 3], [0.4, 0.3, 0.2, 0.1])
    for n in ("0", "2"):
        out = tmp_path / f"g{n}"
        assert cli("graft", src, "-t", f"{LAYERS}L", "--selection", sel, "--align-sweeps", n, "-o", out)[0] == 0
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert json.loads(f.metadata()["xpertctl"])["params"]["align_sweeps"] == int(n)
    for args, needle in ((["--align-sweeps", "-1"], "--align-sweeps"), (["--align-sweeps", "2", "--no-align"], "--no-align")):
        out = tmp_path / "bad"
        code, _, err = cli("graft", src, "-t", "2L", "--selection", sel, *args, "-o", out)
        assert_user_error(code, err, needle)
        assert not out.exists()


def test_graft_of_an_adapted_file_records_the_factors_sweeps_and_refuses_its_own(tmp_path, cli):
    """An adapted file's alignment was done at decompose: the graft records the sweeps decompose ran (it
    recorded graft's default 0) and refuses --align-sweeps (it recorded a number that was never applied)."""
    src = tmp_path / "m"
    build_moe(src, kind="shuffled", seed=3)
    sel = _selection(tmp_path / "sel.json", src, [0, 1, 2, 3], [0.4, 0.3, 0.2, 0.1])

    def params(out):
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            return json.loads(f.metadata()["xpertctl"])["params"]
    for n in (2, 0):
        f, a, g = tmp_path / f"f{n}.safetensors", tmp_path / f"a{n}.safetensors", tmp_path / f"g{n}"
        assert cli("decompose", src, sel, "--align-sweeps", n, "-o", f)[0] == 0
        assert cli("reshape", f, "-t", f"{LAYERS}L", "-o", a)[0] == 0
        code, _, err = cli("graft", a, "-o", g)
        assert code == 0, err
        assert params(g)["align_sweeps"] == n
    code, _, err = cli("graft", tmp_path / "a0.safetensors", "--align-sweeps", "3", "-o", tmp_path / "bad")
    assert_user_error(code, err, "--align-sweeps")
    assert not (tmp_path / "bad").exists()
