"""Run every benchmark once, side by side, and put the figures (and the commands) in bench/RESULTS.md.

RESULTS.md is mostly hand-written (before/after comparisons, notes, other benchmarks' sections): this
script rewrites only its own block, between the BEGIN and END markers, appended at the end the first
time. Everything outside the block is kept byte for byte."""
from __future__ import annotations

import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
DATA = ROOT / "bench" / "data"
RESULTS = ROOT / "bench" / "RESULTS.md"
BEGIN = "<!-- bench/run_all.py: begin (this block is rewritten by each `make bench`; edit outside it) -->"
END = "<!-- bench/run_all.py: end -->"


def merge(existing: str, generated: str) -> str:
    """`existing` with the run's block replaced by `generated` (appended if there is none yet)."""
    block = f"{BEGIN}\n{generated.strip()}\n{END}"
    if BEGIN in existing and END in existing.split(BEGIN, 1)[1]:
        head, rest = existing.split(BEGIN, 1)
        return head + block + rest.split(END, 1)[1]
    return (existing.rstrip("\n") + "\n\n" if existing.strip() else "") + block + "\n"


def write(generated: str, path: Path = RESULTS) -> None:
    text = merge(path.read_text() if path.exists() else "", generated)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main() -> None:
    import bench_graft, bench_stats, bench_stream, bench_train, bench_tucker
    subprocess.run([sys.executable, str(ROOT / "bench" / "make_olmoe_shaped.py"), str(DATA)], check=True)
    subprocess.run([sys.executable, str(ROOT / "bench" / "make_olmoe_shaped.py"), str(DATA), "--layers", "2"], check=True)
    tk = bench_tucker.main(DATA / "olmoe-shaped")
    gr = bench_graft.main(DATA)
    sa = bench_stats.main(DATA / "olmoe-2L")
    sm = bench_stream.main(DATA)
    tr = bench_train.main()
    mem = subprocess.getoutput("free -g | awk '/Mem/{print $2}'")
    lines = [
        f"## Every benchmark, latest `make bench` run ({time.strftime('%Y-%m-%d')})", "",
        f"Machine: {platform.machine()}, {subprocess.getoutput('nproc')} cores, "
        f"{mem} GiB RAM, no GPU; "
        f"{time.strftime('%Y-%m-%d')}. Made by `make bench` (= `python bench/run_all.py`); the OLMoE-shaped "
        "checkpoints by `python bench/make_olmoe_shaped.py bench/data` (exact OLMoE-1B-7B config, key names, "
        "shapes, bf16, 5 GB shards, seeded random weights; + fused layout; + synthetic stats).", "",
        "### Bounded memory: one-shot graft of OLMoE-1B-7B (13.8 GB) to 12 layers", "",
        "`xpertctl graft bench/data/olmoe-shaped --target 12L --stats bench/data/olmoe-shaped.stats.safetensors -o OUT`",
        "(default consolidation: aligned neurons, full ranks, usage weights, selected-mass rescale; goal: peak RSS "
        "<= 4 GiB, wall <= 5 min), and without `--stats` (all 64 experts per layer; goal: peak RSS <= 4 GiB)", "",
        "| run | wall | peak RSS | output | load (1 min) |", "|---|---|---|---|---|",
        *[f"| {k} | {v['wall_s']:.1f} s | {v['peak_rss_gib']:.2f} GiB | {v['out_gib']:.2f} GiB | "
          f"{v['load_before']:.1f} -> {v['load_after']:.1f} |" for k, v in gr.items() if "wall_s" in v], "",
        f"Where the time goes (per-expert layout with stats, {gr['breakdown']['layers']} mapped layers, same steps "
        f"timed in-process, load {gr['breakdown']['load']:.1f}):", "",
        *[f"- {k}: {v:.1f} s" for k, v in gr["breakdown"].items() if k not in ("layers", "load")], "",
        f"Alignment of all {gr['align 64']['experts']} experts of one layer (no stats): "
        f"{gr['align 64']['seconds_per_layer']:.1f} s (load {gr['align 64']['load']:.1f})", "",
        "### Fast Tucker: one 1024 x 2048 x 8 stack (8 OLMoE-shaped gate matrices)", "",
        "`python bench/bench_tucker.py bench/data/olmoe-shaped` — tensorly's default `tucker(X, rank)` "
        "(init='svd', truncated SVD, HOOI up to 100 iterations) against xpertctl's (goal: >= 10x faster at "
        "equal or lower error)", "",
        "| ranks | xpertctl | tensorly | speed-up | xpertctl error | tensorly error |", "|---|---|---|---|---|---|",
        *[f"| {r['ranks']} | {r['xpertctl_s']:.3f} s | {r['tensorly_s']:.1f} s | {r['speedup']:.1f}x | "
          f"{r['xpertctl_err']:.6f} | {r['tensorly_err']:.6f} |" for r in tk], "",
        "### Fast stats: counting overhead", "",
        "`python bench/bench_stats.py bench/data/olmoe-2L` — OLMoE-shaped model cut to 2 layers, float32, "
        "batch 4 x 512, median of 5 alternating runs (goal: >= 0.95x the bare forward)", "",
        f"- bare transformers forward with output_router_logits=True: {sa['bare_tok_s']:,.0f} tok/s",
        f"- xpertctl stats forward (router hooks + counting): {sa['xpertctl_tok_s']:,.0f} tok/s",
        f"- ratio: **{sa['ratio']:.3f}**", "",
        "### Layer streaming", "",
        "`xpertctl stats bench/data/olmoe-shaped --stream-layers -d legal=... -d code=... --max-tokens 2000 "
        "--seq-len 512 --stream-tokens 8192 --dtype float32` (goal: peak RSS <= 6 GiB)", "",
        f"- wall {sm['wall_s']:.1f} s, peak RSS **{sm['peak_rss_gib']:.2f} GiB**, {sm['tok_s']:.0f} tok/s end to end", "",
        "### Training loop overhead", "",
        "`python bench/bench_train.py` — 4-layer student of the demo teacher, batch 8 x 256, 40 steps", "",
        f"- xpertctl train: {tr['xpertctl_tok_s']:,.0f} tok/s; bare AdamW loop: {tr['bare_tok_s']:,.0f} tok/s; "
        f"ratio **{tr['ratio']:.3f}**", "",
    ]
    write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
