"""`xpertctl tune`: each arm's training settings picked on the validation split, the same way for every arm.

Each `--arm NAME=GLOB` matches the `train` runs of one arm (RUN/ with train_config.json and metrics.jsonl):
a grid over the learning rate, the warmup and the init's `--up-gain` (read from the records, not from run
names), each cell trained with the same seeds. A cell's score is the mean over its seeds of the run's last
validation loss; the pick is the cell with the lowest score. A pick on the edge of its grid is flagged: the
best setting may lie beyond it. Writes OUT/TUNE.md (every cell, the pick, its margin) and OUT/picks.json
(what a recipe's `picks` var takes)."""
from __future__ import annotations

import glob
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from .errors import XpertError

KNOBS = ("lr", "warmup", "up_gain")


def parse_arm(text: str) -> tuple[str, str]:
    name, sep, pattern = str(text).partition("=")
    if not sep or not name or not pattern:
        raise XpertError(f"--arm {text!r}: expected NAME=GLOB (train run directories of that arm)")
    return name, pattern


def load_run(run: Path) -> dict:
    """One run's cell (lr, warmup, up_gain), seed, steps and last validation loss."""
    cfg_path, met_path = run / "train_config.json", run / "metrics.jsonl"
    if not cfg_path.is_file() or not met_path.is_file():
        raise XpertError(f"{run}: not a finished `xpertctl train` run (no train_config.json / metrics.jsonl)")
    try:
        rec = json.loads(cfg_path.read_text())
        rows = [json.loads(l) for l in met_path.read_text().splitlines() if l.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise XpertError(f"{run}: unreadable run record ({e.__class__.__name__})") from None
    params = rec.get("params") or {} if isinstance(rec, dict) else {}
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    if not val or not (run / "final").is_dir():
        raise XpertError(f"{run}: the run did not finish (no final/ or no validation loss; train with --eval-every)")
    return {"run": str(run), "seed": params.get("seed"), "steps": rows[-1]["step"], "lr": params.get("lr"),
            "warmup": params.get("warmup"), "up_gain": _up_gain(rec), "val": val[-1]}


def init_params(train_rec: dict) -> dict:
    """The params of the graft the run started from ({} for an init that records none)."""
    from .io.provenance import read
    start = next((i.get("path") for i in train_rec.get("inputs") or [] if i.get("path")), None)
    if start is None:
        return {}
    files = sorted(Path(start).glob("*.safetensors"))
    try:
        return read(files[0]).get("params") or {} if files else {}
    except XpertError:
        return {}


def _up_gain(train_rec: dict) -> float:
    """The --up-gain of the graft the run started from (1 for an init that records none)."""
    return float(init_params(train_rec).get("up_gain") or 1.0)


def pick(runs: list[dict]) -> dict:
    """Cells (mean over seeds), the pick and where it sits on the grid."""
    cells = defaultdict(dict)
    for r in runs:
        cells[tuple(r[k] for k in KNOBS)][r["seed"]] = r["val"]
    seeds = set.union(*(set(v) for v in cells.values()))
    full = {c: v for c, v in cells.items() if set(v) >= seeds}  # a cell missing a seed is not comparable
    if not full:
        raise XpertError(f"no cell of the grid has every seed ({sorted(seeds)}); give every cell the same seeds")
    scored = sorted(((float(np.mean([v[s] for s in seeds])), c) for c, v in full.items()), key=lambda x: x[0])
    best_score, best = scored[0]
    grid = {k: sorted({c[i] for c in cells}) for i, k in enumerate(KNOBS)}
    edge = [k for i, k in enumerate(KNOBS) if len(grid[k]) > 1 and best[i] in (grid[k][0], grid[k][-1])]
    runner = scored[1] if len(scored) > 1 else None
    return {"pick": dict(zip(KNOBS, best)), "val_loss": best_score, "seeds": sorted(seeds), "grid": grid,
            "edge": edge, "margin": (runner[0] - best_score) if runner else None,
            "cells": [{**dict(zip(KNOBS, c)), "val_loss": s} for s, c in scored],
            "incomplete": len(cells) - len(full)}


def build(arms: list[str], out: Path, *, title: str = "Tuning", force: bool = False) -> Path:
    from .io.writer import atomic_path, check_output
    groups = {}
    for a in arms:
        name, pattern = parse_arm(a)
        dirs = sorted(Path(p) for p in glob.glob(pattern) if Path(p).is_dir())
        if not dirs:
            raise XpertError(f"--arm {a}: no run directory matches")
        if name in groups:
            raise XpertError(f"--arm {a}: arm {name!r} given twice")
        groups[name] = [load_run(d) for d in dirs]
    check_output(out, force, [Path(r["run"]) for rs in groups.values() for r in rs], marker="TUNE.md")
    results = {}
    for name, runs in groups.items():
        steps = {r["steps"] for r in runs}
        if len(steps) > 1:
            raise XpertError(f"--arm {name}: runs of different lengths ({sorted(steps)} steps); tune one budget at a time")
        try:
            results[name] = pick(runs) | {"steps": steps.pop()}
        except XpertError as e:
            raise XpertError(f"--arm {name}: {e}") from None
    lines = [f"# {title}", "", "Each arm's grid (learning rate x warmup x FFN up-gain), scored by the mean over seeds "
             "of the last validation loss (val split); the pick is the lowest. An arm picked on the edge of its "
             "grid may do better beyond it.", "",
             "| arm | steps | seeds | cells | lr | warmup | up-gain | val loss | margin to the next cell | on the edge |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        p = r["pick"]
        margin = f"{r['margin']:.4f}" if r["margin"] is not None else "-"
        lines.append(f"| {name} | {r['steps']} | {len(r['seeds'])} | {len(r['cells'])} | {p['lr']:g} | {p['warmup']} | "
                     f"{p['up_gain']:g} | {r['val_loss']:.4f} | {margin} | {', '.join(r['edge']) or 'no'} |")
    lines.append("")
    lines += [f"- {name}: {r['incomplete']} cell(s) without every seed left out" for name, r in results.items()
              if r["incomplete"]] + [""]
    for name, r in results.items():
        lines += [f"## {name}", "", "| lr | warmup | up-gain | val loss (mean over seeds) |", "|---|---|---|---|"]
        lines += [f"| {c['lr']:g} | {c['warmup']} | {c['up_gain']:g} | {c['val_loss']:.4f} |" for c in r["cells"]]
        lines.append("")
    picks = {name: {**r["pick"], "val_loss": round(r["val_loss"], 5), "steps": r["steps"], "seeds": r["seeds"],
                    "edge": r["edge"]} for name, r in results.items()}
    lines += ["## For the recipe", "", "```yaml",
              *[f"- {{arm: {n}, lr: {p['lr']:g}, warmup: {p['warmup']}, up_gain: {p['up_gain']:g}}}" for n, p in picks.items()],
              "```", ""]
    with atomic_path(Path(out), force, marker="TUNE.md") as tmp:
        tmp.mkdir()
        (tmp / "TUNE.md").write_text("\n".join(lines))
        (tmp / "picks.json").write_text(json.dumps(picks, indent=2) + "\n")
    return Path(out)
