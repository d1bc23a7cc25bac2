"""The demo report: mean ± std per arm and depth, steps to reach scratch's final loss, plots, verdict.

Runs are named `{arm}-{depth}L-s{seed}` (eval results `.../{name}.json`, whose model path is
`.../{name}/final`, next to the run's metrics.jsonl)."""
from __future__ import annotations

import glob
import json
import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from . import report_stats as rstats
from .errors import XpertError

_NAME = re.compile(r"^(?P<arm>.+)-(?P<depth>\d+)L-s(?P<seed>\d+)$")


def _eval_doc(path: Path, what: str) -> dict:
    """An `xpertctl eval` results JSON, or a one-line error naming `what` (--results, --teacher)."""
    if not path.is_file():
        raise XpertError(f"{what} {path}: no such file")
    try:
        doc = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise XpertError(f"{what} {path}: not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("tasks"), dict) or not isinstance(doc.get("model"), dict):
        raise XpertError(f"{what} {path}: not an `xpertctl eval` results JSON (no 'model' and 'tasks')")
    return doc


def _split(doc: dict) -> str:
    """The split its perplexities were measured on (results written before it was recorded: 'val', eval's default)."""
    return ((doc.get("xpertctl") or {}).get("params") or {}).get("split") or "val"


def _model_sha(final: Path) -> str | None:
    """The fingerprint eval records for a model directory (its weights files), or None when absent."""
    from .io import provenance
    files = sorted(final.glob("*.safetensors"))
    return provenance.fingerprint(final, files)["sha256"] if files else None


def _load_run(res_path: Path, ignored: list[str]) -> dict | None:
    """One run's numbers: its eval JSON and the metrics.jsonl beside the model it evaluated. None (and a
    line in `ignored`) when that model is no longer the one evaluated (retrained since)."""
    m = _NAME.match(res_path.stem)
    if not m:
        raise XpertError(f"{res_path}: result name is not ARM-<depth>L-s<seed>")
    doc = _eval_doc(res_path, "--results")
    model = Path(str(doc["model"].get("path")))
    run_dir = model.parent
    if not (run_dir / "metrics.jsonl").is_file():
        ignored.append(f"{res_path}: evaluated {model}, whose run directory has no metrics.jsonl (moved, removed, "
                       "or not a `train` output)")
        return None
    if doc["model"].get("sha256") != _model_sha(model):
        ignored.append(f"{res_path}: evaluated another model than today's {model} (retrained since?); "
                       "re-run its eval")
        return None
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    ppl = next((v for k, v in doc["tasks"].items() if k.startswith("ppl:")), {})
    mc = next((v for k, v in doc["tasks"].items() if k.startswith("mc:")), {})
    doms = {d: v["nll"] for d, v in ppl.items() if isinstance(v, dict)}
    return {"arm": m["arm"], "depth": int(m["depth"]), "seed": int(m["seed"]), "val": val, "split": _split(doc),
            "final_val": val[-1][1] if val else float("nan"), "test_nll": doms,
            "test_ppl": math.exp(np.mean(list(doms.values()))) if doms else float("nan"),
            "acc": mc.get("acc", float("nan")), "acc_norm": mc.get("acc_norm", float("nan")),
            "train_loss": [(r["step"], r["loss"]) for r in rows], "knobs": _knobs(run_dir),
            "prior_tokens": _prior_tokens(run_dir), "tokens": rows[-1].get("tokens") if rows else None}


def _knobs(run_dir: Path) -> dict:
    """The run's lr, warmup and graft up-gain (what `tune` picks), from its train_config.json."""
    from .tune import load_run
    try:
        r = load_run(run_dir)
    except XpertError:
        return {}
    return {k: r[k] for k in ("lr", "warmup", "up_gain")}


def _prior_tokens(run_dir: Path) -> int | None:
    """Tokens its init was trained on before this run: a learngene descendant's Aux-Net tokens (0 otherwise;
    None when the init the run recorded is gone or was re-made since, so that its record cannot be read)."""
    from .io import provenance
    from .tune import init_params
    try:
        rec = json.loads((run_dir / "train_config.json").read_text())
        start = next((i for i in rec.get("inputs") or [] if i.get("path")), None)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    if start is None:
        return 0
    init = Path(start["path"])
    if not sorted(init.glob("*.safetensors")) or provenance.weights_fingerprint(init)["sha256"] != start.get("sha256"):
        return None
    lg = init_params(rec).get("learngene")
    return int(lg.get("tokens") or 0) if isinstance(lg, dict) else 0


def _fidelity(patterns: list[str] | None, runs: set, ignored: list[str]) -> dict[tuple[str, int, int], float]:
    """Mean rel_error over target layers from `xpertctl fidelity` JSONs named ARM-<depth>L-s<seed>.json;
    a file named like no run is listed in `ignored`."""
    out = {}
    for pat in patterns or []:
        if not glob.glob(pat):
            raise XpertError(f"--fidelity {pat}: no files match")
    for f in sorted({Path(p) for pat in (patterns or []) for p in glob.glob(pat)}):
        m = _NAME.match(f.stem)
        key = (m["arm"], int(m["depth"]), int(m["seed"])) if m else None
        if key not in runs:
            ignored.append(f"{f}: fidelity of no run in the results (named ARM-<depth>L-s<seed> like them)")
            continue
        try:
            rows = json.loads(f.read_text())["layers"]
            out[key] = float(np.mean([r["rel_error"] for r in rows]))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise XpertError(f"--fidelity {f}: not an `xpertctl fidelity` JSON (no 'layers' with 'rel_error')") from None
    return out


def paired_ci(x: dict[int, float], y: dict[int, float]) -> tuple[float, float, int]:
    """Mean of the per-seed differences x - y over the seeds both have, and its 95% t half-width."""
    diff, half, n, _ = rstats.paired(x, y)
    return diff, half, n


CI_GOAL = 0.05  # nats: the half-width of the (corrected) paired 95% interval a primary contrast should reach


def seeds_for(half: float, n: int, goal: float = CI_GOAL) -> int | None:
    """The fewest seeds whose 95% t half-width reaches `goal` at the spread that gave `half` over `n` seeds."""
    if math.isnan(half) or n < 2:
        return None
    from scipy.stats import t as student_t
    sd = half * math.sqrt(n) / student_t.ppf(0.975, n - 1)
    return next((m for m in range(2, 100_000) if student_t.ppf(0.975, m - 1) * sd / math.sqrt(m) <= goal), None)


def _contrast(text: str) -> tuple[str, str]:
    a, sep, b = str(text).partition(":")
    if not sep or not a or not b:
        raise XpertError(f"--contrast {text!r}: expected FIRST:SECOND (two arm names)")
    return a, b


def _ms(xs: list[float], fmt: str = "{:.3f}") -> str:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return "-"
    return (fmt + " ± " + fmt).format(np.mean(xs), np.std(xs, ddof=1) if len(xs) > 1 else 0.0)


def _reach(val: list[tuple[int, float]], target: float) -> int | None:
    return next((s for s, v in val if v <= target), None)


# ---- inputs ----------------------------------------------------------------------------------------

def _load_budgets(results: list[str], budgets: list[str] | None, ignored: list[str]) -> dict[float, list[dict]]:
    """{multiple of the base steps: its runs}: --results is 1x unless a `--budget 1=GLOB` names it."""
    from . import report_paper as paper
    files = sorted({Path(p) for pat in results for p in glob.glob(pat)})
    if not files:
        raise XpertError(f"--results {' '.join(results)}: no result files match")
    found = {1.0: files}
    for b in budgets or []:
        mult, pattern = paper.parse_budget(b)
        fs = sorted(Path(p) for p in glob.glob(pattern))
        if not fs:
            raise XpertError(f"--budget {b}: no result files match")
        found[mult] = fs
    out = {m: [r for r in (_load_run(f, ignored) for f in fs) if r is not None] for m, fs in found.items()}
    if not out[1.0] and 1.0 in found:
        raise XpertError(f"--results {' '.join(results)}: no usable result; e.g. {ignored[0]}")
    for r in (r for rs in out.values() for r in rs):  # the figure every comparison is made on
        r["score"] = float(np.mean(list(r["test_nll"].values()))) if r["test_nll"] else r["final_val"]
    return out


def _check_arms(by_budget: dict[float, list[dict]], baseline: str, contrasts, primary) -> None:
    names = sorted({r["arm"] for rs in by_budget.values() for r in rs})
    if baseline not in names:
        raise XpertError(f"--baseline {baseline!r}: no results of that arm (arms: {', '.join(names)})")
    for opt, given in (("--contrast", contrasts), ("--primary", primary)):
        for c in given or []:
            for a in _contrast(c):
                if a not in names:
                    raise XpertError(f"{opt} {c!r}: no results of arm {a!r} (arms: {', '.join(names)})")


def _tuning(specs: list[str] | None) -> dict[float, dict]:
    """--tuning MULT=DIR: the picks.json of `xpertctl tune` for that budget."""
    out = {}
    for t in specs or []:
        mult, sep, d = str(t).partition("=")
        try:
            m = float(mult)
        except ValueError:
            m = float("nan")
        f = Path(d) / "picks.json"
        if not sep or not m > 0 or not f.is_file():
            raise XpertError(f"--tuning {t!r}: expected MULTIPLE=DIR of `xpertctl tune` (with picks.json)")
        out[m] = json.loads(f.read_text())
    return out


def _by(runs: list[dict]) -> dict[tuple[int, str], dict[int, dict]]:
    out: dict = defaultdict(dict)
    for r in runs:
        out[(r["depth"], r["arm"])][r["seed"]] = r
    return out


def _steps(runs) -> int:
    return max((r["val"][-1][0] for r in runs if r["val"]), default=0)


# ---- sections ----------------------------------------------------------------------------------------

def primary_tests(by_budget: dict[float, list[dict]], primary: list[str]) -> list[dict]:
    """Every declared primary contrast at every budget and depth that has both arms: paired on the
    test NLL, Holm-adjusted over the whole family, with Bonferroni-simultaneous intervals."""
    tests = []
    for mult, runs in sorted(by_budget.items()):
        by = _by(runs)
        for d in sorted({r["depth"] for r in runs}):
            for c in primary or []:
                a, b = _contrast(c)
                if (d, a) in by and (d, b) in by:
                    x = {s: r["score"] for s, r in by[(d, a)].items()}
                    y = {s: r["score"] for s, r in by[(d, b)].items()}
                    diff, _, n, p = rstats.paired(x, y)
                    tests.append({"mult": mult, "depth": d, "a": a, "b": b, "x": x, "y": y, "diff": diff, "n": n, "p": p})
    level = rstats.simultaneous_level(len(tests))
    for t, adj in zip(tests, rstats.holm([t["p"] for t in tests])):
        t["p_holm"], t["level"] = adj, level
        t["half"] = rstats.paired(t["x"], t["y"], level=level)[1]
    return tests


def _verdict(t: dict) -> str:
    if math.isnan(t["p_holm"]):
        return "no interval (one seed)"
    if t["p_holm"] < 0.05:
        return f"{t['a']} better" if t["diff"] < 0 else f"{t['a']} worse"
    return "indistinguishable"


def headline_section(tests: list[dict], steps_of: dict[float, int]) -> list[str]:
    if not tests:
        return []
    lines = ["## The answer", "",
             f"Declared primary contrasts ({len(tests)} tests: every budget and depth), each paired seed by seed on "
             "the test split's NLL (mean over domains; negative: the first arm is better), Holm-corrected for the "
             f"whole family; intervals are simultaneous ({100 * tests[0]['level']:.2f}% each, so all hold together "
             "at 95%).", "",
             "| budget | depth | contrast | Δ test NLL | simultaneous interval | seeds | Holm p | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for t in tests:
        ci = f"{t['diff'] - t['half']:+.3f} to {t['diff'] + t['half']:+.3f}" if not math.isnan(t["half"]) else "-"
        p = f"{t['p_holm']:.3g}" if not math.isnan(t["p_holm"]) else "-"
        lines.append(f"| {t['mult']:g}× ({steps_of.get(t['mult'], 0)} steps) | {t['depth']} | {t['a']} − {t['b']} | "
                     f"{t['diff']:+.3f} | {ci} | {t['n']} | {p} | **{_verdict(t)}** |")
    lines.append("")
    for t in tests:
        lines.append(f"- {t['mult']:g}×, {t['depth']} layers: {t['a']} vs {t['b']}: **{_verdict(t)}** "
                     f"(Δ {t['diff']:+.3f} nats, ±{t['half']:.3f}).")
    wide = [t for t in tests if not math.isnan(t["half"]) and t["half"] > CI_GOAL]
    lines += ["", f"Precision (goal ±{CI_GOAL} nats after correction): "
              + (f"met by all {len(tests)}." if not wide else
                 f"met by {len(tests) - len(wide)} of {len(tests)}; not by "
                 + ", ".join(f"{t['a']}−{t['b']} at {t['mult']:g}× (±{t['half']:.3f}, {t['n']} seeds)" for t in wide))
              + "", ""]
    return lines


def result_section(runs: list[dict], baseline: str, split: str, title: str) -> list[str]:
    by = _by(runs)
    lines = [f"## {title}", "",
             f"| depth | arm | seeds | FFN fidelity before training (rel_error) | {split} NLL (mean over domains) | "
             f"Δ vs {baseline}, paired (95%, uncorrected) | {split} ppl | mc acc | steps to reach {baseline}'s final val "
             "(median; seeds that never did count as beyond) |", "|---|---|---|---|---|---|---|---|---|"]
    for d in sorted({r["depth"] for r in runs}):
        base = by.get((d, baseline), {})
        target = float(np.mean([r["final_val"] for r in base.values()])) if base else float("nan")
        total = _steps(base.values())
        for a in sorted({a for dd, a in by if dd == d}, key=lambda a: (a == baseline, a)):
            rs = list(by[(d, a)].values())
            if a == baseline or not base:
                delta = reach = "-"
            else:
                diff, half, n, _ = rstats.paired({s: r["score"] for s, r in by[(d, a)].items()},
                                                {s: r["score"] for s, r in base.items()})
                delta = f"{diff:+.3f} ± {half:.3f}" if not math.isnan(half) else f"{diff:+.3f} (1 seed)"
                med, got = rstats.censored_median([rstats.reach_step(r["val"], target) for r in rs], total)
                reach = (f"{med:.0f} of {total} ({got}/{len(rs)} seeds got there)" if med is not None
                         else f"> {total} ({got}/{len(rs)} seeds got there)")
            lines.append(f"| {d} | {a} | {len(rs)} | {_ms([r['fidelity'] for r in rs])} | {_ms([r['score'] for r in rs])} | "
                         f"{delta} | {_ms([r['test_ppl'] for r in rs], '{:.1f}')} | {_ms([r['acc'] for r in rs])} | {reach} |")
    return lines + [""] + prior_lines(runs)


def prior_lines(runs: list[dict]) -> list[str]:
    """The tokens an arm's init trained on before its runs (a learngene's Aux-Net), stated next to the result:
    its runs' budget is not all it saw."""
    prior = {}
    for r in runs:
        if r.get("prior_tokens"):
            prior.setdefault((r["depth"], r["arm"]), set()).add(r["prior_tokens"])
    lines = [f"- {a} at {d} layers: its init trained on **{', '.join(f'{t:,}' for t in sorted(ts))} tokens** before "
             f"these runs (the learngene's Aux-Net, distilled from the teacher), on top of each run's "
             f"{_run_tokens(runs, d, a)} tokens." for (d, a), ts in sorted(prior.items())]
    unknown = sorted({f"{r['arm']}-{r['depth']}L-s{r['seed']}" for r in runs if r.get("prior_tokens", 0) is None})
    if unknown:
        lines.append(f"- The init of {len(unknown)} run(s) ({', '.join(unknown[:4])}{', ...' if len(unknown) > 4 else ''}) "
                     "is gone or was re-made since: the tokens it trained on before these runs (a learngene's "
                     "Aux-Net) cannot be stated.")
    return lines + [""] if lines else []


def _run_tokens(runs: list[dict], depth: int, arm: str) -> str:
    got = {r["tokens"] for r in runs if r["depth"] == depth and r["arm"] == arm and r.get("tokens")}
    return ", ".join(f"{t:,}" for t in sorted(got)) or "(unrecorded)"


def exploratory_section(runs: list[dict], contrasts: list[str] | None) -> list[str]:
    pairs = [_contrast(c) for c in contrasts or []]
    by = _by(runs)
    rows = []
    for d in sorted({r["depth"] for r in runs}):
        for a, b in pairs:
            if (d, a) in by and (d, b) in by:
                diff, half, n, _ = rstats.paired({s: r["score"] for s, r in by[(d, a)].items()},
                                                {s: r["score"] for s, r in by[(d, b)].items()})
                ci = f"{diff:+.3f} ± {half:.3f}" if not math.isnan(half) else f"{diff:+.3f}"
                rows.append(f"| {d} | {a} − {b} | {ci} | {n} |")
    if not rows:
        return []
    return ["## Exploratory contrasts (uncorrected)", "",
            "Paired seed by seed on the test NLL, 95% intervals without multiplicity correction: hypotheses "
            "for the next experiment, not findings.", "", "| depth | first − second | Δ (95% CI) | seeds |",
            "|---|---|---|---|", *rows, ""]


def budget_section(by_budget: dict[float, list[dict]], baseline: str, plot: Path | None) -> list[str]:
    """Per budget: each arm's mean test NLL and how many times its budget the baseline needs to match it
    (bracketed by the baseline's own runs at every budget, each with its own schedule and tuned settings)."""
    if len(by_budget) < 2:
        return []
    curves = defaultdict(dict)  # depth -> {mult: {seed: score}} of the baseline
    for mult, runs in by_budget.items():
        for r in runs:
            if r["arm"] == baseline:
                curves[r["depth"]].setdefault(mult, {})[r["seed"]] = r["score"]
    rows, points = [], defaultdict(list)
    for mult, runs in sorted(by_budget.items()):
        by = _by(runs)
        for (d, a), rs in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1] == baseline, kv[0][1])):
            scores = {s: r["score"] for s, r in rs.items()}
            m = float(np.mean(list(scores.values())))
            if a == baseline or len(curves[d]) < 2:
                rows.append(f"| {mult:g}× | {_steps(rs.values())} | {d} | {a} | {len(rs)} | {m:.3f} | - | - |")
                continue
            r = rstats.budget_ratio(curves[d], scores, mult)
            bmin, bmax = min(curves[d]), max(curves[d])
            lo, hi = (f"{x * mult:.2f}×" if math.isfinite(x) else (f"< {bmin:g}×" if x < 0 else f"> {bmax:g}×")
                      for x in (r["low"], r["high"]))
            point = (f"{r['ratio'] * mult:.2f}× ({r['ratio']:.2f}× its own)" if r["ratio"] is not None else
                     (f"< {bmin:g}× (worse than {baseline}'s smallest budget)" if r["censored"] == "<"
                      else f"> {bmax:g}× (better than {baseline}'s largest budget)"))
            cens = f"; {100 * (r['below'] + r['beyond']):.0f}% of draws outside" if r["below"] + r["beyond"] else ""
            rows.append(f"| {mult:g}× | {_steps(rs.values())} | {d} | {a} | {len(rs)} | {m:.3f} | {point} | "
                        f"{lo} to {hi}{cens} |")
            diff, half, n, _ = rstats.paired(scores, {s: x["score"] for s, x in by.get((d, baseline), {}).items()})
            points[(a, d)].append((mult, diff, half))
    lines = ["## Training budget", "",
             f"Every arm trained at several multiples of the 1× budget, each run with its own schedule and its own "
             f"tuned settings. The last columns: the budget (a multiple of 1×) at which {baseline} — its mean test "
             "NLL at each budget, log-linear in between — matches the arm's mean, and that budget over the arm's own, "
             "with a 95% bootstrap interval over seeds; draws beyond the budgets run are censored (shown as < or >), "
             "never dropped.", "",
             f"| budget | steps | depth | arm | seeds | test NLL | {baseline} needs | 95% interval |",
             "|---|---|---|---|---|---|---|---|", *rows, ""]
    for (a, d), pts in sorted(points.items()):  # the sign at every budget, in words (by its paired interval)
        words = [f"{_word(diff, half, baseline)} at {mult:g}× (Δ {diff:+.3f} ± {half:.3f})" for mult, diff, half in pts]
        lines.append(f"- {a} ({d}L): " + "; ".join(words) + ".")
    lines.append("")
    if plot is not None and points:
        paper_plot(points, baseline, plot)
        lines += [f"![Δ test NLL vs {baseline} against budget]({plot.name})", ""]
    return lines


