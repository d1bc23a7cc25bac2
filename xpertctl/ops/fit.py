"""Beyond the paper: fit each student FFN to the MoE block it replaces, on data, validated on held-out text.

The calibration documents of each domain are split by document: most are fitted, `holdout` of them
(at least one per domain that has two) are only scored. Every number that decides anything (the
ridge, whether a fitted layer is kept, when the FFN optimization stops) comes from text the fit it
judges did not see: the held-out documents, or (leave one domain out) a domain left out of the fit.

`down`: gate and up stay as consolidated (they decide which neurons fire); the down projection is
solved by ridge least squares so that down(act(x)) reproduces the block's output y:

  B = B0 + (A^T A + lam I)^-1 (A^T Y - A^T A B0),  A = silu(x G^T) * (x U^T) [N, f],  B = D^T,  B0 = D0^T

The ridge pulls toward the consolidation D0, not toward zero: directions of A the calibration text
barely excites keep the consolidation's weights instead of being extrapolated (the cause of the fit
that was worse than a zero FFN on unseen text; see README). lam = r * trace(A^T A) / f for r on a
grid, chosen per layer as `select` says (see scores): `domains` (default) leaves each calibration
domain out in turn and scores all its documents by the fit to the other domains, `documents` scores
the pooled held-out documents, `both` the mean of the two; one calibration domain can only use
`documents` (select_for says so). One eigendecomposition per layer serves the grid, and errors come
exactly from moments, so no token is kept in memory. A layer whose
held-out error does not beat the consolidation's keeps the consolidation. The calibration domains
are pooled as captured, or (`weighting="domains"`) each scaled to unit ||Y||^2 (see weighted).

`ffn`: gate, up and down of each target layer, from the validated down fit, optimized with Adam on
the captured (x, y) pairs (cached on disk, read in minibatches), stopped at the best held-out error.
"""
from __future__ import annotations

import contextlib
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..console import err, notice
from ..errors import XpertError
from ..io.checkpoint import Checkpoint
from ..specs import FIT_WEIGHTINGS as WEIGHTINGS  # how calibration domains weigh in the down fit (see weighted)
from ..specs import RIDGE_SELECTS as SELECTS  # what the ridge is chosen on (see scores)
from . import capture

RIDGES = (0.0, 1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)  # relative to trace(A^T A) / f
HOLDOUT = 0.1
HELD = "held out"
RIDGE_CHOICE = {  # what each `select` chooses the ridge on, as the provenance records it
    "domains": "chosen per layer by leaving each calibration domain out (scored by the fit to the other domains)",
    "documents": "chosen per layer on held-out documents of the calibration text",
    "both": "chosen per layer on the mean of leaving each calibration domain out and held-out documents",
}


