"""Screens of tmux instances on disk: the last screen kept when a pane goes, and instance
logs replayed through the terminal emulator (CONTRACT §9 `logs`, `capture`).

Effects layer: the tmux adapter calls `save_last_screen` before it ends a session; the CLI
calls the readers. Rendering itself is termrender's; nothing here talks to tmux.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from controller import logfiles, termrender
from controller.supervisors.tmux import WINDOW_SIZE

SUFFIX = ".screen"
WINDOW = (int(WINDOW_SIZE[0]), int(WINDOW_SIZE[1]))  # the emulator must be the pane's size
TAIL_BYTES_PER_LINE = 2048  # --tail N replays this much output per line asked for (at least 256 KiB)
FOLLOW_POLL = 0.2
SETTLE = 0.5  # -f shows the screen once output has paused this long (never each spinner frame)


def last_screen_path(state_dir: Path, instance_id: str) -> Path:
    return state_dir / "logs" / f"{instance_id}{SUFFIX}"


def save_last_screen(path: Path, text: str) -> None:
    """Atomically, mode 0600 (a screen may show anything the agent printed)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def exited_screen(state_dir: Path, doc: dict[str, Any] | None, instance_id: str, raw: bool) -> str | None:
    """The last screen of a tmux instance that is not running now; None if it runs or none was kept."""
    if doc is None or doc.get("supervisor") != "tmux":
        return None
    inst = next((i for i in doc.get("instances") or [] if i.get("id") == instance_id), None)
    if inst is not None and inst.get("pid"):
        return None  # running: its live screen is the answer
    try:
        text = last_screen_path(state_dir, instance_id).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return text if raw else logfiles.strip_escapes(text)


def is_terminal_log(doc: dict[str, Any] | None, path: Path) -> bool:
    """A tmux instance's log, or (agent gone) a log whose bytes only read right when emulated."""
    if doc is not None:
        return doc.get("supervisor") == "tmux"
    return termrender.looks_like_terminal_ui(logfiles.tail_bytes(path, 64 * 1024))


def rendered_lines(path: Path, tail: int | None) -> tuple[list[str], termrender.Renderer, int]:
    """The log as a person saw it (last `tail` lines), the renderer holding its state, and the offset read to."""
    renderer = termrender.Renderer(*WINDOW)
    size = logfiles.size(path)
    start = 0 if tail is None else max(0, size - max(256 * 1024, tail * TAIL_BYTES_PER_LINE))
    try:
        with open(path, "rb") as fh:
            fh.seek(start)
            while chunk := fh.read(1 << 20):
                renderer.feed(chunk)
                start += len(chunk)
    except FileNotFoundError:
        return [], renderer, 0
    lines = renderer.finish()
    if tail is not None:
        lines = lines[-tail:] if tail > 0 else []
    return lines, renderer, start


class Follower:
    """`logs -f` of a tmux instance: final lines as they come, the screen once output pauses."""

    def __init__(self, renderer: termrender.Renderer, shown: list[str], write: Callable[[str], object]) -> None:
        self.renderer = renderer
        self.shown = list(shown)  # screen rows already printed
        self.write = write

    def feed(self, data: bytes) -> None:
        self.renderer.feed(data)
        for line in self.renderer.take():
            if self.shown and self.shown[0] == line:
                self.shown.pop(0)  # printed already, as part of a screen; now it scrolled off
            else:
                self._print([line])
                self.shown = []

    def settle(self) -> None:
        rows = self.renderer.screen_rows()
        same = 0
        while same < min(len(rows), len(self.shown)) and rows[same] == self.shown[same]:
            same += 1
        self._print(rows[same:])
        self.shown = rows

    def _print(self, lines: list[str]) -> None:
        if lines:
            self.write("".join(line + "\n" for line in lines))


def follow(path: Path, offset: int, follower: Follower, flush: Callable[[], None]) -> None:
    """Until interrupted: new output of the log through the emulator (a rotation starts it over)."""
    quiet_since: float | None = None
    while True:
        size = logfiles.size(path)
        if size < offset:  # rotated (copy-truncate)
            offset = 0
        if size > offset:
            with open(path, "rb") as fh:
                fh.seek(offset)
                data = fh.read(size - offset)
            offset += len(data)
            follower.feed(data)
            quiet_since = time.monotonic()
        elif quiet_since is not None and time.monotonic() - quiet_since >= SETTLE:
            follower.settle()
            quiet_since = None
        flush()
        time.sleep(FOLLOW_POLL)
