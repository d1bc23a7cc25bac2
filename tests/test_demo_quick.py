"""The demo recipe end to end at toy size (what `make demo DEMO=quick` runs): every step, the report."""
import json

from conftest import ROOT


def test_quick_demo_produces_the_report(tmp_path, monkeypatch, cli):
    monkeypatch.chdir(ROOT)  # the recipe's paths are relative to the repository
    work = tmp_path / "demo"
    code, out, err = cli("run", "recipes/demo.yaml", "--profile", "quick", "--set", f"vars.work={work}",
                         "--set", f"vars.report={work / 'report'}")
    assert code == 0, err[-3000:]
    report = (work / "report" / "REPORT.md").read_text()
    for arm in ("xpert", "literal", "fit", "random", "low", "norm-matched", "scratch"):
        assert f"| 2 | {arm} | 1 |" in report
        fid = json.loads((work / "fidelity" / f"{arm}-2L-s0.json").read_text())
        assert all(0 < r["rel_error"] < 10 for r in fid["layers"])
    assert "**Verdict**" in report and "## Teacher (reference)" in report
    for png in ("loss_curves.png", "expert_frequency.png", "fidelity_vs_loss.png"):
        assert (work / "report" / png).read_bytes()[:4] == b"\x89PNG"
    # evaluation touched only the test split; stats only the train split
    assert "/train/legal.txt" in err and "--split test" in err
