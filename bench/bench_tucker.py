"""decompose's Tucker vs tensorly's default `tucker` call on one 1024x2048x8 expert stack (OLMoE's
gate matrices of 8 selected experts), at the default ranks and at a truncated setting."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import tensorly as tl
import torch
from tensorly.decomposition import tucker as tl_tucker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from xpertctl.ops.tucker import tucker  # noqa: E402


def stack(src: Path | None) -> torch.Tensor:
    if src is not None and src.exists():
        from xpertctl.io import open_checkpoint
        ck = open_checkpoint(src)
        return torch.stack([e[0].float() for e in ck.experts(0, list(range(8)))], -1)
    g = torch.Generator().manual_seed(0)  # low-rank shared part + noise, like related experts
    base = torch.randn(1024, 64, generator=g) @ torch.randn(64, 2048, generator=g) / 8
    return torch.stack([base + 0.02 * torch.randn(1024, 2048, generator=g) for _ in range(8)], -1)


def rel_err(x, core, factors):
    with tl.backend_context("numpy"):
        rec = tl.tucker_to_tensor((core, factors))
    return float(np.linalg.norm(x - rec) / np.linalg.norm(x))


def main(src: Path | None = None) -> list[dict]:
    x = stack(src)
    xn = x.numpy()
    rows = []
    for ranks in ([1024, 2048, 1], [512, 1024, 2]):
        t0 = time.perf_counter()
        core, fs, err = tucker(x, ranks)
        ours = time.perf_counter() - t0
        with tl.backend_context("numpy"):
            t0 = time.perf_counter()
            c2, f2 = tl_tucker(xn, rank=ranks)  # tensorly's defaults: init="svd", n_iter_max=100
            theirs = time.perf_counter() - t0
        e2 = rel_err(xn, c2, f2)
        row = {"ranks": ranks, "xpertctl_s": ours, "tensorly_s": theirs, "speedup": theirs / ours,
               "xpertctl_err": err, "tensorly_err": e2}
        rows.append(row)
        print(f"ranks {ranks}: xpertctl {ours:.3f} s (err {err:.6f}) | tensorly tucker {theirs:.1f} s "
              f"(err {e2:.6f}) | {theirs / ours:.0f}x", flush=True)
    return rows


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
