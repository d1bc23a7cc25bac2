"""Function fidelity of every consolidation variant on one MoE, in one pass over the text.

    python studies/fidelity_variants.py [--src fixtures/teacher] [--corpus fixtures/corpus-mini]
        [--depth 6] [--tokens 4000] [--json out.json]
    python studies/fidelity_variants.py --per-domain [--split test] [--fit-steps 500]

`--per-domain` (issue 20): stats and calibration on all of the train split, and each student measured
on each domain's test split on its own (4,096 tokens each): the default, the validated `--fit down` (ridge chosen by domains, or by held-out documents) and
`--fit ffn`; per domain the mean and the worst layer (`--fits down --domains legal`: one cheap re-check).
`--sweeps`: the default with and without the two alignment sweeps (`--align-sweeps 2`) on 4 and 8
selected experts per layer (the default selection keeps 2, where sweeps never run), test splits pooled.

Stats on the corpus's train split pick the experts (min / random / low); each variant's dense FFNs are
built in memory exactly as `graft` builds them, and all are measured against the source's MoE blocks
on the val split (rel_error, cosine, least-squares scale). This is the table in the README's method
section. `--fit` adds the validated down fit from the default (selected) and from `--rescale routed`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xpertctl.io import open_checkpoint  # noqa: E402
from xpertctl.ops import decompose, fidelity, fit, reshape  # noqa: E402
from xpertctl.ops import select as sel  # noqa: E402
from xpertctl.ops import stats as stats_op  # noqa: E402
from xpertctl.specs import RESCALE_DEFAULT, Target  # noqa: E402

DEFAULT = dict(align_neurons=True, weighting="joint", ranks=None)
VARIANTS = {  # name: (selection, decompose kwargs, combine, rescale); each row changes one thing from the default
    "default (aligned, joint, full ranks, usage, selected-mass scale)": ("min", DEFAULT, "usage", "selected"),
    "default with the whole block's routing mass (`--rescale routed`)": ("min", DEFAULT, "usage", "routed"),
    "default without a scale (`--rescale none`)": ("min", DEFAULT, "usage", "none"),
    "literal paper (unaligned, per-matrix rank 1)": ("min", dict(align_neurons=False, weighting="per-matrix", ranks="full,full,1"), "literal", "none"),
    "unaligned mean (no Tucker)": ("min", dict(align_neurons=False, no_tucker=True), "usage", "none"),
    "unaligned, joint, full ranks": ("min", dict(align_neurons=False, weighting="joint", ranks=None), "usage", "selected"),
    "aligned, joint rank 1": ("min", dict(align_neurons=True, weighting="joint", ranks="full,full,1"), "usage", "selected"),
    "aligned, joint energy 0.9": ("min", dict(align_neurons=True, weighting="joint", ranks="full,full,0.9"), "usage", "selected"),
    "default, random selection": ("random", DEFAULT, "usage", "selected"),
    "default, low selection": ("low", DEFAULT, "usage", "selected"),
    "random selection, `--rescale routed`": ("random", DEFAULT, "usage", "routed"),
    "low selection, `--rescale routed`": ("low", DEFAULT, "usage", "routed"),
}


def student_of(ck, doc, target, kwargs, combine, rescale, label):
    per_src = {}
    _, fmeta = decompose.compute(ck, doc, "(bench)", **kwargs,
                                 each=lambda i, t: per_src.__setitem__(i, reshape.combine_layer(t, i, combine)))
    adapted, meta = reshape.adapt(per_src, fmeta, target, combine=combine, rescale=rescale)
    return adapted, meta, fidelity.Student(
        label=label, ffns=[tuple(adapted[f"layers.{k}.{m}"] for m in fidelity.MATS) for k in range(target.layers)],
        layer_map=meta["layer_map"], residual_index=adapted["residual_index"],
        experts={int(k): v for k, v in (meta.get("experts") or {}).items()}, init_std=0.02, source=None)


def train_split_student(ck, corpus: Path, seq_len: int, depth: int, label: str = "default (no fit)"):
    """The studies' common start: the source run over all of the corpus's train split (kept as the runner's
    documents, the calibration text), stats on it, the min selection and the default student at `depth`.
    Returns (runner, domain names, adapted, meta, student)."""
    from xpertctl.ops import capture
    names = sorted(p.stem for p in (corpus / "train").glob("*.txt"))
    runner = capture.prepare(ck, [f"{n}={corpus / 'train' / (n + '.txt')}" for n in names], seq_len=seq_len,
                             sample_seed=0)
    res = stats_op.collect(ck, runner.model, runner.tokenizer, runner.docs, top_k=ck.top_k, seq_len=seq_len,
                           batch_size=8, max_tokens=None, device="cpu")
    st = sel.Stats(res.counts.numpy(), res.mass.numpy(), res.tokens.numpy(), res.layers, res.domains, ck.top_k,
                   ck.num_experts, ck.fingerprint, {}, res.routed.numpy())
    doc = sel.selection_doc(st, sel.choose(st, "min", None, 0), "min", None, 0)
    doc["source"] = None
    adapted, meta, base = student_of(ck, doc, Target(layers=depth), DEFAULT, "usage", RESCALE_DEFAULT, label)
    return runner, names, adapted, meta, base


def per_domain(a) -> None:
    ck = open_checkpoint(a.src)
    corpus = Path(a.corpus)
    t0 = time.perf_counter()
    runner, names, adapted, meta, base = train_split_student(ck, corpus, a.seq_len, a.depth)

    students = [base]
    fits = {"--fit down (ridge by domains)": dict(method="down", select="domains"),
            "--fit down --ridge-select documents": dict(method="down", select="documents"),
            "--fit down --fit-weighting domains": dict(method="down", select="domains", weighting="domains"),
            f"--fit ffn (--fit-steps {a.fit_steps})": dict(method="ffn", select="domains", steps=a.fit_steps)}
    keep = dict(zip(("down", "documents", "weighted", "ffn"), fits))  # --fits picks some (cheap re-checks)
    fits = {keep[k]: fits[keep[k]] for k in (a.fits.split(",") if a.fits else keep) if k in keep}  # none: no fit
    for label, kw in fits.items():
        t1 = time.perf_counter()
        out, _ = fit.fit(ck, runner.model, runner.tokenizer, runner.docs, adapted, meta, seq_len=a.seq_len,
                         max_tokens=65536, **kw)
        print(f"{label}: fitted in {time.perf_counter() - t1:.0f} s", file=sys.stderr)
        students.append(fidelity.Student(label, [tuple(out[f"layers.{k}.{m}"] for m in fidelity.MATS)
                                                 for k in range(a.depth)], base.layer_map, base.residual_index,
                                         base.experts, 0.02, None))
    table: dict[str, dict[str, list[float]]] = {}
    measured = a.domains.split(",") if a.domains else names  # calibration always uses every domain
    for n in measured:
        rows, _ = fidelity.measure(ck, students, [f"{n}={corpus / a.split / (n + '.txt')}"], max_tokens=4096,
                                   seq_len=a.seq_len)
        for s_, r in zip(students, rows):
            table.setdefault(s_.label, {})[n] = [x["rel_error"] for x in r]
        table.setdefault("reference: the selected experts' own routed mixture", {})[n] = [
            x["references"]["selected_mixture"]["rel_error"] for x in rows[0]]
    print(f"| variant (mean / worst layer, {a.split} split) | " + " | ".join(measured) + " |")
    print("|---|" + "---|" * len(measured))
    for label, per in table.items():
        print(f"| {label} | " + " | ".join(f"{sum(v) / len(v):.3f} / {max(v):.3f}" for v in per.values()) + " |")
    print(f"\n{a.split} split, 4,096 tokens per domain, depth {a.depth}, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if a.json:
        Path(a.json).write_text(json.dumps(table, indent=1))


def sweeps(a) -> None:
    from xpertctl.ops import capture
    ck = open_checkpoint(a.src)
    corpus = Path(a.corpus)
    names = sorted(p.stem for p in (corpus / "train").glob("*.txt"))
    runner = capture.prepare(ck, [f"{n}={corpus / 'train' / (n + '.txt')}" for n in names], seq_len=a.seq_len)
    res = stats_op.collect(ck, runner.model, runner.tokenizer, runner.docs, top_k=ck.top_k, seq_len=a.seq_len,
                           batch_size=8, max_tokens=None, device="cpu")
    st = sel.Stats(res.counts.numpy(), res.mass.numpy(), res.tokens.numpy(), res.layers, res.domains, ck.top_k,
                   ck.num_experts, ck.fingerprint, {}, res.routed.numpy())
    students = []
    for k in (4, 8):
        doc = sel.selection_doc(st, sel.choose(st, "min", k, 0), "min", k, 0)
        doc["source"] = None
        for n in (2, 0):
            students.append(student_of(ck, doc, Target(layers=a.depth), dict(DEFAULT, sweeps=n), "usage", RESCALE_DEFAULT,
                                       f"{k} experts per layer, --align-sweeps {n}")[2])
    rows, tokens = fidelity.measure(ck, students, [f"{n}={corpus / a.split / (n + '.txt')}" for n in names],
                                    max_tokens=4096, seq_len=a.seq_len)
    print(f"| variant ({a.split} splits pooled) | mean rel_error | mean cosine | per layer |")
    print("|---|---|---|---|")
    for s_, r in zip(students, rows):
        m = fidelity.summary(r)["student"]
        print(f"| {s_.label} | {m['rel_error']:.4f} | {m['cosine']:+.4f} | " + " ".join(f"{x['rel_error']:.3f}" for x in r) + " |")
    print(f"\n{sum(tokens.values())} tokens", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default=str(ROOT / "fixtures/teacher"))
    ap.add_argument("--corpus", default=str(ROOT / "fixtures/corpus-mini"))
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=4000)
    ap.add_argument("--seq-len", type=int, default=None, help="default 256; 512 with --per-domain (graft's)")
    ap.add_argument("--fit", action="store_true", help="also the data-aware down fit (calibrated on train)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--per-domain", action="store_true", help="per-domain table on --split (see the docstring)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--fit-steps", type=int, default=500)
    ap.add_argument("--fits", default=None, help="--per-domain: some of down,documents,weighted,ffn, or none (default all)")
    ap.add_argument("--domains", default=None, help="--per-domain: measure only these (comma-separated)")
    ap.add_argument("--sweeps", action="store_true", help="what the alignment sweeps gain (see the docstring)")
    a = ap.parse_args()
    if a.sweeps:
        a.seq_len = a.seq_len or 512
        return sweeps(a)
    if a.per_domain:
        a.seq_len = a.seq_len or 512
        return per_domain(a)
    a.seq_len = a.seq_len or 256
    ck = open_checkpoint(a.src)
    corpus = Path(a.corpus)
    names = sorted(p.stem for p in (corpus / "train").glob("*.txt"))
    train = [f"{n}={corpus / 'train' / (n + '.txt')}" for n in names]
    val = [f"{n}={corpus / 'val' / (n + '.txt')}" for n in names]
    t0 = time.perf_counter()
    runner = __import__("xpertctl.ops.capture", fromlist=["prepare"]).prepare(ck, train, seq_len=a.seq_len)
    res = stats_op.collect(ck, runner.model, runner.tokenizer, runner.docs, top_k=ck.top_k, seq_len=a.seq_len,
                           batch_size=8, max_tokens=a.tokens, device="cpu")
    st = sel.Stats(res.counts.numpy(), res.mass.numpy(), res.tokens.numpy(), res.layers, res.domains, ck.top_k,
                   ck.num_experts, ck.fingerprint, {}, res.routed.numpy())
    docs = {c: sel.selection_doc(st, sel.choose(st, c, None, 0), c, None, 0) for c in ("min", "random", "low")}
    for d in docs.values():
        d["source"] = None  # built in memory from this checkpoint
    target = Target(layers=a.depth)
    students = []
    for label, (crit, kw, comb, resc) in VARIANTS.items():
        adapted, meta, s = student_of(ck, docs[crit], target, kw, comb, resc, label)
        students.append(s)
        if a.fit and crit == "min" and kw is DEFAULT and resc in ("routed", "selected"):  # the fit from either scale
            downs = fit.fit_down(ck, runner.model, runner.tokenizer, runner.docs, adapted, meta, seq_len=a.seq_len,
                                 batch_size=8, max_tokens=a.tokens, device="cpu")  # validated (ridge by domains)
            ffns = [(g, u, downs[k]) for k, (g, u, _) in enumerate(s.ffns)]
            name = "default" if resc == RESCALE_DEFAULT else f"`--rescale {resc}`"
            students.append(fidelity.Student(f"{name} + fit down (ridge, calibrated on train)", ffns, s.layer_map,
                                             s.residual_index, s.experts, 0.02, None))
    rows, tokens = fidelity.measure(ck, students, val, max_tokens=a.tokens, seq_len=a.seq_len)
    out = {"src": a.src, "depth": a.depth, "tokens": tokens, "variants": {}}
    print(f"| variant | rel_error | worst layer | cosine | LS scale | rel_error at LS scale |")
    print("|---|---|---|---|---|---|")
    for s, r in zip(students, rows):
        m = fidelity.summary(r)
        out["variants"][s.label] = {"summary": m, "layers": r}
        x = m["student"]
        worst = max(l["rel_error"] for l in r)
        print(f"| {s.label} | {x['rel_error']:.3f} | {worst:.3f} | {x['cosine']:+.3f} | {x['scale']:.2f} | {x['rel_error_at_scale']:.3f} |")
    ref = fidelity.summary(rows[0])
    for name in ("selected_mixture", "scratch"):
        x = ref[name]
        print(f"| reference: {name.replace('_', ' ')} | {x['rel_error']:.3f} | | {x['cosine']:+.3f} | {x['scale']:.2f} | {x['rel_error_at_scale']:.3f} |")
    print("| reference: zero FFN | 1.000 | 1.000 | +0.000 | - | 1.000 |")
    print(f"\n{sum(tokens.values())} val tokens, depth {a.depth}, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
