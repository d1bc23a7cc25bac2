"""Routing statistics: run the MoE over each domain's text and count top-k selections per expert (of a
dense model: each FFN neuron's activations, ops/neurons.py)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import data
from ..documents import check_field_applies
from ..errors import XpertError
from ..io import open_checkpoint, provenance, write_safetensors
from ..io.checkpoint import Checkpoint
from ..specs import check_device
from .capture import Tap, drive, find_router


class RouterCounter(Tap):
    """Forward hooks on every MoE router; counts selections of unmasked tokens, per domain.

    Router outputs differ between families and transformers versions: a tuple (logits, weights,
    indices) in transformers v5, bare logits from an nn.Linear gate before. Both are handled: the
    indices the model actually used are taken when present, else top-k of the logits.
    """

    def __init__(self, model, ck: Checkpoint, top_k: int):
        self.layers = ck.moe_layers
        self.E, self.k, self.scoring = ck.num_experts, top_k, ck.family.scoring
        L = len(self.layers)
        self.counts = torch.zeros(L, self.E, dtype=torch.int64)
        self.mass = torch.zeros(L, self.E, dtype=torch.float64)
        self.routed = torch.zeros(L, self.E, dtype=torch.float64)  # routing weight each expert received
        self.per_domain: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = []
        self.handles = [find_router(model, ck, i)[0].register_forward_hook(self._hook(n))
                        for n, i in enumerate(self.layers)]

    def start_domain(self, name: str) -> None:
        super().start_domain(name)
        self.counts.zero_(); self.mass.zero_(); self.routed.zero_()

    def end_domain(self, name: str, tokens: int) -> None:
        self.per_domain.append((self.counts.clone(), self.mass.float().clone(), self.routed.float().clone(), tokens))

    def _hook(self, n: int):
        def hook(_mod, _inp, out):
            logits, idx = self.split(out)
            logits, idx = logits.reshape(-1, self.E), idx.reshape(-1, idx.shape[-1])
            w = _routing_weights(out, idx)
            if self.mask is not None:
                logits, idx = logits[self.mask], idx[self.mask]
                w = w[self.mask] if w is not None else None
            self.counts[n] += torch.bincount(idx.reshape(-1).cpu(), minlength=self.E)
            if w is not None:  # top-k weights often sum to < 1 (OLMoE): the scale a dense FFN must match
                self.routed[n] += torch.bincount(idx.reshape(-1).cpu(), weights=w.reshape(-1).double().cpu(),
                                                 minlength=self.E)
            probs = logits.float().sigmoid() if self.scoring == "sigmoid" else logits.float().softmax(-1)
            self.mass[n] += probs.sum(0).double().cpu()
        return hook

    def split(self, out) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(out, torch.Tensor):
            logits = out
            probs = logits.float().sigmoid() if self.scoring == "sigmoid" else logits.float().softmax(-1)
            return logits, probs.topk(self.k, dim=-1).indices
        tensors = [t for t in out if isinstance(t, torch.Tensor)]
        logits = next((t for t in tensors if t.is_floating_point() and t.shape[-1] == self.E), None)
        idx = next((t for t in tensors if not t.is_floating_point() and t.dim() >= 2), None)
        if logits is None:
            raise XpertError("router output has no [tokens, experts] logits; unsupported transformers version")
        if idx is None:
            idx = self.split(logits)[1]
        return logits, idx

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _routing_weights(out, idx: torch.Tensor) -> torch.Tensor | None:
    """The top-k weights a v5 router returns beside its indices ((logits, weights, indices)), if any."""
    if not isinstance(out, tuple):
        return None
    for t in out[1:]:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() == idx.numel():
            return t.reshape(idx.shape).float()
    return None


@dataclass
class StatsResult:
    counts: torch.Tensor  # [D, L, E] int64
    mass: torch.Tensor  # [D, L, E] float32
    routed: torch.Tensor | None  # [D, L, E] float32: summed top-k routing weight (None for neuron stats)
    tokens: torch.Tensor  # [D] int64
    layers: list[int]
    domains: list[str]
    tokens_per_second: float


def collect(ck: Checkpoint, model, tokenizer, docs_by_domain: dict[str, list[str]], *, top_k: int,
            seq_len: int, batch_size: int, max_tokens: int | None, device: str,
            stream_tokens: int | None = None) -> StatsResult:
    """Count router selections per (domain, layer, expert); padding never counted.

    With `stream_tokens` (layer streaming) each forward carries that many tokens' windows, so each
    layer is read from disk once per chunk instead of once per batch."""
    counter = RouterCounter(model, ck, top_k)
    t0 = time.perf_counter()
    try:
        tokens = drive(ck, model, tokenizer, docs_by_domain, counter, seq_len=seq_len, batch_size=batch_size,
                       max_tokens=max_tokens, device=device, stream_tokens=stream_tokens, label="", rate=True)
    finally:
        counter.remove()
    counts, mass, routed, _ = zip(*counter.per_domain)
    total = sum(tokens.values())
    return StatsResult(torch.stack(counts), torch.stack(mass), torch.stack(routed), torch.tensor(list(tokens.values()), dtype=torch.int64),
                       list(ck.moe_layers), list(docs_by_domain), total / max(time.perf_counter() - t0, 1e-9))


def run(src: Path, domains: list[str], out: Path, *, tokenizer: Path | None = None, max_tokens: int | None = None,
        seq_len: int | None = None, batch_size: int = 8, device: str = "cpu", dtype: str = "float32",
        stream_layers: bool = False, stream_tokens: int = 65536, top_k: int | None = None, seed: int = 0,
        text_field: str = "text", neuron_top: float | None = None, force: bool = False) -> Path:
    """`xpertctl stats`: write stats.safetensors (counts, mass, tokens, layers) with provenance. A dense source's
    counts are per FFN neuron (active: in the top `neuron_top` of |activation| per token), its mass the
    summed |activation|, and the record says level "neuron"."""
    from ..io import check_output
    from . import neurons
    check_device(device)
    ck = open_checkpoint(src).require_ffn_source()
    if ck.dense and top_k is not None:
        raise XpertError(f"--top-k {top_k}: {ck.path} is a dense {ck.family.name} model (no router); how many "
                         "neurons count as active is --neuron-top FRACTION")
    if not ck.dense and neuron_top is not None:
        raise XpertError(f"--neuron-top {neuron_top:g}: for dense sources; {ck.path} is an MoE whose router chooses "
                         "the experts (--top-k)")
    q = neurons.NEURON_TOP if neuron_top is None else neuron_top
    k_neurons = neurons.per_token(ck.expert_ffn, q) if ck.dense else None
    paths = data.parse_domains(domains)
    check_output(out, force, [ck.path, *paths.values()])
    check_field_applies(paths.values(), text_field)
    if max_tokens is not None and max_tokens <= 0:
        raise XpertError(f"--max-tokens: must be positive, got {max_tokens}")
    if batch_size <= 0:
        raise XpertError(f"--batch-size: must be positive, got {batch_size}")
    if top_k is not None and not 1 <= top_k <= ck.num_experts:
        raise XpertError(f"--top-k {top_k}: must be 1..{ck.num_experts} (experts per layer)")
    k_override, top_k = top_k, top_k or ck.top_k
    if top_k is None and not ck.dense:
        raise XpertError(f"{ck.path}: top-k unknown (its config.json has no num_experts_per_tok); pass --top-k")
    from .capture import prepare
    runner = prepare(ck, domains, tokenizer=tokenizer, seq_len=seq_len, device=device, dtype=dtype,
                     stream_layers=stream_layers, top_k=k_override, sample_seed=seed if max_tokens is not None else None,
                     text_field=text_field)
    model, tok, docs, seq_len = runner.model, runner.tokenizer, runner.docs, runner.seq_len
    stream = stream_tokens if stream_layers else None
    if ck.dense:
        counts, mass, tokens, layers, names, rate = neurons.collect(
            ck, model, tok, docs, neuron_top=q, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens,
            device=device, stream_tokens=stream)
        res = StatsResult(counts, mass, None, tokens, layers, names, rate)
        what = dict(level="neuron", neuron_top=q, neurons_per_token=k_neurons, num_neurons=ck.expert_ffn)
    else:
        res = collect(ck, model, tok, docs, top_k=top_k, seq_len=seq_len, batch_size=batch_size,
                      max_tokens=max_tokens, device=device, stream_tokens=stream)
        what = dict(top_k=top_k, num_experts=ck.num_experts)
    rec = provenance.record(
        "stats", inputs=[ck.fingerprint] + [provenance.fingerprint(p) for p in paths.values()],
        params={"domains": {n: str(p) for n, p in paths.items()}, "max_tokens": max_tokens, "seq_len": seq_len,
                "batch_size": batch_size, "dtype": dtype, "stream_layers": stream_layers, "top_k": k_override,
                "text_field": text_field,
                "sample": {"seed": seed, "how": data.sampling(docs, max_tokens)} if max_tokens else None,
                **({"neuron_top": neuron_top} if ck.dense else {})},
        seed=seed if max_tokens else None,
        source=ck.fingerprint, family=ck.family.name, **what, layers=res.layers, domains=res.domains)
    tensors = {"counts": res.counts, "mass": res.mass, "tokens": res.tokens,
               "layers": torch.tensor(res.layers, dtype=torch.int64)}
    if res.routed is not None:
        tensors["routed"] = res.routed
    return write_safetensors(out, tensors, provenance.as_metadata(rec), force=force)

