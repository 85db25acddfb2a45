"""The work queue: which agent names need a reconcile, when, and the wake-up of the loop.

Runtime layer, owned by the loop. It knows names and deadlines, never what an agent is: a
file event, a child exit, a timer or a request only marks a name dirty (level-based).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable


class WorkQueue:
    def __init__(self) -> None:
        self.dirty: set[str] = set()
        self.timers: dict[str, float] = {}  # name -> monotonic deadline
        self._wake: asyncio.Event | None = None

    def bind(self) -> asyncio.Event:
        """Create the wake-up event on the running loop (once the loop exists)."""
        self._wake = asyncio.Event()
        return self._wake

    def event(self) -> asyncio.Event:
        """The wake-up event, created on the running loop if the loop has none yet."""
        return self._wake if self._wake is not None else self.bind()

    def mark(self, name: str) -> None:
        self.dirty.add(name)
        self.wake()

    def mark_all(self, names: Iterable[str]) -> None:
        self.dirty.update(names)
        self.wake()

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def at(self, name: str, deadline: float) -> None:
        """Reconcile name again at deadline (replaces an earlier timer of it)."""
        self.timers[name] = deadline

    def at_most(self, name: str, deadline: float) -> None:
        """Reconcile name no later than deadline (keeps an earlier timer)."""
        self.timers[name] = min(self.timers.get(name, float("inf")), deadline)

    def forget(self, name: str) -> None:
        self.timers.pop(name, None)
        self.dirty.discard(name)

    def due(self, now: float) -> None:
        for name, at in list(self.timers.items()):
            if at <= now:
                del self.timers[name]
                self.dirty.add(name)

    def next_timeout(self, now: float) -> float | None:
        return max(0.0, min(self.timers.values()) - now) if self.timers else None

    def take(self, order: Callable[[str], tuple[float, str]]) -> list[str]:
        """Every dirty name, in order; the set is empty afterwards."""
        names = sorted(self.dirty, key=order)
        self.dirty.clear()
        return names
