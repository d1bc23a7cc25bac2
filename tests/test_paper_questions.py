"""Issue 21: the paper's questions in miniature — the word-order task, the SFT set, the report's new
sections and the demo profiles (the learngene init: test_learngene.py)."""
import json
import random
from pathlib import Path

import pytest

from conftest import ROOT, assert_user_error

MINI = ROOT / "fixtures" / "corpus-mini"


def _corpus(tmp_path: Path, texts: dict[str, list[str]]) -> Path:
    """A corpus dir whose test split holds exactly `texts` (train/val get one filler document each)."""
    root = tmp_path / "corpus"
    for s in ("train", "val", "test"):
        (root / s).mkdir(parents=True)
        for name, docs in texts.items():
            (root / s / f"{name}.txt").write_text("\n\n".join(docs if s == "test" else ["filler words here"]) + "\n")
    return root


def _numbered(prefix: str, n: int) -> str:
    return " ".join(f"{prefix}{i}" for i in range(n))


def test_order_items_are_real_windows_against_reorderings(tmp_path, cli):
    # distinct words, so every item can be located in its document independently of the builder
    docs = {"alpha": [_numbered("a", 100), _numbered("b", 70)], "beta": [_numbered("c", 64), "too short to use"]}
    corpus = _corpus(tmp_path, docs)
    code, out, err = cli("corpus", "order", corpus, "-o", tmp_path / "order.jsonl", "--per-domain", "50", "--seed", "3")
    assert code == 0, err
    items = [json.loads(l) for l in (tmp_path / "order.jsonl").read_text().splitlines()]
    # non-overlapping 32-word windows: 100 -> 3, 70 -> 2, 64 -> 2, the short document none
    assert sorted(x["domain"] for x in items) == ["alpha"] * 5 + ["beta"] * 2
    starts = set()
    for x in items:
        ctx, choices = x["context"].split(), x["choices"]
        assert len(ctx) == 24 and len(choices) == 4 and len(set(choices)) == 4
        doc = next(d.split() for d in docs[x["domain"]] if ctx[0] in d.split())
        s = doc.index(ctx[0])
        assert s % 32 == 0 and doc[s: s + 24] == ctx
        starts.add((x["domain"], ctx[0]))
        real = doc[s + 24: s + 32]
        assert choices[x["label"]] == " ".join(real)
        for j, c in enumerate(choices):
            assert sorted(c.split()) == sorted(real)  # the same words in every choice
            assert (c == " ".join(real)) == (j == x["label"])
            assert not c.startswith(" ")
    assert len(starts) == len(items)
    labels = [x["label"] for x in items]
    assert len(set(labels)) > 1  # the answer is not always in the same place


def test_order_skips_windows_without_enough_distinct_orders_and_caps_per_domain(tmp_path):
    from xpertctl import corpus
    same = " ".join(["w"] * 24 + ["x"] * 8)  # 8 identical words: no other order exists
    mixed = " ".join(f"m{i}" for i in range(32 * 6))
    root = _corpus(tmp_path, {"d": [same, mixed]})
    out = corpus.order(root, tmp_path / "o.jsonl", per_domain=4, seed=0)
    items = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(items) == 4 and all(x["context"].startswith("m") for x in items)


def test_order_is_deterministic_and_seeded(tmp_path):
    from xpertctl import corpus
    a = corpus.order(MINI, tmp_path / "a.jsonl", per_domain=5, seed=1).read_text()
    b = corpus.order(MINI, tmp_path / "b.jsonl", per_domain=5, seed=1).read_text()
    c = corpus.order(MINI, tmp_path / "c.jsonl", per_domain=5, seed=2).read_text()
    assert a == b and a != c and len(a.splitlines()) == 30


def test_order_on_a_corpus_without_test_text_is_one_line(tmp_path, cli):
    root = _corpus(tmp_path, {"d": ["only a few words"]})
    code, out, err = cli("corpus", "order", root, "-o", tmp_path / "o.jsonl")
    assert_user_error(code, err, "too little text")
    assert not (tmp_path / "o.jsonl").exists()


# ---- the SFT set ---------------------------------------------------------------------------------------

