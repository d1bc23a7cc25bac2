"""Counting overhead of `xpertctl stats`: tokens/s of its hooked forward vs a bare transformers
forward with output_router_logits=True, same model (OLMoE-shaped, cut to 2 layers), same batches,
alternating, median of repeats."""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from xpertctl.io import open_checkpoint  # noqa: E402
from xpertctl.ops import stats as st  # noqa: E402
from xpertctl.ops.hf_model import load_model  # noqa: E402


def main(src: Path, batch: int = 4, seq: int = 512, repeats: int = 5) -> dict:
    ck = open_checkpoint(src)
    model = load_model(ck, torch.float32, "cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 2048, (batch, seq), generator=g)
    mask = torch.ones_like(x)
    counter = st.RouterCounter(model, ck, ck.top_k)
    counter.remove()  # the bare pass runs without hooks

    def bare():
        model(input_ids=x, attention_mask=mask, output_router_logits=True, use_cache=False)

    def ours():
        counter.mask = mask.reshape(-1).bool()
        model(input_ids=x, attention_mask=mask, use_cache=False)

    with torch.inference_mode():
        bare(); ours()  # warm-up
        tb, to = [], []
        for _ in range(repeats):
            t0 = time.perf_counter(); bare(); tb.append(time.perf_counter() - t0)
            hooked = st.RouterCounter(model, ck, ck.top_k)
            counter.__dict__.update(hooked.__dict__)
            t0 = time.perf_counter(); ours(); to.append(time.perf_counter() - t0)
            hooked.remove()
    n = batch * seq
    res = {"bare_tok_s": n / statistics.median(tb), "xpertctl_tok_s": n / statistics.median(to)}
    res["ratio"] = res["xpertctl_tok_s"] / res["bare_tok_s"]
    print(f"stats counting: bare forward {res['bare_tok_s']:,.0f} tok/s | xpertctl stats {res['xpertctl_tok_s']:,.0f} "
          f"tok/s | ratio {res['ratio']:.3f}", flush=True)
    return res


if __name__ == "__main__":
    main(Path(sys.argv[1]))
