"""Checkpoint access: lazy safetensors reads, atomic sharded writes, the architecture table.

Exports resolve on first use, so importing a light submodule (io.arch) does not import torch.
"""
from importlib import import_module

_EXPORTS = {"Checkpoint": "checkpoint", "open_checkpoint": "checkpoint", "read_header": "files",
            "check_output": "writer", "parse_size": "writer", "write_model_dir": "writer",
            "write_safetensors": "writer"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
