"""One run per output directory: ``RunLock`` holds ``OUT/.lock`` (the holder's pid and host)
for as long as a run writes into OUT, and ``remove_stale_temporaries`` clears what a killed
writer left behind.

The lock is an ``flock`` on the file (released by the kernel when its holder dies, however it
dies), and the file names its holder for the error message. A lock file whose holder is gone
(flock free, and its pid not alive on this host) is stale: it is taken over with a notice.
"""
from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
from typing import Optional

try:
    import fcntl
except ImportError:  # Windows: the pid check alone
    fcntl = None

LOCK_NAME = ".lock"
# atomic_write's temporary names: ".<name>.<random>.tmp"
_TEMPORARY = re.compile(r"^\..+\.tmp$")


class LockHeld(RuntimeError):
    """Another live run writes into this directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:
        return False
    return True


def _holder(text: str) -> tuple[Optional[int], str]:
    parts = text.split()
    try:
        return int(parts[0]), parts[1] if len(parts) > 1 else ""
    except (IndexError, ValueError):
        return None, ""


class RunLock:
    """``with RunLock(out):`` creates OUT if needed and holds OUT/.lock, or raises LockHeld."""

    def __init__(self, directory: str, *, notice=None):
        self.directory = directory
        self.path = os.path.join(directory, LOCK_NAME)
        self.notice = notice or (lambda message: print(message, file=sys.stderr, flush=True))
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        os.makedirs(self.directory, exist_ok=True)
        host = socket.gethostname()
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if fcntl is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError:
                        holder = os.pread(fd, 256, 0).decode(errors="replace")
                        raise LockHeld(self._held_message(holder)) from None
                    # the file may have been removed (and recreated) by its last holder between
                    # our open and our flock: lock the file that is at the path, not a ghost
                    try:
                        if os.stat(self.path).st_ino != os.fstat(fd).st_ino:
                            os.close(fd)
                            continue
                    except FileNotFoundError:
                        os.close(fd)
                        continue
                previous = os.pread(fd, 256, 0).decode(errors="replace")
                pid, their_host = _holder(previous)
                if pid is not None and pid != os.getpid() and their_host in ("", host) and _pid_alive(pid):
                    raise LockHeld(self._held_message(previous))
                if previous.strip():
                    self.notice(f"pyalign train: notice: {self.path}: taking over the stale lock of "
                                f"pid {pid} on {their_host or 'this host'}, which is no longer running")
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()} {host}\n".encode(), 0)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            return self
        raise LockHeld(f"{self.directory} is in use: its lock {self.path} keeps changing hands")

    def _held_message(self, text: str) -> str:
        pid, host = _holder(text)
        who = f"pid {pid} on {host or 'this host'}" if pid is not None else "another process"
        return (f"key 'out' {self.directory!r} is in use by another pyalign train run ({who}, lock "
                f"{self.path}); wait for it, or pass another --out (remove the lock only if that "
                f"run is dead)")

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)  # while still holding it: a waiter re-checks the inode
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def remove_stale_temporaries(*directories: str) -> list[str]:
    """Remove atomic_write's leftover temporary files (``.<name>.*.tmp``) from ``directories``:
    call only while holding the run lock, when no writer of this run is alive."""
    removed = []
    for directory in directories:
        if not os.path.isdir(directory):
            continue
        for name in os.listdir(directory):
            path = os.path.join(directory, name)
            if _TEMPORARY.match(name) and os.path.isfile(path):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                    removed.append(path)
    return removed


__all__ = ["RunLock", "LockHeld", "LOCK_NAME", "remove_stale_temporaries"]
