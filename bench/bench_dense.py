"""Dense sources (docs/notes/dense-sources.md): figures behind the neuron-level defaults, on a real model.

    python bench/bench_dense.py topshare MODEL CORPUS [--tokens 4096]   # |activation| mass in the top q
    python bench/bench_dense.py rss MODEL CORPUS [--tokens 4096]        # peak RSS and tok/s of `stats`

topshare: per layer, the mean over tokens of the share of sum_j |a_j| that the k = round(q N) largest
|a_j| carry (a = silu(gate x) * (up x), the input of down_proj), for q in 1/32 .. 1/2, each domain of
CORPUS (a directory of NAME.txt) capped at --tokens tokens. It says how much of a token's FFN
activation "the active neurons" at --neuron-top q hold.

rss: runs `xpertctl stats MODEL -d ... --max-tokens N` in a subprocess and polls its RSS (psutil, every
0.1 s): the figure that must not grow with the vocabulary (hooks, no logits). The machine is shared:
each figure carries the load average."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
QS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)


def topshare(model_dir: Path, corpus: Path, tokens: int) -> None:
    from xpertctl import data
    from xpertctl.io import open_checkpoint
    from xpertctl.ops.hf_model import load_model
    ck = open_checkpoint(model_dir).require_ffn_source()
    model = load_model(ck, torch.float32, "cpu")
    tok = data.load_tokenizer(model_dir)
    N = ck.expert_ffn
    ks = [max(1, round(q * N)) for q in QS]
    sums = torch.zeros(len(ck.dense_layers), len(QS), dtype=torch.float64)
    count, mask = 0, {}
    for n, i in enumerate(ck.dense_layers):
        def hook(_m, args, n=n):
            a = args[0].reshape(-1, N)[mask["keep"]].abs().float()
            srt = a.sort(-1, descending=True).values.cumsum(-1)
            tot = srt[:, -1:].clamp_min(1e-30)
            for c, k in enumerate(ks):
                sums[n, c] += (srt[:, k - 1: k] / tot).sum().double()
        model.get_submodule(f"model.layers.{i}.mlp.down_proj").register_forward_pre_hook(hook)
    with torch.inference_mode():
        for f in sorted(corpus.glob("*.txt")):
            stream = data.domain_tokens(data.DomainText(f, 0), tok, tokens)
            for b in data.windows(stream, 512, 4, tok.pad_token_id or 0):
                mask["keep"] = b.attention_mask.reshape(-1).bool()
                model.base_model(input_ids=b.input_ids, attention_mask=b.attention_mask)
                count += int(b.attention_mask.sum())
    mean = sums / count
    print(f"{model_dir}: {len(ck.dense_layers)} layers x {N} neurons, {count} token positions, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("share of a token's sum |a| in its top q of neurons (mean over tokens)")
    print("layer  " + "  ".join(f"q={q:<6.4g}" for q in QS))
    for n, i in enumerate(ck.dense_layers):
        print(f"{i:5d}  " + "  ".join(f"{v:8.3f}" for v in mean[n].tolist()))
    print("mean   " + "  ".join(f"{v:8.3f}" for v in mean.mean(0).tolist()))


def rss(model_dir: Path, corpus: Path, tokens: int) -> None:
    import psutil
    out = Path(f"/tmp/bench-dense-{os.getpid()}.safetensors")
    doms = [a for f in sorted(corpus.glob("*.txt")) for a in ("-d", f"{f.stem}={f}")]
    cmd = [sys.executable, "-m", "xpertctl", "stats", str(model_dir), *doms, "--max-tokens", str(tokens),
           "--seq-len", "1024", "-o", str(out), "--force"]
    t0, peak = time.perf_counter(), 0
    p = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL)
    proc = psutil.Process(p.pid)
    while p.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    n = tokens * len(doms) // 2
    print(f"stats {model_dir} ({len(doms) // 2} domains x {tokens} tokens): exit {p.returncode}, peak RSS "
          f"{peak / 2**30:.2f} GiB, {wall:.0f} s wall ({n / wall:,.0f} tok/s incl. loading), "
          f"load average {os.getloadavg()[0]:.1f}")
    out.unlink(missing_ok=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("topshare", "rss"))
    ap.add_argument("model", type=Path)
    ap.add_argument("corpus", type=Path)
    ap.add_argument("--tokens", type=int, default=4096)
    a = ap.parse_args()
    (topshare if a.what == "topshare" else rss)(a.model, a.corpus, a.tokens)
