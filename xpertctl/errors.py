"""The one exception type that means "the user's input is wrong": the CLI prints it as one line, exit 2;
and what a Ctrl-C says it left."""
import errno
import os
import re
import sys


class XpertError(Exception):
    """A problem with the user's input (file, option, spec). The message names the file or field."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C that left something the user must know about; the message says what is kept and how to go on."""


def written() -> list:
    """Outputs this process renamed into place (complete), without importing the writer (torch)."""
    writer = sys.modules.get("xpertctl.io.writer")
    return list(writer.written) if writer is not None else []


def interrupted_message(e: BaseException) -> str:
    """What a Ctrl-C left: the command's own note (Interrupted), the outputs already complete, or nothing."""
    inner = e if isinstance(e, KeyboardInterrupt) else (e.__cause__ or e.__context__)
    if isinstance(inner, Interrupted) and str(inner):
        return f"interrupted; {inner}"
    done = written()
    if done:
        return (f"interrupted after {', '.join(map(str, done))} was completely written; it is kept "
                "(remove it if you do not want it)")
    return "interrupted; no partial output was kept"


def forget_written() -> None:
    """A new command or recipe step starts: earlier outputs are not its own."""
    writer = sys.modules.get("xpertctl.io.writer")
    if writer is not None:
        writer.written.clear()


# A disk's refusal of a write: full, over quota, read-only, no permission, file too large (RLIMIT_FSIZE), I/O error
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


def disk_error(e: BaseException) -> tuple[int, BaseException] | None:
    """(errno, the error that carries it) when `e` is a disk's refusal: an OSError, or the error safetensors
    ("... (os error 28)") or torch raises around one. An XpertError is the user's input, never this."""
    seen = set()
    while e is not None and id(e) not in seen and not isinstance(e, XpertError):
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            return e.errno, e
        m = re.search(r"\(os error (\d+)\)", str(e)) if not isinstance(e, OSError) else None
        if m and int(m.group(1)) in WRITE_ERRNOS:
            return int(m.group(1)), e
        e = e.__cause__ if e.__cause__ is not None or e.__suppress_context__ else e.__context__
    return None


def write_failure(e: BaseException, path, note: str = "") -> "XpertError | None":
    """One line for a disk's refusal behind `e` while writing `path`: the file the error names when it is
    another one (an input that cannot be read), else `path`."""
    found = disk_error(e)
    if found is None:
        return None
    code, err = found
    what = os.strerror(code)
    name = getattr(err, "filename", None)
    if name is not None and path is not None:
        out = os.path.abspath(path)
        head, tail = os.path.split(out)
        mine = os.path.abspath(name)
        if not (mine == out or mine.startswith(out + os.sep) or mine.startswith(os.path.join(head, f".{tail}."))):
            return XpertError(f"{name}: {what}")
    where = path if path is not None else name
    return XpertError(f"{where}: write failed ({what}){note}" if where is not None else f"write failed ({what}){note}")
