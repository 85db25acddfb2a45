"""Instance logs: escape codes removed for people, tails, and rotation that keeps exactly N backups."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from controller.logfiles import rotate_if_needed, strip_escapes, tail_lines


@pytest.mark.parametrize(("raw", "clean"), [
    ("\x1b[31mred\x1b[0m plain", "red plain"),
    ("\x1b[1;38;5;208mbold orange\x1b[m", "bold orange"),
    ("\x1b[2J\x1b[Hcleared", "cleared"),
    ("\x1b[?25lhidden cursor\x1b[?25h", "hidden cursor"),
    ("\x1b]0;window title\x07prompt$ ", "prompt$ "),
    ("\x1b]8;;http://example.com\x1b\\link\x1b]8;;\x1b\\", "link"),
    ("progress 10%\rprogress 55%\rprogress 100%", "progress 100%"),
    ("windows line\r", "windows line"),
    ("\x1b[32m10%\x1b[0m\r\x1b[2K\x1b[32mdone\x1b[0m", "done"),
    ("bell\x07 and backspace\x08", "bell and backspace"),
    ("tabs\tstay", "tabs\tstay"),
    ("two\nlines\r\n", "two\nlines\n"),
    ("unicode ✓ stays", "unicode ✓ stays"),
])
def test_strip_escapes_keeps_what_a_person_would_read(raw: str, clean: str) -> None:
    assert strip_escapes(raw) == clean


@pytest.mark.parametrize(("raw", "clean"), [
    ("\x1b[1mbold\x1b(B\x1b[m normal", "bold normal"),  # what `tput sgr0` prints for xterm
    ("\x1b7saved cursor\x1b8", "saved cursor"),
    ("\x1b=keypad mode\x1b>", "keypad mode"),
    ("\x1bcafter reset", "after reset"),
], ids=["charset-designation", "save-restore-cursor", "keypad-mode", "full-reset"])
def test_strip_escapes_removes_every_escape_sequence_shape(raw: str, clean: str) -> None:
    assert strip_escapes(raw) == clean


def write_log(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "reviewer-0.log"
    path.write_bytes(text.encode())
    return path


def test_tail_returns_the_last_n_lines_without_escape_codes(tmp_path: Path) -> None:
    path = write_log(tmp_path, "".join(f"\x1b[33mline {i}\x1b[0m\n" for i in range(100)))
    assert tail_lines(path, 3) == ["line 97", "line 98", "line 99"]
    assert tail_lines(path, 2, raw=True) == ["\x1b[33mline 98\x1b[0m", "\x1b[33mline 99\x1b[0m"]


def test_tail_includes_an_unterminated_last_line(tmp_path: Path) -> None:
    assert tail_lines(write_log(tmp_path, "a\nb\npartial"), 2) == ["b", "partial"]


def test_tail_of_a_short_missing_or_empty_log(tmp_path: Path) -> None:
    assert tail_lines(write_log(tmp_path, "only\n"), 10) == ["only"]
    assert tail_lines(tmp_path / "missing.log", 10) == []
    assert tail_lines(write_log(tmp_path, ""), 10) == []
    assert tail_lines(write_log(tmp_path, "x\n"), 0) == []


def test_tail_survives_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bin.log"
    path.write_bytes(b"ok\n\xff\xfe broken\n")
    assert tail_lines(path, 2) == ["ok", "\ufffd\ufffd broken"]


def test_tail_of_a_huge_log_reads_only_its_end(tmp_path: Path) -> None:
    path = write_log(tmp_path, "x" * 5_000_000 + "\nlast\n")
    assert tail_lines(path, 1) == ["last"]


def rotate_n_times(path: Path, times: int, backups: int) -> None:
    for i in range(1, times + 1):
        path.write_text(f"generation {i}\n" + "x" * 2000)
        assert rotate_if_needed(path, 1024, backups)


def test_rotation_keeps_exactly_n_backups_newest_first(tmp_path: Path) -> None:
    log = tmp_path / "reviewer-0.log"
    rotate_n_times(log, 6, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "reviewer-0.log", "reviewer-0.log.1", "reviewer-0.log.2", "reviewer-0.log.3"]
    assert [(tmp_path / f"reviewer-0.log.{i}").read_text().splitlines()[0] for i in (1, 2, 3)] == [
        "generation 6", "generation 5", "generation 4"]
    assert log.stat().st_size == 0


def test_rotated_backups_are_private(tmp_path: Path) -> None:
    log = tmp_path / "reviewer-0.log"
    rotate_n_times(log, 1, 2)
    assert stat.S_IMODE((tmp_path / "reviewer-0.log.1").stat().st_mode) == 0o600


def test_rotation_with_zero_backups_only_truncates(tmp_path: Path) -> None:
    log = tmp_path / "reviewer-0.log"
    rotate_n_times(log, 2, 0)
    assert [p.name for p in tmp_path.iterdir()] == ["reviewer-0.log"] and log.stat().st_size == 0


def test_log_within_its_limit_is_left_alone(tmp_path: Path) -> None:
    log = write_log(tmp_path, "x" * 1024)
    assert not rotate_if_needed(log, 1024, 3)
    assert log.stat().st_size == 1024 and [p.name for p in tmp_path.iterdir()] == ["reviewer-0.log"]
    assert not rotate_if_needed(tmp_path / "missing.log", 1024, 3)


def test_rotation_keeps_the_same_file_so_an_appending_agent_keeps_writing_to_it(tmp_path: Path) -> None:
    log = write_log(tmp_path, "y" * 4096)
    inode = log.stat().st_ino
    with open(log, "ab") as agent_fd:
        assert rotate_if_needed(log, 1024, 1)
        agent_fd.write(b"after rotation\n")
    assert log.stat().st_ino == inode
    assert log.read_bytes() == b"after rotation\n"
    assert (tmp_path / "reviewer-0.log.1").read_bytes() == b"y" * 4096


def test_a_log_is_looked_at_as_often_as_its_write_rate_requires() -> None:
    from controller.logrotate import FIRST_CHECK, MIN_CHECK, QUIET_CHECK, Rotator

    wait = Rotator._wait
    assert wait(None, 10 << 20, FIRST_CHECK) == FIRST_CHECK  # no rate yet: learn it soon
    assert wait(50 << 20, 10 << 20, FIRST_CHECK) == pytest.approx(0.1)  # half the time to fill the headroom
    assert wait(50 << 20, 0, FIRST_CHECK) == MIN_CHECK  # at the limit: as often as allowed
    assert wait(10, 10 << 20, FIRST_CHECK) == QUIET_CHECK  # a trickle: seldom, but never more than QUIET
    # a log that stopped growing is looked at less and less often, not suddenly every QUIET seconds
    assert wait(0.0, 10 << 20, MIN_CHECK) == 2 * FIRST_CHECK
    assert wait(0.0, 10 << 20, QUIET_CHECK) == QUIET_CHECK
