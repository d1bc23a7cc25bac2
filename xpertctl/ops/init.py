"""A fresh, seeded model of any family in the architecture table (teachers for demos and tests)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import XpertError
from ..io import arch
from ..io.writer import atomic_path, check_output


def run(family: str, out: Path, *, tokenizer: Path, layers: int, hidden: int, ffn: int, heads: int,
        experts: int = 8, top_k: int = 2, kv_heads: int | None = None, max_positions: int = 1024,
        seed: int = 0, force: bool = False) -> Path:
    """`xpertctl init`: config from the table's family + sizes, weights from transformers' own init."""
    import transformers
    from .. import data
    fam = arch.BY_NAME.get(family)
    if fam is None:
        raise XpertError(f"init: unknown family {family!r} (known: {', '.join(arch.BY_NAME)})")
    check_output(out, force, [tokenizer], marker="config.json")
    tok = data.load_tokenizer(tokenizer)
    cls = getattr(transformers, fam.hf_class)
    cfg_cls = transformers.AutoConfig.for_model(fam.model_types[0]).__class__
    kw = dict(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
              num_key_value_heads=kv_heads or heads, max_position_embeddings=max_positions,
              pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
              tie_word_embeddings=False)
    if fam.moe:
        kw.update({fam.experts_key: experts, "num_experts_per_tok": top_k, fam.ffn_key: ffn,
                   "output_router_logits": True})  # the load-balancing loss joins the training loss
    else:
        kw["intermediate_size"] = ffn
    try:  # a shape the class refuses (the table's rules catch the common ones first)
        config = cfg_cls(**kw)
        torch.manual_seed(seed)
        model = cls(config)
    except (ValueError, TypeError) as e:
        lines = [l.strip() for l in str(e).splitlines() if l.strip()]
        raise XpertError(f"init {family}: {lines[-1] if lines else e.__class__.__name__}") from None
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # its "Writing model shards" bar would be a line of stderr before an error
    with atomic_path(Path(out), force, marker="config.json") as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return Path(out)
