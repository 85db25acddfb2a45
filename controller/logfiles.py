"""Instance log files: tail, escape-code stripping, size-based rotation.

Agents write their log directly (O_APPEND), so that they outlive the controller without a
broken pipe; rotation is therefore copy-then-truncate, scheduled by controller/logrotate.py.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# CSI and OSC sequences, other two-byte escapes, and stray control characters except \t and \n
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[ -/]*[0-~]|[\x00-\x08\x0b-\x1f\x7f]")


def strip_escapes(text: str) -> str:
    # a carriage return redraws the line: keep what was drawn last
    lines = []
    for line in text.split("\n"):
        if "\r" in line:
            parts = [p for p in line.split("\r") if p]
            line = parts[-1] if parts else ""
        lines.append(ANSI.sub("", line))
    return "\n".join(lines)


def tail_bytes(path: Path, max_bytes: int = 64 * 1024) -> bytes:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            return fh.read()
    except OSError:
        return b""


def size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def tail_lines(path: Path, n: int, *, raw: bool = False, since: int = 0) -> list[str]:
    """The last n lines; with `since`, only of what was written after that offset (a log
    rotated in between, i.e. now shorter than `since`, is read from its start)."""
    if n <= 0:
        return []
    want = max(64 * 1024, n * 512)
    current = size(path)
    if 0 < since <= current:
        want = min(want, current - since)
    data = tail_bytes(path, want).decode("utf-8", errors="replace") if want > 0 else ""
    text = data if raw else strip_escapes(data)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines[-n:]


def rotate_if_needed(path: Path, max_bytes: int, backups: int) -> bool:
    """Copy-truncate rotation: <log>.1 .. <log>.N beside the log. True if it rotated."""
    try:
        size = path.stat().st_size
    except OSError:
        return False
    if size <= max_bytes:
        return False
    if backups > 0:
        for i in range(backups - 1, 0, -1):
            older = path.with_name(f"{path.name}.{i}")
            if older.exists():
                os.replace(older, path.with_name(f"{path.name}.{i + 1}"))
        target = path.with_name(f"{path.name}.1")
        with open(path, "rb") as src, open(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as dst:
            # up to what was there plus maxBytes: a writer faster than the copy cannot keep it going
            left = size + max_bytes
            while left > 0 and (chunk := src.read(min(left, 1024 * 1024))):
                dst.write(chunk)
                left -= len(chunk)
    os.truncate(path, 0)
    return True
