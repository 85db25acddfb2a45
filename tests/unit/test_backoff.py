"""Backoff and crash-loop arithmetic of CONTRACT §3."""

from __future__ import annotations

import pytest

from controller.backoff import delay, next_attempt, restarts_in_window


@pytest.mark.parametrize(("attempt", "expected"), [
    (1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 256.0), (10, 300.0), (11, 300.0),
])
def test_delay_doubles_from_initial_and_is_capped_at_max(attempt: int, expected: float) -> None:
    assert delay(attempt, 1.0, 300.0) == expected


@pytest.mark.parametrize("attempt", [0, -1])
def test_no_delay_before_the_first_restart(attempt: int) -> None:
    assert delay(attempt, 5.0, 300.0) == 0.0


def test_delay_of_a_very_long_crash_loop_stays_at_max_without_overflow() -> None:
    assert delay(10_000, 0.5, 120.0) == 120.0


def test_fractional_and_zero_initial_delays() -> None:
    assert [delay(n, 0.25, 10.0) for n in (1, 2, 3)] == [0.25, 0.5, 1.0]
    assert delay(7, 0.0, 300.0) == 0.0


def test_max_below_initial_wins() -> None:
    assert delay(1, 10.0, 3.0) == 3.0


def test_restarts_in_window_counts_only_recent_restarts() -> None:
    now = 1000.0
    assert restarts_in_window([], now, 60) == 0
    assert restarts_in_window([now - 100, now - 60, now - 59.9, now - 1, now], now, 60) == 3


@pytest.mark.parametrize(("failures", "runtime", "expected"), [
    (0, 1.0, 1), (1, 1.0, 2), (7, 599.0, 8), (7, 600.0, 1), (7, 10_000.0, 1),
])
def test_next_attempt_counts_up_and_resets_after_a_long_run(failures: int, runtime: float, expected: int) -> None:
    assert next_attempt(failures, runtime, 600.0) == expected
