"""The final norm of a depth-cut student with an inherited head, refitted to the stream it now reads
(`graft --final-norm refit`).

Why: a student that inherits the embeddings (the tied head) and the final norm from a deeper source reads
the residual stream of its own few layers through a norm and head trained on the stream of the source's
last layer. In SmolLM2-135M (30 layers) the stream after a cut to 8 layers is dominated by a few massive
dimensions that the source's last layers outgrow; the RMSNorm divides by the rms those dimensions set, so
after it they carry the vector almost alone, and the gain and embedding columns there spread the logits:
the student starts far above the uniform ln V (docs/notes/real-model.md has the measurements).

What: both models run on calibration text; the student's final-norm gain g' is fitted per residual
dimension so that g' * rmsnorm(student stream) matches g * rmsnorm(source stream), the vector the source's
head reads, in least squares over the calibration tokens (closed form: g'_d = sum n_s,d g_d n_t,d / sum
n_s,d^2). Nothing else changes. Whole documents are held out (as --fit does) to measure the start NLL with
the inherited and the refitted gain; both go into the model card.
"""
from __future__ import annotations

import math

import torch

from .. import data
from ..errors import XpertError

METHOD = ("per-dimension least squares: g'_d = sum(n_s,d * g_d * n_t,d) / sum(n_s,d^2), n = x / rms(x) of the "
          "final norm's input (s: student, t: source), over the calibration tokens")


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class _NormInput:
    """A forward pre-hook on a model's final norm: the last batch's input (rows of real tokens)."""

    def __init__(self, model):
        self.norm = model.base_model.norm
        self.x = None
        self.handle = self.norm.register_forward_pre_hook(self._hook)

    def _hook(self, mod, args):
        self.x = args[0]

    def remove(self) -> None:
        self.handle.remove()


def _eps(model) -> float:
    n = model.base_model.norm
    return float(getattr(n, "variance_epsilon", getattr(n, "eps", 1e-6)))


def refit(source, student, tokenizer, docs: dict[str, list[str]], *, seq_len: int, batch_size: int = 4,
          max_tokens: int | None = None, holdout: float = 0.1, device: str = "cpu",
          residual_index: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """(the refitted gain, the record for the card). `source` and `student` are transformers causal LMs over
    the same tokenizer; the student's residual dims are the source's `residual_index` (all when None)."""
    from .fit import split_documents
    fit_docs, held_docs = split_documents(docs, holdout)
    g_src = source.base_model.norm.weight.detach().float().cpu()
    g_old = student.base_model.norm.weight.detach().float().cpu().clone()
    H = g_old.numel()
    ri = torch.arange(H) if residual_index is None else torch.as_tensor(residual_index)
    if ri.numel() != H:
        raise XpertError(f"--final-norm refit: the student has {H} residual dims, the residual index {ri.numel()}")
    eps_s, eps_t = _eps(student), _eps(source)
    num = torch.zeros(H, dtype=torch.float64)
    den = torch.zeros(H, dtype=torch.float64)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    taps = _NormInput(source), _NormInput(student)
    tokens = 0
    try:
        with torch.inference_mode():
            for name, d in fit_docs.items():
                stream = data.domain_tokens(d, tokenizer, max_tokens)
                for b in data.windows(stream, seq_len, batch_size, pad):
                    ids, mask = b.input_ids.to(device), b.attention_mask.to(device)
                    source.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
                    student.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
                    keep = mask.reshape(-1).bool().cpu()
                    nt = _rms(taps[0].x.reshape(-1, taps[0].x.shape[-1]).cpu(), eps_t)[keep][:, ri] * g_src[ri]
                    ns = _rms(taps[1].x.reshape(-1, H).cpu(), eps_s)[keep]
                    num += (ns.double() * nt.double()).sum(0)
                    den += ns.double().pow(2).sum(0)
                    tokens += int(keep.sum())
    finally:
        for t in taps:
            t.remove()
    if tokens == 0:
        raise XpertError("--final-norm refit: the calibration text gave no tokens")
    gain = torch.where(den > 0, num / den.clamp_min(1e-30), g_old.double()).float()
    before, after, held = _held_out_nll(student, tokenizer, held_docs, (g_old, gain), seq_len=seq_len,
                                        batch_size=batch_size, max_tokens=max_tokens, device=device, eps=eps_s)
    rec = {"method": METHOD, "calibration_tokens": tokens, "held_out_tokens": held,
           "held_out_nll": {"inherited": before, "refitted": after}, "ln_vocab": math.log(student.config.vocab_size),
           "holdout": holdout, "seq_len": seq_len}
    return gain, rec


def _held_out_nll(student, tokenizer, docs: dict[str, list[str]], gains, *, seq_len: int, batch_size: int,
                  max_tokens: int | None, device: str, eps: float) -> tuple[float, float, int]:
    """Next-token NLL on the held-out documents with each final gain (one forward; the head in row chunks,
    never a whole [batch, window, vocab] tensor)."""
    head = student.get_output_embeddings().weight.detach()
    tap = _NormInput(student)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tot, n = [0.0 for _ in gains], 0
    try:
        with torch.inference_mode():
            for name, d in docs.items():
                stream = data.domain_tokens(d, tokenizer, max_tokens)
                for b in data.windows(stream, seq_len, batch_size, pad):
                    ids, mask = b.input_ids.to(device), b.attention_mask.to(device)
                    student.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
                    x = _rms(tap.x[:, :-1], eps)  # predicts the next token
                    y = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
                    keep = (y != -100).reshape(-1)
                    x, y = x.reshape(-1, x.shape[-1])[keep], y.reshape(-1)[keep]
                    for lo in range(0, len(y), 1024):
                        for k, g in enumerate(gains):
                            logits = (x[lo:lo + 1024] * g.to(x.device)) @ head.T.float()
                            tot[k] += float(torch.nn.functional.cross_entropy(logits, y[lo:lo + 1024], reduction="sum"))
                    n += len(y)
    finally:
        tap.remove()
    if n == 0:
        raise XpertError("--final-norm refit: the held-out calibration documents gave no tokens to score")
    return tot[0] / n, tot[1] / n, n
