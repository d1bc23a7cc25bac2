"""Issue 20: can the validated `--fit down` reach mean <= 0.70 on every domain? (study, not a user tool)

Captures once, then evaluates every candidate from moments (A^T A, A^T Y, Y^T Y per layer and part):
  - the fit's own calibration (train split: fitted documents in quarters, the 10% held-out documents),
  - each domain's val split (whole, an independent selection set: never reported as a result),
  - each domain's test split, the 4,096 tokens `fidelity` samples (seed 0): only reported, never used
    to choose anything.
A down projection's rel_error on a part is exact from its moments (fit.Moments.rel_error), so each
candidate costs one eigendecomposition per layer, no forward pass.

    python studies/fit_down_study.py capture moments.pt   # ~1 forward pass over train, val and test
    python studies/fit_down_study.py report moments.pt    # data size, ridge rules, penalties, test-split bounds
    python studies/fit_down_study.py report2 moments.pt   # each domain's own best ridge (bounds), more documents
    python studies/fit_down_study.py val moments.pt       # the candidates on the val split (where choices are made)
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xpertctl import data  # noqa: E402
from xpertctl.io import open_checkpoint  # noqa: E402
from xpertctl.ops import capture, fit  # noqa: E402

sys.path.insert(0, str(ROOT / "studies"))
from fidelity_variants import train_split_student  # noqa: E402

SEQ = 512
QUARTERS = 4


def moments_of(lm: fit.LayerMoments, part: str) -> list[dict]:
    src = lm.fit if part == "fit" else lm.held
    return [{n: (m.ata, m.aty, m.yty, m.tokens) for n, m in layer.items()} for layer in src]


def capture_all(out: Path) -> None:
    ck = open_checkpoint(ROOT / "fixtures/teacher")
    corpus = ROOT / "fixtures/corpus-mini"
    t0 = time.perf_counter()
    runner, names, adapted, meta, _ = train_split_student(ck, corpus, SEQ, 6, "default")
    lmap = [list(g) for g in meta["layer_map"]]
    # the fit's own document split (fit.fit with max_tokens=65536, holdout 0.1)
    cap = round(65536 / (1 - fit.HOLDOUT))
    docs = {n: data.domain_documents(d, cap) for n, d in runner.docs.items()}
    fit_docs, held_docs = fit.split_documents(docs, fit.HOLDOUT)
    quarters = {}
    for n, d in fit_docs.items():  # the fitted documents in quarters: the data-size curve
        for q in range(QUARTERS):
            quarters[f"{n}#{q}"] = d[q * len(d) // QUARTERS:(q + 1) * len(d) // QUARTERS]
    lm = fit.LayerMoments(adapted, lmap)
    kw = dict(seq_len=SEQ, batch_size=8, device="cpu")
    tok = capture.run(ck, runner.model, runner.tokenizer, quarters, lm, max_tokens=65536, label="fit", **kw)
    lm.part = fit.HELD
    htok = capture.run(ck, runner.model, runner.tokenizer, held_docs, lm, max_tokens=None, label="held", **kw)
    saved = {"fit": moments_of(lm, "fit"), "held": moments_of(lm, fit.HELD), "tokens": {"fit": tok, "held": htok}}
    for split, cap_ in (("val", None), ("test", 4096)):  # test: what `fidelity --max-tokens 4096` samples
        r = capture.prepare(ck, [f"{n}={corpus / split / (n + '.txt')}" for n in names], seq_len=SEQ,
                            sample_seed=0 if cap_ else None)
        m = fit.LayerMoments(adapted, lmap)
        m.part = fit.HELD
        saved["tokens"][split] = capture.run(ck, r.model, r.tokenizer, r.docs, m, max_tokens=cap_, label=split, **kw)
        saved[split] = moments_of(m, fit.HELD)
    saved["b0"] = [adapted[f"layers.{t}.down_proj"].T.double() for t in range(len(lmap))]
    torch.save(saved, out)
    print(f"captured in {time.perf_counter() - t0:.0f} s; tokens {saved['tokens']}", file=sys.stderr)


def load(path: Path):
    s = torch.load(path)
    conv = lambda layer: {n: fit.Moments(*v) for n, v in layer.items()}  # noqa: E731
    for k in ("fit", "held", "val", "test"):
        s[k] = [conv(layer) for layer in s[k]]
    return s


if __name__ == "__main__":
    cmd, path = sys.argv[1], Path(sys.argv[2])
    if cmd == "capture":
        capture_all(path)


# ---- analysis from the moments -------------------------------------------------------------------

GRID = fit.RIDGES
FINE = (0.0,) + tuple(float(x) for x in np.logspace(-4, 2, 25))


def solve(m: fit.Moments, b0: torch.Tensor, r: float, penalty: str = "I") -> torch.Tensor:
    """B0 + (A^T A + lam P)^-1 (A^T Y - A^T A B0), lam = r trace(A^T A) / trace(P)."""
    ata = m.ata
    if r == float("inf"):
        return b0
    p = {"I": torch.eye(ata.shape[0], dtype=ata.dtype), "diag": torch.diag(torch.diag(ata)), "gram": ata}[penalty]
    lam = r * float(torch.trace(ata)) / max(float(torch.trace(p)), 1e-300)
    mat = ata + lam * p
    return b0 + torch.linalg.lstsq(mat, m.aty - ata @ b0).solution


def merged(part: dict, quarters: int = QUARTERS) -> dict:
    """Per domain, the first `quarters` quarters of its fitted documents (held-out parts pass through)."""
    out = {}
    for k, m in part.items():
        n, _, q = k.partition("#")
        if q and int(q) >= quarters:
            continue
        out.setdefault(n, []).append(m)
    return {n: fit.pooled(ms) for n, ms in out.items()}


def score_of(rule, fitd, held, val, b0, r, penalty):
    """The selection score of ridge r under `rule` (never the test split)."""
    if rule == "documents":
        return fit.pooled(list(held.values())).rel_error(solve(fit.pooled(list(fitd.values())), b0, r, penalty))
    if rule in ("val", "val-eq"):
        b = solve(fit.pooled(list(fitd.values())), b0, r, penalty)
        if rule == "val":
            return fit.pooled(list(val.values())).rel_error(b)
        return float(np.mean([m.rel_error(b) for m in val.values()]))
    if rule == "held-eq":
        b = solve(fit.pooled(list(fitd.values())), b0, r, penalty)
        return float(np.mean([m.rel_error(b) for m in held.values()]))
    if rule in ("domains", "both"):
        lodo = []
        for n in fitd:
            rest = fit.pooled([fitd[k] for k in fitd if k != n] + [held[k] for k in held if k != n])
            out = fit.pooled([fitd[n]] + ([held[n]] if n in held else []))
            lodo.append(out.rel_error(solve(rest, b0, r, penalty)))
        s = float(np.mean(lodo))
        return s if rule == "domains" else (s + score_of("documents", fitd, held, val, b0, r, penalty)) / 2
    raise ValueError(rule)


def run_rule(s, rule, grid=GRID, penalty="I", quarters=QUARTERS, weight=None, on="test"):
    """Per layer: the chosen ridge (or inf: the consolidation kept) and the per-domain test rel_errors."""
    per_layer = []
    for t in range(len(s["b0"])):
        b0 = s["b0"][t]
        fitd, held, val, test = merged(s["fit"][t], quarters), s["held"][t], s["val"][t], s["test"][t]
        if weight == "domain":  # each domain's moments scaled to unit ||Y||^2: domains weigh equally
            fitd = {n: _scaled(m, 1.0 / m.yty) for n, m in fitd.items()}
            held = {n: _scaled(m, 1.0 / m.yty) for n, m in held.items()}
        if rule == "oracle":  # chosen on the test split itself: an upper bound, never a method
            sc = [float(np.mean([m.rel_error(solve(fit.pooled(list(fitd.values())), b0, r, penalty))
                                 for m in test.values()])) for r in grid]
        else:
            sc = [score_of(rule, fitd, held, val, b0, r, penalty) for r in grid]
        k = int(np.nanargmin(sc))
        r = grid[k]
        if rule != "oracle":
            base = score_of(rule, fitd, held, val, b0, float("inf"), penalty)
            hb = fit.pooled(list(held.values()))
            cand = solve(fit.pooled(list(fitd.values())), b0, r, penalty)
            if not (sc[k] < base and hb.rel_error(cand) < hb.rel_error(b0)):
                r = float("inf")
        b = solve(fit.pooled(list(fitd.values())), b0, r, penalty)
        per_layer.append((r, {n: m.rel_error(b) for n, m in s[on][t].items()}))
    return per_layer


def _scaled(m: fit.Moments, c: float) -> fit.Moments:
    return fit.Moments(m.ata * c, m.aty * c, m.yty * c, m.tokens)


def floor(s):
    """Per layer and domain: the best any down projection can do on the test tokens with gate and up as
    consolidated (least squares on the test split's own moments, in-sample): no ridge rule goes below."""
    out = []
    for t in range(len(s["b0"])):
        row = {}
        for n, m in s["test"][t].items():
            b = solve(m, s["b0"][t], 1e-9)
            row[n] = m.rel_error(b)
        out.append((None, row))
    return out


def line(label, per_layer):
    names = list(per_layer[0][1])
    cells = []
    for n in names:
        v = [row[n] for _, row in per_layer]
        cells.append(f"{np.mean(v):.3f} / {max(v):.3f}")
    ridges = " ".join("-" if r is None else ("kept" if r == float("inf") else f"{r:g}") for r, _ in per_layer)
    return f"| {label} | " + " | ".join(cells) + f" | {ridges} |", names


def report(path: Path, which: list[str] | None = None) -> None:
    s = load(path)
    rows = {
        "consolidation (no fit)": lambda: [(float("inf"), {n: m.rel_error(s["b0"][t]) for n, m in s["test"][t].items()})
                                           for t in range(len(s["b0"]))],
        "domains (today's default)": lambda: run_rule(s, "domains"),
        "domains, 1/4 of the fitted documents": lambda: run_rule(s, "domains", quarters=1),
        "domains, 1/2": lambda: run_rule(s, "domains", quarters=2),
        "domains, 3/4": lambda: run_rule(s, "domains", quarters=3),
        "documents": lambda: run_rule(s, "documents"),
        "documents, 1/4": lambda: run_rule(s, "documents", quarters=1),
        "documents, 1/2": lambda: run_rule(s, "documents", quarters=2),
        "both": lambda: run_rule(s, "both"),
        "held-out documents, domains weighted equally": lambda: run_rule(s, "held-eq"),
        "domains, fine grid": lambda: run_rule(s, "domains", FINE),
        "documents, fine grid": lambda: run_rule(s, "documents", FINE),
        "val split pooled": lambda: run_rule(s, "val", FINE),
        "val split, domains weighted equally": lambda: run_rule(s, "val-eq", FINE),
        "domains, fit weighting domains equally": lambda: run_rule(s, "domains", weight="domain"),
        "documents, fit weighting domains equally": lambda: run_rule(s, "documents", weight="domain"),
        "domains, penalty diag(A^T A)": lambda: run_rule(s, "domains", FINE, "diag"),
        "documents, penalty diag(A^T A)": lambda: run_rule(s, "documents", FINE, "diag"),
        "domains, penalty A^T A (shrink the LS step)": lambda: run_rule(s, "domains", FINE, "gram"),
        "ORACLE ridge I on test (bound)": lambda: run_rule(s, "oracle", FINE),
        "ORACLE ridge diag on test (bound)": lambda: run_rule(s, "oracle", FINE, "diag"),
        "ORACLE shrink on test (bound)": lambda: run_rule(s, "oracle", FINE, "gram"),
        "FLOOR: LS on each domain's test tokens (bound)": lambda: floor(s),
    }
    first = True
    for label, fn in rows.items():
        if which and not any(w in label for w in which):
            continue
        text, names = line(label, fn())
        if first:
            print("| variant (test split, mean / worst layer) | " + " | ".join(names) + " | ridge per layer |")
            print("|---|" + "---|" * (len(names) + 1))
            first = False
        print(text, flush=True)


if __name__ == "__main__" and sys.argv[1] == "report":
    report(Path(sys.argv[2]), sys.argv[3:] or None)


def per_domain_oracle(s, penalty="I", weight=None, extra=None, grid=FINE, rank=None):
    """Per domain: each layer's ridge chosen on THAT domain's test tokens (a bound for every ridge rule:
    no selection, however clever, can give a domain a lower mean with this fitted family)."""
    per_layer = []
    for t in range(len(s["b0"])):
        b0 = s["b0"][t]
        fitd = merged(s["fit"][t])
        if extra:  # more calibration documents: the held-out part and/or the val split added to the fit
            for part in extra:
                for n, m in s[part][t].items():
                    fitd[n] = fit.pooled([fitd[n], m])
        if weight == "domain":
            fitd = {n: _scaled(m, 1.0 / m.yty) for n, m in fitd.items()}
        allm = fit.pooled(list(fitd.values()))
        cands = [solve(allm, b0, r, penalty) for r in grid]
        if rank:
            cands = [reduce_rank(allm, b0, b, k) for b in cands for k in rank]
        row = {n: min(m.rel_error(b) for b in cands) for n, m in s["test"][t].items()}
        per_layer.append((None, row))
    return per_layer


def reduce_rank(m: fit.Moments, b0, b, k):
    """The step B - B0 restricted to the k output directions its fitted values use most (reduced-rank)."""
    step = b - b0
    fitted = step.T @ m.ata @ step  # [d, d] = (A step)^T (A step)
    _, v = torch.linalg.eigh(fitted)
    vk = v[:, -k:]
    return b0 + step @ vk @ vk.T


def report2(path: Path) -> None:
    s = load(path)
    rows = {
        "per-domain ORACLE, ridge I": lambda: per_domain_oracle(s),
        "per-domain ORACLE, ridge diag": lambda: per_domain_oracle(s, "diag"),
        "per-domain ORACLE, shrink": lambda: per_domain_oracle(s, "gram"),
        "per-domain ORACLE, ridge I, domains weighted equally": lambda: per_domain_oracle(s, weight="domain"),
        "per-domain ORACLE, ridge I, fit + held + val documents": lambda: per_domain_oracle(s, extra=("held", "val")),
        "per-domain ORACLE, ridge I x rank (8,16,32,64,128)": lambda: per_domain_oracle(s, grid=FINE[::2], rank=(8, 16, 32, 64, 128)),
        "domains rule, fit + held + val documents": lambda: run_rule({**s, "fit": [
            {**{k: v for k, v in s["fit"][t].items()}, **{f"{n}#-1": m for n, m in s["val"][t].items()}}
            for t in range(len(s["b0"]))]}, "domains"),
    }
    for label, fn in rows.items():
        print(line(label, fn())[0], flush=True)


def report_val(path: Path) -> None:
    """The candidates on the val split (the selection set for choices between methods)."""
    s = load(path)
    for label, kw in {"val: consolidation": dict(rule="domains", grid=(float("inf"),)),
                      "val: domains (today)": dict(rule="domains"),
                      "val: domains, domains weighted equally": dict(rule="domains", weight="domain"),
                      "val: documents": dict(rule="documents"),
                      "val: documents, domains weighted equally": dict(rule="documents", weight="domain"),
                      "val: both": dict(rule="both"),
                      "val: both, domains weighted equally": dict(rule="both", weight="domain")}.items():
        print(line(label, run_rule(s, on="val", **kw))[0], flush=True)
    for n in s["val"][0]:
        print(n, "yty/token per layer (fit part):",
              " ".join(f"{merged(s['fit'][t])[n].yty / merged(s['fit'][t])[n].tokens:.3g}" for t in range(6)))


if __name__ == "__main__" and sys.argv[1] == "val":
    report_val(Path(sys.argv[2]))

if __name__ == "__main__" and sys.argv[1] == "report2":
    report2(Path(sys.argv[2]))
