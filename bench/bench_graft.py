"""One-shot `xpertctl graft <OLMoE-shaped> --target 12L` under /usr/bin/time -v (wall, peak RSS): with
stats for the per-expert and the fused layout, and without stats (every one of the 64 experts per
layer, the design card's first command); the scratch baseline (`--ffn-init scratch`) with stats; then where the time goes in the default pipeline (same
steps, timed in-process) and what neuron alignment costs for 8 and for 64 experts.

    python bench/bench_graft.py [bench/data] [--skip-fused] [--skip-all]

The 2-core machine is shared: each figure is printed with the 1-minute load average before the run."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
XPERTCTL = str(Path(sys.executable).parent / "xpertctl")


def load() -> float:
    return os.getloadavg()[0]


def timed(cmd: list[str]) -> dict:
    ld = load()
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-2000:])
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", r.stderr)
    h, m, s = (float(x) if x else 0.0 for x in wall.groups())
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    return {"wall_s": h * 3600 + m * 60 + s, "peak_rss_gib": rss / 2**20, "load_before": ld, "load_after": load()}


def graft_run(data: Path, name: str, stats: bool, scratch: bool = False) -> dict:
    src = data / name
    out = data / f"{name}-12L"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [XPERTCTL, "graft", str(src), "--target", "12L", "-o", str(out)]
    if stats:
        cmd[5:5] = ["--stats", str(data / f"{name}.stats.safetensors")]
    if scratch:
        cmd += ["--ffn-init", "scratch"]
    r = timed(cmd)
    r["out_gib"] = sum(p.stat().st_size for p in out.glob("*.safetensors")) / 2**30
    shutil.rmtree(out, ignore_errors=True)
    what = "with stats (8 experts/layer)" if stats else "no stats (all 64 experts/layer)"
    what += ", --ffn-init scratch (the baseline)" if scratch else ""
    print(f"graft {name} -> 12L, {what}: wall {r['wall_s']:.1f} s, peak RSS {r['peak_rss_gib']:.2f} GiB, "
          f"output {r['out_gib']:.2f} GiB (load {r['load_before']:.1f} -> {r['load_after']:.1f})", flush=True)
    return r


def breakdown(src: Path, stats: Path) -> dict:
    """The one-shot graft's default pipeline, stage by stage: read the selected experts, align their
    neurons, combine (full ranks: the usage-weighted sum of the aligned experts, one matrix at a time),
    adapt (depth map, --rescale, width), build the fresh model, write it. For reference, what
    the factor path (`decompose` at the same defaults) adds for the same layers: the joint Gram and the
    per-matrix stack + Tucker, which the one-shot path no longer forms."""
    import torch
    from xpertctl.io import open_checkpoint, write_model_dir
    from xpertctl.ops import decompose, graft, reshape
    from xpertctl.ops import select as sel
    from xpertctl.ops.tucker import tucker_given_experts
    from xpertctl.specs import Target
    t = {}
    ld = load()
    t0 = time.perf_counter()
    ck = open_checkpoint(src)
    st = sel.load_stats(stats)
    doc = sel.selection_doc(st, sel.choose(st, "min"), "min", None, 0)
    target = Target(12)
    meta = decompose.factor_meta(ck, doc, stats, None, True, False, {}, "joint")
    used = sorted({i for g in reshape.check(meta, target, "uniform", "usage", "norm") for i in g})
    t["open + select"] = time.perf_counter() - t0
    read = al = comb = gram = tuck = 0.0
    per_src = {}
    for l in doc["layers"]:
        if l["layer"] not in used:
            continue
        t0 = time.perf_counter()
        experts = decompose.read_layer(ck, l)
        read += time.perf_counter() - t0
        w = decompose.layer_weights(l)
        t0 = time.perf_counter()
        perms = decompose.align_perms(experts, w)
        al += time.perf_counter() - t0
        t0 = time.perf_counter()
        a = reshape.expert_mix(w, torch.eye(w.numel()), "usage").tolist()
        per_src[l["layer"]] = tuple(decompose.mode3_sum((decompose.matrix(e, k, p) for e, p in zip(experts, perms)), a)
                                    for k in range(3))
        comb += time.perf_counter() - t0
        # reference only: the factor path's extra work on the same aligned experts
        aligned = [decompose.permute(e, p) for e, p in zip(experts, perms)]
        t0 = time.perf_counter()
        decompose.joint_gram(aligned)
        gram += time.perf_counter() - t0
        t0 = time.perf_counter()
        for k in range(3):
            x = decompose.stack(aligned, k)
            tucker_given_experts(x, x.shape[0], x.shape[1], torch.eye(x.shape[2]))
            del x
        tuck += time.perf_counter() - t0
        del aligned, experts
    t["read selected experts (lazy)"] = read
    t["align neurons"] = al
    t["combine (weighted sum of aligned experts)"] = comb
    t0 = time.perf_counter()
    adapted, ameta = reshape.adapt(per_src, meta, target)
    t["adapt (depth, rescale, width)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    state, config = graft.build(adapted, ameta, ck)
    t["fresh model init (12L, d2048, vocab 50304)"] = time.perf_counter() - t0
    out = ROOT / "bench" / "data" / "breakdown-out"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    write_model_dir(out, state, {}, {"config.json": config.to_json_string().encode()})
    t["write safetensors"] = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    t["(not in the one-shot path) joint Gram, factor path"] = gram
    t["(not in the one-shot path) stack + Tucker per matrix, factor path"] = tuck
    t["layers"] = len(used)
    t["load"] = ld
    return t


def align_cost(src: Path, layer: int = 0, n: int = 64) -> dict:
    """Alignment of all n experts of one layer with equal weights (the no-stats one-shot graft)."""
    import torch
    from xpertctl.io import open_checkpoint
    from xpertctl.ops import decompose
    ck = open_checkpoint(src)
    ld = load()
    experts = decompose.read_layer(ck, {"layer": layer, "experts": list(range(n))})
    t0 = time.perf_counter()
    decompose.align_perms(experts, torch.full((n,), 1.0 / n))
    return {"experts": n, "seconds_per_layer": time.perf_counter() - t0, "load": ld}


def main(data: Path, fused: bool = True, all_experts: bool = True) -> dict:
    res = {}
    for name in ("olmoe-shaped",) + (("olmoe-shaped-fused",) if fused else ()):
        res[f"{name} stats"] = graft_run(data, name, stats=True)
    if all_experts:
        res["olmoe-shaped all-64"] = graft_run(data, "olmoe-shaped", stats=False)
    res["olmoe-shaped scratch"] = graft_run(data, "olmoe-shaped", stats=True, scratch=True)
    bd = breakdown(data / "olmoe-shaped", data / "olmoe-shaped.stats.safetensors")
    res["breakdown"] = bd
    print(f"breakdown (per-expert layout, {bd['layers']} mapped layers, load {bd['load']:.1f}):")
    for k, v in bd.items():
        if k not in ("layers", "load"):
            print(f"  {k}: {v:.1f} s", flush=True)
    ac = align_cost(data / "olmoe-shaped")
    res["align 64"] = ac
    print(f"align {ac['experts']} experts of one layer: {ac['seconds_per_layer']:.1f} s (load {ac['load']:.1f})")
    return res


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(Path(args[0]) if args else ROOT / "bench" / "data", fused="--skip-fused" not in sys.argv,
         all_experts="--skip-all" not in sys.argv)