def _word(diff: float, half: float, baseline: str) -> str:
    if math.isnan(half):
        return "no interval"
    return (f"better than {baseline}" if diff + half < 0 else f"worse than {baseline}" if diff - half > 0
            else f"indistinguishable from {baseline}")


def paper_plot(points, baseline, plot):
    from .report_paper import _budget_plot
    _budget_plot(points, baseline, plot)


def depth_section(runs: list[dict], baseline: str) -> list[str]:
    depths = sorted({r["depth"] for r in runs})
    if len(depths) < 2:
        return []
    by = _by(runs)
    arms = sorted({a for _, a in by if a != baseline})
    lines = ["## Depth (exploratory)", "", f"Paired Δ test NLL vs {baseline} (95%, uncorrected) per student depth.", "",
             "| arm | " + " | ".join(f"{d} layers" for d in depths) + " |", "|---|" + "---|" * len(depths)]
    for a in arms:
        cells = []
        for d in depths:
            if (d, a) in by and (d, baseline) in by:
                diff, half, n, _ = rstats.paired({s: r["score"] for s, r in by[(d, a)].items()},
                                                {s: r["score"] for s, r in by[(d, baseline)].items()})
                cells.append((f"{diff:+.3f} ± {half:.3f}" if not math.isnan(half) else f"{diff:+.3f}") + f" ({n})")
            else:
                cells.append("-")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return lines + [""]


