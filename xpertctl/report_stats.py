"""The report's statistics: paired intervals, Holm's correction over the declared primary contrasts, the
budget at which scratch matches an arm (bracketed, bootstrapped, censored), steps to reach a loss
(censored). Plain functions on numbers; every one is checked against an independent computation in tests."""
from __future__ import annotations

import math

import numpy as np

LEVEL = 0.95


def paired(x: dict[int, float], y: dict[int, float], level: float = LEVEL) -> tuple[float, float, int, float]:
    """(mean of the per-seed differences x - y over the seeds both have, the t half-width at `level`,
    the number of pairs, the two-sided p-value of 'no difference'). NaN where fewer than 2 pairs."""
    from scipy.stats import t as student_t
    seeds = sorted(set(x) & set(y))
    d = np.array([x[s] - y[s] for s in seeds], dtype=float)
    n = len(d)
    if n < 2:
        return (float(d.mean()) if n else float("nan")), float("nan"), n, float("nan")
    se = d.std(ddof=1) / math.sqrt(n)
    half = float(student_t.ppf(1 - (1 - level) / 2, n - 1) * se)
    p = float(2 * student_t.sf(abs(d.mean()) / se, n - 1)) if se > 0 else (0.0 if d.mean() else 1.0)
    return float(d.mean()), half, n, p


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control), in the input's order; NaN stays NaN
    and does not count in the family."""
    idx = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    m = len(idx)
    out = [float("nan")] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def simultaneous_level(m: int, level: float = LEVEL) -> float:
    """The per-interval level whose m intervals hold together at `level` (Bonferroni; Holm's decisions are
    read from the adjusted p-values, its intervals are these)."""
    return 1 - (1 - level) / max(m, 1)


def reach_step(curve: list[tuple[int, float]], target: float) -> float | None:
    """The first step at which a validation curve reaches `target` (linear between evaluations); None if never."""
    prev = None
    for step, v in curve:
        if v <= target:
            if prev is None or prev[1] == v:
                return float(step)
            s0, v0 = prev
            return s0 + (v0 - target) / (v0 - v) * (step - s0)
        prev = (step, v)
    return None


def censored_median(values: list[float | None], limit: float) -> tuple[float | None, int]:
    """Median over every seed, a seed that never got there counted as beyond `limit` (censored, not
    dropped): (median, or None when it is censored itself; how many seeds got there)."""
    got = sum(v is not None for v in values)
    xs = sorted(math.inf if v is None else v for v in values)
    if not xs:
        return None, 0
    n = len(xs)
    med = xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2
    return (None if math.isinf(med) else float(med)), got


def matching_budget(curve: dict[float, float], target: float) -> tuple[float | None, str]:
    """The budget at which a monotone (budget -> loss) curve reaches `target`, linear in log budget between
    the bracketing budgets run: (budget, '') inside them, (None, '<'|'>') when the target lies before the
    smallest budget or beyond the largest (censored)."""
    pts = sorted(curve.items())
    if target > pts[0][1]:
        return None, "<"
    for (b0, l0), (b1, l1) in zip(pts, pts[1:]):
        if l1 <= target <= l0:
            if l0 == l1:
                return b0, ""
            f = (l0 - target) / (l0 - l1)
            return float(math.exp(math.log(b0) + f * (math.log(b1) - math.log(b0)))), ""
    return (pts[-1][0], "") if target == pts[-1][1] else (None, ">")


def budget_ratio(base: dict[float, dict[int, float]], arm: dict[int, float], budget: float, *, draws: int = 2000,
                 seed: int = 0, level: float = LEVEL) -> dict:
    """How many times `budget` the baseline needs to match the arm's mean loss at `budget`: the point
    estimate from the means, a percentile interval from resampling every cell's seeds (each budget of the
    baseline and the arm independently), and the share of draws that fell outside the budgets run
    (censored: reported, never dropped). base: {budget: {seed: loss}}, arm: {seed: loss}."""
    rng = np.random.default_rng(seed)
    means = {b: float(np.mean(list(v.values()))) for b, v in base.items()}
    point, side = matching_budget(means, float(np.mean(list(arm.values()))))
    cells = {b: np.array(list(v.values())) for b, v in base.items()}
    a = np.array(list(arm.values()))
    ratios, lo, hi = [], 0, 0
    for _ in range(draws):
        m = {b: float(rng.choice(v, len(v)).mean()) for b, v in cells.items()}
        r, s = matching_budget(m, float(rng.choice(a, len(a)).mean()))
        if s == "<":
            lo += 1
            ratios.append(-math.inf)
        elif s == ">":
            hi += 1
            ratios.append(math.inf)
        else:
            ratios.append(r / budget)
    q = np.quantile(np.array(ratios), [(1 - level) / 2, 1 - (1 - level) / 2], method="inverted_cdf")
    return {"ratio": point / budget if point is not None else None, "censored": side,
            "low": float(q[0]), "high": float(q[1]), "below": lo / draws, "beyond": hi / draws,
            "min": min(base) / budget, "max": max(base) / budget}
