"""Why a depth-cut SmolLM2 student with inherited embeddings, norms and attention starts above ln V, and what
fixes it: prints the start NLL on held-out text for each layer map, FFN and final-norm option.

The students are built by hand here (the source's attention, norms and embeddings copied; each kept layer's
FFN cut to its N most-used neurons on the calibration text, or N random ones, or kept whole), so the final-norm
question is measured apart from any FFN consolidation. Streams are cached in --cache, so re-runs only pay for
new arms. Final-norm options, each computed from the same streams:

  source     the inherited gain as is (what graft did before --final-norm)
  refit      graft --final-norm refit's per-dimension least squares (xpertctl.ops.final_norm.refit's formula)
  scale      one scalar on the inherited gain, least squares of the same target

  nice -n 10 python studies/depth_cut_start.py --src build/real/smollm2 --maps uniform,first --arms 1536:act,768:act
"""
from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "fixtures" / "corpus-mini"
DOMAINS = ("code", "legal", "lexicon", "manuals", "quotes", "scripture")


def maps(n_src: int, n: int) -> dict[str, list[int]]:
    return {"uniform": [int(round(t * (n_src - 1) / (n - 1))) for t in range(n)],  # reshape.layer_map's uniform
            "first": list(range(n)),
            "first6+last2": list(range(n - 2)) + [n_src - 2, n_src - 1],
            "first7+last": list(range(n - 1)) + [n_src - 1]}


def windows(tok, split: str, n_tokens: int, seq: int) -> torch.Tensor:
    """The first documents of each domain of corpus-mini's split, EOS-joined, in [*, seq] windows."""
    out, per = [], n_tokens // len(DOMAINS)
    for d in DOMAINS:
        ids: list[int] = []
        for doc in (CORPUS / split / f"{d}.txt").read_text().split("\n\n"):
            ids += tok(doc)["input_ids"] + [tok.eos_token_id]
            if len(ids) >= per:
                break
        ids = ids[:per - per % seq]
        out.append(torch.tensor(ids).view(-1, seq))
    return torch.cat(out)


