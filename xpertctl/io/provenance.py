"""Provenance recorded in every artifact: version, command, input fingerprints, parameters, seed."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from .. import __version__
from ..errors import XpertError
from .files import read_header, sha256  # noqa: F401  (sha256 re-exported)

KEY = "xpertctl"


def command_line() -> str:
    return "xpertctl " + shlex.join(sys.argv[1:]) if sys.argv and "xpertctl" in Path(sys.argv[0]).name else ""


def file_fingerprint(path: Path) -> dict:
    """path + size + sha256 of the safetensors header, or of the whole file for small JSON/text."""
    path = Path(path)
    if path.suffix == ".safetensors":
        digest = sha256(read_header(path).raw)
    else:
        digest = sha256(path.read_bytes())
    return {"path": str(path.resolve()), "size": path.stat().st_size, "sha256": digest}


def tree_fingerprint(path: Path) -> dict:
    """path + size + sha256 over a file's bytes, or over every file (name and bytes) of a directory."""
    import hashlib
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return {"path": str(path.resolve()), "size": sum(f.stat().st_size for f in files), "sha256": h.hexdigest()}


def record(kind: str, inputs: list[dict], params: dict, seed: int | None = None, **extra) -> dict:
    """The provenance dict of one artifact (stored as JSON under the "xpertctl" metadata key)."""
    rec = {"version": __version__, "kind": kind, "command": command_line(), "inputs": inputs,
           "params": params, "seed": seed}
    rec.update(extra)
    return rec


def as_metadata(rec: dict) -> dict[str, str]:
    return {KEY: json.dumps(rec, sort_keys=True)}


def read(path: Path, kind: str | None = None) -> dict:
    """The provenance of an xpertctl safetensors artifact; with `kind`, check it is that kind."""
    h = read_header(Path(path))
    raw = h.metadata.get(KEY)
    if raw is None:
        raise XpertError(f"{path}: not an xpertctl artifact (no '{KEY}' metadata)")
    try:
        rec = json.loads(raw)
    except json.JSONDecodeError:
        raise XpertError(f"{path}: corrupt '{KEY}' metadata") from None
    if kind is not None and rec.get("kind") != kind:
        raise XpertError(f"{path}: is a {rec.get('kind')!r} artifact, expected {kind!r}")
    return rec
