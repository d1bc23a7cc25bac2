"""The report's sections on the paper's other questions (exploratory): downstream accuracy, domain
diversity and SFT Rouge-L (report.py has the primary contrasts, budget and depth). Each takes loaded runs (report._load_run's dicts) or result
globs and returns Markdown lines; every difference is paired seed by seed with a 95% t-interval."""
from __future__ import annotations

import glob
import json
import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from .errors import XpertError

LOSS_GOAL, ACC_GOAL, ROUGE_GOAL = 0.05, 0.03, 1.0  # the precision goals: nats, accuracy, Rouge-L points


def _pci(x: dict[int, float], y: dict[int, float]) -> tuple[float, float, int]:
    """Mean of the per-seed differences x - y over the seeds both have, its 95% t half-width, n (scipy's
    one-sample t interval of the differences: the paired t interval)."""
    seeds = sorted(set(x) & set(y))
    d = np.array([x[s] - y[s] for s in seeds], dtype=float)
    if len(d) < 2:
        return (float(d.mean()) if len(d) else float("nan")), float("nan"), len(d)
    if np.ptp(d) == 0:  # identical differences: scipy's interval is undefined, the spread is zero
        return float(d.mean()), 0.0, len(d)
    from scipy.stats import ttest_1samp
    ci = ttest_1samp(d, 0.0).confidence_interval(0.95)
    return float(d.mean()), float((ci.high - ci.low) / 2), len(d)


def _fmt(diff: float, half: float, n: int, digits: int = 3) -> str:
    if not n:
        return "-"
    return f"{diff:+.{digits}f} ± {half:.{digits}f}" if not math.isnan(half) else f"{diff:+.{digits}f} (1 seed)"


def mean_ci(xs: list[float]) -> tuple[float, float]:
    """Mean and 95% t half-width over seeds (nan with one)."""
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    if len(xs) < 2:
        return float(xs[0]), float("nan")
    from scipy.stats import t as student_t
    return float(np.mean(xs)), float(student_t.ppf(0.975, len(xs) - 1) * np.std(xs, ddof=1) / math.sqrt(len(xs)))


def precision(found: list[tuple[str, float, int]], goal: float, unit: str, seeds_for=None) -> list[str]:
    """One line: which paired intervals reach ±goal, and for the others the seeds that would take at the
    observed spread (seeds_for(half, n, goal), report.seeds_for, handed in by the caller)."""
    if not found:
        return []
    met = [f"{k} (±{h:.3f})" for k, h, n in found if not math.isnan(h) and h <= goal]
    short = [f"{k} (±{h:.3f} over {n} seeds" + (f"; about {seeds_for(h, n, goal) or 'more than 100,000'} seeds at this spread)"
                                                if seeds_for else ")") for k, h, n in found if not math.isnan(h) and h > goal]
    alone = [k for k, h, n in found if math.isnan(h)]
    return [f"**Precision** (goal: paired 95% intervals within ±{goal:g} {unit}): met for {', '.join(met) or 'none'}; "
            f"not met for {', '.join(short) or 'none'}" + (f"; no interval (one paired seed) for {', '.join(alone)}"
                                                           if alone else "") + ".", ""]


def _reading(diff: float, half: float, lower_better: bool = True) -> str:
    if math.isnan(half):
        return "no interval"
    if diff + half < 0:
        return "lower" if lower_better else "lower (worse)"
    if diff - half > 0:
        return "higher" if lower_better else "higher (better)"
    return "indistinguishable"


# ---- downstream multiple choice ---------------------------------------------------------------------

def mc_scores(res_path: Path) -> dict[str, dict]:
    """{task file name: {acc, n, choices}} of every `mc:` task in one eval JSON."""
    doc = json.loads(Path(res_path).read_text())
    out = {}
    for key, v in doc.get("tasks", {}).items():
        if key.startswith("mc:") and isinstance(v, dict):
            out[Path(key[3:]).name] = {"acc": float(v["acc"]), "n": int(v.get("n", 0)), "choices": _choices(key[3:])}
    return out


def _choices(path: str) -> int | None:
    try:
        first = Path(path).read_text().splitlines()[0]
        return len(json.loads(first)["choices"])
    except (OSError, IndexError, ValueError, KeyError, TypeError):
        return None


