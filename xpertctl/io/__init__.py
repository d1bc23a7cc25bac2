"""Checkpoint access: lazy safetensors reads, atomic sharded writes, the architecture table."""
from .checkpoint import Checkpoint, open_checkpoint
from .files import read_header
from .writer import check_output, parse_size, write_model_dir, write_safetensors

__all__ = ["Checkpoint", "open_checkpoint", "read_header", "check_output", "parse_size",
           "write_model_dir", "write_safetensors"]
