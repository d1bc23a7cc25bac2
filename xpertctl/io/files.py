"""Safetensors files: validated headers, lazy one-tensor reads grouped by shard, fingerprints."""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import XpertError

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


@dataclass
class Header:
    path: Path
    tensors: dict[str, dict]  # name -> {"dtype", "shape", "data_offsets"}
    metadata: dict[str, str]
    raw: bytes  # the header bytes (fingerprinted)


def read_header(path: Path) -> Header:
    """Parse and check a safetensors header without touching tensor data.

    Catches truncated files and headers whose offsets point past the end of the file, so a bad
    checkpoint fails at open time with the file named, not halfway through a long job.
    """
    path = Path(path)
    if not path.is_file():
        raise XpertError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise XpertError(f"{path}: not a safetensors file (too short: {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise XpertError(f"{path}: truncated or not a safetensors file (header of {n} bytes, file of {size})")
        raw = f.read(n)
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise XpertError(f"{path}: corrupt safetensors header ({e.__class__.__name__})") from None
    if not isinstance(obj, dict):
        raise XpertError(f"{path}: corrupt safetensors header")
    meta = obj.pop("__metadata__", None) or {}
    data_len = size - 8 - n
    for name, t in obj.items():
        try:
            start, end = t["data_offsets"]
            nbytes = _DTYPE_BYTES[t["dtype"]]
            numel = 1
            for d in t["shape"]:
                numel *= int(d)
        except (KeyError, TypeError, ValueError):
            raise XpertError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        if end > data_len or end - start != numel * nbytes or start < 0:
            raise XpertError(f"{path}: truncated or corrupt: tensor {name!r} lies outside the file's data")
    return Header(path, obj, meta, raw)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class ShardedReader:
    """Lazy reads from one or more safetensors files. `opened` records every file actually opened."""

    weight_map: dict[str, Path]  # tensor name -> file that holds it
    headers: dict[Path, Header]
    opened: list[Path] = field(default_factory=list)

    def shape(self, name: str) -> list[int]:
        return list(self.headers[self.weight_map[name]].tensors[name]["shape"])

    def dtype(self, name: str) -> str:
        return self.headers[self.weight_map[name]].tensors[name]["dtype"]

    def read(self, requests: list[tuple[str, object]]) -> list[torch.Tensor]:
        """Read (name, index) pairs; index is None (whole tensor) or what get_slice accepts.

        Requests are grouped by shard so each file is opened once per call.
        """
        out: list[torch.Tensor | None] = [None] * len(requests)
        by_file: dict[Path, list[int]] = {}
        for n, (name, _) in enumerate(requests):
            if name not in self.weight_map:
                raise XpertError(f"{self.describe()}: tensor {name!r} not found")
            by_file.setdefault(self.weight_map[name], []).append(n)
        for path, idxs in by_file.items():
            self.opened.append(path)
            try:
                with safe_open(str(path), framework="pt") as f:
                    for n in idxs:
                        name, index = requests[n]
                        out[n] = f.get_tensor(name) if index is None else f.get_slice(name)[index]
            except XpertError:
                raise
            except Exception as e:  # safetensors raises its own error types on bad data
                raise XpertError(f"{path}: cannot read tensor data ({e})") from None
        return out  # type: ignore[return-value]

    def read_one(self, name: str, index=None) -> torch.Tensor:
        return self.read([(name, index)])[0]

    def describe(self) -> str:
        files = sorted({str(p) for p in self.weight_map.values()})
        return files[0] if len(files) == 1 else str(Path(files[0]).parent)


def open_files(files: list[Path], weight_map: dict[str, str] | None = None) -> ShardedReader:
    """A reader over the given files. With an index's weight_map, check it names only existing files."""
    headers = {p: read_header(p) for p in files}
    wm: dict[str, Path] = {}
    if weight_map is None:
        for p, h in headers.items():
            for name in h.tensors:
                wm[name] = p
    else:
        by_name = {p.name: p for p in files}
        for name, fname in weight_map.items():
            p = by_name[fname]
            if name not in headers[p].tensors:
                raise XpertError(f"{p}: index says it holds {name!r}, but it does not")
            wm[name] = p
    return ShardedReader(wm, headers)


def tree_size(paths: list[Path]) -> int:
    return sum(os.path.getsize(p) for p in paths)
