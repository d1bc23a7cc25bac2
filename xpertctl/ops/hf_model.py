"""Running a checkpoint with transformers' own class: the loadable directory and the model.

Shared by stats (whole model in memory) and stream (one layer at a time), so neither imports the other.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import XpertError
from ..io.checkpoint import Checkpoint


@contextmanager
def model_dir(ck: Checkpoint):
    """A directory transformers can load: the checkpoint itself, or a bare file plus its config."""
    if ck.path.is_dir():
        yield ck.path
        return
    if not (ck.path.parent / "config.json").is_file():
        raise XpertError(f"{ck.path}: running the model needs its config.json next to the file")
    with tempfile.TemporaryDirectory() as d:
        os.symlink(ck.path.resolve(), Path(d) / "model.safetensors")
        os.symlink((ck.path.parent / "config.json").resolve(), Path(d) / "config.json")
        yield Path(d)


def config_overrides(ck: Checkpoint, top_k: int | None) -> dict:
    """Config values the run changes: the routed experts per token when --top-k overrides it."""
    return {"num_experts_per_tok": top_k} if top_k is not None and top_k != ck.top_k else {}


def load_model(ck: Checkpoint, dtype: torch.dtype, device: str, top_k: int | None = None):
    """The checkpoint as transformers' own model class, in eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # our own progress bar is the one users watch
    with model_dir(ck) as d:
        try:
            model = AutoModelForCausalLM.from_pretrained(str(d), dtype=dtype, **config_overrides(ck, top_k))
        except (OSError, ValueError, KeyError) as e:
            raise XpertError(f"{ck.path}: transformers cannot load it ({str(e).splitlines()[0][:160]})") from None
    return model.to(device).eval()
