"""`xpertctl stats --stream-layers` on the full OLMoE-shaped checkpoint (13.8 GB, larger than the
memory budget we allow it): 2 domains x 2,000 tokens; wall, peak RSS, tokens/s."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_graft import XPERTCTL, timed  # noqa: E402


def main(data: Path, tokens: int = 2000) -> dict:
    corpus = ROOT / "fixtures" / "corpus-mini" / "train"
    out = data / "stream-stats.safetensors"
    doms = [f"{d}={corpus / (d + '.txt')}" for d in ("legal", "code")]
    cmd = [XPERTCTL, "stats", str(data / "olmoe-shaped"), *sum((["-d", d] for d in doms), []), "--max-tokens",
           str(tokens), "--seq-len", "512", "--stream-layers", "--stream-tokens", "8192", "--dtype", "float32",
           "-o", str(out), "--force"]
    r = timed(cmd)
    r["tok_s"] = 2 * tokens / r["wall_s"]
    print(f"stats --stream-layers (16 layers, 13.8 GB, 2 x {tokens} tokens): wall {r['wall_s']:.1f} s, "
          f"peak RSS {r['peak_rss_gib']:.2f} GiB, {r['tok_s']:.0f} tok/s end to end", flush=True)
    return r


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "bench" / "data")