def picks_unused(tuning: dict[float, dict], by_budget: dict[float, list[dict]]) -> list[str]:
    """Final runs that did not train with their arm's pick at their budget (the picks not copied into the recipe)."""
    out = []
    for mult, picks in sorted(tuning.items()):
        for r in by_budget.get(mult, []):
            p, k = picks.get(r["arm"]), r.get("knobs") or {}
            if p is None or not k:
                continue
            off = [f"{n} {k[n]:g} (pick {p[n]:g})" for n in ("lr", "warmup", "up_gain")
                   if k.get(n) is not None and p.get(n) is not None and not math.isclose(float(k[n]), float(p[n]))]
            if off:
                out.append(f"{r['arm']}-{r['depth']}L-s{r['seed']} at {mult:g}×: {', '.join(off)}")
    return out


def tuning_section(tuning: dict[float, dict], by_budget: dict[float, list[dict]] | None = None) -> list[str]:
    if not tuning:
        return []
    unused = picks_unused(tuning, by_budget or {})
    used = ("the final runs above use these picks." if not unused else
            f"**{len(unused)} final run{'s' if len(unused) > 1 else ''} above did not train with these picks** "
            f"(copy the picks into the recipe and re-run): {'; '.join(unused[:6])}{' ...' if len(unused) > 6 else ''}.")
    lines = ["## Tuning (validation split)", "",
             f"Every arm got the same grid at each budget (`xpertctl tune`); {used} "
             "A pick on the edge of its grid is marked.", "",
             "| budget | arm | lr | warmup | up-gain | val loss | seeds | on the edge |", "|---|---|---|---|---|---|---|---|"]
    for mult, picks in sorted(tuning.items()):
        for arm, p in picks.items():
            lines.append(f"| {mult:g}× | {arm} | {p['lr']:g} | {p['warmup']} | {p['up_gain']:g} | {p['val_loss']:.4f} | "
                         f"{len(p.get('seeds', []))} | {', '.join(p.get('edge') or []) or 'no'} |")
    return lines + [""]


