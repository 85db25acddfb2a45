"""Backoff and crash-loop arithmetic of CONTRACT §3. Pure."""

from __future__ import annotations

from collections.abc import Iterable


def delay(attempt: int, initial: float, maximum: float) -> float:
    """Delay before restart number `attempt` (1-based) in a row: min(initial * 2^(n-1), max)."""
    if attempt < 1:
        return 0.0
    # cap the exponent: 2**1100 overflows a float, and the max wins long before that
    return min(initial * 2.0 ** min(attempt - 1, 1000), maximum)


def restarts_in_window(times: Iterable[float], now: float, window: float) -> int:
    return sum(1 for t in times if now - t < window)


def next_attempt(failures_in_row: int, runtime: float, reset_after: float) -> int:
    """The n of the next restart: back to 1 once the instance ran resetAfterSeconds."""
    return 1 if runtime >= reset_after else failures_in_row + 1
