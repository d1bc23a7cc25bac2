"""The one write path of every artifact: a hidden temp beside the output (`.NAME.tmp-PID`; a command's
caches inside it), the umask's modes, fsync, an atomic rename; a disk's refusal is one line naming the output,
and what killed runs left is cleared by the next (by PID)."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import XpertError, write_failure

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
    check_writable(out)


def check_writable(out: Path) -> None:
    """Refuse before any work when the directory that would hold the output (or its nearest existing
    ancestor) takes no writes: a read-only file system, no permission (a full disk only shows when written)."""
    where = Path(os.path.abspath(out)).parent
    while not where.exists() and where != where.parent:
        where = where.parent
    if os.access(where, os.W_OK | os.X_OK):
        return
    try:
        read_only = bool(os.statvfs(where).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    why = os.strerror(errno.EROFS if read_only else errno.EACCES)
    raise XpertError(f"{out}: cannot write in {where} ({why}); nothing was written")

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
def atomic_path(out: Path, force: bool, marker: str | None = None, inside: bool = False):
    """Yield a temp path beside `out` (hidden: `.NAME.tmp-PID`); when the body returns, give every file and
    directory in it the umask's mode, fsync them and rename the temp over `out` (then fsync the parent); on
    any failure remove it. A refusal of the disk (full, read-only, no permission, quota) is one XpertError
    naming `out`. `marker`: for a directory output, the file an earlier output that --force may replace holds.
    `inside`: a file output written by a library that puts temps of its own beside the file (safetensors):
    the yielded path is `.NAME.tmp-PID/NAME`, so those temps too are inside ours."""
    given, out = Path(out), Path(os.path.abspath(out))  # absolute: './' has a name too (and is refused)
    _check_place(given)
    holder = temp_of(out)
    tmp = holder / out.name if inside else holder
    _clear_stale(out)
    _live.add(holder)
    try:
        if inside:
            holder.mkdir()
        yield tmp
        _finish(tmp)
        if out.exists() or out.is_symlink():
            if not force:
                raise XpertError(f"{given}: already exists (use --force to replace it)")
            _check_replace(given, tmp.is_dir(), marker)
            if not tmp.is_dir():
                os.replace(tmp, out)  # one step: readers see the old file or the new one
                written.append(out)
            elif _exchange(tmp, out):  # the same for a directory; the old one is now in the temp
                written.append(out)
            else:  # rename(2) replaces no directory: where the two cannot be swapped, the old one steps aside
                old = _aside(out)
                os.replace(out, old)
                os.replace(tmp, out)
                written.append(out)
                _remove(old)
        else:
            os.replace(tmp, out)
            written.append(out)
        _remove(holder)  # what is left of the temp: the swapped-out old directory, an `inside` holder
    except BaseException as e:
        _restore(out)
        _remove(holder)
        failure = write_failure(e, given, "; nothing was written") if isinstance(e, Exception) else None
        if failure is not None:  # disk full, read-only, no permission: the user's problem, not a bug
            raise failure from None
        raise
    finally:
        _live.discard(holder)
    try:
        _sync(out.parent)  # the rename itself on disk; the output is in place whatever this says
    except OSError:
        pass


def temp_of(out: Path) -> Path:
    """The hidden temp an output is written to before its rename: `.NAME.tmp-PID` beside it."""
    out = Path(os.path.abspath(out))
    return out.with_name(f".{out.name}.tmp-{os.getpid()}")


def _aside(out: Path) -> Path:
    return out.with_name(f".{out.name}.old-{os.getpid()}")


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux's renameat2 RENAME_EXCHANGE); False where the system or the
    file system cannot, and the caller replaces in two renames."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.renameat2
    except (OSError, AttributeError):
        return False
    if call(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


@contextmanager
def scratch(out: Path, name: str = "cache"):
    """A working directory for a command's caches, inside the hidden temp of its output `out`
    (`.NAME.tmp-PID/NAME/`): the rule that removes the temp of a killed run removes them too, and they are
    gone when the block ends. A disk that refuses the cache is one XpertError naming `out`."""
    given, out = Path(out), Path(os.path.abspath(out))
    tmp = temp_of(out)
    _clear_stale(out)
    made = not tmp.exists()
    d = tmp / name
    try:
        tmp.mkdir(exist_ok=True)
        _live.add(tmp)
        d.mkdir()
        yield d
    except Exception as e:
        failure = write_failure(e, given)
        if failure is not None:
            raise failure from None
        raise
    finally:
        _remove(tmp if made else d)
        if made:
            _live.discard(tmp)


def _restore(out: Path) -> None:
    """Put back the earlier output moved aside for --force when the new one never took its place."""
    old = _aside(out)
    if (old.exists() or old.is_symlink()) and not (out.exists() or out.is_symlink()):
        os.replace(old, out)


written: list[Path] = []  # outputs renamed into place by this process: a late Ctrl-C names them as complete
_live: set[Path] = set()  # temps this process is writing now: never cleared as stale


def _clear_stale(out: Path) -> None:
    """What killed runs left beside `out`: their temps are removed; an earlier output one of them had moved
    aside to replace it (--force) is put back when nothing took its place, else removed."""
    for p in sorted(out.parent.glob(f".{out.name}.tmp-*")) + sorted(out.parent.glob(f".{out.name}.old-*")):
        if _stale(p):
            if p.name.startswith(f".{out.name}.old-") and not (out.exists() or out.is_symlink()):
                try:
                    os.replace(p, out)
                except OSError:
                    pass
            else:
                _remove(p)


def clear_stale(directory: Path) -> None:
    """What killed processes left in `directory` (a run directory's checkpoints in the making, the temps
    of any output in it), cleared as _clear_stale does beside one output."""
    for p in sorted(Path(directory).glob(".*.tmp-*")) + sorted(Path(directory).glob(".*.old-*")):
        name = re.match(r"\.(.+)\.(?:tmp|old)-\d+$", p.name)
        if name is not None and _stale(p):
            _clear_stale(Path(directory) / name.group(1))


def _stale(p: Path) -> bool:
    """A temp (or set-aside output) whose process is gone; this process's own only when no write of it is
    under way (a PID reused, as the same PID of a container's main process is after a restart)."""
    pid = p.name.rsplit("-", 1)[-1]
    if not pid.isdigit() or p in _live:
        return False
    return int(pid) == os.getpid() or not _alive(int(pid))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(p: Path) -> None:
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists() or p.is_symlink():
            p.unlink()
    except OSError:  # a read-only or vanished parent: nothing more can be done
        pass


def _finish(tmp: Path) -> None:
    """Every file and directory of a finished temp: the mode the umask gives (whoever created it: safetensors
    and torch create files 0600), and its bytes on disk (fsync) before the rename makes it the output."""
    mask = umask()
    if not tmp.is_dir() or tmp.is_symlink():
        os.chmod(tmp, 0o666 & ~mask)
        _sync(tmp)
        return
    for root, _, files in os.walk(tmp, topdown=False):  # a directory after everything in it
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)
                _sync(p)
        os.chmod(root, 0o777 & ~mask)
        _sync(root)


def _sync(path) -> None:
    """fsync a file or a directory (a directory's entries: the renames in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):  # a file system that cannot sync a directory
            raise
    finally:
        os.close(fd)


def umask() -> int:
    """The process's umask, read without setting it (os.umask would change it for a moment for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text(out: Path, text: str, force: bool = True, output: bool = True) -> Path:
    """A small text file (JSON, a record), written like every other output. `output=False`: a file kept
    for the command's own use (a recipe step's record), which a late Ctrl-C does not name."""
    with atomic_path(Path(out), force) as tmp:
        tmp.write_text(text)
    if not output:
        written.remove(Path(os.path.abspath(out)))
    return Path(out)


def save_torch(obj, path: Path) -> None:
    """torch.save through a Python file: a full disk then surfaces as the OSError behind torch's own error
    (writing to a path, torch reports only "unexpected pos")."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in tensors.items()}


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    save_file(tensors, str(path), metadata={"format": "pt", **metadata})  # created 0600: atomic_path sets the mode
    _sort_metadata(path)


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
    with atomic_path(Path(out), force, inside=True) as tmp:
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
