"""Run an MoE over text and hand every MoE block's input and output to a callback.

What `fidelity` and the data-aware fit need: for each MoE layer, the hidden states that enter the
block (after the post-attention norm), the block's output (routed experts plus shared experts where
the family has them), and the routing the model actually used (top-k indices and weights), with
padding dropped. Hooks sit on transformers' own modules, so the block computes exactly what the
model computes; nothing here re-implements routing. A dense source's FFN (its `mlp`) is the block.

Only the base model runs (no LM head): hidden states are captured by hooks, so memory never holds a
[batch, window, vocab] logits tensor.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import data
from ..console import progress
from ..errors import XpertError
from ..io import arch
from ..io.checkpoint import Checkpoint


@dataclass
class BlockIO:
    layer: int  # source layer index
    x: torch.Tensor  # [N, H] float32: the block's input, padding dropped
    y: torch.Tensor  # [N, H] float32: the block's output
    index: torch.Tensor | None  # [N, k] the experts each token was routed to
    weight: torch.Tensor | None  # [N, k] float32: their routing weights
    domain: str = ""  # the domain whose text is running


OnBlock = Callable[[BlockIO], None]


def find_router(model, ck: Checkpoint, i: int):
    """(router module, its path) of MoE layer i: the one place both stats and the block capture find it."""
    for p in arch.router_modules(ck.family, i):
        try:
            return model.get_submodule(p), p
        except AttributeError:
            continue
    raise XpertError(f"{ck.path}: cannot find the router module of layer {i} in {type(model).__name__}")


class Tap:
    """What drive() needs from a set of hooks: the padding mask of the running batch and the domain."""
    mask: torch.Tensor | None = None  # [B*T] bool, set before each forward
    domain: str = ""

    def start_domain(self, name: str) -> None:
        self.domain = name

    def end_domain(self, name: str, tokens: int) -> None:
        pass


class FiniteGuard:
    """Refuses NaN or Inf where they first appear in a forward pass: the embeddings' output, the hidden
    states entering an MoE layer's router (after that layer's attention and norms), the router's
    probabilities, a layer's output. Hooks fire in layer order, so the one that fires first names the
    first place; padded positions are not looked at. Results made from such values (router counts,
    fidelity figures, fitted FFNs) would be silently meaningless."""

    def __init__(self, model, ck: Checkpoint, tap: Tap):
        self.ck, self.tap = ck, tap
        base = model.base_model
        where = f"{ck.path}: NaN or Inf in the hidden states"
        self.handles = [base.embed_tokens.register_forward_hook(
            self._output(f"{where} from the embeddings (model.embed_tokens.weight)"))]
        for i in ck.moe_layers:
            router, _ = find_router(model, ck, i)
            self.handles.append(router.register_forward_hook(self._router(i)))
        for i, layer in enumerate(base.layers):
            part = "experts" if i in ck.moe_layers else "attention, norms or FFN"
            self.handles.append(layer.register_forward_hook(
                self._output(f"{where} of layer {i}, first at its output (from its {part})")))

    def _finite(self, t) -> bool:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() == 0:
            return True
        rows = t.reshape(-1, t.shape[-1])
        m = self.tap.mask
        if m is not None and rows.shape[0] == m.numel():
            rows = rows[m]
        return bool(torch.isfinite(rows).all())

    def _output(self, message: str):
        def hook(_mod, _args, out):
            if not self._finite(out[0] if isinstance(out, tuple) else out):
                raise XpertError(message)
        return hook

    def _router(self, i: int):
        key = arch.router_key(self.ck.family, self.ck.fused).format(i=i)

        def hook(_mod, args, out):
            if args and not self._finite(args[0]):
                raise XpertError(f"{self.ck.path}: NaN or Inf in the hidden states of layer {i}, first entering its "
                                 "MoE block (from its attention or norms)")
            if not all(self._finite(t) for t in (out if isinstance(out, tuple) else (out,))):
                raise XpertError(f"{self.ck.path}: NaN or Inf in the router probabilities of layer {i} ({key})")
        return hook

    def __enter__(self) -> "FiniteGuard":
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


def drive(ck: Checkpoint, model, tokenizer, docs_by_domain: dict[str, list[str]], tap: Tap, *, seq_len: int,
          batch_size: int, max_tokens: int | None, device: str, stream_tokens: int | None = None,
          label: str = "capture", rate: bool = False) -> dict[str, int]:
    """The one forward loop over every domain's token windows (stats and the block capture share it):
    padding masked through `tap.mask`, no LM head when layer-streamed, NaN or Inf refused where it first
    appears (FiniteGuard). Returns tokens per domain."""
    if stream_tokens:
        batch_size = max(1, stream_tokens // seq_len)  # each layer read once per chunk, not per batch
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    fwd = model.base_model  # the hooks see every layer; logits would only cost vocabulary x window memory
    tokens: dict[str, int] = {}
    t0, total = time.perf_counter(), 0
    with FiniteGuard(model, ck, tap), progress() as bar, torch.inference_mode():
        for name, docs in docs_by_domain.items():
            stream = data.domain_tokens(docs, tokenizer, max_tokens)
            if stream.numel() == 0:
                raise XpertError(f"domain {name!r}: the text tokenizes to no tokens")
            task = bar.add_task(f"{label} {name}" if label else name, total=int(stream.numel()), info="")
            tap.start_domain(name)
            n = 0
            for b in data.windows(stream, seq_len, batch_size, pad):
                tap.mask = b.attention_mask.reshape(-1).bool().to(device)
                fwd(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device), use_cache=False)
                got = int(b.attention_mask.sum())
                n += got
                total += got
                info = f"{total / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s" if rate else ""
                bar.update(task, advance=got, info=info)
            tap.end_domain(name, n)
            tokens[name] = n
    return tokens


class BlockTap(Tap):
    """Forward hooks on each MoE block and its router; calls on_block once per block call."""

    def __init__(self, model, ck: Checkpoint, on_block: OnBlock):
        self.on_block, self.E, self.H = on_block, ck.num_experts, ck.hidden
        self.routing: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}
        self.handles = []
        for i in ck.moe_layers:
            router, path = find_router(model, ck, i)
            block = model.get_submodule(path.rsplit(".", 1)[0])
            self.handles.append(router.register_forward_hook(self._router_hook(i)))
            self.handles.append(block.register_forward_hook(self._block_hook(i)))

    def _router_hook(self, i: int):
        def hook(_mod, _inp, out):
            # transformers v5 routers return (logits, top-k weights, top-k indices)
            if isinstance(out, tuple):
                w = next((t for t in out[1:] if isinstance(t, torch.Tensor) and t.is_floating_point()), None)
                idx = next((t for t in out if isinstance(t, torch.Tensor) and not t.is_floating_point()), None)
                if w is not None and idx is not None:
                    self.routing[i] = (idx.reshape(-1, idx.shape[-1]), w.reshape(-1, w.shape[-1]).float())
                    return
            self.routing[i] = None
        return hook

    def _block_hook(self, i: int):
        def hook(_mod, args, out):
            x = args[0] if args else None
            y = out[0] if isinstance(out, tuple) else out
            if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
                raise XpertError(f"layer {i}: unexpected MoE block call signature; unsupported transformers version")
            x, y = x.reshape(-1, self.H).float(), y.reshape(-1, self.H).float()
            routing = self.routing.pop(i, None)
            idx, w = routing if routing is not None else (None, None)
            if self.mask is not None:
                x, y = x[self.mask], y[self.mask]
                if idx is not None:
                    idx, w = idx[self.mask], w[self.mask]
            self.on_block(BlockIO(i, x.cpu(), y.cpu(), None if idx is None else idx.cpu(),
                                  None if w is None else w.cpu(), self.domain))
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class MlpTap(Tap):
    """Forward hooks on each dense layer's FFN module: its input and output, padding dropped (no routing)."""

    def __init__(self, model, ck: Checkpoint, on_block: OnBlock):
        self.on_block, self.H = on_block, ck.hidden
        self.handles = []
        for i in ck.dense_layers:
            try:
                mlp = model.get_submodule(arch.MLP.format(i=i))
            except AttributeError:
                raise XpertError(f"{ck.path}: cannot find layer {i}'s mlp in {type(model).__name__}") from None
            self.handles.append(mlp.register_forward_hook(self._hook(i)))

    def _hook(self, i: int):
        def hook(_mod, args, out):
            x, y = args[0].reshape(-1, self.H).float(), out.reshape(-1, self.H).float()
            if self.mask is not None:
                x, y = x[self.mask], y[self.mask]
            self.on_block(BlockIO(i, x.cpu(), y.cpu(), None, None, self.domain))
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def run(ck: Checkpoint, model, tokenizer, docs_by_domain: dict[str, list[str]], on_block: OnBlock, *,
        seq_len: int, batch_size: int, max_tokens: int | None, device: str, stream_tokens: int | None = None,
        label: str = "capture") -> dict[str, int]:
    """Run the model over every domain's text; on_block sees each block's I/O. Returns tokens per domain."""
    tap = MlpTap(model, ck, on_block) if ck.dense else BlockTap(model, ck, on_block)
    try:
        return drive(ck, model, tokenizer, docs_by_domain, tap, seq_len=seq_len, batch_size=batch_size,
                     max_tokens=max_tokens, device=device, stream_tokens=stream_tokens, label=label)
    finally:
        tap.remove()


