"""Issue 20: why does `--fit ffn` stay at 0.69 on legal's test split while five domains reach 0.33-0.41?
(study, not a user tool)

The committed teacher, min selection from stats on all of the train split, the default consolidation
to 6 layers, the validated down fit as the start, Adam as `graft --fit ffn` runs it (1,024-token
minibatches, lr 1e-3, the same seeds); each domain's test split as `fidelity` samples it (4,096 tokens,
seed 0), scored every 25 steps and never used to choose anything.

    python studies/fit_ffn_study.py steps [--steps 1500]     # the held-out and test errors along the steps
    python studies/fit_ffn_study.py inputs [--steps 500]     # calibration inputs widened with synthetic ones

`steps`: is it early stopping (the held-out documents are like the calibration; unlike text may want
fewer steps) or not enough steps? `inputs`: half of each minibatch replaced by synthetic block inputs,
their targets computed by the source's own MoE block: `noiseS` perturbs a calibration input before the
RMS norm (relative size S) and renormalizes it; `mixup` renormalizes a random convex mix of two
calibration inputs. Only target layers 3 and 4 (where legal stays highest) are refitted.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xpertctl.io import open_checkpoint  # noqa: E402
from xpertctl.ops import capture, fit  # noqa: E402

sys.path.insert(0, str(ROOT / "studies"))
from fidelity_variants import train_split_student  # noqa: E402

SEQ = 512


def setup(src: Path, corpus: Path):
    ck = open_checkpoint(src)
    runner, names, adapted, meta, _ = train_split_student(ck, corpus, SEQ, 6, "default")
    test = fit.DiskCache(Path(tempfile.mkdtemp(prefix="fit-ffn-study-")), set(range(ck.num_layers)), ck.hidden, names)
    for n in names:  # the 4,096 tokens `fidelity --max-tokens 4096` measures, domain by domain
        r = capture.prepare(ck, [f"{n}={corpus / 'test' / (n + '.txt')}"], seq_len=SEQ, sample_seed=0)
        capture.run(ck, r.model, r.tokenizer, r.docs, lambda io: test("test", io.layer, io.domain, io.x, io.y),
                    seq_len=SEQ, batch_size=8, max_tokens=4096, device="cpu", label=f"test {n}")
    test.close()
    return ck, runner, adapted, meta, names, test


def synthetic(x: torch.Tensor, gamma: torch.Tensor, mode: str) -> torch.Tensor:
    """Block inputs near the calibration's: perturbed or mixed before the RMS norm, then renormalized."""
    z = x / gamma
    if mode.startswith("noise"):
        z = z + float(mode[5:]) * z.pow(2).mean(1, keepdim=True).sqrt() * torch.randn_like(z)
    elif mode == "mixup":
        lam = torch.rand(z.shape[0], 1)
        z = lam * z + (1 - lam) * z[torch.randperm(z.shape[0])]
    return gamma * z * torch.rsqrt(z.pow(2).mean(1, keepdim=True) + 1e-5)


def traced(model, test, names, log: dict, layers: set[int], mode: str):
    """fit.optimize_ffn's loop (same sampling, loss and optimizer), scoring the test split every 25 steps and
    running every step (no early stop); with `mode` != none, half of each minibatch is synthetic."""
    def run(w0, fit_data, held_data, *, steps, batch=1024, lr=1e-3, eval_every=25, patience=4, seed=0):
        t = seed  # graft seeds target layer t with seed + t, seed 0
        if t not in layers:
            return w0, 0.0, 0.0, 0
        xs, ys, _ = fit_data
        hx, hy, _ = held_data
        tx, ty, td = test.read("test", [t])
        block = model.get_submodule(f"model.layers.{t}.mlp")
        gamma = model.get_submodule(f"model.layers.{t}.post_attention_layernorm").weight.detach().float()
        n = sum(x.shape[0] for x in xs)
        params = [p.detach().clone().float().requires_grad_(True) for p in w0]
        opt = torch.optim.Adam(params, lr=lr)
        gen = np.random.default_rng(seed)
        torch.manual_seed(seed)
        rows = []

        def score(step):
            e, yy = fit._sq_error(hx, hy, params)
            rows.append({"step": step, "held": math.sqrt(e / yy), **fit._per_domain(tx, ty, td, params, names)})
        score(0)
        for step in range(1, steps + 1):
            idx = gen.choice(n, size=min(batch, n), replace=False)
            x, y = fit._rows(xs, idx), fit._rows(ys, idx)
            if mode != "none":
                h = x.shape[0] // 2
                xa = synthetic(x[:h], gamma, mode)
                with torch.no_grad():
                    out = block(xa.unsqueeze(0))
                ya = (out[0] if isinstance(out, tuple) else out).reshape(h, -1).float()
                x, y = torch.cat([x[h:], xa]), torch.cat([y[h:], ya])
            p = fit.act(x, params[0], params[1]) @ params[2].T
            loss = ((p - y) ** 2).sum() / (y * y).sum().clamp_min(1e-30)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % eval_every == 0:
                score(step)
        log[t] = rows
        return tuple(p.detach() for p in params), rows[0]["held"], rows[-1]["held"], steps
    return run


def refit(ck, runner, adapted, meta, steps):
    fit.fit(ck, runner.model, runner.tokenizer, runner.docs, adapted, meta, seq_len=SEQ, max_tokens=65536,
            method="ffn", select="domains", steps=steps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("steps", "inputs"))
    ap.add_argument("--src", default=str(ROOT / "fixtures" / "teacher"))
    ap.add_argument("--corpus", default=str(ROOT / "fixtures" / "corpus-mini"))
    ap.add_argument("--steps", type=int, default=None)
    a = ap.parse_args()
    t0 = time.perf_counter()
    ck, runner, adapted, meta, names, test = setup(Path(a.src), Path(a.corpus))
    short = [n[:5] for n in names]
    if a.what == "steps":
        log: dict = {}
        fit.optimize_ffn = traced(runner.model, test, names, log, set(range(6)), "none")
        refit(ck, runner, adapted, meta, a.steps or 1500)
        print("| step | held-out documents | " + " | ".join(names) + " |\n|---|---|" + "---|" * len(names))
        for i, r0 in enumerate(log[0]):
            if r0["step"] % 250 == 0:
                rows = [log[t][i] for t in sorted(log)]
                print(f"| {r0['step']} | {np.mean([r['held'] for r in rows]):.3f} | "
                      + " | ".join(f"{np.mean([r[n] for r in rows]):.3f}" for n in names) + " |")
        print("\nper layer, legal (step 0 / 500 / last):",
              "  ".join(f"{t}: {log[t][0]['legal']:.3f} / {log[t][20]['legal']:.3f} / {log[t][-1]['legal']:.3f}"
                        for t in sorted(log)))
    else:
        print(f"| inputs | layer | held-out documents | " + " | ".join(short) + " |\n|---|---|---|" + "---|" * len(names))
        for mode in ("none", "noise0.3", "noise1.0", "mixup"):
            log = {}
            fit.optimize_ffn = traced(runner.model, test, names, log, {3, 4}, mode)
            refit(ck, runner, adapted, meta, a.steps or 500)
            for t in sorted(log):
                r = log[t][-1]
                print(f"| {mode} | {t} | {r['held']:.3f} | " + " | ".join(f"{r[n]:.3f}" for n in names) + " |",
                      flush=True)
    print(f"\n{time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
