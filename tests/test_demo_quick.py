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


ARMS = ("xpert", "scratch", "random", "kd", "learngene")


def test_quick_fair_race_tunes_every_arm_and_reports_the_declared_contrasts(tmp_path, monkeypatch, cli):
    """recipes/fair-race.yaml at toy size: every arm on the same tuning grid, the picks, the finals trained
    with them, the Holm-corrected primary contrasts and the teacher; scale-matched controls at xpert's norms."""
    from safetensors import safe_open
    monkeypatch.chdir(ROOT)
    work = tmp_path / "fair"
    code, out, err = cli("run", "recipes/fair-race.yaml", "--profile", "quick", "--set", f"vars.work={work}", "--jobs", "2")
    assert code == 0, err[-3000:]
    report = (work / "report" / "REPORT.md").read_text()
    assert "| xpert − scratch |" in report and "| xpert − random |" in report and "Holm" in report
    assert "| kd − scratch |" in report and "| xpert − learngene |" in report
    picks = json.loads((work / "tune-report" / "picks.json").read_text())
    assert set(picks) == set(ARMS)
    # the finals train with the profile's committed picks; the report names exactly the arms whose tuning
    # picked otherwise (at 6 steps the gains' margins are ~1e-3 nats: which way they fall is not the test)
    import yaml
    committed = yaml.safe_load((ROOT / "recipes" / "fair-race.yaml").read_text())["profiles"]["quick"]["vars"]["picks"]
    knobs = ("lr", "warmup", "up_gain")
    moved = {a for a, p in picks.items() if any(float(p[k]) != float(committed[a][k]) for k in knobs)}
    tuning = report.split("## Tuning")[1].split("\n\n")[1]
    if not moved:
        assert "the final runs above use these picks" in tuning, tuning
    for arm in ARMS:
        assert (f"{arm}-3L-s0 at 1×" in tuning) == (arm in moved), (arm, moved, tuning)
    # 5 arms x 2 learning rates x 2 FFN up-gains x 1 tuning seed, each read back with its own gain
    assert len([p for p in (work / "tune").glob("*-lr*") if (p / "final").is_dir()]) == 5 * 2 * 2
    assert {p["up_gain"] for p in picks.values()} <= {1.0, 2.0}
    table = report.split("## Tuning")[1]
    assert all(f"| 1× | {a} |" in table for a in ARMS)
    # kd: scratch's init (the same weights) trained with the teacher's soft targets; the others without
    for g in (1, 2):
        kd = json.loads((work / "tune" / f"kd-lr0.004-w2-g{g}-s100" / "train_config.json").read_text())
        sc = json.loads((work / "tune" / f"scratch-lr0.004-w2-g{g}-s100" / "train_config.json").read_text())
        assert kd["params"]["teacher"] == "fixtures/teacher" and kd["params"]["kd_alpha"] == 0.5
        assert sc["params"]["teacher"] is None and kd["inputs"][0] == sc["inputs"][0]
    # learngene: the TLEG descendant of the Aux-Net at the arm's gain; its Aux-Net tokens beside its result
    from xpertctl.io.provenance import read
    aux = read(work / "learngene" / "learngene.safetensors")
    assert aux["aux"]["tokens"] == 12288
    for g in (1, 2):
        rec = read(work / "init" / f"learngene-g{g}-s0" / "model.safetensors")["params"]
        assert rec["ffn_init"] == "learngene" and rec["up_gain"] == g and rec["learngene"]["tokens"] == 12288
    assert "learngene at 3 layers: its init trained on **12,288 tokens** before these runs" in report
    # an init that is gone (or re-made) cannot be read: the report says so rather than stating nothing
    (work / "init" / "learngene-g1-s0").rename(work / "gone")
    code, _, err = cli("report", "--results", str(work / "eval" / "*-3L-s*.json"), "-o", str(work / "again"))
    assert code == 0, err
    again = (work / "again" / "REPORT.md").read_text()
    assert "The init of 1 run(s) (learngene-3L-s0) is gone or was re-made since" in again
    assert "its init trained on **12,288 tokens**" in again  # seed 1's init is still there
    (work / "gone").rename(work / "init" / "learngene-g1-s0")

    def norms(d, m="down_proj"):
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            return [f.get_tensor(k).norm().item() for k in sorted(f.keys()) if f"mlp.{m}" in k]
    # the random control is rescaled to xpert's per-layer FFN norms (same seed, same gain)
    for g in (1, 2):
        x, r = norms(work / "init" / f"xpert-g{g}-s0"), norms(work / "init" / f"random-g{g}-s0")
        assert len(x) == 3 and all(abs(a - b) <= 1e-4 * a for a, b in zip(x, r))
    # gain 2 is the same function with the scale moved from down to up: up x 2, down / 2, gate as it was
    for arm in ("xpert", "scratch", "random", "learngene"):
        one, two = work / "init" / f"{arm}-g1-s0", work / "init" / f"{arm}-g2-s0"
        for m, ratio in (("up_proj", 2.0), ("down_proj", 0.5), ("gate_proj", 1.0)):
            assert all(abs(b / a - ratio) < 1e-3 for a, b in zip(norms(one, m), norms(two, m))), (arm, m)


def test_the_committed_picks_are_the_committed_tuning_s():
    """`make demo` trains with vars.picks and shows the committed tuning beside its result: they are one
    set of numbers (the report would say the finals did not use the picks)."""
    import yaml
    doc = yaml.safe_load((ROOT / "recipes" / "fair-race.yaml").read_text())
    tuning = doc["vars"]["tuning"][0].split("=", 1)[1]
    picks = json.loads((ROOT / tuning / "picks.json").read_text())
    assert set(picks) == set(doc["vars"]["arms"]) == set(doc["vars"]["picks"])
    for arm, p in doc["vars"]["picks"].items():
        assert (p["lr"], p["warmup"], p["up_gain"]) == (picks[arm]["lr"], picks[arm]["warmup"], picks[arm]["up_gain"]), arm
    for g in {p["up_gain"] for p in doc["vars"]["picks"].values()}:
        assert g in doc["vars"]["all_gains"], f"the picks' up-gain {g} needs its grafts (vars.all_gains)"
    assert not set(doc["vars"]["tune_seeds"]) & set(doc["vars"]["seeds"]), "tuning seeds are never final seeds"
