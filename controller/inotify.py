"""Linux inotify read from the event loop: the manifests watch wakes only when something changed.

Runtime layer, used by watch.py for the manifests tree, its parent dir and the requests dir
in place of watchfiles, whose thread wakes every step (tens of times a second) while idle.
It reports changed paths only: it reads no file and decides nothing about what changed.
Where inotify is unavailable (or out of watches) it raises OSError and watch.py falls back.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF = 0x400, 0x800
IN_Q_OVERFLOW, IN_IGNORED, IN_ONLYDIR, IN_ISDIR = 0x4000, 0x8000, 0x1000000, 0x40000000
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
ENTRIES = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_ATTRIB | IN_CLOSE_WRITE
TREE = ENTRIES | IN_MODIFY | IN_DELETE_SELF | IN_MOVE_SELF
HEADER = struct.Struct("iIII")
MAX_DIRS = 10_000  # directories watched below one root: a pathological tree cannot exhaust the watches
QUIET = 0.002  # seconds without a new event that end a burst once no file is still being written
WRITING = IN_CREATE | IN_MODIFY  # a file opened for writing and not closed yet: the burst goes on
DONE = IN_CLOSE_WRITE | IN_DELETE | IN_MOVED_FROM  # ... until it is closed, removed or renamed away


@dataclass(frozen=True)
class Event:
    path: Path  # the watched dir joined with the name, or the dir itself
    mask: int


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if not hasattr(libc, "inotify_init1"):
        raise OSError("inotify is not available on this system")
    return libc


class Inotify:
    """One inotify fd and its watches; the caller reads it when the loop says it is readable."""

    def __init__(self) -> None:
        self._libc = _libc()
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.fd: int = fd
        self.dirs: dict[int, Path] = {}  # watch descriptor -> the directory it watches
        self.overflowed = False

    def add(self, path: Path, mask: int) -> int:
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask | IN_ONLYDIR)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
        self.dirs[wd] = path
        return int(wd)

    def add_tree(self, root: Path, mask: int = TREE) -> None:
        """root and every directory below it (symlinks not followed, like the loader's walk).
        A subdirectory that vanished or cannot be read is skipped: the loader reports it."""
        self.add(root, mask)
        count = 0
        for dirpath, dirnames, _ in os.walk(root, followlinks=False):
            for d in dirnames:
                count += 1
                if count > MAX_DIRS:
                    return
                try:
                    self.add(Path(dirpath, d), mask)
                except FileNotFoundError:
                    continue
                except PermissionError:
                    continue

    def read(self) -> list[Event]:
        """Every queued event (none if there is nothing to read)."""
        events: list[Event] = []
        while True:
            try:
                data = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                return events
            if not data:
                return events
            offset = 0
            while offset + HEADER.size <= len(data):
                wd, mask, _, size = HEADER.unpack_from(data, offset)
                name = data[offset + HEADER.size:offset + HEADER.size + size].rstrip(b"\0")
                offset += HEADER.size + size
                if mask & IN_Q_OVERFLOW:
                    self.overflowed = True  # events were lost: the caller treats it as a change
                    continue
                base = self.dirs.get(wd)
                if base is None:
                    continue
                if mask & IN_IGNORED:
                    self.dirs.pop(wd, None)  # the directory is gone: the kernel dropped its watch
                events.append(Event(base / os.fsdecode(name) if name else base, mask))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _still_writing(events: list[Event]) -> bool:
    """A file created or modified in this burst and not closed since (a write in chunks, or
    an editor's save in place): reading it now would see half of it."""
    open_: set[Path] = set()
    for e in events:
        if e.mask & IN_ISDIR:
            continue
        if e.mask & DONE:
            open_.discard(e.path)
        elif e.mask & WRITING:
            open_.add(e.path)
    return bool(open_)


async def bursts(ino: Inotify, stop: asyncio.Event, *others: asyncio.Event,
                 debounce: float) -> AsyncIterator[list[Event]]:
    """Yields the events of each burst: it ends after QUIET seconds without a new event once
    every file written in it was closed again, or after `debounce` seconds at most. Returns
    when stop (or another event given) is set. Nothing runs between bursts: the loop wakes
    only when the fd becomes readable."""
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    loop.add_reader(ino.fd, ready.set)
    try:
        while True:
            waiters = [asyncio.ensure_future(e.wait()) for e in (ready, stop, *others)]
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
            if stop.is_set() or any(e.is_set() for e in others):
                return
            events: list[Event] = []
            deadline = loop.time() + debounce
            while True:
                ready.clear()
                events.extend(ino.read())
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    await asyncio.wait_for(ready.wait(), left if _still_writing(events) else min(QUIET, left))
                except TimeoutError:
                    break
            ready.clear()
            events.extend(ino.read())
            if events or ino.overflowed:
                yield events
    finally:
        loop.remove_reader(ino.fd)