@dataclass
class Runner:
    model: object
    tokenizer: object
    docs: dict[str, "data.DomainText"]
    seq_len: int


def prepare(ck: Checkpoint, domains: list[str], *, tokenizer: Path | None = None, seq_len: int | None = None,
            device: str = "cpu", dtype: str = "float32", stream_layers: bool = False, top_k: int | None = None,
            sample_seed: int | None = None, text_field: str = "text") -> Runner:
    """The source model (transformers' class, or layer-streamed), its tokenizer and the text to run
    (with `sample_seed`, each domain's documents in that seeded order, so a token cap samples the domain;
    `text_field`: the field / column of .jsonl, .parquet and .arrow records)."""
    from ..specs import check_device, parse_dtype
    from .hf_model import load_model
    check_device(device)
    paths = data.parse_domains(domains)
    max_pos = int(ck.config.get("max_position_embeddings", 2048))
    seq_len = seq_len or min(1024, max_pos)
    if not 1 <= seq_len <= max_pos:
        raise XpertError(f"--seq-len {seq_len}: must be 1..{max_pos} (the model's max_position_embeddings)")
    if ck.path.is_file() and not ck.config:
        raise XpertError(f"{ck.path}: running the model needs its config.json next to the file")
    tok_dir = Path(tokenizer) if tokenizer else (ck.path if ck.path.is_dir() else ck.path.parent)
    tok = data.load_tokenizer(tok_dir)
    docs = {name: data.DomainText(p, sample_seed, text_field) for name, p in paths.items()}  # read when run (data.domain_tokens)
    if stream_layers:
        if device != "cpu":
            raise XpertError("--stream-layers runs on the CPU (it exists for models larger than memory)")
        from .stream import load_streaming
        model = load_streaming(ck, parse_dtype(dtype), top_k)
    else:
        model = load_model(ck, parse_dtype(dtype), device, top_k)
    return Runner(model, tok, docs, seq_len)
