"""Atomic writes: a temp path next to the target, renamed into place only when complete."""
from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import XpertError

DEFAULT_SHARD_SIZE = 5_000_000_000  # bytes, as in transformers' save_pretrained


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper()
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for u, mult in units.items():
        if s.endswith(u):
            num = s[: -len(u)].strip()
            break
    else:
        num, mult = s, 1
    try:
        val = int(float(num) * mult)
    except ValueError:
        raise XpertError(f"--shard-size: cannot read {text!r} (e.g. 5GB, 500MB, 1000000)") from None
    if val <= 0:
        raise XpertError(f"--shard-size: must be positive, got {text!r}")
    return val


def check_output(out: Path, force: bool, inputs: list[Path] = (), *, marker: str | None = None,
                 make_parents: bool = False) -> None:
    """The one rule for every output, checked before any work starts (atomic_path checks it again at the
    rename). An output never equals, contains or lies inside an input, nor the current directory; an
    existing output needs --force; a file never replaces a directory; and a directory output (`marker`:
    the file every output of this command holds) replaces only an empty directory or one holding that
    marker, i.e. an earlier output of the same kind, never a directory of unrelated files nor a file.
    `make_parents`: the command creates missing parent directories itself."""
    out = Path(out)
    out_r = _check_place(out)
    for p in inputs:
        if p is None:
            continue
        p = Path(p).resolve()
        if out_r == p:
            raise XpertError(f"{out}: output would overwrite the input {p}")
        if out_r in p.parents:
            raise XpertError(f"{out}: output would replace a directory holding the input {p}")
        if p in out_r.parents:
            raise XpertError(f"{out}: output would be written inside the input {p}")
    if out.exists() or out.is_symlink():
        if not force:
            raise XpertError(f"{out}: already exists (use --force to replace it)")
        _check_replace(out, marker is not None, marker)
    if not make_parents and not out.parent.exists():
        raise XpertError(f"{out}: parent directory {out.parent} does not exist")


def _check_place(out: Path) -> Path:
    """`out` resolved; the current directory, an ancestor of it or / is never an output."""
    out_r = Path(out).resolve()
    cwd = Path.cwd().resolve()
    if out_r == cwd or out_r in cwd.parents:
        raise XpertError(f"{out}: is the current directory or contains it; give a new path to write")
    return out_r


def _check_replace(out: Path, new_is_dir: bool, marker: str | None) -> None:
    """What --force may replace: a file by a file; a directory by a directory holding `marker`."""
    old_is_dir = out.is_dir() and not out.is_symlink()
    if old_is_dir and not new_is_dir:
        raise XpertError(f"{out}: is a directory; a file output never replaces a directory, even with --force "
                         "(remove it yourself or choose another path)")
    if new_is_dir and not old_is_dir:
        raise XpertError(f"{out}: is a file; this command writes a directory and replaces only its own "
                         "earlier output, even with --force")
    if new_is_dir and any(out.iterdir()) and (marker is None or not (out / marker).is_file()):
        raise XpertError(f"{out}: is a directory without {marker or 'the marker of this command'}, not an earlier "
                         "output of this command; not replaced, even with --force (remove it yourself)")


@contextmanager
def atomic_path(out: Path, force: bool, marker: str | None = None):
    """Yield a temp path beside `out`; on success rename it over `out`, on any failure remove it.
    `marker`: for a directory output, the file an earlier output that --force may replace holds."""
    given, out = Path(out), Path(os.path.abspath(out))  # absolute: './' has a name too (and is refused)
    _check_place(given)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    _clear_stale(out)
    try:
        yield tmp
        if out.exists() or out.is_symlink():
            if not force:
                raise XpertError(f"{given}: already exists (use --force to replace it)")
            _check_replace(given, tmp.is_dir(), marker)
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            written.append(out)
            _remove(old)
        else:
            os.replace(tmp, out)
            written.append(out)
    except OSError as e:
        _restore(out)
        _remove(tmp)
        if e.errno in _WRITE_ERRORS:  # disk full, read-only, no permission: the user's problem, not a bug
            raise XpertError(f"{given}: write failed ({e.strerror or e}); nothing was written") from None
        raise
    except BaseException:
        _restore(out)
        _remove(tmp)
        raise


