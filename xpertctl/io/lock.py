"""Lock files, as git's: one process at a time holds one; the file names its holder (PID, host, start
time) for whoever finds it held; a holder that died without removing it (SIGKILL, a crash, power loss)
is taken over with a notice.

Holding is an flock(2) on the open file, so the kernel releases it when the holder dies, whatever
killed it: a lock found unlocked is stale by construction, never guessed from a PID. The recorded PID
only names the holder (and says whether the one that left it is gone).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from ..errors import XpertError


def _holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        doc = json.loads(os.read(fd, 1 << 16) or b"{}")
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(h: dict) -> str:
    if not h.get("pid"):
        return "another process (its record is not written yet)"
    return f"process {h['pid']} on {h.get('host', '?')} since {h.get('started', '?')}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextmanager
def held(path: Path, what: str, notice=None):
    """Hold the lock file `path` for the block (created with its directory); XpertError naming the holder
    when another process holds it. `what` names the work it guards; `notice(text)` reports a takeover."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise XpertError(f"{path}: {what} is in progress: {_describe(holder)} holds its lock; wait for it "
                                 "to end, or stop it") from None
            try:  # still the file at `path`? (its holder may have removed it between our open and our flock)
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        prev = _holder(fd)
        if prev.get("pid") and prev.get("host") not in (None, socket.gethostname()):
            os.close(fd)  # a holder on another host cannot be seen from here: its flock may not reach us
            raise XpertError(f"{path}: {what} may be in progress: {_describe(prev)} holds its lock, and a process "
                             "on another host cannot be checked from here; remove the file if that run is gone")
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "what": what}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(me) + "\n").encode())
        os.fsync(fd)
    except OSError as e:
        raise XpertError(f"{path}: cannot take the lock of {what} ({e.strerror or e})") from None
    if prev.get("pid") and notice is not None:
        gone = "which is gone" if not _alive(int(prev["pid"])) else "which no longer holds it"
        notice(f"{path}: took over the lock of {_describe(prev)}, {gone} (a killed run; its partial step "
               "runs again)")
    try:
        yield
    finally:
        try:
            os.unlink(path)  # before the flock goes: a waiting process then finds no lock, or its own
        except OSError:
            pass
        os.close(fd)