def rmsn(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


class Bench:
    def __init__(self, src: Path, cache: Path, held_tokens: int, cal_tokens: int, seq: int):
        self.tok = transformers.AutoTokenizer.from_pretrained(src)
        self.src = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        self.H = self.src.config.hidden_size
        self.cache = cache
        cache.mkdir(parents=True, exist_ok=True)
        self.held = windows(self.tok, "test", held_tokens, seq)
        self.cal = windows(self.tok, "train", cal_tokens, seq)
        self.E = self.src.model.embed_tokens.weight.detach()
        self.g = self.src.model.norm.weight.detach().clone()
        self.S = self.cached("src_cal", lambda: self.body(self.src, self.cal, usage=True))
        self.S_held = self.cached("src_held", lambda: self.body(self.src, self.held)[0])

    def cached(self, name, fn):
        p = self.cache / f"{name}.pt"
        if p.exists():
            return torch.load(p)
        t = time.time()
        v = fn()
        torch.save(v, p)
        print(f"  ({name}: {time.time() - t:.0f}s)", flush=True)
        return v

    def body(self, model, ids, usage=False):
        """The final norm's input [N, T, H] (and, with usage, each layer's summed |FFN activation|)."""
        pre, acts = [], {}
        hooks = [model.model.norm.register_forward_pre_hook(lambda m, a: pre.append(a[0].detach()))]
        if usage:
            for i, lay in enumerate(model.model.layers):
                hooks.append(lay.mlp.down_proj.register_forward_pre_hook(
                    lambda m, a, i=i: acts.__setitem__(i, acts.get(i, 0) + a[0].detach().abs().sum((0, 1)))))
        with torch.no_grad():
            for b in ids.split(4):
                model.model(b)
        for h in hooks:
            h.remove()
        return (torch.cat(pre), acts) if usage else (torch.cat(pre), None)

    def nll(self, pre, ids, g, chunk=1024) -> float:
        x, y = pre[:, :-1].reshape(-1, self.H), ids[:, 1:].reshape(-1)
        tot = 0.0
        with torch.no_grad():
            for a in range(0, len(y), chunk):
                logits = (rmsn(x[a:a + chunk]) * g) @ self.E.T
                tot += torch.nn.functional.cross_entropy(logits, y[a:a + chunk], reduction="sum").item()
        return tot / len(y)

    def student(self, lmap, ffn, select, seed=0):
        cfg = transformers.LlamaConfig(**{**self.src.config.to_dict(), "num_hidden_layers": len(lmap),
                                          "intermediate_size": ffn})
        m = transformers.LlamaForCausalLM(cfg).eval()
        sd, s = m.state_dict(), self.src.state_dict()
        sd["model.embed_tokens.weight"] = s["model.embed_tokens.weight"]
        gen = torch.Generator().manual_seed(seed)
        N = self.src.config.intermediate_size
        for t, i in enumerate(lmap):
            p = f"model.layers.{i}."
            for k, v in s.items():
                if k.startswith(p) and ".mlp." not in k:
                    sd[f"model.layers.{t}." + k[len(p):]] = v
            usage = self.S[1][i]
            idx = (usage.topk(ffn).indices if select == "act" else torch.randperm(N, generator=gen)[:ffn]).sort().values
            for n in ("gate_proj", "up_proj"):
                sd[f"model.layers.{t}.mlp.{n}.weight"] = s[f"model.layers.{i}.mlp.{n}.weight"][idx]
            sd[f"model.layers.{t}.mlp.down_proj.weight"] = s[f"model.layers.{i}.mlp.down_proj.weight"][:, idx]
        m.load_state_dict(sd, strict=False)
        return m

    def row(self, name, lmap, ffn, select):
        st = self.cached(f"{name}-{ffn}-{select}", lambda: dict(zip(
            ("held", "cal"), (self.body(self.student(lmap, ffn, select), x)[0] for x in (self.held, self.cal)))))
        ns, target = rmsn(st["cal"].reshape(-1, self.H)), self.g * rmsn(self.S[0].reshape(-1, self.H))
        refit = (ns * target).sum(0) / ns.pow(2).sum(0).clamp_min(1e-12)  # final_norm.refit's formula
        a = self.g * ns
        scale = ((a * target).sum() / a.pow(2).sum()).item()
        rms = st["held"].pow(2).mean(-1).sqrt().mean().item()
        return (rms, self.nll(st["held"], self.held, self.g), self.nll(st["held"], self.held, refit),
                scale, self.nll(st["held"], self.held, self.g * scale))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=ROOT / "build" / "real" / "smollm2")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--maps", default="uniform,first")
    ap.add_argument("--arms", default="1536:act,768:act,768:random", help="FFN:how (act: most used; random)")
    ap.add_argument("--held-tokens", type=int, default=3072)
    ap.add_argument("--cal-tokens", type=int, default=3072)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--cache", type=Path, default=ROOT / "build" / "depth_cut")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    b = Bench(a.src, a.cache, a.held_tokens, a.cal_tokens, a.seq_len)
    V = b.src.config.vocab_size
    print(f"ln V = {math.log(V):.3f}; source ({b.src.config.num_hidden_layers} layers) held-out NLL "
          f"{b.nll(b.S_held, b.held, b.g):.3f}; {b.held.numel()} held-out tokens (corpus-mini test), "
          f"{b.cal.numel()} calibration tokens (train)")
    print("| layer map | FFN | stream rms | source gain | refit | scale (s) |")
    print("|---|---|---|---|---|---|")
    lm = maps(b.src.config.num_hidden_layers, a.layers)
    for name in a.maps.split(","):
        for arm in a.arms.split(","):
            ffn, how = arm.split(":")
            rms, r0, r1, s, r2 = b.row(name, lm[name], int(ffn), how)
            print(f"| {name} {lm[name]} | {ffn} {how} | {rms:.1f} | {r0:.3f} | {r1:.3f} | {r2:.3f} ({s:.3f}) |", flush=True)


if __name__ == "__main__":
    main()
