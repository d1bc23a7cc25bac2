"""One-shot `xpertctl graft <OLMoE-shaped> --target 12L --stats <stats>` under /usr/bin/time -v (wall,
peak RSS) for the per-expert and the fused layout, plus where the time goes (same steps, timed
in-process)."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
XPERTCTL = str(Path(sys.executable).parent / "xpertctl")


def timed(cmd: list[str]) -> dict:
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-2000:])
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", r.stderr)
    h, m, s = (float(x) if x else 0.0 for x in wall.groups())
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    return {"wall_s": h * 3600 + m * 60 + s, "peak_rss_gib": rss / 2**20}


def breakdown(src: Path, stats: Path) -> dict:
    """The same pipeline as one-shot graft, each stage timed."""
    import torch
    from xpertctl.io import open_checkpoint, write_model_dir
    from xpertctl.ops import decompose, graft, reshape
    from xpertctl.ops import select as sel
    from xpertctl.ops.tucker import resolve, tucker
    from xpertctl.specs import Target
    t = {}
    t0 = time.perf_counter()
    ck = open_checkpoint(src)
    st = sel.load_stats(stats)
    doc = sel.selection_doc(st, sel.choose(st, "min"), "min", None, 0)
    t["open + select"] = time.perf_counter() - t0
    read = tuck = 0.0
    factors = {}
    for l in doc["layers"]:
        t0 = time.perf_counter()
        experts = ck.experts(l["layer"], l["experts"])
        read += time.perf_counter() - t0
        t0 = time.perf_counter()
        w = decompose.layer_weights(l)
        factors[f"layers.{l['layer']}.weights"] = w
        for m, x in decompose.stacks(experts).items():
            core, (u1, u2, u3), _ = tucker(x, resolve(["full", "full", 1], tuple(x.shape)))
            factors.update({f"layers.{l['layer']}.{m}.{k}": v for k, v in
                            (("core", core), ("U1", u1), ("U2", u2), ("U3", u3))})
        tuck += time.perf_counter() - t0
    t["read selected experts (lazy)"] = read
    t["Tucker"] = tuck
    meta = {"layers": [l["layer"] for l in doc["layers"]], "hidden": ck.hidden, "expert_ffn": ck.expert_ffn,
            "source": ck.fingerprint, "family": "olmoe", "method": "tucker"}
    t0 = time.perf_counter()
    adapted, ameta = reshape.compute(factors, meta, Target(12))
    t["reshape"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    state, config = graft.build(adapted, ameta, ck)
    t["fresh model init (12L, d2048, vocab 50304)"] = time.perf_counter() - t0
    out = ROOT / "bench" / "data" / "breakdown-out"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    write_model_dir(out, state, {}, {"config.json": config.to_json_string().encode()})
    t["write safetensors"] = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return t


def main(data: Path) -> dict:
    res = {}
    for name in ("olmoe-shaped", "olmoe-shaped-fused"):
        src, stats = data / name, data / f"{name}.stats.safetensors"
        out = data / f"{name}-12L"
        shutil.rmtree(out, ignore_errors=True)
        r = timed([XPERTCTL, "graft", str(src), "--target", "12L", "--stats", str(stats), "-o", str(out)])
        size = sum(p.stat().st_size for p in out.glob("*.safetensors")) / 2**30
        res[name] = dict(r, out_gib=size)
        print(f"graft {name} -> 12L: wall {r['wall_s']:.1f} s, peak RSS {r['peak_rss_gib']:.2f} GiB, "
              f"output {size:.2f} GiB", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    bd = breakdown(data / "olmoe-shaped", data / "olmoe-shaped.stats.safetensors")
    res["breakdown"] = bd
    for k, v in bd.items():
        print(f"  {k}: {v:.1f} s", flush=True)
    return res


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "bench" / "data")
