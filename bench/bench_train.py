"""tokens/s of `xpertctl train`: against a bare AdamW loop on the same model, batch and data (`main`); and
end to end on demo-sized students, plain vs knowledge distillation and before vs after the speed settings
(`speed`, `python bench/bench_train.py speed [--before SRC_DIR]`); plus the teacher's forward cost per batch."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from xpertctl import data  # noqa: E402
from xpertctl import train as tr  # noqa: E402


def main(steps: int = 40, batch: int = 8, seq: int = 256) -> dict:
    tmp = Path(tempfile.mkdtemp())
    from xpertctl.ops import graft
    from xpertctl.specs import Target
    model_dir = graft.run(ROOT / "fixtures" / "teacher", tmp / "student", target=Target(4), dtype="float32")
    corpus = ROOT / "fixtures" / "corpus-mini"
    d = data.tokenize(model_dir, [], tmp / "data", corpus=corpus)
    cfg = tr.TrainConfig(steps=steps, batch_size=batch, seq_len=seq, eval_every=0)
    t0 = time.perf_counter()
    tr.train(model_dir, tmp / "run", cfg, data_dir=d)
    wall = time.perf_counter() - t0
    rows = [json.loads(l) for l in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    ours = rows[-1]["tok_s"]

    model = tr.load_causal_lm(model_dir).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    stream = data.load_token_data(d).stream("train")
    t0 = time.perf_counter()
    for s in range(steps):
        x, y, m = tr.lm_batch(stream, cfg, s, 0)
        model(input_ids=x, labels=y).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
    bare = steps * batch * seq / (time.perf_counter() - t0)
    res = {"xpertctl_tok_s": ours, "bare_tok_s": bare, "ratio": ours / bare, "xpertctl_wall_s": wall}
    print(f"train: xpertctl {ours:,.0f} tok/s (in-loop) | bare loop {bare:,.0f} tok/s | ratio {ours / bare:.3f} "
          f"| whole command {wall:.1f} s for {steps} steps incl. load and checkpoint", flush=True)
    return res


# ---- end to end: `xpertctl train` commands, interleaved, each measured as a child process ----------------

RUNNER = ("import sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]; "
          "sys.path.insert(0, sys.argv.pop(1)); from xpertctl.cli import main; sys.argv[0] = 'xpertctl'; main()")


def _run_train(src: Path, model: Path, data_dir: Path, out: Path, steps: int, extra: list[str]) -> dict:
    """One `xpertctl train` from the source tree `src` (so an older checkout can be timed the same way)."""
    import shutil
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-c", RUNNER, str(src), "train", str(model), "--data", str(data_dir), "--steps", str(steps),
           "--batch-size", "8", "--seq-len", "256", "--lr", "2e-3", "--warmup", "10", "--eval-every", "0",
           "-o", str(out), *extra]
    r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode:
        raise RuntimeError(p.stderr[-2000:])
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    # steady state: tokens and seconds between step 5 and the last (tok_s is cumulative since the loop began)
    tk = lambda r: r["step"] * 8 * 256
    t5, tn = tk(rows[4]) / rows[4]["tok_s"], tk(rows[-1]) / rows[-1]["tok_s"]
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    return {"steady_tok_s": (tk(rows[-1]) - tk(rows[4])) / (tn - t5), "wall_s": wall, "cpu_s": cpu,
            "tok_per_cpu_s": tk(rows[-1]) / cpu, "last_loss": rows[-1]["loss"],
            "kl": rows[-1].get("kl")}


def teacher_forward_cost(teacher: Path, data_dir: Path, batches: int = 6, threads: int = 0) -> dict:
    """ms per 8 x 256 batch of the frozen teacher's forward (what --teacher adds to every micro-step)."""
    from xpertctl import distill
    prev = torch.get_num_threads()
    torch.set_num_threads(threads or prev)
    t = distill.load_teacher(teacher, tr.load_causal_lm(teacher), teacher)
    stream = data.load_token_data(data_dir).stream("train")
    cfg = tr.TrainConfig(batch_size=8, seq_len=256)
    xs = [tr.lm_batch(stream, cfg, s, 0)[0] for s in range(batches + 1)]
    with torch.no_grad():
        t(input_ids=xs[0], use_cache=False)
        t0, c0 = time.perf_counter(), time.process_time()
        for x in xs[1:]:
            t(input_ids=x, use_cache=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    torch.set_num_threads(prev)
    return {"ms_per_batch": 1000 * wall / batches, "cpu_ms_per_batch": 1000 * cpu / batches}


def speed(before: Path | None = None, steps: int = 40, repeats: int = 2, depths=(3, 4, 6)) -> dict:
    """Arms x depths, `repeats` interleaved rounds (the machine is shared: every figure is a median)."""
    tmp = Path(tempfile.mkdtemp())
    from xpertctl.ops import graft
    from xpertctl.specs import Target
    teacher = ROOT / "fixtures" / "teacher"
    models = {L: graft.run(teacher, tmp / f"student-{L}L", target=Target(L), dtype="float32") for L in depths}
    d = data.tokenize(models[depths[0]], [], tmp / "data", corpus=ROOT / "fixtures" / "corpus-mini")
    arms = {"plain": (ROOT, []), "plain --threads 1": (ROOT, ["--threads", "1"]),
            "plain --compile": (ROOT, ["--compile"]), "plain --threads 1 --compile": (ROOT, ["--threads", "1", "--compile"]),
            "KD": (ROOT, ["--teacher", str(teacher)]), "KD --threads 1": (ROOT, ["--teacher", str(teacher), "--threads", "1"])}
    if before is not None:
        arms = {"before (main)": (Path(before), []), **arms}
    res: dict = {}
    for rnd in range(repeats):
        for L in depths:
            for name, (src, extra) in arms.items():
                r = _run_train(src, models[L], d, tmp / "run", steps, extra)
                res.setdefault((name, L), []).append(r)
                print(f"round {rnd + 1} {L}L {name:20s} steady {r['steady_tok_s']:8,.0f} tok/s | command {r['wall_s']:6.1f} s "
                      f"wall, {r['cpu_s']:6.1f} s CPU, {r['tok_per_cpu_s']:6,.0f} tok/CPU-s | last loss {r['last_loss']:.6f}"
                      f" | load {os.getloadavg()[0]:.1f}", flush=True)
    med = lambda xs: float(np.median(xs))
    summary = {f"{name} {L}L": {k: med([r[k] for r in rs]) for k in ("steady_tok_s", "wall_s", "cpu_s", "tok_per_cpu_s")}
               for (name, L), rs in res.items()}
    for tdepth in (0, 1):
        tf = teacher_forward_cost(teacher, d, threads=tdepth)
        summary[f"teacher forward, threads {tdepth or torch.get_num_threads()}"] = tf
        print(f"teacher forward (threads {tdepth or torch.get_num_threads()}): {tf['ms_per_batch']:.0f} ms wall, "
              f"{tf['cpu_ms_per_batch']:.0f} ms CPU per 8 x 256 batch", flush=True)
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    if sys.argv[1:2] == ["speed"]:
        import argparse
        ap = argparse.ArgumentParser()
        ap.add_argument("speed")
        ap.add_argument("--before", type=Path, help="an older xpertctl source tree to time the same way")
        ap.add_argument("--steps", type=int, default=40)
        ap.add_argument("--repeats", type=int, default=2)
        ap.add_argument("--depths", default="3,4,6")
        a = ap.parse_args()
        speed(a.before, a.steps, a.repeats, tuple(int(x) for x in a.depths.split(",")))
    else:
        main()
