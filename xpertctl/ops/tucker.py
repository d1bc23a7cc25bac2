"""Tucker decomposition of an expert stack: Gram-matrix HOSVD, then HOOI sweeps when needed.

Why not tensorly.decomposition.tucker as is: its SVD of each unfolding (or its `symeig_svd`, which
forms the *larger* Gram of a wide unfolding: 16384² for a 1024×2048×8 stack) costs far more than the
problem needs. The factor of mode m only needs the leading eigenvectors of the small Gram
X_(m) X_(m)^T (d_m × d_m): HOSVD from those, then higher-order orthogonal iteration (HOOI, the
algorithm tensorly runs) until the fit stops improving. When at most one mode is truncated the HOSVD
is already optimal and no sweep runs. Mode products use tensorly's own tenalg on the torch backend.

A mode kept at full rank needs no eigendecomposition at all: any orthonormal basis of the whole
space reconstructs exactly, so its factor is the identity (and products with it are skipped). The
default ranks (full, full, full: DEFAULT_RANKS) need no eigendecomposition at all, and the paper's
(full, full, 1) one n×n Gram of the expert mode: milliseconds, where a generic HOOI spends tens of
seconds on 1024×2048×8 (bench/bench_tucker.py).
"""
from __future__ import annotations

import tensorly as tl
import torch
from tensorly.tenalg import multi_mode_dot

from ..errors import XpertError


DEFAULT_RANKS = "full,full,full"  # chosen by measured function fidelity: see the README's method section


def parse_ranks(text: str | None, shape: tuple[int, ...] | None = None) -> list[str | int | float]:
    """'full,full,1' -> ['full', 'full', 1]; the expert mode may also be an energy fraction ('0.9':
    the fewest components that keep 90% of the experts' joint energy). Checked against a shape when given."""
    parts = (text or DEFAULT_RANKS).replace(" ", "").split(",")
    if len(parts) != 3:
        raise XpertError(f"--ranks {text!r}: give three ranks (rows, columns, experts), e.g. full,full,full")
    out: list[str | int | float] = []
    for m, p in enumerate(parts):
        if p == "full":
            out.append("full")
        elif p.isdigit() and int(p) > 0:
            out.append(int(p))
        elif m == 2 and _is_fraction(p):
            out.append(float(p))
        else:
            raise XpertError(f"--ranks {text!r}: {p!r} is not 'full' or a positive integer"
                             + (" or an energy fraction in (0, 1]" if m == 2 else ""))
    if shape is not None:
        resolve(out, shape, text)
    return out


def _is_fraction(p: str) -> bool:
    try:
        return "." in p and 0 < float(p) <= 1
    except ValueError:
        return False


def resolve(ranks: list, shape: tuple[int, ...], text: str | None = None) -> list[int]:
    """Integer ranks for a stack shape (an energy fraction resolves to the full size here; the expert
    factor resolves it from the eigenvalues)."""
    res = []
    for m, (r, d) in enumerate(zip(ranks, shape)):
        if r == "full" or isinstance(r, float):
            res.append(d)
        elif r > d:
            raise XpertError(f"--ranks {text or ranks}: rank {r} of mode {m + 1} exceeds its size {d} (stack {list(shape)})")
        else:
            res.append(int(r))
    return res


def expert_factor(gram: torch.Tensor, rank: str | int | float, text: str | None = None) -> torch.Tensor:
    """U3 [n, r] from the experts' n x n Gram: all of it ('full': the identity), the top r
    eigenvectors, or the fewest that keep an energy fraction."""
    n = gram.shape[0]
    if rank == "full":
        return torch.eye(n)
    evals, _ = torch.linalg.eigh(gram.double())
    if isinstance(rank, float):
        e = evals.flip(0).clamp_min(0)
        frac = torch.cumsum(e, 0) / e.sum().clamp_min(1e-300)
        r = int((frac < rank - 1e-12).sum()) + 1
    else:
        if rank > n:
            raise XpertError(f"--ranks {text or rank}: rank {rank} of mode 3 exceeds its size {n} (the selected experts)")
        r = int(rank)
    if r >= n:
        return torch.eye(n)
    return _leading(gram, r).float().contiguous()