def downstream_section(runs: list[dict], files: list[Path], teacher: Path | None, baseline: str = "scratch",
                       seeds_for=None) -> list[str]:
    """Accuracy per arm on every multiple-choice task, paired with the baseline seed by seed; the teacher
    with its binomial interval over items; chance."""
    scores = {(r["arm"], r["depth"], r["seed"]): mc_scores(f) for r, f in zip(runs, files)}
    tasks = sorted({t for s in scores.values() for t in s})
    if not tasks:
        return []
    t_scores = mc_scores(teacher) if teacher is not None and Path(teacher).is_file() else {}
    lines = ["## Downstream: multiple choice", "",
             "Accuracy on held-out (test-split) items; mean over seeds with its 95% interval, and the difference "
             "to the baseline paired seed by seed. The teacher's interval is over items (binomial).", ""]
    for task in tasks:
        any_s = next(s[task] for s in scores.values() if task in s)
        chance = f"{1 / any_s['choices']:.3f}" if any_s["choices"] else "?"
        lines += [f"**{task}** ({any_s['n']} items, chance {chance})" + (
            f"; teacher {t_scores[task]['acc']:.3f} ± {1.96 * math.sqrt(t_scores[task]['acc'] * (1 - t_scores[task]['acc']) / max(t_scores[task]['n'], 1)):.3f}"
            if task in t_scores else ""), "",
                  f"| depth | arm | seeds | acc (95% CI) | paired Δ vs {baseline} (95% CI) | reading |", "|---|---|---|---|---|---|"]
        keys = sorted({(d, a) for (a, d, _s), s in scores.items() if task in s}, key=lambda k: (k[0], k[1] == baseline, k[1]))
        found = []
        for d, a in keys:
            mine = {s: v[task]["acc"] for (aa, dd, s), v in scores.items() if aa == a and dd == d and task in v}
            base = {s: v[task]["acc"] for (aa, dd, s), v in scores.items() if aa == baseline and dd == d and task in v}
            m, h = mean_ci(list(mine.values()))
            acc = f"{m:.3f} ± {h:.3f}" if not math.isnan(h) else f"{m:.3f}"
            if a == baseline or not base:
                delta, reading = "-", "-"
            else:
                diff, half, n = _pci(mine, base)
                delta, reading = _fmt(diff, half, n), _reading(diff, half, lower_better=False)
                found.append((f"{a} at {d}L", half, n))
            lines.append(f"| {d} | {a} | {len(mine)} | {acc} | {delta} | {reading} |")
        lines.append("")
        lines += precision(found, ACC_GOAL, "accuracy", seeds_for)
    return lines


# ---- training budget ----------------------------------------------------------------------------------

def parse_budget(text: str) -> tuple[float, str]:
    mult, sep, pattern = str(text).partition("=")
    try:
        m = float(mult)
    except ValueError:
        m = float("nan")
    if not sep or not pattern or not m > 0:
        raise XpertError(f"--budget {text!r}: expected MULTIPLE=GLOB, e.g. 4=eval/x4/*.json")
    return m, pattern


