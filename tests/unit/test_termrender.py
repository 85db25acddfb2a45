"""Terminal-faithful logs (CONTRACT §9): raw pane output of the real CLIs, rendered as a person saw it.

The fixtures under tests/fixtures/screens are recordings of claude 2.1.332 and codex 0.171.0
in a 200x50 tmux pane: `<name>.log` the raw bytes piped from the pane, `<name>.txt` what
`tmux capture-pane -p` showed at the end of the recording.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from controller import logfiles, termrender

SCREENS = Path(__file__).resolve().parent.parent / "fixtures" / "screens"
# recordings whose capture was taken at the moment the log ends (the others moved on in between)
SAME_MOMENT = ["claude-idle", "claude-retrying", "claude-trust", "codex-reconnecting", "codex-trust"]


def raw(name: str) -> bytes:
    return (SCREENS / f"{name}.log").read_bytes()


def captured(name: str) -> list[str]:
    lines = [line.rstrip() for line in (SCREENS / f"{name}.txt").read_text().splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def test_claude_trust_question_reads_with_its_spaces() -> None:
    text = "\n".join(termrender.render(raw("claude-trust")))
    assert "Is this a project you created or one you trust?" in text
    assert "Yes, I trust this folder" in text
    # what stripping escapes alone gives: the words claude places with cursor moves glued together
    assert "Isthisaprojectyoucreated" in logfiles.strip_escapes(raw("claude-trust").decode())
    assert "Isthisaprojectyoucreated" not in text


@pytest.mark.parametrize("name", SAME_MOMENT)
def test_the_last_screen_of_a_replayed_log_is_what_tmux_showed(name: str) -> None:
    renderer = termrender.Renderer(200, 50)
    renderer.feed(raw(name))
    renderer.flush()
    assert renderer.screen_rows() == captured(name)


def test_codex_full_screen_ui_becomes_lines_not_one_giant_line() -> None:
    data = raw("codex-reconnecting")
    assert max(len(line) for line in logfiles.strip_escapes(data.decode()).split("\n")) > 1000
    lines = termrender.render(data)
    assert max(len(line) for line in lines) <= 200
    assert any(line.startswith("› write a poem") for line in lines)
    assert any("Reconnecting..." in line for line in lines)


def test_a_counter_redrawn_in_place_leaves_one_line_not_debris() -> None:
    lines = termrender.render(raw("claude-retrying"))
    # the retry line was redrawn every second (attempt 1/10 ... 8/10): only its last state remains
    assert [line for line in lines if "retrying in" in line] == [
        "✻ Connection refused — a firewall or proxy may be blocking it (ECONNREFUSED) · retrying in 2s · attempt 8/10"]


def test_a_spinner_on_one_line_renders_once() -> None:
    frames = b"".join(b"\rWorking " + glyph.encode() for glyph in "|/-\\|/-\\")
    assert termrender.render(b"start\r\n" + frames + b"\r\ndone\r\n") == ["start", "Working \\", "done"]


def test_feeding_in_small_chunks_renders_the_same_as_all_at_once() -> None:
    data = raw("claude-trust") + raw("codex-login")
    renderer = termrender.Renderer(200, 50)
    for i in range(0, len(data), 7):  # splits escape sequences and UTF-8 characters
        renderer.feed(data[i:i + 7])
    assert renderer.finish() == termrender.render(data)


def test_keyboard_protocol_queries_are_not_drawn_as_text() -> None:
    # claude opens with kitty/xterm keyboard queries (CSI < u, CSI > 5 u, CSI ? 2026 $ p)
    assert termrender.render(b"\x1b[<u\x1b[>5u\x1b[>4;2m\x1b[?2026$pWelcome\x1b[9Gto") == ["Welcome to"]


def test_lines_that_scroll_off_are_all_kept_in_order() -> None:
    data = b"".join(f"line {i}\r\n".encode() for i in range(130))
    assert termrender.render(data, columns=40, lines=10) == [f"line {i}" for i in range(130)]


def test_a_screen_wiped_by_a_clear_or_the_alternate_screen_is_kept_once() -> None:
    first = b"\x1b[Hquestion one?\r\n"
    data = first + b"\x1b[2J" + first + b"\x1b[2J" + b"\x1b[?1049h\x1b[Hfull screen\x1b[?1049l" + b"after\r\n"
    # the cursor comes back to where it was before the alternate screen (row 2): "after" is drawn there
    assert termrender.render(data, columns=40, lines=5) == ["question one?", "full screen", "", "after"]


def test_a_ui_that_clears_on_every_tick_gives_each_distinct_screen_once_in_its_last_state() -> None:
    ticks = b"".join(b"\x1b[H\x1b[2J> fix it\r\n" + f"{c} Working ({n}s)".encode() for n, c in enumerate("|/-\\" * 5))
    question = b"\x1b[H\x1b[2JDo you want to proceed?\r\n1. Yes"
    assert termrender.render(ticks + question + b"\x1b[H\x1b[2Jbye", columns=40, lines=5) == [
        "> fix it", "\\ Working (19s)", "Do you want to proceed?", "1. Yes", "bye"]


def test_wide_characters_are_given_once() -> None:
    assert termrender.render("日本語 ok\r\n".encode(), columns=20, lines=3) == ["日本語 ok"]


def test_a_log_of_plain_lines_is_not_taken_for_a_terminal_ui() -> None:
    assert not termrender.looks_like_terminal_ui(b"plain\nlines\n\x1b[31mred\x1b[0m\n")
    assert termrender.looks_like_terminal_ui(raw("claude-trust"))
    assert termrender.looks_like_terminal_ui(raw("codex-login"))


# -- `logs -f` of a tmux instance ------------------------------------------------------------
def test_follow_prints_new_lines_once_and_the_screen_only_when_output_pauses() -> None:
    from controller.screens import Follower

    printed: list[str] = []
    renderer = termrender.Renderer(40, 4)
    follower = Follower(renderer, [], printed.append)
    follower.feed(b"one\r\ntwo\r\n")
    follower.settle()  # output paused: the screen so far
    assert "".join(printed) == "one\ntwo\n"
    for n in range(5):  # a counter redrawn in place, then a pause
        follower.feed(f"\rworking {n}s".encode())
    assert "".join(printed) == "one\ntwo\n"  # nothing while it ticks
    follower.settle()
    follower.feed(b"\r\nthree\r\nfour\r\nfive\r\n")  # scrolls "one", "two" off: printed already
    follower.settle()
    assert "".join(printed) == "one\ntwo\nworking 4s\nthree\nfour\nfive\n"


def test_output_written_without_a_terminal_keeps_its_lines() -> None:
    # an earlier run under the process supervisor wrote bare "\n"; then a tmux run wrote "\r\n"
    assert termrender.render(b"hello pid=1\ncolored \x1b[31mtext\x1b[0m\n" + b"hello pid=2\r\n") == [
        "hello pid=1", "colored text", "hello pid=2"]