def _restore(out: Path) -> None:
    """Put back the earlier output moved aside for --force when the new one never took its place."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if (old.exists() or old.is_symlink()) and not (out.exists() or out.is_symlink()):
        os.replace(old, out)


written: list[Path] = []  # outputs renamed into place by this process: a late Ctrl-C names them as complete


_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


def _clear_stale(out: Path) -> None:
    """Remove temp outputs of earlier runs that were killed (their process is gone)."""
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            _remove(p)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in tensors.items()}


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    save_file(tensors, str(path), metadata={"format": "pt", **metadata})
    os.chmod(path, 0o666 & ~_umask())  # safetensors creates 0600; every other output follows the umask
    _sort_metadata(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _sort_metadata(path: Path) -> None:
    """Rewrite the header's __metadata__ object with sorted keys, in place.

    safetensors serializes metadata from a hash map, so the key order (and so the file's bytes)
    changes from run to run. Reordering keys keeps the header's length, so only those bytes change.
    """
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
        text = raw.decode("utf-8")
        key = '"__metadata__":'
        start = text.find(key)
        if start < 0:
            return
        obj_start = start + len(key)
        meta, end = json.JSONDecoder().raw_decode(text, obj_start)
        canon = json.dumps(dict(sorted(meta.items())), ensure_ascii=False, separators=(",", ":"))
        new = (text[:obj_start] + canon + text[end:]).encode("utf-8")
        if len(new) != len(raw) or json.loads(new) != json.loads(raw):
            return  # escaping differs from safetensors' own: leave the (valid) file as written
        f.seek(8)
        f.write(new)


def add_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Merge `metadata` into a safetensors file's __metadata__ (a file another library wrote: transformers'
    save_pretrained drops the metadata it is given). The tensor bytes are streamed into a sibling temp that
    replaces the file, so memory does not grow with the model."""
    path = Path(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        meta = {**header.get("__metadata__", {}), **metadata}
        header["__metadata__"] = dict(sorted(meta.items()))
        raw = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # safetensors pads its header to 8 bytes
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as g:
                g.write(struct.pack("<Q", len(raw)) + raw)
                shutil.copyfileobj(f, g, 1 << 22)
            os.chmod(tmp, os.stat(path).st_mode & 0o777)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def write_safetensors(out: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                      force: bool = False) -> Path:
    """One safetensors file, written atomically."""
    with atomic_path(Path(out), force) as tmp:
        _save(_contiguous(tensors), tmp, metadata)
    return Path(out)


def write_model_dir(out: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                    files: dict[str, bytes | Path], shard_size: int = DEFAULT_SHARD_SIZE,
                    force: bool = False) -> Path:
    """A Hugging Face model directory: weights sharded by bytes (+ index when > 1 shard), extra files."""
    tensors = _contiguous(tensors)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():  # keep the caller's order: layers stay together
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    with atomic_path(Path(out), force, marker="config.json") as tmp:
        tmp.mkdir()
        if len(shards) == 1:
            _save(shards[0], tmp / "model.safetensors", metadata)
        else:
            wm, n = {}, len(shards)
            for s, shard in enumerate(shards, 1):
                fname = f"model-{s:05d}-of-{n:05d}.safetensors"
                _save(shard, tmp / fname, metadata)
                wm.update({k: fname for k in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total, **metadata}, "weight_map": wm}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        for fname, content in files.items():
            dest = tmp / fname
            if isinstance(content, Path):
                shutil.copyfile(content, dest)
            else:
                dest.write_bytes(content)
    return Path(out)
