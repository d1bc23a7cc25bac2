"""The data path at scale: `tokenize`, `train` and `stats --max-tokens` on small and large data; wall
time and peak RSS (psutil, polled every 0.2 s: the largest process, and the sum over the process tree,
which counts pages the forked tokenizer workers share with their parent twice).

    python bench/bench_data.py corpus  BUILD           # BUILD/c30m, c300m, c3g: the mini corpus repeated
    python bench/bench_data.py tokenize BUILD c300m [--workers 2] [--baseline]
    python bench/bench_data.py train BUILD             # 20 steps on 30M vs 3B synthetic tokens
    python bench/bench_data.py stats BUILD             # --max-tokens 100000 on c30m vs c3g

`--baseline` also times the tokenizers library's own `encode_batch_fast` over every core on the same
documents (the reader's, in batches of 10,000) in the same run. Figures are appended to
BUILD/bench_data.jsonl. The machine's 2 cores are shared: each figure carries the load average."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PY = sys.executable
TOKENIZER = ROOT / "fixtures" / "teacher"
GIB = 2 ** 30


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Wall time and peak RSS of a command (largest process and whole tree)."""
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    proc = psutil.Process(p.pid)
    peak_one = peak_tree = 0
    while p.poll() is None:
        try:
            rss = [proc.memory_info().rss] + [c.memory_info().rss for c in proc.children(recursive=True)]
        except psutil.Error:
            rss = [0]
        peak_one, peak_tree = max(peak_one, max(rss)), max(peak_tree, sum(rss))
        time.sleep(0.2)
    out, err = p.communicate()
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}\n{err[-2000:]}")
    return {"wall_s": time.perf_counter() - t0, "peak_rss_gib": peak_one / GIB, "tree_rss_gib": peak_tree / GIB,
            "load_before": load, "load_after": os.getloadavg()[0], "stdout": out.strip()}