def test_sft_records_from_known_text(tmp_path, cli):
    root = tmp_path / "c"
    texts = {
        "lexicon": {"train": 'dog: a domesticated canid; "the dog barked"\nx: y',
                    "test": 'cat: a small domesticated carnivore; "the cat sat"\nowl: nocturnal bird of prey'},
        "manuals": {"train": "NAME\n       ls - list directory contents\nSYNOPSIS",
                    "test": "NAME\n       cp - copy files and directories\nOPTIONS\n-a, --archive\n"
                            "       same as -dR. Preserves links.\n-x\n       -y"},
        "scripture": {"train": "In the beginning God created the heaven and the earth and all that is in them.",
                      "test": "short verse.\nAnd God said, Let there be light: and there was light over all."},
        "code": {"train": "def f(): pass", "test": "def g(): pass"},
    }
    for dom, parts in texts.items():
        for s in ("train", "val", "test"):
            (root / s).mkdir(parents=True, exist_ok=True)
            (root / s / f"{dom}.txt").write_text(parts.get(s, "filler text") + "\n")
    code, out, err = cli("corpus", "sft", root, "-o", tmp_path / "sft")
    assert code == 0, err
    read = lambda n: [json.loads(l) for l in (tmp_path / "sft" / n).read_text().splitlines()]
    test = read("test.jsonl")
    assert test == [
        {"instruction": 'Define the word "cat".', "response": "a small domesticated carnivore", "domain": "lexicon"},
        {"instruction": 'Define the word "owl".', "response": "nocturnal bird of prey", "domain": "lexicon"},
        {"instruction": "What does the command `cp` do?", "response": "copy files and directories", "domain": "manuals"},
        {"instruction": "What does the option `-a, --archive` do?", "response": "same as -dR.", "domain": "manuals"},
        {"instruction": "Continue this verse from the King James Bible.",
         "context": "And God said, Let there be", "response": "light: and there was light over all.",
         "domain": "scripture"}]
    train = read("train.jsonl")
    assert [r["response"] for r in train] == ["a domesticated canid", "list directory contents",
                                              "the earth and all that is in them."]
    from xpertctl import data
    for r in test + train:
        data.prompt_of(r)  # what train --sft and eval gen: read


def test_sft_caps_each_domain_and_is_seeded(tmp_path):
    from xpertctl import corpus
    a = corpus.sft(MINI, tmp_path / "a", max_train=7, max_test=3, seed=0)
    b = corpus.sft(MINI, tmp_path / "b", max_train=7, max_test=3, seed=0)
    assert (a / "test.jsonl").read_text() == (b / "test.jsonl").read_text()
    recs = [json.loads(l) for l in (a / "train.jsonl").read_text().splitlines()]
    from collections import Counter
    assert all(n <= 7 for n in Counter(r["domain"] for r in recs).values()) and len(recs) >= 7


# ---- the report's sections on synthetic results -------------------------------------------------------

def _run(root: Path, sub: str, name: str, val: list[tuple[int, float]], nll: dict[str, float],
         mc: dict[str, tuple[float, int]] | None = None, gen: float | None = None, model: Path | None = None) -> Path:
    """An eval JSON named `name` under root/sub, its model root/runs/<sub>/<name>/final with metrics.jsonl."""
    run = root / "runs" / sub / name
    (run / "final").mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": v, "val_loss": v}) + "\n"
                                               for s, v in val))
    tasks = {"ppl:data": {k: {"nll": v} for k, v in nll.items()}}
    for task, (acc, n) in (mc or {}).items():
        tasks[f"mc:{root / task}"] = {"acc": acc, "acc_norm": acc, "n": n}
    if gen is not None:
        tasks["gen:sft/test.jsonl"] = {"rougeL": gen, "n": 30}
    out = root / sub / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": {"path": str(model or run / "final")}, "tasks": tasks}))
    return out


