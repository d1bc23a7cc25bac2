"""OLMoE-1B-7B-shaped figures for issue 20 (under /usr/bin/time -v: wall, peak RSS), each printed with the
1-minute load average before the run (the 2-core machine is shared):

  sweeps  one-shot `graft --stats ... --target 12L` with the two alignment sweeps (`--align-sweeps 2`,
          the default before issue 20) and without them (the default now): what the sweeps cost;
  ffn     one-shot graft to 12L with `--fit ffn --stream-layers` on N calibration tokens (two sizes):
          peak RSS and time per 1k calibration tokens.

    python bench/bench_fit.py DATA [sweeps] [ffn] [--tokens 2048,4096] [--fit-steps 25]

DATA holds olmoe-shaped/ and olmoe-shaped.stats.safetensors (bench/make_olmoe_shaped.py writes them)."""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_graft import load  # noqa: E402

PY = sys.executable


def timed(cmd: list[str]) -> dict:
    """Wall, CPU (user + sys: what the run itself needed, less sensitive to others' load) and peak RSS."""
    import re
    import subprocess
    ld = load()
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", r.stderr)
    h, m, s = (float(x) if x else 0.0 for x in wall.groups())
    cpu = sum(float(re.search(rf"{k} time \(seconds\): ([\d.]+)", r.stderr).group(1)) for k in ("User", "System"))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    return {"wall_s": h * 3600 + m * 60 + s, "cpu_s": cpu, "peak_rss_gib": rss / 2**20, "load_before": ld,
            "load_after": load(), "stderr": r.stderr}


def graft_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [PY, "-m", "xpertctl.cli", "graft", str(data / "olmoe-shaped"), "--stats",
            str(data / "olmoe-shaped.stats.safetensors"), "--target", "12L", "-o", str(out), "--force", *extra]


def sweeps(data: Path) -> None:
    for on in (True, False):
        out = data / "olmoe-12L-bench"
        r = timed(graft_cmd(data, out, *(["--align-sweeps", "2"] if on else [])))
        shutil.rmtree(out, ignore_errors=True)
        print(f"graft olmoe-shaped -> 12L with stats, alignment sweeps {'on' if on else 'off'}: wall {r['wall_s']:.1f} s, "
              f"CPU {r['cpu_s']:.1f} s, "
              f"peak RSS {r['peak_rss_gib']:.2f} GiB (load {r['load_before']:.1f} -> {r['load_after']:.1f})", flush=True)


def ffn(data: Path, tokens: list[int], steps: int) -> None:
    corpus = ROOT / "fixtures" / "corpus-mini" / "train"
    for n in tokens:
        out = data / "olmoe-12L-ffn-bench"
        cal = [x for d in ("legal", "code") for x in ("--calibration", f"{d}={corpus / (d + '.txt')}")]
        # N tokens in all: N/2 fitted per domain, plus the held-out documents' share (10%)
        r = timed(graft_cmd(data, out, "--fit", "ffn", "--stream-layers", *cal, "--calibration-tokens", str(n // 2),
                            "--seq-len", "512", "--fit-steps", str(steps)))
        shutil.rmtree(out, ignore_errors=True)
        print(f"graft olmoe-shaped -> 12L --fit ffn --stream-layers, {n} calibration tokens (+10% held out), "
              f"--fit-steps {steps}: wall {r['wall_s']:.0f} s ({r['wall_s'] / n * 1000:.0f} s per 1k calibration tokens), "
              f"CPU {r['cpu_s']:.0f} s ({r['cpu_s'] / n * 1000:.0f} s per 1k), "
              f"peak RSS {r['peak_rss_gib']:.2f} GiB (load {r['load_before']:.1f} -> {r['load_after']:.1f})", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("data", type=Path)
    ap.add_argument("what", nargs="*", default=["sweeps", "ffn"])
    ap.add_argument("--tokens", default="2048,4096")
    ap.add_argument("--fit-steps", type=int, default=25)
    a = ap.parse_args()
    if "sweeps" in a.what:
        sweeps(a.data)
    if "ffn" in a.what:
        ffn(a.data, [int(x) for x in a.tokens.split(",")], a.fit_steps)