def act(x: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(x @ g.T) * (x @ u.T)


def split_documents(docs: dict[str, list[str]], holdout: float) -> tuple[dict, dict]:
    """(fit, held-out) documents per domain: the last `holdout` of each domain's (seeded) order, at
    least one from every domain with two or more documents."""
    if not 0 < holdout < 1:
        raise XpertError(f"--holdout {holdout}: must be between 0 and 1 (the share of documents held out)")
    fit, held = {}, {}
    for name, d in docs.items():
        n_hold = max(1, round(len(d) * holdout)) if len(d) >= 2 else 0
        fit[name] = d[:len(d) - n_hold]
        if n_hold:
            held[name] = d[len(d) - n_hold:]
    if not held:
        raise XpertError("--calibration: every domain is a single document; a validated fit holds out whole "
                         "documents (blank-line separated paragraphs of .txt, lines of .jsonl): give more text")
    return fit, held


@dataclass
class Moments:
    """A^T A, A^T Y, Y^T Y and the token count of one target layer on one part of the text (float64)."""
    ata: torch.Tensor
    aty: torch.Tensor
    yty: float = 0.0
    tokens: int = 0

    @classmethod
    def zeros(cls, f: int, d: int) -> "Moments":
        return cls(torch.zeros(f, f, dtype=torch.float64), torch.zeros(f, d, dtype=torch.float64))

    def add(self, a: torch.Tensor, y: torch.Tensor) -> None:
        a, y = a.double(), y.double()
        self.ata += a.T @ a
        self.aty += a.T @ y
        self.yty += float((y * y).sum())
        self.tokens += a.shape[0]

    def scaled(self, c: float) -> "Moments":
        return Moments(self.ata * c, self.aty * c, self.yty * c, self.tokens)

    def rel_error(self, b: torch.Tensor) -> float:
        """||A B - Y|| / ||Y|| from the moments alone (b = D^T [f, d])."""
        if self.yty <= 0:
            return float("nan")
        b = b.double()
        e = self.yty - 2 * float((b * self.aty).sum()) + float((b * (self.ata @ b)).sum())
        return math.sqrt(max(e, 0.0) / self.yty)


class LayerMoments:
    """Moments of every target layer: the fitted part pooled, the held-out part per domain."""

    def __init__(self, adapted: dict[str, torch.Tensor], layer_map: list[list[int]]):
        self.ri = adapted["residual_index"].long()
        self.layer_map = layer_map
        self.gu = [(adapted[f"layers.{t}.gate_proj"].float(), adapted[f"layers.{t}.up_proj"].float())
                   for t in range(len(layer_map))]
        self.f, self.d = self.gu[0][0].shape[0], self.ri.numel()
        self.fit: list[dict[str, Moments]] = [{} for _ in layer_map]  # per domain
        self.held: list[dict[str, Moments]] = [{} for _ in layer_map]
        self.part = "fit"
        self.sink = None  # optional (part, BlockIO restricted) consumer: the ffn fit's disk cache

    def __call__(self, io: capture.BlockIO) -> None:
        x, y = io.x[:, self.ri], io.y[:, self.ri]
        if self.sink is not None:
            self.sink(self.part, io.layer, io.domain, x, y)
        for t, group in enumerate(self.layer_map):
            if io.layer in group:
                a = act(x, *self.gu[t])
                part = self.fit if self.part == "fit" else self.held
                part[t].setdefault(io.domain, Moments.zeros(self.f, self.d)).add(a, y)


def pooled(parts: list[Moments]) -> Moments:
    return Moments(sum(m.ata for m in parts), sum(m.aty for m in parts), sum(m.yty for m in parts),
                   sum(m.tokens for m in parts))


def weighted(parts: dict[str, Moments], how: str) -> dict[str, Moments]:
    """`tokens`: as captured (a domain weighs by its tokens and its output energy). `domains`: each domain
    scaled to unit ||Y||^2, so the fit minimizes the sum of the domains' squared relative errors, the
    measure fidelity reports per domain (pooled, domains whose block outputs are larger dominated: 5x
    apart per token in one layer of the committed teacher; bench/RESULTS.md)."""
    if how == "tokens":
        return parts
    return {n: m.scaled(1.0 / m.yty) if m.yty > 0 else m for n, m in parts.items()}


def ridge_path(m: Moments, b0: torch.Tensor, ridges) -> list[torch.Tensor]:
    """B(r) = B0 + (A^T A + lam I)^-1 (A^T Y - A^T A B0), lam = r trace / f, for every r (one eigh)."""
    f = m.ata.shape[0]
    b0 = b0.double()
    ev, v = torch.linalg.eigh(m.ata)
    ev = ev.clamp_min(0)
    rhs = v.T @ (m.aty - m.ata @ b0)
    scale = float(ev.sum()) / f
    floor = max(float(ev.max()), 1e-300) * 1e-12  # r = 0 on a singular A^T A: the minimum-norm step
    out = []
    for r in ridges:
        den = ev + r * scale
        inv = torch.where(den > floor, 1.0 / den.clamp_min(floor), torch.zeros_like(den))
        out.append(b0 + v @ (inv[:, None] * rhs))
    return out


@dataclass
class LayerFit:
    target: int
    sources: list[int]
    ridge: float | None  # chosen (relative); None when the consolidation was kept
    kept: str  # "fit" or "consolidation"
    calibration: dict[str, float]  # rel_error on the fitted part: consolidation, fit
    held_out: dict[str, float]  # pooled held-out rel_error: consolidation, fit
    held_out_domains: dict[str, dict[str, float]] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    score: dict = field(default_factory=dict)  # what chose the ridge (see scores)

    def as_dict(self) -> dict:
        return {"target": self.target, "sources": self.sources, "ridge": self.ridge, "kept": self.kept,
                "calibration": self.calibration, "held_out": self.held_out,
                "held_out_domains": self.held_out_domains, "tokens": self.tokens, "score": self.score}


def scores(fit: dict[str, Moments], held: dict[str, Moments], b0: torch.Tensor, grid, select: str):
    """Per ridge: (the candidate B fitted on every domain, its selection score, its pooled held-out error).

    `documents`: the pooled error on held-out documents of the calibration domains. `domains` (default):
    each domain scored by the fit to the other domains (leave one domain out), averaged: text of a kind
    no calibration document is, which is what a student trained on other text meets (a fit chosen on
    held-out documents alone was worse than a zero FFN on such text). `both`: the mean of the two.
    One calibration domain: `documents` (select_for says so before the long work)."""
    allm, hm = pooled(list(fit.values())), pooled(list(held.values()))
    cands = ridge_path(allm, b0, grid)
    held_err = [hm.rel_error(b) for b in cands]
    if select == "documents" or len(fit) < 2:
        return cands, held_err, held_err
    lodo = []
    for n, m in fit.items():
        rest = pooled([fit[k] for k in fit if k != n] + [held[k] for k in held if k != n])
        out = pooled([m] + ([held[n]] if n in held else []))
        lodo.append([out.rel_error(b) for b in ridge_path(rest, b0, grid)])
    lodo_mean = [float(np.mean(c)) for c in zip(*lodo)]
    score = lodo_mean if select == "domains" else [(h + l) / 2 for h, l in zip(held_err, lodo_mean)]
    return cands, score, held_err


def select_for(select: str, domains: int, ridge: float | None) -> str:
    """The `select` that can be used: leaving a domain out needs two or more domains; with one, the
    held-out documents choose (said on stderr when a ridge is to be chosen, recorded either way)."""
    if select == "documents" or domains >= 2:
        return select
    if ridge is None:
        notice(f"--ridge-select {select} needs two or more --calibration domains; choosing the ridge on "
               "held-out documents")
    return "documents"


def solve_down(lm: LayerMoments, downs0: list[torch.Tensor], ridge: float | None,
               select: str = "domains", weighting: str = "tokens") -> tuple[list[torch.Tensor], list[LayerFit]]:
    """Per target layer: the down projection [d, f] (fitted, or the consolidation) and what was measured
    (the reported errors are pooled over tokens whatever the weighting; the decisions use the weighting)."""
    downs, report = [], []
    for t, d0 in enumerate(downs0):
        fm, hm = pooled(list(lm.fit[t].values())), pooled(list(lm.held[t].values()))
        if fm.tokens == 0:
            raise XpertError(f"--fit: target layer {t} saw no calibration tokens")
        b0 = d0.T.double()
        grid = RIDGES if ridge is None else (ridge,)
        fw, hw = weighted(lm.fit[t], weighting), weighted(lm.held[t], weighting)
        cands, score, held = scores(fw, hw, b0, grid, select)
        k = int(np.nanargmin(score))
        base_score = scores(fw, hw, b0, (float("inf"),), select)[1][0]
        base_held = pooled(list(hw.values())).rel_error(b0)
        better = score[k] < base_score and held[k] < base_held
        b = cands[k] if better else b0
        row = LayerFit(t, list(lm.layer_map[t]), grid[k] if better else None, "fit" if better else "consolidation",
                       {"consolidation": fm.rel_error(b0), "fit": fm.rel_error(cands[k])},
                       {"consolidation": hm.rel_error(b0), "fit": hm.rel_error(cands[k])},
                       {n: {"consolidation": m.rel_error(b0), "fit": m.rel_error(cands[k])} for n, m in lm.held[t].items()},
                       {"fit": fm.tokens, "held_out": hm.tokens})
        row.score = {"how": select, "weighting": weighting, "consolidation": base_score, "fit": score[k],
                     "held_out": {"consolidation": base_held, "fit": held[k]}}  # as weighted: what decided
        if not better:
            notice(f"--fit: target layer {t}: the fit's held-out error {held[k]:.3f} (score {score[k]:.3f}) does not "
                   f"beat the consolidation's {base_held:.3f} ({base_score:.3f}); the layer keeps the consolidation")
        downs.append(b.T.float().contiguous())
        report.append(row)
    return downs, report


class DiskCache:
    """The (x, y) pairs of each source layer the target uses, appended to float32 files on disk, one
    per (part, layer): the whole-FFN fit reads them back as memmaps, so memory does not grow with tokens."""

    def __init__(self, root: Path, layers: set[int], d: int, domains: list[str]):
        self.root, self.layers, self.d = Path(root), layers, d
        self.domains = {n: k for k, n in enumerate(domains)}
        self.files: dict[tuple[str, int, str], object] = {}
        self.rows: dict[tuple[str, int], int] = {}

    def __call__(self, part: str, layer: int, domain: str, x: torch.Tensor, y: torch.Tensor) -> None:
        if layer not in self.layers:
            return
        for what, t in (("x", x), ("y", y),
                        ("dom", torch.full((x.shape[0],), self.domains.get(domain, -1), dtype=torch.int16))):
            key = (part, layer, what)
            if key not in self.files:
                self.files[key] = open(self.root / f"{part}-{layer}-{what}.bin", "wb")
            self.files[key].write(t.contiguous().numpy().tobytes())
        self.rows[(part, layer)] = self.rows.get((part, layer), 0) + x.shape[0]

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def read(self, part: str, layers: list[int]) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        xs, ys, ds = [], [], []
        for i in layers:
            n = self.rows.get((part, i), 0)
            if n == 0:
                continue
            xs.append(np.memmap(self.root / f"{part}-{i}-x.bin", np.float32, "r", shape=(n, self.d)))
            ys.append(np.memmap(self.root / f"{part}-{i}-y.bin", np.float32, "r", shape=(n, self.d)))
            ds.append(np.memmap(self.root / f"{part}-{i}-dom.bin", np.int16, "r", shape=(n,)))
        return xs, ys, ds


def _rows(arrs: list[np.ndarray], idx: np.ndarray) -> torch.Tensor:
    """Rows idx of the concatenation of memmaps, without concatenating them."""
    out, start = [], 0
    for a in arrs:
        sel = idx[(idx >= start) & (idx < start + a.shape[0])] - start
        if sel.size:
            out.append(torch.from_numpy(np.array(a[np.sort(sel)])))
        start += a.shape[0]
    return torch.cat(out)


def _sq_error(xs, ys, w, block: int = 8192) -> tuple[float, float]:
    """(sum ||ffn(x) - y||^2, sum ||y||^2) over memmapped pairs, a block at a time."""
    e = yy = 0.0
    with torch.no_grad():
        for x, y in zip(xs, ys):
            for s in range(0, x.shape[0], block):
                xb, yb = torch.from_numpy(np.array(x[s:s + block])), torch.from_numpy(np.array(y[s:s + block]))
                p = act(xb, w[0], w[1]) @ w[2].T
                e += float(((p - yb).double() ** 2).sum())
                yy += float((yb.double() ** 2).sum())
    return e, yy


def optimize_ffn(w0: tuple[torch.Tensor, ...], fit_data, held_data, *, steps: int, batch: int = 1024,
                 lr: float = 1e-3, eval_every: int = 25, patience: int = 4, seed: int = 0):
    """Adam on gate, up, down from w0 to reproduce y; the weights at the best held-out error.
    Returns (weights, held-out rel_error at w0, best held-out rel_error, steps taken)."""
    xs, ys, _ = fit_data
    hx, hy, _ = held_data
    n = sum(x.shape[0] for x in xs)
    params = [p.detach().clone().float().requires_grad_(True) for p in w0]
    opt = torch.optim.Adam(params, lr=lr)
    e0, yy = _sq_error(hx, hy, w0)
    start = best = math.sqrt(e0 / yy) if yy > 0 else float("nan")
    best_w, bad, step = [p.detach().clone() for p in params], 0, 0
    gen = np.random.default_rng(seed)
    # the loss is relative to the mean ||y||^2 of the batch's own tokens: steps are scale-free
    for step in range(1, steps + 1):
        idx = gen.choice(n, size=min(batch, n), replace=False)
        x, y = _rows(xs, idx), _rows(ys, idx)
        p = act(x, params[0], params[1]) @ params[2].T
        loss = ((p - y) ** 2).sum() / (y * y).sum().clamp_min(1e-30)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            e, _ = _sq_error(hx, hy, params)
            rel = math.sqrt(e / yy)
            if rel < best:
                best, best_w, bad = rel, [p.detach().clone() for p in params], 0
            else:
                bad += 1
                if bad >= patience:
                    break
    return tuple(best_w), start, best, step


def fit(ck: Checkpoint, model, tokenizer, docs: dict[str, list[str]], adapted: dict[str, torch.Tensor],
        meta: dict, *, method: str = "down", ridge: float | None = None, holdout: float = HOLDOUT,
        seq_len: int, batch_size: int = 8, max_tokens: int | None = None, device: str = "cpu",
        stream_tokens: int | None = None, steps: int = 500, lr: float = 1e-3, seed: int = 0,
        select: str = "domains", weighting: str = "tokens", cache_for: Path | None = None) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The adapted FFNs with fitted layers, and per target layer what was chosen and measured. The `ffn` fit's
    block I/O cache lives inside the hidden temp of the output `cache_for` (io.writer.scratch), so a killed
    run's cache goes with its temp; without an output, in a temporary directory."""
    if ridge is not None and ridge < 0:
        raise XpertError(f"--ridge {ridge}: must be >= 0")
    lmap = [list(g) for g in meta["layer_map"]]
    from .. import data
    cap = None if max_tokens is None else round(max_tokens / (1 - holdout))  # fit + held-out tokens per domain
    docs = {n: data.domain_documents(d, cap) for n, d in docs.items()}  # a bounded sample of a large domain
    fit_docs, held_docs = split_documents(docs, holdout)
    held_tokens = None if max_tokens is None else max(seq_len, round(max_tokens * holdout / (1 - holdout)))
    lm = LayerMoments(adapted, lmap)
    n = len(lmap)
    with _cache_dir(method, cache_for) as tmp:
        cache = DiskCache(Path(tmp), {i for g in lmap for i in g}, lm.d, list(docs)) if method == "ffn" else None
        lm.sink = cache
        try:
            kw = dict(seq_len=seq_len, batch_size=batch_size, device=device, stream_tokens=stream_tokens)
            lm.part = "fit"
            capture.run(ck, model, tokenizer, {k: v for k, v in fit_docs.items() if v}, lm, max_tokens=max_tokens,
                        label="calibrate", **kw)
            lm.part = HELD
            capture.run(ck, model, tokenizer, held_docs, lm, max_tokens=held_tokens, label="held out", **kw)
        finally:
            if cache is not None:
                cache.close()
        downs, report = solve_down(lm, [adapted[f"layers.{t}.down_proj"].float() for t in range(n)], ridge, select,
                                   weighting)
        out = dict(adapted)
        for t, d in enumerate(downs):
            out[f"layers.{t}.down_proj"] = d
        rows = [r.as_dict() for r in report]
        if method == "ffn":
            for t in range(n):
                w0 = tuple(out[f"layers.{t}.{m}"].float() for m in ("gate_proj", "up_proj", "down_proj"))
                w, start, best, took = optimize_ffn(w0, cache.read("fit", lmap[t]), cache.read(HELD, lmap[t]),
                                                    steps=steps, lr=lr, seed=seed + t)
                cal_e, cal_yy = _sq_error(*cache.read("fit", lmap[t])[:2], w)
                rows[t]["ffn"] = {"steps": took, "held_out_start": start, "held_out": best,
                                  "calibration": math.sqrt(cal_e / cal_yy) if cal_yy > 0 else None}
                hx, hy, hd = cache.read(HELD, lmap[t])
                rows[t]["ffn"]["held_out_domains"] = _per_domain(hx, hy, hd, w, list(docs))
                if best < start:
                    for m, p in zip(("gate_proj", "up_proj", "down_proj"), w):
                        out[f"layers.{t}.{m}"] = p.contiguous()
                    rows[t]["kept"] = "ffn"
    print_report(rows, method)
    return out, rows


def _cache_dir(method: str, out: Path | None):
    """Where the `ffn` fit caches block I/O (`down` needs no cache): inside the output's hidden temp."""
    if method != "ffn":
        return contextlib.nullcontext()
    if out is None:
        return tempfile.TemporaryDirectory(prefix="xpertctl-fit-")
    from ..io.writer import scratch
    return scratch(out, "fit-cache")


def _per_domain(xs, ys, ds, w, names: list[str]) -> dict[str, float]:
    e, yy = np.zeros(len(names)), np.zeros(len(names))
    with torch.no_grad():
        for x, y, d in zip(xs, ys, ds):
            for s in range(0, x.shape[0], 8192):
                xb, yb = torch.from_numpy(np.array(x[s:s + 8192])), torch.from_numpy(np.array(y[s:s + 8192]))
                db = np.asarray(d[s:s + 8192])
                r = ((act(xb, w[0], w[1]) @ w[2].T - yb).double() ** 2).sum(1).numpy()
                np.add.at(e, db, r)
                np.add.at(yy, db, (yb.double() ** 2).sum(1).numpy())
    return {n: math.sqrt(e[k] / yy[k]) for k, n in enumerate(names) if yy[k] > 0}


def print_report(rows: list[dict], method: str) -> None:
    from rich.table import Table
    t = Table(title=f"--fit {method}: rel_error per target layer (held out: whole documents never fitted)",
              title_justify="left")
    for c in ("target", "ridge", "kept", "calibration cons/fit", "held-out cons/fit", *(["held-out ffn", "steps"] if method == "ffn" else [])):
        t.add_column(c, justify="right")
    for r in rows:
        extra = []
        if method == "ffn":
            extra = [f"{r['ffn']['held_out']:.3f}", str(r["ffn"]["steps"])]
        t.add_row(str(r["target"]), "-" if r["ridge"] is None else f"{r['ridge']:g}", r["kept"],
                  f"{r['calibration']['consolidation']:.3f} / {r['calibration']['fit']:.3f}",
                  f"{r['held_out']['consolidation']:.3f} / {r['held_out']['fit']:.3f}", *extra)
    err.print(t)


def fit_down(ck: Checkpoint, model, tokenizer, docs: dict[str, list[str]], adapted: dict[str, torch.Tensor],
             meta: dict, *, ridge: float | None = None, seq_len: int, batch_size: int = 8,
             max_tokens: int | None = None, device: str = "cpu", stream_tokens: int | None = None) -> list[torch.Tensor]:
    """New down projections [d, f] per target layer (the validated `down` fit)."""
    out, _ = fit(ck, model, tokenizer, docs, adapted, meta, method="down", ridge=ridge, seq_len=seq_len,
                 batch_size=batch_size, max_tokens=max_tokens, device=device, stream_tokens=stream_tokens)
    return [out[f"layers.{t}.down_proj"] for t in range(len(meta["layer_map"]))]
