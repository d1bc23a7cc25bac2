"""Write an OLMoE-1B-7B-shaped checkpoint: its exact config.json, key names, shapes, dtype (bf16) and
5 GB shards, with seeded random weights (~13.8 GB), plus a fused-layout variant and matching
synthetic stats files. Not part of the tests; `make bench` makes it once.

    python bench/make_olmoe_shaped.py bench/data            # full: olmoe-shaped/ and olmoe-shaped-fused/
    python bench/make_olmoe_shaped.py bench/data --layers 2 # a 2-layer cut (olmoe-2L/) for the stats bench
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# allenai/OLMoE-1B-7B-0924 config.json (transformers 4.43 keys; v5 reads them unchanged)
CONFIG = {
    "architectures": ["OlmoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "clip_qkv": None,
    "eos_token_id": 50279, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 1024, "max_position_embeddings": 4096, "model_type": "olmoe", "norm_topk_prob": False,
    "num_attention_heads": 16, "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 16,
    "num_key_value_heads": 16, "output_router_logits": False, "pad_token_id": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 10000.0, "router_aux_loss_coef": 0.01, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 50304,
}
SHARD = 5_000_000_000


def layer_tensors(i: int, g: torch.Generator, fused: bool):
    H, I, E = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["num_experts"]

    def rnd(*shape, std=0.02):
        return torch.empty(shape, dtype=torch.bfloat16).normal_(0, std, generator=g)
    p = f"model.layers.{i}"
    out = {f"{p}.input_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
           f"{p}.post_attention_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
           f"{p}.self_attn.q_norm.weight": torch.ones(H, dtype=torch.bfloat16),
           f"{p}.self_attn.k_norm.weight": torch.ones(H, dtype=torch.bfloat16)}
    for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
        out[f"{p}.self_attn.{n}.weight"] = rnd(H, H)
    out[f"{p}.mlp.gate.weight"] = rnd(E, H, std=0.1)
    experts = [(rnd(I, H), rnd(I, H), rnd(H, I)) for _ in range(E)]  # same draws for both layouts
    if fused:
        out[f"{p}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([a, b]) for a, b, _ in experts])
        out[f"{p}.mlp.experts.down_proj"] = torch.stack([c for _, _, c in experts])
    else:
        for j, (a, b, c) in enumerate(experts):
            out[f"{p}.mlp.experts.{j}.gate_proj.weight"] = a
            out[f"{p}.mlp.experts.{j}.up_proj.weight"] = b
            out[f"{p}.mlp.experts.{j}.down_proj.weight"] = c
    return out


def write(out: Path, layers: int, fused: bool, seed: int = 0) -> Path:
    if (out / "model.safetensors.index.json").exists():
        print(f"{out}: exists")
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = dict(CONFIG, num_hidden_layers=layers)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    tok = ROOT / "fixtures" / "teacher"  # any tokenizer whose ids fit the 50304 vocabulary
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tok / f, tmp / f)
    g = torch.Generator().manual_seed(seed)
    H, V = CONFIG["hidden_size"], CONFIG["vocab_size"]
    pending: dict[str, torch.Tensor] = {}
    shards: list[dict[str, torch.Tensor]] = []
    names: list[str] = []

    def flush():
        if pending:
            n = len(names) + 1
            name = f"model-{n:05d}.safetensors"
            save_file(dict(pending), str(tmp / name), metadata={"format": "pt"})
            names.append(name)
            shards.append({k: None for k in pending})
            pending.clear()

    def add(tensors):
        for k, v in tensors.items():
            size = sum(t.numel() * 2 for t in pending.values())
            if pending and size + v.numel() * 2 > SHARD:
                flush()
            pending[k] = v

    add({"model.embed_tokens.weight": torch.empty(V, H, dtype=torch.bfloat16).normal_(0, 0.02, generator=g)})
    for i in range(layers):
        add(layer_tensors(i, g, fused))
        print(f"{out.name}: layer {i + 1}/{layers}", flush=True)
    add({"model.norm.weight": torch.ones(H, dtype=torch.bfloat16),
         "lm_head.weight": torch.empty(V, H, dtype=torch.bfloat16).normal_(0, 0.02, generator=g)})
    flush()
    total = len(names)
    wm, size = {}, 0
    for n, (name, keys) in enumerate(zip(names, shards), 1):
        final = f"model-{n:05d}-of-{total:05d}.safetensors"
        (tmp / name).rename(tmp / final)
        wm.update({k: final for k in keys})
        size += (tmp / final).stat().st_size
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": size}, "weight_map": wm}, indent=2))
    tmp.rename(out)
    return out


def synthetic_stats(ckpt: Path, out: Path, seed: int = 0) -> Path:
    """Stats with structure: a few experts per layer used in every domain, others domain-specific."""
    from xpertctl.io import open_checkpoint, provenance
    ck = open_checkpoint(ckpt)
    g = torch.Generator().manual_seed(seed)
    D, L, E, k, tokens = 4, len(ck.moe_layers), ck.num_experts, ck.top_k, 100_000
    w = torch.rand(D, L, E, generator=g) ** 4
    w[:, :, :6] += 0.5  # six shared experts per layer
    counts = (w / w.sum(-1, keepdim=True) * tokens * k).round().to(torch.int64)
    rec = provenance.record("stats", [ck.fingerprint], {"synthetic": True}, source=ck.fingerprint, family="olmoe",
                            top_k=k, num_experts=E, layers=ck.moe_layers, domains=["wiki", "code", "arxiv", "web"])
    save_file({"counts": counts, "mass": counts.float() / k, "tokens": torch.full((D,), tokens, dtype=torch.int64),
               "layers": torch.tensor(ck.moe_layers)}, str(out), metadata={"format": "pt", **provenance.as_metadata(rec)})
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=16)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.layers == 16:
        for name, fused in (("olmoe-shaped", False), ("olmoe-shaped-fused", True)):
            d = write(a.out / name, 16, fused)
            synthetic_stats(d, a.out / f"{name}.stats.safetensors")
    else:
        write(a.out / f"olmoe-{a.layers}L", a.layers, False)
