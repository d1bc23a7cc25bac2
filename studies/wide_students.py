"""Held-out fidelity of students wider than one expert (issue 30, item 2), per domain and split.

    python studies/wide_students.py [--src fixtures/teacher] [--corpus fixtures/corpus-mini] [--out build/wide]
        [--splits val,test] [--tokens 4096] [--per-layer 2,4,8] [--rules groups,experts,norm]

Every student is made by the CLI (`xpertctl stats` on all of the train split at --seq-len 256, cached;
`xpertctl select --per-layer K`; `xpertctl graft SRC --target 6L,fF --selection ... --width-rule R`), the
commands printed as they run. Then each domain's split is run through the source once and every student is
measured on it together (`fidelity.measure`, the function `xpertctl fidelity` calls, with its defaults:
--max-tokens 4096, the source's window, seed 0), which gives the same figures as one `xpertctl fidelity`
per student (`--check` runs the CLI for the two goal students and compares).

Printed per student and split: each domain's mean rel_error over the 6 target layers, the worst domain, and
the selected experts' routed mixture (fidelity's reference) for that selection.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DOMAINS = ("code", "legal", "lexicon", "manuals", "quotes", "scripture")


def sh(args: list, log: list[str]) -> None:
    """`xpertctl ARGS`, run in this process (the CLI's own entry point: one import of torch for all)."""
    from xpertctl.cli import main as cli
    log.append("xpertctl " + " ".join(map(str, args)))
    print("$", log[-1], file=sys.stderr, flush=True)
    argv, sys.argv = sys.argv, ["xpertctl", *map(str, args)]
    handler = signal.getsignal(signal.SIGINT)  # a finished command takes over Ctrl-C until its exit
    try:
        cli()
    except SystemExit as e:
        if e.code:
            sys.exit(f"failed ({e.code}): {log[-1]}")
    finally:
        sys.argv = argv
        signal.signal(signal.SIGINT, handler)


def students(a, log) -> list[tuple[str, Path]]:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = Path(a.corpus)
    stats = out / "stats.safetensors"
    if not stats.exists():
        sh(["stats", a.src, *[x for n in DOMAINS for x in ("-d", f"{n}={corpus / 'train' / (n + '.txt')}")],
            "--seq-len", 256, "-o", stats], log)
    made = []
    for k in map(int, a.per_layer.split(",")):
        sel = out / f"sel{k}.json"
        if not sel.exists():
            sh(["select", stats, "--per-layer", k, "-o", sel], log)
        widths = sorted({128, 128 * k} | {w for w in (256, 512) if w < 128 * k})
        for f in widths:
            rules = a.rules.split(",") if 128 < f < 128 * k else [None]
            for rule in rules:
                name = f"k{k}-f{f}" + (f"-{rule}" if rule else "")
                d = out / name
                if not (d / "config.json").exists():
                    sh(["graft", a.src, "--target", f"6L,f{f}", "--selection", sel, *(["--width-rule", rule] if rule else []),
                        "-o", d, "--force"], log)
                made.append((name, d))
    return made


def measure(a, made):
    from xpertctl.io import open_checkpoint
    from xpertctl.ops import fidelity
    ck = open_checkpoint(a.src)
    studs = [fidelity.load_student(d, ck.hidden, ck) for _, d in made]
    res: dict = {}
    for split in a.splits.split(","):
        for n in DOMAINS:
            rows, _ = fidelity.measure(ck, studs, [f"{n}={Path(a.corpus) / split / (n + '.txt')}"],
                                       max_tokens=a.tokens, seed=0)
            for (name, _), r in zip(made, rows):
                s = fidelity.summary(r)
                res.setdefault(split, {}).setdefault(name, {})[n] = {
                    "rel_error": s["student"]["rel_error"], "selected_mixture": s["selected_mixture"]["rel_error"],
                    "layers": [x["rel_error"] for x in r]}
            print(f"measured {split}/{n}", file=sys.stderr, flush=True)
    return res


def table(res: dict) -> str:
    lines = []
    for split, per in res.items():
        lines += [f"\n{split} split: mean rel_error over the 6 target layers (selected experts' routed mixture in "
                  "brackets)", "", "| student | " + " | ".join(DOMAINS) + " | worst |", "|---|" + "---|" * (len(DOMAINS) + 1)]
        for name, doms in per.items():
            cells = [f"{doms[n]['rel_error']:.3f} ({doms[n]['selected_mixture']:.3f})" for n in DOMAINS]
            worst = max(doms[n]["rel_error"] for n in DOMAINS)
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {worst:.3f} |")
    return "\n".join(lines)


def check(a, made, res, log) -> None:
    """The goal students measured by `xpertctl fidelity` itself, one domain at a time: the same figures."""
    out = Path(a.out)
    split = a.splits.split(",")[-1]
    for name, d in made:
        if name not in ("k2-f128", "k2-f256"):
            continue
        for n in DOMAINS:
            fid = out / f"fid-{name}-{split}-{n}.json"
            sh(["fidelity", a.src, d, "-d", f"{n}={Path(a.corpus) / split / (n + '.txt')}", "--max-tokens", a.tokens,
                "-o", fid, "--force"], log)
            got = json.loads(fid.read_text())["summary"]["student"]["rel_error"]
            want = res[split][name][n]["rel_error"]
            print(f"check {name} {split}/{n}: cli {got:.4f} bench {want:.4f}", file=sys.stderr)
            assert abs(got - want) < 1e-4, (name, n, got, want)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default=str(ROOT / "fixtures/teacher"))
    ap.add_argument("--corpus", default=str(ROOT / "fixtures/corpus-mini"))
    ap.add_argument("--out", default=str(ROOT / "build/wide"))
    ap.add_argument("--splits", default="val,test")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--per-layer", default="2,4,8")
    ap.add_argument("--rules", default="groups,experts,norm")
    ap.add_argument("--check", action="store_true", help="also run `xpertctl fidelity` on the goal students")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    t0 = time.perf_counter()
    log: list[str] = []
    made = students(a, log)
    res = measure(a, made)
    if a.check:
        check(a, made, res, log)
    import hashlib
    weights = Path(a.src) / "model.safetensors" if Path(a.src).is_dir() else Path(a.src)
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    print(f"source {a.src} ({weights.name} sha256 {sha}), {a.tokens} tokens per domain and split")
    print(table(res))
    print(f"\n{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if a.json:
        Path(a.json).write_text(json.dumps({"src": a.src, "sha256": sha, "commands": log, "results": res}, indent=1))


if __name__ == "__main__":
    main()