def teacher_section(tdoc: dict | None, by_budget: dict[float, list[dict]]) -> list[str]:
    if tdoc is None:
        return []
    ppl = next((v for k, v in tdoc["tasks"].items() if k.startswith("ppl:")), {})
    mc_key, mc = next(((k, v) for k, v in tdoc["tasks"].items() if k.startswith("mc:")), ("mc:-", {}))
    doms = [v["nll"] for v in ppl.values() if isinstance(v, dict)]
    t_nll = float(np.mean(doms)) if doms else float("nan")
    lines = ["## Teacher (reference)", "", f"- {_split(tdoc)} NLL {t_nll:.3f} (ppl {math.exp(t_nll):.1f})",
             f"- multiple choice ({Path(mc_key[3:]).name}) acc {mc.get('acc', float('nan')):.3f}, "
             f"acc_norm {mc.get('acc_norm', float('nan')):.3f}"]
    for mult, runs in sorted(by_budget.items()):
        means = {}
        for r in runs:
            means.setdefault((r["arm"], r["depth"]), []).append(r["score"])
        if means:
            (arm, d), best = min(((k, float(np.mean(v))) for k, v in means.items()), key=lambda kv: kv[1])
            lines.append(f"- at {mult:g}×: the best student ({arm}, {d} layers) {best:.3f}; the teacher is "
                         f"{best - t_nll:.3f} nats below it")
    return lines + [""]


