"""The input fingerprint of a large safetensors checkpoint: wall time and bytes read, against a full
sha256 of the same file (what reading every byte would cost).

    python bench/bench_fingerprint.py BUILD [--gib 14] [--full] [--identity]

writes BUILD/fp-big.safetensors (a real header for one tensor of --gib GiB; the data section is a
sparse hole, so the file costs no disk) and prints one JSON line per measurement. The full-read figure
reads zeros from a hole (no disk I/O): a real 14 GB checkpoint on disk is slower still.

--identity also times what `train --resume` compares (train.run_identity's inputs): a model directory
of that checkpoint (provenance.weights_identity, every byte) and a data directory of --gib GiB of train
tokens (data.identity, every train/val byte), each with its peak RSS growth: the time grows with the
size (it reads all of it, once per train start), the memory must not."""
from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make(path: Path, gib: float) -> Path:
    n = int(gib * 2 ** 30) // 4
    header = json.dumps({"__metadata__": {"format": "pt"},
                         "w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 4 * n)
    return path


def rchar() -> int:
    """Bytes this process has read through read(2) so far (Linux /proc/self/io)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return -1


def main() -> None:
    build = Path(sys.argv[1])
    gib = float(sys.argv[sys.argv.index("--gib") + 1]) if "--gib" in sys.argv else 14.0
    build.mkdir(parents=True, exist_ok=True)
    f = make(build / "fp-big.safetensors", gib)
    from xpertctl.io import provenance
    r0, t0 = rchar(), time.perf_counter()
    fp = provenance.fingerprint(f)
    dt, read = time.perf_counter() - t0, rchar() - r0
    print(json.dumps({"what": "fingerprint", "file_bytes": f.stat().st_size, "bytes_read": read,
                      "seconds": round(dt, 4), "sha256": fp["sha256"][:16], "load": os.getloadavg()[0]}))
    if "--full" in sys.argv:
        t0 = time.perf_counter()
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while block := fh.read(1 << 24):
                h.update(block)
        print(json.dumps({"what": "full sha256 (reading the hole)", "file_bytes": f.stat().st_size,
                          "seconds": round(time.perf_counter() - t0, 2), "load": os.getloadavg()[0]}))
    if "--identity" in sys.argv:
        identity(build, f)
    f.unlink()


def rss_mib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def identity(build: Path, weights: Path) -> None:
    from xpertctl import data
    from xpertctl.io import provenance
    model = build / "fp-model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text('{"model_type": "llama"}')
    os.replace(weights, model / "model.safetensors")
    tokens = build / "fp-data"
    tokens.mkdir(exist_ok=True)
    n = (model / "model.safetensors").stat().st_size
    with open(tokens / "d.train.bin", "wb") as fh:
        fh.truncate(n)
    (tokens / data.MANIFEST).write_text(json.dumps({"dtype": "uint16", "domains": {"d": {
        "train": {"file": "d.train.bin", "tokens": n // 2}}}}))
    for what, fn, path in (("weights_identity", provenance.weights_identity, model),
                           ("data.identity", data.identity, tokens)):
        m0, t0 = rss_mib(), time.perf_counter()
        fn(path)
        print(json.dumps({"what": what, "bytes": n, "seconds": round(time.perf_counter() - t0, 2),
                          "peak_rss_growth_mib": round(rss_mib() - m0, 1), "load": os.getloadavg()[0]}))
    os.replace(model / "model.safetensors", weights)
    for p in (model / "config.json", tokens / "d.train.bin", tokens / data.MANIFEST):
        p.unlink()
    model.rmdir(), tokens.rmdir()


if __name__ == "__main__":
    main()