def record(build: Path, row: dict) -> None:
    print(json.dumps(row), flush=True)
    with open(build / "bench_data.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def make_corpus(build: Path) -> None:
    unit = b"".join(p.read_bytes().rstrip(b"\n") + b"\n\n" for p in sorted((ROOT / "fixtures" / "corpus-mini").glob("*/*.txt")))
    for name, size in (("c30m", 30_000_000), ("c300m", 300_000_000), ("c3g", 3_000_000_000)):
        (build / name).mkdir(parents=True, exist_ok=True)
        with open(build / name / "all.txt", "wb") as f:
            for _ in range(-(-size // len(unit))):
                f.write(unit)


def tokenize(build: Path, corpus: str, workers: int, baseline: bool) -> None:
    src = build / corpus / "all.txt"
    out = build / f"tok-{corpus}"
    r = run_measured([PY, "-m", "xpertctl.cli", "tokenize", "--tokenizer", str(TOKENIZER), "-d", f"all={src}",
                      "-o", str(out), "--force", "--workers", str(workers)])
    m = json.loads((out / "manifest.json").read_text())
    tokens = sum(m["domains"]["all"][s]["tokens"] for s in ("train", "val", "test"))
    row = {"bench": "tokenize", "corpus": corpus, "bytes": src.stat().st_size, "tokens": tokens, "workers": workers,
           **{k: v for k, v in r.items() if k != "stdout"}, "tok_s": tokens / r["wall_s"]}
    if baseline:
        row["encode_batch"] = encode_batch_baseline(src)
        row["ratio"] = row["tok_s"] / row["encode_batch"]["tok_s"]
    record(build, row)


def encode_batch_baseline(src: Path) -> dict:
    """The tokenizers library alone: encode_batch_fast over every core, same documents, batches of 10,000."""
    code = f"""
import json, time
from tokenizers import Tokenizer
from xpertctl.documents import iter_documents
tok = Tokenizer.from_file({str(TOKENIZER / 'tokenizer.json')!r})
t0, n, batch = time.perf_counter(), 0, []
for d in iter_documents({str(src)!r}):
    batch.append(d)
    if len(batch) == 10000:
        n += sum(len(e.ids) + 1 for e in tok.encode_batch_fast(batch, add_special_tokens=False)); batch = []
n += sum(len(e.ids) + 1 for e in tok.encode_batch_fast(batch, add_special_tokens=False))
print(json.dumps({{"tokens": n, "s": time.perf_counter() - t0}}))
"""
    r = run_measured([PY, "-c", code], env={"TOKENIZERS_PARALLELISM": "true"})
    got = json.loads(r["stdout"].splitlines()[-1])
    return {"tok_s": got["tokens"] / r["wall_s"], "wall_s": r["wall_s"], "peak_rss_gib": r["peak_rss_gib"],
            "load_before": r["load_before"]}


def synthetic_data(out: Path, tokens: int) -> Path:
    """Token data of `tokens` random ids (two domains, 1% val), written with numpy in 64M-token pieces."""
    from xpertctl import data
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    tok = data.load_tokenizer(TOKENIZER)
    m = {"tokenizer": {"path": str(TOKENIZER), "sha256": data.tokenizer_fingerprint(TOKENIZER), "vocab_size": len(tok),
                       "eos_id": tok.eos_token_id}, "dtype": "uint16", "split": {"val_pct": 1, "test_pct": 0},
         "domains": {}}
    for dom, share in (("a", 0.6), ("b", 0.4)):
        entry = {"source": "synthetic"}
        for split, frac in (("train", 0.99), ("val", 0.01), ("test", 0.0)):
            n = int(tokens * share * frac)
            f = out / f"{dom}.{split}.bin"
            if not (f.is_file() and f.stat().st_size == 2 * n):
                with open(f, "wb") as fh:
                    for k in range(0, n, 1 << 26):
                        rng.integers(0, len(tok), size=min(1 << 26, n - k), dtype=np.uint16).tofile(fh)
            entry[split] = {"file": f.name, "tokens": n, "documents": 0}
        m["domains"][dom] = entry
    (out / "manifest.json").write_text(json.dumps(m))
    return out


def train(build: Path) -> None:
    model = build / "student"
    if not (model / "config.json").is_file():
        run_measured([PY, "-m", "xpertctl.cli", "init", "llama", "--tokenizer", str(TOKENIZER), "-o", str(model),
                      "--layers", "2", "--hidden", "64", "--ffn", "128", "--force"])
    for label, tokens in (("30M", 30_000_000), ("3B", 3_000_000_000)):
        d = synthetic_data(build / f"synth-{label}", tokens)
        r = run_measured([PY, "-m", "xpertctl.cli", "train", str(model), "--data", str(d), "--steps", "20",
                          "--batch-size", "8", "--seq-len", "256", "--eval-every", "10", "--threads", "1",
                          "-o", str(build / f"run-{label}"), "--force"])
        record(build, {"bench": "train", "tokens": tokens, "data_gib": 2 * tokens / GIB,
                       **{k: v for k, v in r.items() if k != "stdout"}})


def stats(build: Path) -> None:
    for corpus in ("c30m", "c3g"):
        src = build / corpus / "all.txt"
        r = run_measured([PY, "-m", "xpertctl.cli", "stats", str(TOKENIZER), "-d", f"all={src}", "--max-tokens", "100000",
                          "--seq-len", "256", "-o", str(build / f"stats-{corpus}.safetensors"), "--force"],
                         env={"OMP_NUM_THREADS": "1"})
        record(build, {"bench": "stats", "corpus": corpus, "bytes": src.stat().st_size,
                       **{k: v for k, v in r.items() if k != "stdout"}})


if __name__ == "__main__":
    what, build = sys.argv[1], Path(sys.argv[2])
    if what == "corpus":
        make_corpus(build)
    elif what == "tokenize":
        w = int(sys.argv[sys.argv.index("--workers") + 1]) if "--workers" in sys.argv else 2
        tokenize(build, sys.argv[3], w, "--baseline" in sys.argv)
    elif what == "train":
        train(build)
    elif what == "stats":
        stats(build)
