"""Wall time of a demo-shaped recipe run one step at a time vs side by side (`xpertctl run --jobs N`).

    python bench/bench_jobs.py [--runs 6] [--steps 120] [--jobs 2]

The recipe grafts `runs` 3-layer students from the committed teacher (different seeds), trains each for
`steps` steps of 8 x 256 tokens on fixtures/corpus-mini and evaluates it: the shape of the demo's
arms. Both variants run the same recipe into fresh directories, in the same process environment; the
1-minute load average before each is printed, since a shared machine changes everything.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def recipe(work: Path, runs: int, steps: int) -> dict:
    seeds = list(range(runs))
    return {"name": "bench-jobs", "vars": {"w": str(work), "seeds": seeds}, "steps": [
        {"id": "data", "op": "tokenize", "args": {"tokenizer": str(ROOT / "fixtures/teacher"),
                                                   "corpus": str(ROOT / "fixtures/corpus-mini"), "out": "${vars.w}/data"}},
        {"id": "init-${grid.seed}", "op": "graft", "grid": {"seed": "${vars.seeds}"},
         "args": {"src": str(ROOT / "fixtures/teacher"), "target": "3L", "seed": "${grid.seed}", "dtype": "float32",
                  "out": "${vars.w}/init-${grid.seed}"}},
        {"id": "train-${grid.seed}", "op": "train", "grid": {"seed": "${vars.seeds}"},
         "args": {"ckpt": "${vars.w}/init-${grid.seed}", "data_dir": "${steps.data.out}", "steps": steps,
                  "batch_size": 8, "seq_len": 256, "lr": 0.002, "warmup": 10, "eval_every": 0, "eval_batches": 4,
                  "seed": "${grid.seed}", "out": "${vars.w}/run-${grid.seed}"}},
        {"id": "eval-${grid.seed}", "op": "eval", "grid": {"seed": "${vars.seeds}"},
         "args": {"ckpt": "${vars.w}/run-${grid.seed}/final", "task": ["ppl:${steps.data.out}"], "split": "test",
                  "seq_len": 256, "out": "${vars.w}/eval-${grid.seed}.json"}},
    ]}


def timed(jobs: int, runs: int, steps: int) -> float:
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-jobs{jobs}-"))
    r = tmp / "r.yaml"
    r.write_text(yaml.safe_dump(recipe(tmp / "w", runs, steps), sort_keys=False))
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "xpertctl", "run", str(r), "--jobs", str(jobs)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    print(f"--jobs {jobs}: {wall:.1f} s for {runs} graft+train+eval chains of {steps} steps "
          f"({wall / runs:.1f} s per chain; load before {load:.1f})", flush=True)
    return wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args()
    one = timed(1, a.runs, a.steps)
    many = timed(a.jobs, a.runs, a.steps)
    print(f"side by side: {one / many:.2f}x the throughput of one at a time ({os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
