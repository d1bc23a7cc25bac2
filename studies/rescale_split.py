"""Issue 20: is `--rescale routed`'s training gain the FFN's output scale, or where its weights carry it?
(study, not a user tool; needs the demo's build: `make demo`)

A SwiGLU FFN computes the same function when its up rows are multiplied by k and its down columns divided
by k (silu(g x) * (k u x) / k). Each arm below is made from the demo's grafts by such exact rescalings, or is a
norm-matched random control of one, and is trained as the demo trains (3 layers, 120 steps, the same seeds
and data), paired with the demo's scratch runs seed by seed:

  routed, nmrouted   `graft --rescale routed` (grafted here, whatever the demo's default) and its norm-matched control
  selected      `graft --rescale selected` (its down projections are r = selected/routed mass times routed's)
  hybrid        routed's down projections, selected's function (up rows times r)
  hybrid2       selected's down projections, routed's function (up rows times 1/r)
  k2, k4        routed's function, up rows times k, down columns divided by k
  selk4         selected's function, up rows times 4, down columns divided by 4 (`--rescale selected --up-gain 4`)
  selk8 … selk64 the same with a gain of 8, 16, 32 and 64
  fitk4         the demo's validated down fit, up rows times 4, down columns divided by 4 (`--fit down --up-gain 4`)
  nm-hybrid2, nm-k4, nmsel1 … nmsel64   random FFNs with those arms' row norms (as `graft --ffn-init
                norm-matched` makes them; nmselK: of `--rescale selected --up-gain K`)
  scratch-k4 … scratch-k64   the scratch baseline's fresh FFNs, up rows times K, down columns divided by K
  scratch-gpt2  the scratch baseline with GPT-2's residual-projection init: down_proj and o_proj / sqrt(2 L)

    python studies/rescale_split.py [--build build/demo] [--out build/rescale-split]
    python studies/rescale_split.py --beyond     # selk4 at 6 layers and at 4x the steps (after DEMO=depth, budget)

The --beyond comparison labels the profiles' `xpert` runs "default": that is `routed` for builds made before the
default became `selected` (2026-11-26), and selk4's own ungained init after.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from xpertctl.ops.graft import norm_matched  # noqa: E402

XPERTCTL = [sys.executable, "-m", "xpertctl"]
TRAIN = ["--steps", "120", "--batch-size", "8", "--seq-len", "256", "--lr", "0.002", "--warmup", "10",
         "--eval-every", "15", "--eval-batches", "4", "--threads", "1"]  # recipes/paper.yaml's train step
LAYERS = 3
FFN = [f"model.layers.{t}.mlp.{m}_proj.weight" for t in range(LAYERS) for m in ("gate", "up", "down")]


def run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}\n{r.stderr[-2000:]}")


def derive(base: Path, out: Path, change) -> None:
    """A copy of the model directory `base` whose weights change(w) rewrites in place."""
    if out.exists():
        return
    shutil.copytree(base, out)
    w = load_file(str(base / "model.safetensors"))
    with safe_open(str(base / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    change(w)
    save_file(w, str(out / "model.safetensors"), metadata=meta)


def up_times(k: list[float]):
    """Up rows times k[t], down columns divided by k[t]: the same function."""
    def change(w):
        for t in range(LAYERS):
            w[f"model.layers.{t}.mlp.up_proj.weight"] *= k[t]
            w[f"model.layers.{t}.mlp.down_proj.weight"] /= k[t]
    return change


def norm_matched_of(seed: int):
    def change(w):  # the generator graft's build uses for --ffn-init norm-matched, in its order
        gen = torch.Generator().manual_seed(seed + 7919)
        for k in FFN:
            w[k] = norm_matched(w[k], gen)
    return change


def residual_scaled(w) -> None:
    """GPT-2's init of the projections into the residual stream: std / sqrt(2 * layers)."""
    for t in range(LAYERS):
        for m in ("mlp.down_proj", "self_attn.o_proj"):
            w[f"model.layers.{t}.{m}.weight"] /= (2 * LAYERS) ** 0.5


