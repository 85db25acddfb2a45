"""The clock seam: monotonic time for deadlines and durations, wall time for people.

Effects layer. The runtime takes a `TimeSource` as a parameter: `SystemClock` in production,
a fake clock that advances only when told in the deterministic simulation (tests/fakes.py).
"""

from __future__ import annotations

import time
from typing import Protocol

from controller.status import Clock


class TimeSource(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never steps: every deadline and duration."""

    def wall(self) -> float:
        """Seconds since the epoch: only timestamps people read."""


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()


def reading(source: TimeSource) -> Clock:
    """Both clocks read together, to turn monotonic deadlines into times people read."""
    return Clock(source.wall(), source.monotonic())
