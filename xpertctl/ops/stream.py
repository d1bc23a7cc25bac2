"""Layer streaming for models larger than RAM: the model is built on the meta device and each decoder
layer is materialized from disk just before it runs and dropped right after.

All windows of all domains go through the model in one forward pass per `stream_tokens` chunk, so
each layer is read from disk once per chunk while the hidden states of every window stay in memory:
memory ~ one layer + embeddings + tokens x hidden x 4 bytes. In-memory parameter names are
transformers v5's (fused experts `mlp.experts.gate_up_proj` / `down_proj`, which is also the fused
on-disk layout); per-expert files are assembled through io's expert reads.
"""
from __future__ import annotations

import torch

from ..errors import XpertError
from ..io.checkpoint import Checkpoint
from .hf_model import config_overrides, model_dir


def _disk_key(ck: Checkpoint, layer: int, name: str) -> str:
    key = f"model.layers.{layer}.{name}"
    if not ck.fused and ck.family.block != "mlp":  # Mixtral's per-expert files say block_sparse_moe
        key = key.replace(".mlp.", f".{ck.family.block}.", 1)
    return key


def _fill_layer(layer: torch.nn.Module, ck: Checkpoint, i: int, dtype: torch.dtype) -> None:
    layer.to_empty(device="cpu")
    state = layer.state_dict(keep_vars=True)
    experts = None
    for name, t in state.items():
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            if ck.fused:
                src = ck.tensor(_disk_key(ck, i, name))
            else:
                if experts is None:
                    experts = ck.experts(i, list(range(ck.num_experts)))
                if name.endswith("gate_up_proj"):
                    src = torch.stack([torch.cat([g, u]) for g, u, _ in experts])
                else:
                    src = torch.stack([d for _, _, d in experts])
        else:
            key = _disk_key(ck, i, name)
            if not ck.has(key):
                raise XpertError(f"{ck.path}: layer {i} needs {key!r}, which is not in the checkpoint")
            src = ck.tensor(key)
        if tuple(src.shape) != tuple(t.shape):
            raise XpertError(f"{ck.path}: {name} of layer {i} has shape {list(src.shape)}, the model expects {list(t.shape)}")
        with torch.no_grad():
            t.copy_(src.to(t.dtype))


def load_streaming(ck: Checkpoint, dtype: torch.dtype, top_k: int | None = None):
    """The model with only embeddings, norms and rotary tables in memory; layers load on demand."""
    from transformers import AutoConfig, AutoModelForCausalLM
    with model_dir(ck) as d:
        config = AutoConfig.from_pretrained(str(d), **config_overrides(ck, top_k))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    base = model.base_model
    base.embed_tokens.to_empty(device="cpu")
    with torch.no_grad():
        base.embed_tokens.weight.copy_(ck.tensor("model.embed_tokens.weight").to(dtype))
    base.norm.to_empty(device="cpu")
    if getattr(base.norm, "weight", None) is not None:  # OLMo's LayerNorm has no weight
        with torch.no_grad():
            base.norm.weight.copy_(ck.tensor("model.norm.weight").to(dtype))
    base.rotary_emb = type(base.rotary_emb)(config=config)  # buffers computed, not loaded
    for i, layer in enumerate(base.layers):
        layer.register_forward_pre_hook(lambda mod, args, i=i: _fill_layer(mod, ck, i, dtype))
        layer.register_forward_hook(_drop)
    return model.eval()


def _drop(mod: torch.nn.Module, args, out) -> None:
    """Free the layer's weights after it ran (returns None: the output is left as it is)."""
    mod.to("meta")
