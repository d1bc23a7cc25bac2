"""Provenance recorded in every artifact: version, command, input fingerprints, parameters, seed."""
from __future__ import annotations

import contextvars
import hashlib
import json
import os
import shlex
import sys
from contextlib import contextmanager
from pathlib import Path

from .. import __version__
from ..errors import XpertError
from .files import read_header, sha256  # noqa: F401  (sha256 re-exported)

KEY = "xpertctl"


_COMMAND: contextvars.ContextVar[str | None] = contextvars.ContextVar("xpertctl_command", default=None)


@contextmanager
def command(line: str):
    """Record `line` as the command of artifacts written inside (a recipe step's own command line)."""
    token = _COMMAND.set(line)
    try:
        yield
    finally:
        _COMMAND.reset(token)


def command_line() -> str:
    if _COMMAND.get() is not None:
        return _COMMAND.get()
    return "xpertctl " + shlex.join(sys.argv[1:]) if sys.argv and "xpertctl" in Path(sys.argv[0]).name else ""


SAMPLES, SAMPLE_BYTES = 9, 1 << 16  # blocks of a safetensors data section in its digest


def digest(path: Path) -> str:
    """sha256 of a safetensors file's header (tensor layout + provenance metadata), its data section's
    length and SAMPLES blocks of SAMPLE_BYTES of that data at fixed offsets (evenly spaced from its first
    to its last byte, the middle one included; all of it when smaller): a rewrite in place with the same
    layout is seen while reading ~0.6 MB of a 14 GB checkpoint. Any other file: sha256 of its bytes."""
    path = Path(path)
    if path.suffix == ".safetensors":
        raw = read_header(path).raw
        h = hashlib.sha256(raw)
        with open(path, "rb") as f:
            start = 8 + len(raw)
            n = os.fstat(f.fileno()).st_size - start
            h.update(f"\0{n}\0".encode())
            if n <= SAMPLES * SAMPLE_BYTES:
                f.seek(start)
                h.update(f.read(n))
            else:
                for k in range(SAMPLES):
                    f.seek(start + k * (n - SAMPLE_BYTES) // (SAMPLES - 1))
                    h.update(f.read(SAMPLE_BYTES))
        return h.hexdigest()
    h = hashlib.sha256()  # in blocks: a corpus may be larger than memory
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def fingerprint(path: Path, files: list[Path] | None = None, mtime: bool = False, skip: tuple = ()) -> dict:
    """The one fingerprint of every input: path + size + sha256 (+ mtime when asked: recipes only; an
    artifact's provenance leaves it out, so the same inputs and seed give the same bytes).

    sha256 stands for the content (see digest): copies and moves of the same weights compare equal, which
    is what "made from the same model" checks compare (with size). mtime (ns, the latest of the files) is
    what a recipe adds to see a rewrite in place that no sampled block of a large checkpoint shows.

    One file: its digest. A directory: the digests of its files with their relative names (hidden
    files, i.e. temps and recipe records, skipped). With `files` (a checkpoint's weights and index):
    the digests of those files only, in order and without names, so a model directory and a bare
    copy of its weights file fingerprint the same. skip: relative names of a directory's files to leave out.
    """
    path = Path(path)
    named = files is None
    if named:
        files = [path] if path.is_file() else sorted(
            p for p in path.rglob("*") if p.is_file() and str(p.relative_to(path)) not in skip
            and not any(s.startswith(".") for s in p.relative_to(path).parts))
    files = [Path(f) for f in files]
    if len(files) == 1 and (not named or files == [path]):
        dig = digest(files[0])
    else:
        h = hashlib.sha256()
        for f in files:
            h.update((f"{f.relative_to(path)}\0" if named else "").encode() + digest(f).encode() + b"\n")
        dig = h.hexdigest()
    stats = [f.stat() for f in files]
    fp = {"path": str(path.resolve()), "size": sum(s.st_size for s in stats), "sha256": dig}
    return {**fp, "mtime": max((s.st_mtime_ns for s in stats), default=0)} if mtime else fp


file_fingerprint = fingerprint  # the name the ops use for their single-file inputs


def weights_fingerprint(model_dir: Path) -> dict:
    """A model directory's fingerprint from its safetensors files alone (what train and eval record)."""
    return fingerprint(Path(model_dir), sorted(Path(model_dir).glob("*.safetensors")))


# config.json keys that say who wrote it, not what the model is (the dtype: the tensor table has it,
# and transformers 5 renamed torch_dtype to dtype)
VOLATILE_CONFIG = ("transformers_version", "_name_or_path", "torch_dtype", "dtype")


def weights_identity(model_dir: Path) -> str:
    """A model's weights and architecture as one sha256: each safetensors file's tensor table (without its
    metadata) and all of its data, and config.json without who wrote it. The same weights re-made under
    another command line, path or provenance record are the same model (what a resumed run must start
    from). All of the data, not digest's samples: a re-graft that changes one projection must show."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    for f in sorted(model_dir.glob("*.safetensors")):
        raw = read_header(f).raw
        head = {k: v for k, v in json.loads(raw).items() if k != "__metadata__"}
        h.update(f"{f.name}\0{json.dumps(head, sort_keys=True)}\0".encode())
        with open(f, "rb") as fh:
            fh.seek(8 + len(raw))
            while block := fh.read(1 << 22):
                h.update(block)
    for f in sorted(model_dir.glob("*.bin")):  # a hub checkpoint in torch's format: all of its bytes
        h.update(f"{f.name}\0".encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    cfg = json.loads((model_dir / "config.json").read_text())
    h.update(json.dumps({k: v for k, v in cfg.items() if k not in VOLATILE_CONFIG}, sort_keys=True).encode())
    return h.hexdigest()


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
    try:
        h = read_header(Path(path))
    except XpertError:
        if kind is not None:
            refuse_other_kind(path, kind)  # e.g. a selection JSON where a stats file belongs: say so
        raise
    raw = h.metadata.get(KEY)
    if raw is None:
        raise XpertError(f"{path}: not an xpertctl artifact (no '{KEY}' metadata)"
                         + (f", expected {describe(kind)}" if kind else ""))
    try:
        rec = json.loads(raw)
    except json.JSONDecodeError:
        raise XpertError(f"{path}: corrupt '{KEY}' metadata") from None
    if kind is not None and rec.get("kind") != kind:
        raise XpertError(f"{path}: is {describe(rec.get('kind'))}, expected {describe(kind)}")
    return rec


# what each artifact kind is called in messages ("X is a stats file, expected a selection JSON")
KIND_NAMES = {"stats": "a stats file", "selection": "a selection JSON", "factors": "a factors file",
              "adapted": "an adapted file", "grafted": "the weights of a grafted model",
              "fidelity": "a fidelity JSON", "eval": "an eval results JSON", "data": "a token data manifest",
              "train": "the output of `train` (a trained model or its train_config.json)", "weights": "model weights (safetensors)",
              "learngene": "a learngene (from `xpertctl learngene`)"}


def describe(kind: str | None) -> str:
    return KIND_NAMES.get(kind, f"an artifact of kind {kind!r}" if kind else "an unknown file")


def kind_of(path: Path) -> str | None:
    """Which xpertctl artifact an existing file is: the kind it records, 'selection' for a selection
    JSON without a record, 'weights' for safetensors without one; None when it is none of these."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        raw = read_header(path).metadata.get(KEY)
    except XpertError:
        return _json_kind(path)
    try:
        return json.loads(raw).get("kind") if raw else "weights"
    except (json.JSONDecodeError, AttributeError):
        return None


def _json_kind(path: Path) -> str | None:
    if path.stat().st_size > 64 << 20:  # no artifact JSON is this large; do not read it whole
        return None
    try:
        doc = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(doc, dict):
        return None
    rec = doc.get(KEY)
    kind = (rec.get("kind") if isinstance(rec, dict) else None) or doc.get("kind")
    if kind is None and isinstance(doc.get("layers"), list) and all(isinstance(l, dict) and "experts" in l
                                                                      for l in doc["layers"]):
        kind = "selection"
    return kind if isinstance(kind, str) else None


def refuse_other_kind(path: Path, expected: str, hint: str = "") -> None:
    """Raise "PATH: is a stats file, expected a selection JSON" when `path` is another known artifact."""
    found = kind_of(path)
    if found is not None and found != expected:
        raise XpertError(f"{path}: is {describe(found)}, expected {describe(expected)}{hint}")