def test_report_sections_on_synthetic_results(tmp_path, cli):
    import numpy as np
    from scipy import stats
    root = tmp_path
    (root / "order.jsonl").write_text(json.dumps({"context": "a", "choices": ["b", "c", "d", "e"], "label": 0}) + "\n")
    rng = np.random.default_rng(0)
    accs, finals = {}, {}
    for seed in range(4):
        for arm, shift, acc in (("scratch", 0.0, 0.50), ("xpert", -0.2, 0.60), ("single-code", -0.1, 0.55)):
            a = acc + 0.01 * seed * (arm == "xpert")
            f = 6.0 + shift + 0.03 * rng.standard_normal()
            accs[(arm, seed)], finals[(arm, seed)] = a, f
            val = [(10, 7.0 + shift), (20, 6.5 + shift), (30, f)]
            _run(root, "eval", f"{arm}-3L-s{seed}", val, {"code": f + 0.1 * (arm == "single-code"), "legal": f},
                 {"order.jsonl": (a, 600)})
        for arm in ("scratch", "xpert"):  # the same seeds at 4x the steps: the gap shrinks to 0.05
            f4 = 5.0 + (-0.05 if arm == "xpert" else 0.0) + 0.001 * seed
            _run(root, "eval/x4", f"{arm}-3L-s{seed}", [(40, 6.0), (80, 5.5), (120, f4)],
                 {"code": f4})
        for arm, base in (("scratch", 10.0), ("xpert", 12.0)):
            for point, step, bonus in (("base", 0, 0.0), ("step-000040", 40, 5.0), ("final", 80, 8.0)):
                sft_run = root / "runs" / "sft" / f"{arm}-3L-s{seed}"
                model = sft_run / ("final" if point == "final" else point)
                _run(root, "eval/sft", f"{arm}-3L-s{seed}-sft-{point}", [(80, 1.0)], {}, gen=base + bonus + seed,
                     model=model if point != "base" else None)
                if point == "final":
                    sft_run.mkdir(parents=True, exist_ok=True)
                    (sft_run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n"
                                                                   for s in range(1, 81)))
    teacher = root / "teacher.json"
    teacher.write_text(json.dumps({"model": {"path": "t"}, "tasks": {f"mc:{root / 'order.jsonl'}": {"acc": 0.9, "n": 600}}}))
    code, out, err = cli("report", "--results", str(root / "eval" / "*L-s*.json"), "--teacher", teacher,
                         "--budget", f"4={root / 'eval' / 'x4' / '*.json'}", "--primary", "xpert:scratch",
                         "--sft", str(root / "eval" / "sft" / "*.json"), "-o", root / "rep")
    assert code == 0, err
    text = (root / "rep" / "REPORT.md").read_text()
    # downstream: xpert's paired accuracy gain over scratch, against scipy's paired t interval
    d = [accs[("xpert", s)] - accs[("scratch", s)] for s in range(4)]
    ci = stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
    assert f"| 3 | xpert | 4 | {np.mean([accs[('xpert', s)] for s in range(4)]):.3f}" in text
    assert f"{np.mean(d):+.3f} ± {(ci.high - ci.low) / 2:.3f}" in text
    assert "chance 0.250" in text and f"teacher 0.900 ± {1.96 * (0.9 * 0.1 / 600) ** 0.5:.3f}" in text
    # budget: scratch's mean test NLL at 1x and 4x brackets xpert's 1x mean (log-linear in budget);
    # xpert at 4x is below scratch's largest budget: censored, said so
    assert "## Training budget" in text and (root / "rep" / "budget.png").is_file()
    import math
    s1 = np.mean([finals[("scratch", s)] for s in range(4)])
    s4 = np.mean([5.0 + 0.001 * s for s in range(4)])
    x1 = np.mean([finals[("xpert", s)] for s in range(4)])
    need = math.exp((s1 - x1) / (s1 - s4) * math.log(4))
    line1 = next(l for l in text.splitlines() if l.startswith("| 1× | 30 | 3 | xpert |"))
    assert f"| {need:.2f}× ({need:.2f}× its own) |" in line1
    line4 = next(l for l in text.splitlines() if l.startswith("| 4× | 120 | 3 | xpert |"))
    assert "> 4× (better than scratch's largest budget)" in line4
    # the primary contrast at both budgets, Holm over the two: 4x's differences are exactly -0.05 + 0.001*seed*0
    assert "## The answer" in text and "2 tests" in text
    assert "| 4× (120 steps) | 3 | xpert − scratch | -0.050 |" in text
    # diversity: per evaluation domain, single − mixed seed by seed (code nll carries a +0.1 penalty)
    assert "## Domain diversity" in text
    row = next(l for l in text.splitlines() if l.startswith("| 3 | code |"))
    for penalty in (0.1, 0.0):
        d = [finals[("single-code", s)] + penalty - finals[("xpert", s)] for s in range(4)]
        ci = stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
        assert f"{np.mean(d):+.3f} ± {(ci.high - ci.low) / 2:.3f}" in row
    # sft: base, step 40 and the final step (80, from the SFT run's metrics)
    assert "| step 0 | step 40 | step 80 |" in text
    assert "| 3 | xpert | 13.5 ± " in text and "(Δ +2.0 ± 0.0)" in text
    assert (root / "rep" / "sft_rouge.png").is_file()


