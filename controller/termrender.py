"""Terminal-faithful text of a tmux instance's raw output (CONTRACT §9 `logs`).

Pure: bytes in, lines out, through the pyte VT100 emulator sized like the pane. `agentctl
logs` calls it for tmux instances; it never reads files nor touches a terminal.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pyte
from pyte.screens import Margins

# Private modes that swap in a fresh (alternate) screen: what was on the old one is a frame.
ALT_SCREEN_MODES = frozenset({47, 1047, 1049})
SAVE_CURSOR_MODE = 1049
ERASE_ALL = (2, 3)
# CSI sequences pyte does not parse and would draw as text (the 'u' of kitty's `CSI < u`, the
# 'p' of DECRQM `CSI ? 2026 $ p`): private markers < = >, or intermediate bytes. Queries and
# keyboard modes, never text, so they are dropped before the emulator sees them.
UNPARSED_CSI = re.compile(rb"\x1b\[(?:[<=>][0-?]*[ -/]*|[0-?]*[ -/]+)[@-~]")
# What changes on every tick of a redraw loop: digits, braille and other spinner glyphs.
NOISE = re.compile(r"[0-9\u2800-\u28ff✻✶✳✢✽·◦•●○◐◑◒◓|/\\-]")
CARRY_MAX = 64  # an escape sequence split across two reads is held back at most this long


def _text(line: Any, columns: int) -> str:
    """One buffer row as a person saw it: wide characters once, no trailing blanks."""
    out: list[str] = []
    skip = False
    for x in range(columns):
        if skip:  # the stub cell right of a wide character
            skip = False
            continue
        char = line[x].data
        skip = pyte.screens.wcwidth(char[0]) == 2 if char else False
        out.append(char)
    return "".join(out).rstrip()


class _Screen(pyte.Screen):
    """A pyte screen that hands every line it loses to `sink`: lines scrolled off the top,
    and the whole screen before it is erased or swapped for the alternate screen."""

    def __init__(self, columns: int, lines: int, sink: Callable[[list[str], bool], None]) -> None:
        self.sink: Callable[[list[str], bool], None] | None = None  # pyte's __init__ resets: nothing to keep yet
        super().__init__(columns, lines)
        self.sink = sink

    def rows(self) -> list[str]:
        rows = [_text(self.buffer[y], self.columns) for y in range(self.lines)]
        while rows and not rows[-1]:
            rows.pop()
        return rows

    def frame(self) -> None:
        """The screen as it stands, before something wipes it."""
        if self.sink is None:
            return
        rows = self.rows()
        if rows:
            self.sink(rows, True)

    def index(self) -> None:
        top, bottom = self.margins or Margins(0, self.lines - 1)
        if self.cursor.y == bottom and top == 0 and self.sink is not None:
            # the top line scrolls off into what would be the terminal's scrollback
            self.sink([_text(self.buffer[0], self.columns)], False)
        super().index()

    def erase_in_display(self, how: int = 0, *args: Any, **kwargs: Any) -> None:
        if how in ERASE_ALL or (how == 0 and self.cursor.y == 0 and self.cursor.x == 0):
            self.frame()
        super().erase_in_display(how, *args, **kwargs)

    def reset(self) -> None:
        self.frame()
        super().reset()

    def set_mode(self, *modes: int, **kwargs: Any) -> None:
        if self._swap(modes, kwargs) and SAVE_CURSOR_MODE in modes:
            self.save_cursor()  # xterm: 1049 saves the cursor on entering the alternate screen
        super().set_mode(*modes, **kwargs)

    def reset_mode(self, *modes: int, **kwargs: Any) -> None:
        if self._swap(modes, kwargs) and SAVE_CURSOR_MODE in modes:
            self.restore_cursor()  # ... and restores it on leaving
        super().reset_mode(*modes, **kwargs)

    def _swap(self, modes: tuple[int, ...], kwargs: dict[str, Any]) -> bool:
        """Entering or leaving the alternate screen: the old screen is a frame, the new one blank."""
        if not (kwargs.get("private") and ALT_SCREEN_MODES.intersection(modes)):
            return False
        self.frame()
        super().erase_in_display(2)
        return True

    def write_process_input(self, data: str) -> None:
        """Answers to terminal queries (device attributes...) go nowhere: this is a replay."""


class Renderer:
    """Feed raw pane output in chunks; `take()` returns the lines that are final by now.

    A line is final once it scrolled off the top or its screen was wiped. A screen wiped
    and redrawn with only counters or spinner glyphs changed (a UI that clears on every
    tick) is one screen, given in its last state: it is held back until a different one comes.
    """

    def __init__(self, columns: int = 200, lines: int = 50) -> None:
        self._out: list[str] = []
        self._pending: list[str] | None = None  # the last wiped screen, until one unlike it comes
        self._carry = b""
        self.screen = _Screen(columns, lines, self._sink)
        # a bare LF starts a new line: a pty turns "\n" into "\r\n" (onlcr) for line-oriented
        # programs, and a log may hold output written without a terminal (an earlier run under
        # the process supervisor); the TUIs we replay (claude, codex) never send a bare LF
        self.screen.set_mode(pyte.modes.LNM)
        self.stream = pyte.ByteStream(self.screen)

    def _sink(self, rows: list[str], frame: bool) -> None:
        if frame and self._pending is not None and _gist(self._pending) == _gist(rows):
            self._pending = rows  # the same screen a tick later
            return
        self._emit_pending()
        if frame:
            self._pending = rows
        else:
            self._out.extend(rows)

    def _emit_pending(self) -> None:
        if self._pending is not None:
            self._out.extend(self._pending)
            self._pending = None

    def feed(self, data: bytes) -> None:
        data = self._carry + data
        cut = data.rfind(b"\x1b")
        # a sequence cut short at the end of this chunk is completed by the next one
        if cut >= 0 and len(data) - cut < CARRY_MAX and not _complete(data[cut:]):
            data, self._carry = data[:cut], data[cut:]
        else:
            self._carry = b""
        self.stream.feed(UNPARSED_CSI.sub(b"", data))

    def flush(self) -> None:
        """The input is over: a sequence held back as incomplete never will be."""
        carry, self._carry = self._carry, b""
        self.stream.feed(UNPARSED_CSI.sub(b"", carry))

    def take(self) -> list[str]:
        """The final lines produced since the last call."""
        out, self._out = self._out, []
        return out

    def screen_rows(self) -> list[str]:
        """What is on the screen now (not final: it may still change)."""
        return self.screen.rows()

    def finish(self) -> list[str]:
        """The input so far is all there is: the final lines, then the screen as it was left."""
        self.flush()
        rows = self.screen_rows()
        if self._pending is not None and _gist(self._pending) == _gist(rows):
            self._pending = None  # the screen left is a later state of the one held back
        self._emit_pending()
        return self.take() + rows


def _gist(rows: list[str]) -> list[str]:
    """A screen without what changes on every tick: counters, spinner and progress glyphs."""
    return [NOISE.sub("", row) for row in rows]


def _complete(tail: bytes) -> bool:
    """An escape sequence that has its final byte (a lone ESC or `ESC [ 1 ;` has not)."""
    if len(tail) < 2:
        return False
    if tail[1:2] != b"[":
        return tail[1:2] != b"]" or b"\x07" in tail or b"\x1b\\" in tail[1:]
    return re.match(rb"\x1b\[[0-?]*[ -/]*[@-~]", tail) is not None


def render(data: bytes, *, columns: int = 200, lines: int = 50) -> list[str]:
    """All of a raw pane log as lines: what scrolled by, each wiped screen, then the last screen."""
    renderer = Renderer(columns, lines)
    renderer.feed(data)
    return renderer.finish()


def looks_like_terminal_ui(data: bytes) -> bool:
    """Cursor addressing or an alternate screen: output that only reads right when emulated."""
    return any(seq in data for seq in (b"\x1b[?1049h", b"\x1b[?47h", b"\x1b[?1047h")) or _cursor_moves(data)


def _cursor_moves(data: bytes) -> bool:
    return re.search(rb"\x1b\[[0-9;]*[ABCDGHf]", data) is not None
