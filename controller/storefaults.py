"""What a failed SQLite call means for the state store: busy (wait), corrupt (set aside) or unusable.

Effects layer, called by controller.store only. Tells a lock held by another process (a backup
tool, a `sqlite3` shell) from real damage, and names the processes holding the file via
/proc/*/fd. It must not decide what to do about either: the store does.
"""

from __future__ import annotations

import os
import sqlite3
from enum import StrEnum
from pathlib import Path

# primary result codes (the low byte of an extended code)
SQLITE_BUSY = 5
SQLITE_LOCKED = 6
SQLITE_CORRUPT = 11
SQLITE_NOTADB = 26


class StoreError(Exception):
    """The state store cannot be used and must not be replaced: the controller exits 2."""


class StoreCorrupt(sqlite3.DatabaseError):
    """The database opened but is damaged (quick_check failed)."""


class Fault(StrEnum):
    BUSY = "busy"  # another connection holds a lock: wait, never declare corrupt
    CORRUPT = "corrupt"  # the file is damaged or not a database: set it aside
    OTHER = "other"  # I/O error, read-only, no space, cannot open: report, keep the file


def classify(exc: sqlite3.Error) -> Fault:
    if isinstance(exc, StoreCorrupt):
        return Fault.CORRUPT
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        primary = int(code) & 0xFF
        if primary in (SQLITE_BUSY, SQLITE_LOCKED):
            return Fault.BUSY
        if primary in (SQLITE_CORRUPT, SQLITE_NOTADB):
            return Fault.CORRUPT
        return Fault.OTHER
    # an error raised by the sqlite3 module itself carries no code: its text is all there is
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return Fault.BUSY
    if "malformed" in text or "not a database" in text:
        return Fault.CORRUPT
    return Fault.OTHER


def holders(path: Path) -> list[tuple[int, str]]:
    """(pid, command name) of the other processes that have the database or its WAL/SHM open."""
    wanted = {os.path.realpath(str(path) + suffix) for suffix in ("", "-wal", "-shm", "-journal")}
    found: list[tuple[int, str]] = []
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        if _has_open(int(name), wanted):
            found.append((int(name), _comm(int(name))))
    return sorted(found)


def _has_open(pid: int, wanted: set[str]) -> bool:
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return False  # gone, or not ours to look at
    for fd in fds:
        try:
            if os.readlink(f"{fd_dir}/{fd}") in wanted:
                return True
        except OSError:
            continue
    return False


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as fh:
            return fh.read().strip()
    except OSError:
        return "?"


def describe_holders(path: Path) -> str:
    found = holders(path)
    if not found:
        return "held by a process not visible here"
    return "held by " + ", ".join(f"pid {pid} ({comm})" for pid, comm in found)


def space_hint(path: Path) -> str:
    """SQLite reports a full disk at open as a bare "disk I/O error": say what it is."""
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return ""
    free = st.f_bavail * st.f_frsize
    return f" (its file system has {free} bytes free)" if free < 1 << 20 else ""
