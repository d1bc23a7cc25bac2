"""tune: each arm's pick on the validation split from its runs' records (lr, warmup, the init's up-gain)."""
import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import assert_user_error


def _init(tmp_path, gain):
    d = tmp_path / f"init-k{gain}"
    if not d.exists():
        d.mkdir()
        rec = {"kind": "grafted", "params": {"up_gain": gain}, "inputs": []}
        save_file({"w": torch.zeros(1)}, str(d / "model.safetensors"),
                  metadata={"format": "pt", "xpertctl": json.dumps(rec)})
    return d


def _run(tmp_path, arm, lr, warmup, gain, seed, val, steps=120):
    d = tmp_path / "runs" / f"{arm}-lr{lr}-w{warmup}-k{gain}-s{seed}"
    (d / "final").mkdir(parents=True)
    rec = {"kind": "train", "inputs": [{"path": str(_init(tmp_path, gain))}],
           "params": {"lr": lr, "warmup": warmup, "seed": seed, "steps": steps}}
    (d / "train_config.json").write_text(json.dumps(rec))
    rows = [{"step": steps // 2, "loss": 9.0, "val_loss": 9.0}, {"step": steps, "loss": 5.0, "val_loss": val}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_picks_the_lowest_mean_over_seeds_and_flags_the_grid_edge(tmp_path, cli):
    # xpert: seed 0 alone would pick lr 0.004, the mean over seeds picks lr 0.002 (gain 4, interior of its grid)
    vals = {(0.001, 4, 0): 4.30, (0.001, 4, 1): 4.32, (0.002, 4, 0): 4.21, (0.002, 4, 1): 4.19,
            (0.004, 4, 0): 4.18, (0.004, 4, 1): 4.26, (0.002, 1, 0): 4.40, (0.002, 1, 1): 4.41,
            (0.002, 16, 0): 4.25, (0.002, 16, 1): 4.27}
    for (lr, k, s), v in vals.items():
        _run(tmp_path, "xpert", lr, 10, k, s, v)
    # scratch: best at the largest gain of its grid -> on the edge
    for (lr, k), v in {(0.002, 1): 4.6, (0.002, 16): 4.3, (0.002, 4): 4.5}.items():
        for s in (0, 1):
            _run(tmp_path, "scratch", lr, 10, k, s, v + 0.01 * s)
    code, out, err = cli("tune", "--arm", f"xpert={tmp_path}/runs/xpert-*", "--arm", f"scratch={tmp_path}/runs/scratch-*",
                         "-o", tmp_path / "t")
    assert code == 0, err
    picks = json.loads((tmp_path / "t" / "picks.json").read_text())
    assert picks["xpert"] | {"val_loss": 0} == {"lr": 0.002, "warmup": 10, "up_gain": 4.0, "val_loss": 0, "steps": 120,
                                                "seeds": [0, 1], "edge": []}
    assert picks["xpert"]["val_loss"] == pytest.approx(4.20)
    assert picks["scratch"]["up_gain"] == 16.0 and picks["scratch"]["edge"] == ["up_gain"]
    md = (tmp_path / "t" / "TUNE.md").read_text()
    assert "- {arm: xpert, lr: 0.002, warmup: 10, up_gain: 4}" in md


def test_cells_without_every_seed_are_left_out_and_mixed_budgets_refused(tmp_path, cli):
    _run(tmp_path, "a", 0.002, 10, 1, 0, 4.0)
    _run(tmp_path, "a", 0.002, 10, 1, 1, 4.0)
    _run(tmp_path, "a", 0.004, 10, 1, 0, 3.0)  # better, but seed 1 is missing: not comparable
    code, _, err = cli("tune", "--arm", f"a={tmp_path}/runs/a-*", "-o", tmp_path / "t")
    assert code == 0, err
    assert json.loads((tmp_path / "t" / "picks.json").read_text())["a"]["lr"] == 0.002
    _run(tmp_path, "b", 0.002, 10, 1, 0, 4.0, steps=120)
    _run(tmp_path, "b", 0.004, 10, 1, 0, 4.0, steps=480)
    code, _, err = cli("tune", "--arm", f"b={tmp_path}/runs/b-*", "-o", tmp_path / "t2")
    assert_user_error(code, err, "--arm b", "different lengths")
    assert not (tmp_path / "t2").exists()


@pytest.mark.parametrize("arm,needle", [("nosep", "expected NAME=GLOB"), ("a=/nonexistent/*", "no run directory matches")])
def test_bad_arms_are_one_line_errors(tmp_path, cli, arm, needle):
    code, _, err = cli("tune", "--arm", arm, "-o", tmp_path / "t")
    assert_user_error(code, err, needle)


def test_the_report_says_when_final_runs_did_not_use_the_picks():
    """A recipe's finals train with vars.picks copied by hand: a report must not claim they used the tuning's
    picks when they did not (the quick fair race trained at lr 0.002 / warmup 24 against picks 0.004 / 2)."""
    from xpertctl.report import picks_unused, tuning_section
    picks = {1.0: {"xpert": {"lr": 0.004, "warmup": 2, "up_gain": 1.0, "val_loss": 6.81, "seeds": [100], "edge": []},
                   "scratch": {"lr": 0.002, "warmup": 24, "up_gain": 1.0, "val_loss": 6.83, "seeds": [100], "edge": []}}}
    runs = {1.0: [{"arm": "xpert", "depth": 3, "seed": 0, "knobs": {"lr": 0.002, "warmup": 24, "up_gain": 1.0}},
                  {"arm": "scratch", "depth": 3, "seed": 0, "knobs": {"lr": 0.002, "warmup": 24, "up_gain": 1.0}}]}
    assert picks_unused(picks, runs) == ["xpert-3L-s0 at 1×: lr 0.002 (pick 0.004), warmup 24 (pick 2)"]
    text = "\n".join(tuning_section(picks, runs))
    assert "did not train with these picks" in text and "use these picks" not in text
    runs[1.0][0]["knobs"] = {"lr": 0.004, "warmup": 2, "up_gain": 1.0}
    assert picks_unused(picks, runs) == []
    assert "the final runs above use these picks" in "\n".join(tuning_section(picks, runs))
