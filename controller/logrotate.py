"""Size-based rotation of instance logs: when to look at each log, and the copy off the loop.

Runtime layer, started by `health_loop` beside the reconcile loop. Each log is looked at
again as soon as its measured write rate could fill what is left below maxBytes, so the files
stay within about (backups + 1) x maxBytes plus one check interval of output; the copy itself
runs in a worker thread (asyncio.to_thread). It never stops, starts or signals an instance.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from controller import logfiles
from controller.model import InstanceRecord, RunState
from controller.reconciler import Controller

log = logging.getLogger("agentctl.health")
MIN_CHECK = 0.02  # the most often one log is looked at (a stat): bounds the overshoot to rate x 20 ms
FIRST_CHECK = 0.1  # a new log: learn its rate soon
QUIET_CHECK = 10.0  # the least often: a quiet agent may start to flood at any time (a stat per log)
IDLE_WAKE = 1.0  # with nothing due, look for new instances this often
RATE_HALF_LIFE = 5.0  # seconds: how fast a writer that went quiet stops being treated as fast
# A log due within this share of its interval is looked at now, with the ones that are due:
# looking early is always safe (a stat), and logs started a few ms apart then share one wake-up
# instead of each waking the loop (and scanning every instance) on its own (idle CPU).
EARLY = 0.25


@dataclass
class _Log:
    next_at: float
    path: str  # the log file, as a string: a look is one stat, no Path objects (idle CPU at 1000 logs)
    size: int = 0
    at: float = 0.0
    rate: float | None = None  # bytes per second, measured between looks (decaying, see _look)
    wait: float = FIRST_CHECK  # the last interval between looks
    spec: object = None  # the DesiredAgent and the run's spec hash the limits below were read from
    spec_hash: str | None = None
    limits: tuple[int, int] | None = None


@dataclass
class Rotator:
    """The per-instance schedule; `check` is one pass over every log that is due."""

    controller: Controller
    logs: dict[str, _Log] = field(default_factory=dict)

    def _limits(self, rec: InstanceRecord, state: _Log) -> tuple[int, int] | None:
        """(maxBytes, backups) of the spec the instance runs, None while it runs an older one;
        read again only when the agent's desired spec or the run's spec hash changed."""
        agent = self.controller.agents.get(rec.agent)
        desired = agent.desired if agent is not None else None
        if desired is not state.spec or rec.spec_hash != state.spec_hash:
            state.spec, state.spec_hash = desired, rec.spec_hash
            if desired is None or desired.spec_hash != rec.spec_hash:
                state.limits = None
            else:
                state.limits = desired.spec.logs.max_bytes, desired.spec.logs.backups
        return state.limits

    async def check(self, now: float) -> float:
        """Rotate what is over its limit; returns seconds until the next log is due."""
        live = {r.id: r for r in self.controller.instances.values()
                if r.state == RunState.RUNNING and r.handle is not None}
        for gone in set(self.logs) - set(live):
            del self.logs[gone]
        for iid, rec in live.items():
            state = self.logs.get(iid)
            if state is None:
                state = self.logs[iid] = _Log(next_at=now, path=str(self.controller.log_path(iid)))
            if state.next_at > now + state.wait * EARLY:
                continue
            limits = self._limits(rec, state)
            if limits is None:
                continue
            await self._look(iid, state, *limits, now)
        due = [s.next_at for s in self.logs.values()]
        return max(MIN_CHECK, min(due, default=now + IDLE_WAKE) - time.monotonic())

    async def _look(self, iid: str, state: _Log, max_bytes: int, backups: int, now: float) -> None:
        path = state.path
        try:
            size = os.stat(path).st_size
        except OSError:
            size = 0  # not written yet (or gone): as logfiles.size says
        if state.at and size >= state.size:
            # a bursty writer (2 MiB at once, then a quiet second) must not look quiet between
            # bursts: the estimate is the measured rate or the last one decayed, whichever is higher
            elapsed = max(now - state.at, 1e-3)
            decayed = (state.rate or 0.0) * 0.5 ** (elapsed / RATE_HALF_LIFE)
            state.rate = max((size - state.size) / elapsed, decayed)
        if size > max_bytes:
            if state.rate is None:  # over the limit at the first look: assume it got there fast
                state.rate = size / FIRST_CHECK
            try:
                # the copy of up to maxBytes and more: never on the event loop
                await asyncio.to_thread(logfiles.rotate_if_needed, Path(path), max_bytes, backups)
                log.info("%s log rotated (over %d bytes)", iid, max_bytes)
            except OSError as exc:
                log.error("%s log rotation failed: %s", iid, exc)
            size = 0  # what came in during the copy is counted at the next look
        now = time.monotonic()
        state.size, state.at = size, now
        state.wait = self._wait(state.rate, max(0, max_bytes - size), state.wait)
        state.next_at = now + state.wait

    @staticmethod
    def _wait(rate: float | None, headroom: int, last: float) -> float:
        """Half the time the estimated rate needs to fill the headroom, within [MIN, QUIET];
        a log that never grew is looked at less and less often, never suddenly rarely."""
        if rate is None:
            return FIRST_CHECK
        if rate <= 0:
            return min(max(last, FIRST_CHECK) * 2, QUIET_CHECK)
        return min(max(headroom / rate / 2, MIN_CHECK), QUIET_CHECK)


async def rotation_loop(controller: Controller, stop: asyncio.Event) -> None:
    rotator = Rotator(controller)
    while not stop.is_set():
        try:
            wait = await rotator.check(time.monotonic())
        except Exception as exc:  # noqa: BLE001 - a failed pass is logged; rotation goes on
            log.error("log rotation pass failed: %r", exc)
            wait = IDLE_WAKE
        try:
            await asyncio.wait_for(stop.wait(), wait)
        except TimeoutError:
            pass