def domain_section(runs: list[dict], baseline: str, split: str) -> list[str]:
    doms = sorted({k for r in runs for k in r["test_nll"]})
    if not doms:
        return []
    by = _by(runs)
    lines = [f"## {split.capitalize()} perplexity per domain (mean over seeds)", "",
             "| depth | arm | " + " | ".join(doms) + " |", "|---|---|" + "---|" * len(doms)]
    for (d, a), rs in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1] == baseline, kv[0][1])):
        cells = [f"{math.exp(np.mean([r['test_nll'][k] for r in rs.values() if k in r['test_nll']])):.1f}" for k in doms]
        lines.append(f"| {d} | {a} | " + " | ".join(cells) + " |")
    return lines + [""]


def build(results: list[str], out: Path, *, baseline: str = "scratch", teacher: Path | None = None,
          stats: Path | None = None, selection: Path | None = None, title: str = "XPERT demo",
          fidelity: list[str] | None = None, notes: str | None = None, contrasts: list[str] | None = None,
          primary: list[str] | None = None, budgets: list[str] | None = None, tuning: list[str] | None = None,
          sft: list[str] | None = None, force: bool = False) -> Path:
    """`xpertctl report`: REPORT.md and its plots, from eval JSONs (see the sections above)."""
    from .console import notice
    from .io.writer import atomic_path, check_output
    from . import report_paper as paper
    ignored: list[str] = []  # every input left out, named in REPORT.md and on stderr
    by_budget = _load_budgets(results, budgets, ignored)
    files = sorted({Path(p) for pat in results for p in glob.glob(pat)})
    fid_files = [Path(p) for pat in fidelity or [] for p in glob.glob(pat)]
    check_output(out, force, [*files, *fid_files, teacher, stats, selection], marker="REPORT.md")
    runs = by_budget[1.0]
    splits = sorted({r["split"] for rs in by_budget.values() for r in rs})
    if len(splits) > 1:
        raise XpertError(f"--results: perplexities of different splits ({', '.join(splits)}); eval every run with "
                         "the same --split")
    split = splits[0] if splits else "val"
    _check_arms(by_budget, baseline, contrasts, primary)
    picks = _tuning(tuning)
    tdoc = _eval_doc(Path(teacher), "--teacher") if teacher is not None else None
    fid = _fidelity(fidelity, {(r["arm"], r["depth"], r["seed"]) for r in runs}, ignored)
    for line in ignored:
        notice(f"ignored {line}")
    for r in runs:
        r["fidelity"] = fid.get((r["arm"], r["depth"], r["seed"]), float("nan"))
    for rs in by_budget.values():
        for r in rs:
            r.setdefault("fidelity", float("nan"))
    steps_of = {m: _steps(rs) for m, rs in by_budget.items()}
    tests = primary_tests(by_budget, primary or [])
    lines = [f"# {title}", ""]
    lines += headline_section(tests, steps_of)
    for mult, rs in sorted(by_budget.items()):
        lines += result_section(rs, baseline, split, f"Result at {mult:g}× ({steps_of[mult]} steps)")
    lines += exploratory_section(runs, contrasts)
    if notes:
        lines += [notes, ""]
    lines += teacher_section(tdoc, by_budget)
    lines += tuning_section(picks, by_budget)
    lines += domain_section(runs, baseline, split)
    with atomic_path(Path(out), force, marker="REPORT.md") as tmp:
        tmp.mkdir()
        lines += budget_section(by_budget, baseline, tmp / "budget.png")
        lines += depth_section(runs, baseline)
        # the paper's other questions: sections appear only when their results are there
        lines += paper.downstream_section(runs, files, teacher, baseline, seeds_for=seeds_for)
        lines += paper.diversity_section(runs, seeds_for=seeds_for)
        lines += paper.sft_section(paper.load_sft(sft or []), baseline, tmp / "sft_rouge.png", seeds_for=seeds_for)
        by, depths = _curve_groups(runs)
        arms = sorted({r["arm"] for r in runs}, key=lambda a: (a == baseline, a))
        _curves(by, depths, arms, baseline, tmp / "loss_curves.png")
        lines += ["## Plots", "", "![validation loss](loss_curves.png)", ""]
        if fid:
            _fidelity_plot(runs, tmp / "fidelity_vs_loss.png")
            lines += ["![FFN fidelity before training against test NLL](fidelity_vs_loss.png)", ""]
        if stats is not None:
            _heatmap(stats, selection, tmp / "expert_frequency.png")
            lines += ["![expert frequency](expert_frequency.png)", ""]
        if ignored:
            lines += ["## Inputs ignored", "", *[f"- {line}" for line in ignored], ""]
        lines += ["Runs: " + ", ".join(f.stem for f in files), ""]
        (tmp / "REPORT.md").write_text("\n".join(lines))
    return Path(out)