def test_report_budget_option_is_checked(tmp_path, cli):
    code, out, err = cli("report", "--results", str(tmp_path / "x-*.json"), "--budget", "four=x", "-o", tmp_path / "r")
    assert_user_error(code, err)


# ---- the demo's profiles -------------------------------------------------------------------------------

PROFILES = ("budget", "depth", "diversity", "sft", "ffn", "paper")


@pytest.mark.parametrize("profile", PROFILES)
def test_each_profile_expands_and_reuses_the_default_demo(profile, tmp_path, cli, monkeypatch):
    from xpertctl import recipe as rc
    from xpertctl.ops_table import BY_NAME
    path = ROOT / "recipes" / "paper.yaml"
    demo = rc.expand(rc.load(path), path)
    plan = rc.expand(rc.load(path, profile=profile), path)
    for sid, op, args in plan:
        rc.argv_for(op, args, sid, BY_NAME)  # every op and value checks out
    same = {sid: (op, a) for sid, op, a in plan}
    # every step of the default demo (its report aside) is in the profile with the same op and args: skipped
    assert all(same.get(sid) == (op, a) for sid, op, a in demo if op != "report")
    extra = [(sid, op, a) for sid, op, a in plan if sid not in {s for s, _, _ in demo}]
    trains = [a for _, op, a in extra if op == "train"]
    outs = [a["out"] for _, _, a in plan if "out" in a]
    assert len(outs) == len(set(outs))  # no two steps write the same place
    if profile in ("budget", "paper"):
        steps = sorted({a["steps"] for a in trains if "/runs/x4/" in a["out"] or "/runs/x16/" in a["out"]})
        assert steps == [480, 1920]
        assert sum("/runs/x4/" in a["out"] for a in trains) == 4 * 8 and sum("/runs/x16/" in a["out"] for a in trains) == 4 * 4
        assert all(a["ckpt"] in {x["out"] for _, o, x in demo if o == "graft"} for a in trains if "/runs/x4/" in a["out"] or "/runs/x16/" in a["out"])
    if profile in ("depth", "paper"):
        depth_runs = {a["out"].rsplit("/", 1)[1].rsplit("-s", 1)[0] for a in trains if "L-s" in a["out"]}
        assert {f"{arm}-{d}L" for arm in ("xpert", "fit", "scratch", "kd", "learngene") for d in (4, 6)} <= depth_runs
        assert not any(r.startswith(("random", "low", "literal", "norm-matched")) for r in depth_runs)
    if profile in ("diversity", "paper"):
        assert sum(op == "stats" for _, op, _ in extra) == 6
        assert sum("/runs/single-" in a["out"] for a in trains) == 6 * 8
    if profile in ("sft", "paper"):
        sft = [a for a in trains if a.get("sft")]
        assert len(sft) == 5 * 8 and all(a["ckpt"].endswith("/final") for a in sft)
        gens = [a for _, op, a in extra if op == "eval" and any(t.startswith("gen:") for t in a["task"])]
        assert len(gens) == 5 * 8 * 4  # before SFT and at three SFT checkpoints
    if profile in ("ffn", "paper"):  # the whole-FFN fit (issue 20): its own init, fidelity, training and eval per seed
        ffn = [(op, a) for sid, op, a in extra if "fit-ffn-" in sid]
        assert sorted({op for op, _ in ffn}) == ["eval", "fidelity", "graft", "train"] and len(ffn) == 4 * 8 * (3 if profile == "paper" else 1)  # paper: 3 depths
        assert all(a["fit"] == "ffn" and len(a["calibration"]) == 6 for op, a in ffn if op == "graft")
        assert "fit-ffn:fit" in next(a for _, op, a in plan if op == "report")["contrast"]
    else:
        assert not any("fit-ffn" in sid for sid, _, _ in plan)
    report = next(a for _, op, a in plan if op == "report")
    assert report["out"] != next(a for _, op, a in demo if op == "report")["out"]  # its own report
    # the profile prints its estimate first
    monkeypatch.chdir(ROOT)
    code, out, err = cli("run", "recipes/paper.yaml", "--profile", profile, "--resolved")
    assert code == 0, err
    est = next(l for l in out.splitlines() if l.startswith("estimate:"))
    assert "about" in est and "after its default run" in est


