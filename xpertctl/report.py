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
            "train_loss": [(r["step"], r["loss"]) for r in rows]}


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
    seeds = sorted(set(x) & set(y))
    d = np.array([x[s] - y[s] for s in seeds])
    if len(d) < 2:
        return (float(d.mean()) if len(d) else float("nan")), float("nan"), len(d)
    from scipy.stats import t as student_t
    return float(d.mean()), float(student_t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))), len(d)


CI_GOAL = 0.05  # nats: the half-width of the paired 95% interval a demo arm should reach (issue 12)


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


def build(results: list[str], out: Path, *, baseline: str = "scratch", teacher: Path | None = None,
          stats: Path | None = None, selection: Path | None = None, title: str = "XPERT demo",
          fidelity: list[str] | None = None, notes: str | None = None, contrasts: list[str] | None = None,
          budgets: list[str] | None = None, sft: list[str] | None = None, force: bool = False) -> Path:
    from .console import notice
    from .io.writer import atomic_path, check_output
    from . import report_paper as paper
    files = sorted({Path(p) for pat in results for p in glob.glob(pat)})
    if not files:
        raise XpertError(f"--results {' '.join(results)}: no result files match")
    fid_files = [Path(p) for pat in fidelity or [] for p in glob.glob(pat)]
    budget_files = []
    for b in budgets or []:
        mult, pattern = paper.parse_budget(b)
        found = sorted(Path(p) for p in glob.glob(pattern))
        if not found:
            raise XpertError(f"--budget {b}: no result files match")
        budget_files.append((mult, found))
    check_output(out, force, [*files, *fid_files, *(f for _, fs in budget_files for f in fs), teacher, stats, selection],
                 marker="REPORT.md")
    ignored: list[str] = []  # every input left out, named in REPORT.md and on stderr
    runs = [r for r in (_load_run(f, ignored) for f in files) if r is not None]
    if not runs:
        raise XpertError(f"--results {' '.join(results)}: no usable result; e.g. {ignored[0]}")
    splits = sorted({r["split"] for r in runs})
    if len(splits) > 1:
        raise XpertError(f"--results: perplexities of different splits ({', '.join(splits)}); eval every run with "
                         "the same --split")
    split = splits[0]
    arm_names = sorted({r["arm"] for r in runs})
    if baseline not in arm_names:
        raise XpertError(f"--baseline {baseline!r}: no results of that arm (arms: {', '.join(arm_names)})")
    for c in contrasts or []:
        for a in _contrast(c):
            if a not in arm_names:
                raise XpertError(f"--contrast {c!r}: no results of arm {a!r} (arms: {', '.join(arm_names)})")
    tdoc = _eval_doc(Path(teacher), "--teacher") if teacher is not None else None
    fid = _fidelity(fidelity, {(r["arm"], r["depth"], r["seed"]) for r in runs}, ignored)
    for line in ignored:
        notice(f"ignored {line}")
    for r in runs:
        r["fidelity"] = fid.get((r["arm"], r["depth"], r["seed"]), float("nan"))
    by = defaultdict(list)
    for r in runs:
        by[(r["depth"], r["arm"])].append(r)
    depths = sorted({r["depth"] for r in runs})
    arms = sorted({r["arm"] for r in runs}, key=lambda a: (a == baseline, a))
    lines = [f"# {title}", ""]
    verdicts = []
    table = ["| depth | arm | seeds | FFN fidelity (rel_error before training) | final val loss | paired Δ vs scratch (95% CI) "
             f"| {split} ppl | mc acc | mc acc_norm | steps to scratch's final val |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for d in depths:
        base = by.get((d, baseline), [])
        target = float(np.mean([r["final_val"] for r in base])) if base else float("nan")
        total_steps = max((r["val"][-1][0] for r in base if r["val"]), default=0)
        for a in arms:
            rs = by.get((d, a), [])
            if not rs:
                continue
            reach = [_reach(r["val"], target) for r in rs] if base else []
            got = [x for x in reach if x is not None]
            reach_s = "-" if not base else (f"{np.mean(got):.0f} of {total_steps} ({len(got)}/{len(rs)} seeds)"
                                            if got else f"not reached ({total_steps} steps)")
            diff, half, n = paired_ci({r["seed"]: r["final_val"] for r in rs}, {r["seed"]: r["final_val"] for r in base})
            delta = "-" if a == baseline or not n else (f"{diff:+.3f} ± {half:.3f}" if not math.isnan(half) else f"{diff:+.3f} (1 seed)")
            table.append(f"| {d} | {a} | {len(rs)} | {_ms([r['fidelity'] for r in rs])} | {_ms([r['final_val'] for r in rs])} | "
                         f"{delta} | {_ms([r['test_ppl'] for r in rs], '{:.1f}')} | {_ms([r['acc'] for r in rs])} | "
                         f"{_ms([r['acc_norm'] for r in rs])} | {reach_s} |")
        for a in arms:
            if a == baseline or (d, a) not in by or not base:
                continue
            diff, half, n = paired_ci({r["seed"]: r["final_val"] for r in by[(d, a)]},
                                      {r["seed"]: r["final_val"] for r in base})
            word = "lower (better)" if diff < 0 else "higher (worse)"
            if math.isnan(half):
                spread, sig = f"{n} paired seed(s): no interval, not a finding", False
            else:
                sig = abs(diff) > half
                spread = (f"paired over {n} seeds, 95% CI {diff - half:+.3f} to {diff + half:+.3f}: "
                          f"{'excludes' if sig else 'includes'} zero")
            verdicts.append((a, d, diff, sig, f"- depth {d}: **{a}** ends with val loss {abs(diff):.3f} {word} "
                                                f"than {baseline} ({spread}).", half, n))
    lines += ["## Result", "", *table, ""]
    lines += ["## Outcome", "", "Final validation loss of each arm against the scratch baseline (same data, same "
              "steps, same seeds; the difference is taken seed by seed, each arm paired with the scratch run of "
              "its seed):", "", *[v[4] for v in verdicts], ""]
    lines += ["**Verdict** (an arm is better or worse when the paired 95% interval excludes zero):", ""]
    for a in dict.fromkeys(v[0] for v in verdicts):
        mine = [v for v in verdicts if v[0] == a]
        better = sum(v[3] and v[2] < 0 for v in mine)
        worse = sum(v[3] and v[2] > 0 for v in mine)
        lines.append(f"- {a}: better than {baseline} at {better} of {len(mine)} depths, worse at {worse}, "
                     f"indistinguishable at {len(mine) - better - worse}.")
    lines.append("")
    met = [f"{a} at {d}L (±{h:.3f})" for a, d, _, _, _, h, n in verdicts if h <= CI_GOAL]
    short = [f"{a} at {d}L (±{h:.3f} over {n} seeds; about {seeds_for(h, n) or 'more than 100,000'} seeds at "
             f"this spread)" for a, d, _, _, _, h, n in verdicts if h > CI_GOAL]
    alone = [f"{a} at {d}L" for a, d, _, _, _, h, n in verdicts if math.isnan(h)]
    if verdicts:
        lines += [f"**Precision** (goal: a paired 95% interval no wider than ±{CI_GOAL} nats; the seed counts "
                  f"take the observed spread as the true one): met for {', '.join(met) or 'no arm'}; not met for "
                  f"{', '.join(short) or 'no arm'}" + (f"; no interval (one paired seed) for {', '.join(alone)}"
                                                        if alone else "") + ".", ""]
    pairs = [_contrast(c) for c in contrasts or []]
    if pairs:
        lines += ["## Contrasts between arms", "",
                  "Each row pairs two arms seed by seed (same seed: same non-FFN init, same batches); a negative "
                  "difference means the first arm ends lower. This is what separates knowledge from init scale "
                  "(xpert vs norm-matched) and the selection from any experts (xpert vs random, low).", "",
                  "| depth | first − second | paired Δ val loss (95% CI) | seeds | reading |", "|---|---|---|---|---|"]
        for d in depths:
            for a, b in pairs:
                if (d, a) not in by or (d, b) not in by:
                    continue
                diff, half, n = paired_ci({r["seed"]: r["final_val"] for r in by[(d, a)]},
                                          {r["seed"]: r["final_val"] for r in by[(d, b)]})
                if math.isnan(half):
                    reading, ci = "no interval", f"{diff:+.3f}"
                else:
                    ci = f"{diff:+.3f} ± {half:.3f}"
                    reading = (f"{a} lower" if diff + half < 0 else f"{b} lower" if diff - half > 0
                               else "indistinguishable")
                lines.append(f"| {d} | {a} − {b} | {ci} | {n} | {reading} |")
        lines.append("")
    if notes:
        lines += [notes, ""]
    if tdoc is not None:
        t = tdoc
        ppl = next((v for k, v in t["tasks"].items() if k.startswith("ppl:")), {})
        mc_key, mc = next(((k, v) for k, v in t["tasks"].items() if k.startswith("mc:")), ("mc:-", {}))
        doms = [v["nll"] for v in ppl.values() if isinstance(v, dict)]
        lines += ["## Teacher (reference)", "", f"- {_split(t)} ppl {math.exp(np.mean(doms)):.1f}" if doms else "",
                  f"- multiple choice ({Path(mc_key[3:]).name}) acc {mc.get('acc', float('nan')):.3f}, "
                  f"acc_norm {mc.get('acc_norm', float('nan')):.3f}", ""]
    # per-domain test perplexity
    doms = sorted({k for r in runs for k in r["test_nll"]})
    if doms:
        lines += [f"## {split.capitalize()} perplexity per domain (mean over seeds)", "",
                  "| depth | arm | " + " | ".join(doms) + " |", "|---|---|" + "---|" * len(doms)]
        for d in depths:
            for a in arms:
                rs = by.get((d, a), [])
                if rs:
                    cells = [f"{math.exp(np.mean([r['test_nll'][k] for r in rs if k in r['test_nll']])):.1f}" for k in doms]
                    lines.append(f"| {d} | {a} | " + " | ".join(cells) + " |")
        lines.append("")
    if ignored:
        lines += ["## Inputs ignored", "", *[f"- {line}" for line in ignored], ""]
    with atomic_path(Path(out), force, marker="REPORT.md") as tmp:
        tmp.mkdir()
        # the paper's own questions (issue 21): sections appear only when their results are there
        lines += paper.downstream_section(runs, files, teacher, baseline, seeds_for=seeds_for)
        lines += paper.depth_section(runs, baseline, seeds_for=seeds_for)
        lines += paper.budget_section([(m, [r for r in (_load_run(f, ignored) for f in fs) if r is not None])
                                        for m, fs in budget_files], baseline,
                                      tmp / "budget.png", seeds_for=seeds_for)
        lines += paper.diversity_section(runs, seeds_for=seeds_for)
        lines += paper.sft_section(paper.load_sft(sft or []), baseline, tmp / "sft_rouge.png", seeds_for=seeds_for)
        _curves(by, depths, arms, baseline, tmp / "loss_curves.png")
        lines += ["## Plots", "", "![validation loss](loss_curves.png)", ""]
        if fid:
            _fidelity_plot(runs, tmp / "fidelity_vs_loss.png")
            lines += ["![FFN fidelity before training against final validation loss](fidelity_vs_loss.png)", ""]
        if stats is not None:
            _heatmap(stats, selection, tmp / "expert_frequency.png")
            lines += ["![expert frequency](expert_frequency.png)", ""]
        lines += ["Runs: " + ", ".join(f.stem for f in files), ""]
        (tmp / "REPORT.md").write_text("\n".join(lines))
    return Path(out)


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
        pts = [(r["fidelity"], r["final_val"]) for r in runs if r["arm"] == a and not math.isnan(r["fidelity"])]
        if pts:
            ax.scatter(*zip(*pts), label=a, s=18)
    ax.set_xlabel("FFN rel_error vs the MoE blocks, before training (lower = more faithful)")
    ax.set_ylabel("final validation loss")
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
