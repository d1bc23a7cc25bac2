"""The demo recipes end to end at toy size (`make demo DEMO=quick`: the fair race; `make paper PAPER=quick`):
every step, the report."""
import json

from conftest import ROOT


def test_quick_demo_produces_the_report(tmp_path, monkeypatch, cli):
    monkeypatch.chdir(ROOT)  # the recipe's paths are relative to the repository
    work = tmp_path / "demo"
    code, out, err = cli("run", "recipes/paper.yaml", "--profile", "quick", "--set", f"vars.work={work}",
                         "--set", f"vars.report={work / 'report'}")
    assert code == 0, err[-3000:]
    report = (work / "report" / "REPORT.md").read_text()
    assert "| 2 | kd | 1 |" in report and "| 2 | xpert − norm-matched |" in report
    for arm in ("xpert", "literal", "fit", "random", "low", "norm-matched", "scratch"):
        assert f"| 2 | {arm} | 1 |" in report
        fid = json.loads((work / "fidelity" / f"{arm}-2L-s0.json").read_text())
        assert all(0 < r["rel_error"] < 10 for r in fid["layers"])
    assert "## Result at 1×" in report and "## Teacher (reference)" in report
    for png in ("loss_curves.png", "expert_frequency.png", "fidelity_vs_loss.png"):
        assert (work / "report" / png).read_bytes()[:4] == b"\x89PNG"
    # evaluation touched only the test split; stats only the train split
    assert "/train/legal.txt" in err and "--split test" in err
    # it says where the report went (its last line), and stderr carries no blank lines
    assert err.strip().splitlines()[-1] == f"done: {work / 'report' / 'REPORT.md'}"
    assert "" not in err.strip().splitlines()


def test_one_demo_time_estimate_everywhere():
    """The recipes' estimates are the only numbers: the Makefile prints them from the recipe and the
    README quotes them verbatim. `make demo` is the fair race (its default, tune and quick profiles)."""
    import re
    import yaml
    fair = yaml.safe_load((ROOT / "recipes" / "fair-race.yaml").read_text())
    paper = yaml.safe_load((ROOT / "recipes" / "paper.yaml").read_text())
    full, quick, tune = fair["estimate"], fair["profiles"]["quick"]["estimate"], fair["profiles"]["tune"]["estimate"]
    estimates = [full, quick, tune, paper["estimate"], *(p["estimate"] for p in paper["profiles"].values())]
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert not re.search(r"\d+\s*min", makefile), "the Makefile must not carry its own estimate"
    assert "recipes/fair-race.yaml" in makefile.split("demo: setup")[1].split("\n\n")[0]
    for e in (full, quick, tune):
        assert e.split(" (")[0] in readme, e
    stated = set(re.findall(r"(?:about|~)\s*(\d+)[- ]min", readme))
    assert stated <= {re.search(r"\d+", e).group() for e in estimates}, stated


def test_quick_fair_race_tunes_every_arm_and_reports_the_declared_contrasts(tmp_path, monkeypatch, cli):
    """recipes/fair-race.yaml at toy size: every arm on the same tuning grid, the picks, the finals trained
    with them, the Holm-corrected primary contrasts and the teacher; scale-matched controls at xpert's norms."""
    from safetensors import safe_open
    monkeypatch.chdir(ROOT)
    work = tmp_path / "fair"
    code, out, err = cli("run", "recipes/fair-race.yaml", "--profile", "quick", "--set", f"vars.work={work}")
    assert code == 0, err[-3000:]
    report = (work / "report" / "REPORT.md").read_text()
    assert "| xpert − scratch |" in report and "| xpert − random |" in report and "Holm" in report
    assert "the final runs above use these picks" in report, "the quick profile's picks are its tuning's"
    picks = json.loads((work / "tune-report" / "picks.json").read_text())
    assert set(picks) == {"xpert", "scratch", "random"}
    assert len([p for p in (work / "tune").glob("*-lr*") if (p / "final").is_dir()]) == 3 * 2  # 3 arms x 2 learning rates x 1 tuning seed
    # the random control is rescaled to xpert's per-layer FFN norms (same seed)
    def norms(d):
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            return [f.get_tensor(k).norm().item() for k in sorted(f.keys()) if "mlp.down_proj" in k]
    x, r = norms(work / "init" / "xpert-s0"), norms(work / "init" / "random-s0")
    assert len(x) == 3 and all(abs(a - b) <= 1e-4 * a for a, b in zip(x, r))


def test_the_committed_picks_are_the_committed_tuning_s():
    """`make demo` trains with vars.picks and shows the committed tuning beside its result: they are one
    set of numbers (the report would say the finals did not use the picks)."""
    import yaml
    doc = yaml.safe_load((ROOT / "recipes" / "fair-race.yaml").read_text())
    tuning = doc["vars"]["tuning"][0].split("=", 1)[1]
    picks = json.loads((ROOT / tuning / "picks.json").read_text())
    assert set(picks) == set(doc["vars"]["arms"]) == set(doc["vars"]["picks"])
    for arm, p in doc["vars"]["picks"].items():
        assert (p["lr"], p["warmup"]) == (picks[arm]["lr"], picks[arm]["warmup"]), arm
    assert not set(doc["vars"]["tune_seeds"]) & set(doc["vars"]["seeds"]), "tuning seeds are never final seeds"