def test_default_demo_evaluates_the_order_task_everywhere_and_keeps_its_arms():
    from xpertctl import recipe as rc
    path = ROOT / "recipes" / "paper.yaml"
    demo = rc.expand(rc.load(path), path)
    evals = [a for _, op, a in demo if op == "eval"]
    assert evals and all(any(t.endswith("/order.jsonl") and t.startswith("mc:") for t in a["task"]) for a in evals)
    arms = {a["out"].rsplit("/", 1)[1].rsplit("-3L", 1)[0] for _, op, a in demo if op == "train"}
    assert arms == {"xpert", "literal", "fit", "random", "low", "norm-matched", "scratch", "kd", "learngene"}
    assert not any(op == "corpus cloze" for _, op, _ in demo)


def test_precision_line_names_the_seeds_an_interval_needs():
    from xpertctl.report import seeds_for
    from xpertctl.report_paper import precision
    line = precision([("a", 0.02, 8), ("b", 0.10, 8), ("c", float("nan"), 1)], 0.05, "nats", seeds_for)[0]
    assert "met for a (±0.020)" in line
    assert f"b (±0.100 over 8 seeds; about {seeds_for(0.10, 8, 0.05)} seeds at this spread)" in line
    assert "no interval (one paired seed) for c" in line


def test_an_empty_grid_list_expands_a_step_to_none(tmp_path, cli):
    import yaml
    from xpertctl import recipe as rc
    doc = {"name": "t", "vars": {"on": [], "w": str(tmp_path / "w")}, "steps": [
        {"id": "order-${grid.s}", "op": "corpus order", "grid": {"s": "${vars.on}"},
         "args": {"corpus": str(MINI), "per_domain": 1, "seed": "${grid.s}", "out": "${vars.w}/o${grid.s}.jsonl"}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc))
    assert rc.expand(rc.load(tmp_path / "r.yaml"), tmp_path / "r.yaml") == []
    plan = rc.expand(rc.load(tmp_path / "r.yaml", ["vars.on=[1, 2]"]), tmp_path / "r.yaml")
    assert [sid for sid, _, _ in plan] == ["order-1", "order-2"]
    doc["vars"]["on"] = "x"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc))
    code, _, err = cli("run", tmp_path / "r.yaml", "--dry-run")
    assert_user_error(code, err, "grid.s must be a list")


def test_budget_reading_names_the_sign_at_every_budget():
    """An arm that beats scratch at 1x and ends worse at 16x (interval excluding zero) is said to, at each budget."""
    from xpertctl.report import budget_section

    def runs(mult, gaps):
        out = []
        for seed in range(4):
            for arm, gap in (("scratch", 0.0), *gaps.items()):
                f = 6.0 / mult + gap + 0.01 * seed + (0.002 * seed if arm != "scratch" else 0.0)
                out.append({"arm": arm, "depth": 3, "seed": seed, "score": f, "final_val": f, "val": [(120 * mult, f)]})
        return out
    text = "\n".join(budget_section({1: runs(1, {"xpert": -0.3, "kd": -0.1, "fit": -0.2}),
                                     16: runs(16, {"xpert": +0.05, "kd": -0.2, "fit": 0.0})}, "scratch", None))
    xpert = next(l for l in text.splitlines() if l.startswith("- xpert"))
    assert "better than scratch at 1×" in xpert and "worse than scratch at 16×" in xpert
    fit = next(l for l in text.splitlines() if l.startswith("- fit"))
    assert "indistinguishable from scratch at 16×" in fit