def down_ratio(a: Path, b: Path) -> list[float]:
    """||b's down|| / ||a's down|| per layer (the two grafts differ only by that factor there)."""
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert all(torch.equal(x[k], y[k]) for k in x if ".mlp." not in k), "the two grafts differ outside the FFNs"
    return [float(y[f"model.layers.{t}.mlp.down_proj.weight"].norm() / x[f"model.layers.{t}.mlp.down_proj.weight"].norm())
            for t in range(LAYERS)]


def final_val(run_dir: Path) -> float:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "val_loss" in r][-1]["val_loss"]


def interval(d: np.ndarray) -> str:
    return f"{d.mean():+.3f} ± {stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)):.3f}"


def beyond(b: Path, out: Path, seeds) -> None:
    """`--rescale selected --up-gain 4` where the demo's profiles measured the default: 6 layers (the depth
    profile's runs) and 4x the steps (the budget profile's), paired with their scratch and xpert runs."""
    x4 = ["--steps", "480", "--batch-size", "8", "--seq-len", "256", "--lr", "0.002", "--warmup", "40",
          "--eval-every", "60", "--eval-batches", "4", "--threads", "1"]  # recipes/paper.yaml's train-x4 step
    for s in seeds:
        g = out / f"selk4-6L-{s}"
        if not g.exists():
            run([*XPERTCTL, "graft", str(ROOT / "fixtures" / "teacher"), "-t", "6L", "--selection",
                 str(b / "selection-min.json"), "--rescale", "selected", "--up-gain", "4", "--seed", str(s),
                 "--dtype", "float32", "-o", str(g)])
    jobs = [(out / f"selk4-6L-{s}", out / "runs" / f"selk4-6L-{s}", TRAIN, s) for s in seeds]
    jobs += [(out / f"selk4-{s}", out / "runs" / "x4" / f"selk4-{s}", x4, s) for s in seeds]

    def train(job):
        src, dst, args, s = job
        if not (dst / "metrics.jsonl").exists():
            run([*XPERTCTL, "train", str(src), "--data", str(b / "data"), *args, "--seed", str(s), "-o", str(dst),
                 "--force"])
    with ThreadPoolExecutor(2) as ex:
        list(ex.map(train, jobs))
    for label, mine, theirs in (("6 layers, 120 steps", lambda s: out / "runs" / f"selk4-6L-{s}",
                                 lambda arm, s: b / "runs" / f"{arm}-6L-s{s}"),
                                ("3 layers, 480 steps", lambda s: out / "runs" / "x4" / f"selk4-{s}",
                                 lambda arm, s: b / "runs" / "x4" / f"{arm}-3L-s{s}")):
        v = np.array([final_val(mine(s)) for s in seeds])
        sc, xp = (np.array([final_val(theirs(arm, s)) for s in seeds]) for arm in ("scratch", "xpert"))
        print(f"{label}: selected --up-gain 4 vs scratch {interval(v - sc)}, xpert (default) vs scratch "
              f"{interval(xp - sc)}, selected --up-gain 4 − xpert {interval(v - xp)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=str(ROOT / "build" / "demo"))
    ap.add_argument("--out", default=str(ROOT / "build" / "rescale-split"))
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--beyond", action="store_true", help="selk4 at 6 layers and at 4x the steps")
    a = ap.parse_args()
    b, out = Path(a.build), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = range(a.seeds)
    if a.beyond:
        return beyond(b, out, seeds)
    made = ("routed", "nmrouted", "selected", "hybrid", "hybrid2", "k2", "k4", "nmh2", "nmk4", "scratch-k4", "scratch-gpt2", "selk4", "fitk4",
            "selk8", "selk16", "selk32", "selk64", "nmsel16", "nmsel1", "nmsel4", "scratch-k16",
            "scratch-k8", "scratch-k32", "scratch-k64", "nmsel8", "nmsel64")
    for s in seeds:
        routed, sel = out / f"routed-{s}", out / f"selected-{s}"
        for how, g in (("routed", routed), ("selected", sel)):  # both made here: the demo's default may be either
            if not g.exists():
                run([*XPERTCTL, "graft", str(ROOT / "fixtures" / "teacher"), "-t", f"{LAYERS}L", "--selection",
                     str(b / "selection-min.json"), "--rescale", how, "--seed", str(s), "--dtype", "float32",
                     "-o", str(g)])
        r = down_ratio(routed, sel)
        if s == 0:
            print("selected/routed mass per layer:", " ".join(f"{x:.3f}" for x in r))
        derive(sel, out / f"hybrid-{s}", up_times(r))  # selected's function, routed's down projections
        derive(routed, out / f"hybrid2-{s}", up_times([1 / x for x in r]))  # routed's function, selected's downs
        derive(routed, out / f"k2-{s}", up_times([2.0] * LAYERS))
        derive(routed, out / f"k4-{s}", up_times([4.0] * LAYERS))
        for k in (4, 8, 16, 32, 64):
            derive(sel, out / f"selk{k}-{s}", up_times([float(k)] * LAYERS))
        derive(b / "init" / f"fit-3L-s{s}", out / f"fitk4-{s}", up_times([4.0] * LAYERS))
        derive(out / f"hybrid2-{s}", out / f"nmh2-{s}", norm_matched_of(s))
        derive(out / f"k4-{s}", out / f"nmk4-{s}", norm_matched_of(s))
        derive(routed, out / f"nmrouted-{s}", norm_matched_of(s))
        for k in (4, 8, 16, 64):
            derive(out / f"selk{k}-{s}", out / f"nmsel{k}-{s}", norm_matched_of(s))
        derive(sel, out / f"nmsel1-{s}", norm_matched_of(s))
        scratch = b / "init" / f"scratch-3L-s{s}"
        for k in (4, 8, 16, 32, 64):
            derive(scratch, out / f"scratch-k{k}-{s}", up_times([float(k)] * LAYERS))
        derive(scratch, out / f"scratch-gpt2-{s}", residual_scaled)

    def train(job):
        arm, s = job
        dst = out / "runs" / f"{arm}-{s}"
        if not (dst / "metrics.jsonl").exists():
            run([*XPERTCTL, "train", str(out / f"{arm}-{s}"), "--data", str(b / "data"), *TRAIN, "--seed", str(s),
                 "-o", str(dst), "--force"])
    with ThreadPoolExecutor(2) as ex:
        list(ex.map(train, [(arm, s) for s in seeds for arm in made]))
    scratch = np.array([final_val(b / "runs" / f"scratch-3L-s{s}") for s in seeds])
    arms = {"fit (the demo's)": [b / "runs" / f"fit-3L-s{s}" for s in seeds],
            **{m: [out / "runs" / f"{m}-{s}" for s in seeds] for m in made}}
    v = {k: np.array([final_val(p) for p in ps]) for k, ps in arms.items()}
    routed = v["routed"]
    print(f"| init | final val loss | Δ vs scratch ({len(scratch)} seeds) | Δ vs routed |\n|---|---|---|---|")
    for k, x in v.items():
        print(f"| {k} | {x.mean():.3f} | {interval(x - scratch)} | {interval(x - routed)} |")
    for arm, ctl in (("routed", "nmrouted"), ("hybrid2", "nmh2"),
                     ("k4", "nmk4"), ("k4", "scratch-k4"), ("selk4", "k4"), ("fitk4", "fit (the demo's)"),
                     ("fitk4", "selk4"), ("selk8", "selk4"), ("selk16", "selk4"),
                     ("selk32", "selk16"), ("selk64", "selk16"), ("selk16", "nmsel16"),
                     ("selected", "nmsel1"), ("selk4", "nmsel4"), ("selk8", "nmsel8"), ("selk64", "nmsel64"),
                     ("nmsel16", "scratch-k16"), ("selk4", "scratch-k4"), ("selk8", "scratch-k8"),
                     ("selk16", "scratch-k16"), ("selk32", "scratch-k32"), ("selk64", "scratch-k64")):
        print(f"{arm} − {ctl}: {interval(v[arm] - v[ctl])}")


if __name__ == "__main__":
    main()