def _curve_groups(runs: list[dict]):
    by = defaultdict(list)
    for r in runs:
        by[(r["depth"], r["arm"])].append(r)
    return by, sorted({r["depth"] for r in runs})


def _curves(by, depths, arms, baseline, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(depths), figsize=(5 * len(depths), 3.6), squeeze=False)
    for ax, d in zip(axes[0], depths):
        for a in arms:
            rs = [r for r in by.get((d, a), []) if r["val"]]
            if not rs:
                continue
            steps = [s for s, _ in rs[0]["val"]]
            vals = np.array([[v for _, v in r["val"]][: len(steps)] for r in rs if len(r["val"]) >= len(steps)])
            mean = vals.mean(0)
            ax.plot(steps, mean, label=a, lw=2.2 if a == baseline else 1.4, ls="--" if a == baseline else "-")
            ax.fill_between(steps, vals.min(0), vals.max(0), alpha=0.15)
        ax.set_title(f"{d} layers")
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fidelity_plot(runs: list[dict], path: Path) -> None:
    """Each run's FFN rel_error before training against its final validation loss, one colour per arm."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for a in sorted({r["arm"] for r in runs}):
        pts = [(r["fidelity"], r["score"]) for r in runs if r["arm"] == a and not math.isnan(r["fidelity"])]
        if pts:
            ax.scatter(*zip(*pts), label=a, s=18)
    ax.set_xlabel("FFN rel_error vs the MoE blocks, before training (lower = more faithful)")
    ax.set_ylabel("test NLL")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _heatmap(stats: Path, selection: Path | None, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .ops import select as sel
    st = sel.load_stats(stats)
    f = st.freq  # [D, L, E]
    chosen = {}
    if selection is not None:
        chosen = {l["layer"]: l.get("experts", l.get("neurons")) for l in sel.load_selection(selection)["layers"]}
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.5 * len(st.layers) + 1.8))
    for ax, (name, m) in zip(axes, (("mean over domains", f.mean(0)), ("min over domains", f.min(0)))):
        im = ax.imshow(m, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(st.layers)), [str(l) for l in st.layers])
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_title(f"activation frequency: {name}", fontsize=9)
        for li, l in enumerate(st.layers):
            for j in chosen.get(l, []):
                ax.scatter([j], [li], marker="*", color="red", s=40)
        fig.colorbar(im, ax=ax, fraction=0.04)
    fig.suptitle("teacher routing (red stars: selected experts)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