def tucker_given_experts(x: torch.Tensor, r1: int, r2: int, u3: torch.Tensor, **kw):
    """Tucker of one matrix's stack with the expert factor fixed (shared by gate, up and down):
    core, [U1, U2, U3], relative error. Rows/columns are fitted to the expert-projected stack."""
    x = x.float()
    y = x if _is_identity(u3) else _project(x, [torch.eye(x.shape[0]), torch.eye(x.shape[1]), u3])
    core, (u1, u2, _), _ = tucker(y, [r1, r2, y.shape[2]], **kw)
    # the factors are orthonormal, so the reconstruction is a projection: |x - rec|^2 = |x|^2 - |core|^2
    nx2 = float((x.double() ** 2).sum())
    err = max(0.0, 1 - float((core.double() ** 2).sum()) / max(nx2, 1e-300)) ** 0.5
    return core, [u1, u2, u3.contiguous().clone()], err  # a copy per matrix: safetensors refuses shared storage


def _gram(x: torch.Tensor, mode: int) -> torch.Tensor:
    """X_(mode) X_(mode)^T without forming the unfolding's transpose copy."""
    xm = torch.movedim(x, mode, 0).reshape(x.shape[mode], -1)
    return xm @ xm.T


def _leading(gram: torch.Tensor, r: int) -> torch.Tensor:
    """Top-r eigenvectors of a symmetric PSD matrix, descending (float64 for small matrices; float32,
    several times faster, for the 1024-2048 wide Grams of real experts)."""
    _, vecs = torch.linalg.eigh(gram.double() if gram.shape[0] <= 256 else gram)
    u = vecs[:, -r:].flip(1)
    # fix the sign so the result is deterministic: largest-magnitude entry of each column positive
    idx = u.abs().argmax(0)
    u = u * torch.sign(u[idx, torch.arange(u.shape[1])])[None]
    return u.to(gram.dtype)


def tucker(x: torch.Tensor, ranks: list[int], n_iter: int = 100, tol: float = 1e-5):
    """core, [U1, U2, U3], relative reconstruction error. Factors have orthonormal columns.

    HOOI stops when the relative error changes by less than `tol` between sweeps (tensorly's rule,
    with a 10x stricter default than its 1e-4)."""
    x = x.float()
    with tl.backend_context("pytorch"):
        factors = [torch.eye(d) if r == d else _leading(_gram(x, m), r) for m, (r, d) in enumerate(zip(ranks, x.shape))]
        truncated = sum(r < d for r, d in zip(ranks, x.shape))
        if truncated > 1:
            norm2 = float((x.double() ** 2).sum())
            prev = None
            for _ in range(n_iter):
                core = None
                for m in range(3):
                    if ranks[m] == x.shape[m]:
                        continue  # a full-rank mode stays the identity
                    y = _project(x, factors, skip=m)
                    factors[m] = _leading(_gram(y, m), ranks[m])
                    # the core from the last update's projection: saves a full pass over x per sweep
                    core = multi_mode_dot(y, [factors[m]], modes=[m], transpose=True)
                err_now = max(0.0, 1 - float((core.double() ** 2).sum()) / max(norm2, 1e-300)) ** 0.5
                if prev is not None and abs(err_now - prev) < tol:
                    break
                prev = err_now
        core = _project(x, factors)
        rec = reconstruct(core, factors)
    err = float(torch.linalg.vector_norm(x - rec) / torch.linalg.vector_norm(x).clamp_min(1e-30))
    return core.contiguous(), [f.contiguous() for f in factors], err


def _is_identity(u: torch.Tensor) -> bool:
    return u.shape[0] == u.shape[1] and torch.equal(u, torch.eye(u.shape[0], dtype=u.dtype))


def _project(x: torch.Tensor, factors: list[torch.Tensor], skip: int | None = None) -> torch.Tensor:
    """x ×_m U_m^T over the modes (but `skip`), leaving out identity factors."""
    modes = [m for m, u in enumerate(factors) if m != skip and not _is_identity(u)]
    if not modes:
        return x
    modes.sort(key=lambda m: factors[m].shape[1] / factors[m].shape[0])  # shrink the most first: fewer FLOPs
    with tl.backend_context("pytorch"):
        return multi_mode_dot(x, [factors[m] for m in modes], modes=modes, transpose=True)


def reconstruct(core: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """G ×_1 U1 ×_2 U2 ×_3 U3, leaving out identity factors."""
    modes = [m for m, u in enumerate(factors) if not _is_identity(u)]
    if not modes:
        return core
    with tl.backend_context("pytorch"):
        return multi_mode_dot(core, [factors[m] for m in modes], modes=modes)