def _budget_plot(points: dict, baseline: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for (a, d), pts in sorted(points.items()):
        xs, ys, hs = zip(*pts)
        ax.errorbar(xs, ys, yerr=[0 if math.isnan(h) else h for h in hs], marker="o", capsize=3, label=f"{a} {d}L")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training budget (multiple of 1x)")
    ax.set_ylabel(f"Δ test NLL vs {baseline} (95% CI)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- domain diversity --------------------------------------------------------------------------------

SINGLE = "single-"


def diversity_section(runs: list[dict], mixed: str = "xpert", seeds_for=None) -> list[str]:
    """Arms `single-<domain>` (experts selected from one domain's stats) against the mixed-domain
    selection, per evaluation domain: paired Δ test NLL (single − mixed; positive: mixed is better)."""
    singles = sorted({r["arm"] for r in runs if r["arm"].startswith(SINGLE)})
    if not singles:
        return []
    doms = sorted({k for r in runs for k in r["test_nll"]})
    found = []
    lines = ["## Domain diversity", "",
             f"Experts selected from one domain's statistics (`{SINGLE}<domain>`) vs from all domains (`{mixed}`), "
             "grafted and trained alike. Cells: paired Δ test NLL, single − mixed (95% CI); positive means the "
             "mixed-domain selection ends better on that evaluation domain.", "",
             "| depth | selection from | " + " | ".join(doms) + " | mean over domains |", "|---|---|" + "---|" * (len(doms) + 1)]
    for d in sorted({r["depth"] for r in runs}):
        mix = {r["seed"]: r for r in runs if r["arm"] == mixed and r["depth"] == d}
        if not mix:
            continue
        for a in singles:
            mine = {r["seed"]: r for r in runs if r["arm"] == a and r["depth"] == d}
            if not mine:
                continue
            cells = []
            for k in doms:
                x = {s: r["test_nll"][k] for s, r in mine.items() if k in r["test_nll"]}
                y = {s: r["test_nll"][k] for s, r in mix.items() if k in r["test_nll"]}
                cells.append(_fmt(*_pci(x, y)))
            diff, half, n = _pci({s: r["score"] for s, r in mine.items()}, {s: r["score"] for s, r in mix.items()})
            cells.append(_fmt(diff, half, n))
            found.append((f"{a} − {mixed} (mean over domains)", half, n))
            lines.append(f"| {d} | {a[len(SINGLE):]} | " + " | ".join(cells) + " |")
    return lines + [""] + precision(found, LOSS_GOAL, "nats", seeds_for)


# ---- SFT ---------------------------------------------------------------------------------------------

_SFT = re.compile(r"^(?P<arm>.+)-(?P<depth>\d+)L-s(?P<seed>\d+)-sft-(?P<point>.+)$")


def load_sft(patterns: list[str]) -> list[dict]:
    """Rouge-L results named ARM-<d>L-s<seed>-sft-<point>.json; point `base` (before SFT, step 0),
    `step-NNNNNN`, or `final` (the SFT run's last step, from its metrics.jsonl)."""
    out = []
    for f in sorted({Path(p) for pat in patterns for p in glob.glob(pat)}):
        m = _SFT.match(f.stem)
        if not m:
            continue
        doc = json.loads(f.read_text())
        gen = next((v for k, v in doc["tasks"].items() if k.startswith("gen:")), None)
        if gen is None:
            continue
        point = m["point"]
        if point == "base":
            step = 0
        elif point.startswith("step-"):
            step = int(point[5:])
        else:
            metrics = Path(doc["model"]["path"]).parent / "metrics.jsonl"
            rows = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()] if metrics.is_file() else []
            step = max((r["step"] for r in rows if "step" in r), default=0)  # metrics count steps from 1
        out.append({"arm": m["arm"], "depth": int(m["depth"]), "seed": int(m["seed"]), "step": step,
                    "rougeL": float(gen["rougeL"]), "n": int(gen.get("n", 0))})
    return out


def sft_section(recs: list[dict], baseline: str = "scratch", plot: Path | None = None, seeds_for=None) -> list[str]:
    if not recs:
        return []
    by = defaultdict(dict)
    for r in recs:
        by[(r["arm"], r["depth"], r["step"])][r["seed"]] = r["rougeL"]
    steps = sorted({k[2] for k in by})
    arms = sorted({k[0] for k in by}, key=lambda a: (a == baseline, a))
    n_items = max(r["n"] for r in recs)
    lines = ["## SFT: Rouge-L on held-out instructions", "",
             f"Each pretrained arm fine-tuned on the corpus's instruction set (train split), greedy answers to the "
             f"{n_items} test instructions scored with Rouge-L F (×100); per SFT step: mean over seeds (95% CI) and "
             f"the difference to {baseline} paired by seed.", "",
             "| depth | arm | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|---|" + "---|" * len(steps)]
    curves, found = {}, []
    for d in sorted({k[1] for k in by}):
        for a in arms:
            cells, curve = [], []
            for s in steps:
                mine = by.get((a, d, s))
                if not mine:
                    cells.append("-")
                    continue
                m, h = mean_ci(list(mine.values()))
                cell = f"{m:.1f}" + (f" ± {h:.1f}" if not math.isnan(h) else "")
                base = by.get((baseline, d, s))
                if a != baseline and base:
                    diff, half, n = _pci(mine, base)
                    cell += f" (Δ {_fmt(diff, half, n, 1)})"
                    if s == steps[-1]:
                        found.append((f"{a} at step {s}", half, n))
                cells.append(cell)
                curve.append((s, m, h))
            if curve:
                curves[(a, d)] = curve
                lines.append(f"| {d} | {a} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += precision(found, ROUGE_GOAL, "Rouge-L points", seeds_for)
    if plot is not None and curves:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for (a, d), c in sorted(curves.items()):
            xs, ms, hs = (np.array(v, dtype=float) for v in zip(*c))
            hs = np.nan_to_num(hs)
            ax.plot(xs, ms, marker="o", label=f"{a} {d}L", ls="--" if a == baseline else "-")
            ax.fill_between(xs, ms - hs, ms + hs, alpha=0.15)
        ax.set_xlabel("SFT step")
        ax.set_ylabel("Rouge-L (test instructions)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(plot, dpi=110)
        plt.close(fig)
        lines += [f"![Rouge-L over SFT steps]({plot.name})", ""]
    return lines
