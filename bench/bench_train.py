"""tokens/s of `xpertctl train` vs a bare AdamW loop on the same model, batch and data, no logging."""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from xpertctl import data  # noqa: E402
from xpertctl import train as tr  # noqa: E402


def main(steps: int = 40, batch: int = 8, seq: int = 256) -> dict:
    tmp = Path(tempfile.mkdtemp())
    from xpertctl.ops import graft
    from xpertctl.specs import Target
    model_dir = graft.run(ROOT / "fixtures" / "teacher", tmp / "student", target=Target(4), dtype="float32")
    corpus = ROOT / "fixtures" / "corpus-mini"
    d = data.tokenize(model_dir, [], tmp / "data", corpus=corpus)
    cfg = tr.TrainConfig(steps=steps, batch_size=batch, seq_len=seq, eval_every=0)
    t0 = time.perf_counter()
    tr.train(model_dir, tmp / "run", cfg, data_dir=d)
    wall = time.perf_counter() - t0
    rows = [json.loads(l) for l in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    ours = rows[-1]["tok_s"]

    model = tr.load_causal_lm(model_dir).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    stream = data.load_token_data(d).stream("train")
    t0 = time.perf_counter()
    for s in range(steps):
        x, y, m = tr.lm_batch(stream, cfg, s, 0)
        model(input_ids=x, labels=y).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
    bare = steps * batch * seq / (time.perf_counter() - t0)
    res = {"xpertctl_tok_s": ours, "bare_tok_s": bare, "ratio": ours / bare, "xpertctl_wall_s": wall}
    print(f"train: xpertctl {ours:,.0f} tok/s (in-loop) | bare loop {bare:,.0f} tok/s | ratio {ours / bare:.3f} "
          f"| whole command {wall:.1f} s for {steps} steps incl. load and checkpoint", flush=True)
    return res


if __name__ == "__main__":
    main()
