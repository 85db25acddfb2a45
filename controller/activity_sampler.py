"""Samples the activity of running provider instances (CONTRACT §9) for status, metrics, logIdle.

Runtime layer, driven from health.py's loop: every SAMPLE_EVERY seconds it captures the
screen of each tmux instance of a provider agent (off the loop thread, a few at a time) and
classifies it (activity.py). It writes only `controller.activity`, marking an agent dirty
when one of its instances changes activity; it never stops or starts anything itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from controller.activity import QUIET, Activity, Observation, Reading, classify, has_profile
from controller.model import InstanceRecord
from controller.supervisors.base import SupervisorError
from controller.supervisors.tmux import TmuxSupervisor, capture

if TYPE_CHECKING:
    from controller.reconciler import Controller

log = logging.getLogger("agentctl.activity")
SAMPLE_EVERY = 2.0  # a person waiting is seen within this; a capture costs one tmux call (~2 ms)
MAX_IN_FLIGHT = 4  # captures at once: hundreds of sessions never flood tmux or the thread pool
MAX_CAPTURES_PER_SECOND = 20.0  # beyond 40 sessions each is looked at less often (200: every 10 s)
MAX_PERIOD = 5.0


@dataclass
class Track:
    """What the sampler knows of one run of one instance."""

    run: float  # started_mono of the run
    next_at: float
    progress: float  # monotonic: last screen change that was not noise, or last time seen quiet
    reading: Reading | None = None
    task: asyncio.Task[None] | None = None


@dataclass
class ActivitySampler:
    controller: Controller
    tracks: dict[str, Track] = field(default_factory=dict)

    def round(self, live: list[InstanceRecord], now: float) -> float:
        """Start the captures that are due; seconds until the next one is."""
        wait = MAX_PERIOD
        in_flight = sum(1 for t in self.tracks.values() if t.task is not None)
        period = max(SAMPLE_EVERY, len(self.tracks) / MAX_CAPTURES_PER_SECOND)
        for rec in live:
            provider = self._provider(rec)
            if provider is None:
                continue
            track = self._track(rec, provider, now)
            if rec.supervisor != "tmux" or not has_profile(provider):
                continue  # no screen to read (headless) or no patterns: Unknown, logIdle reads the log
            if track.task is None and now >= track.next_at and in_flight < MAX_IN_FLIGHT:
                track.next_at = now + period
                track.task = asyncio.get_running_loop().create_task(self._sample(rec, track, provider))
                in_flight += 1
            wait = min(wait, max(track.next_at - now, 0.05))
        self._forget({r.id for r in live})
        return wait

    def last_output(self, rec: InstanceRecord, log_last: float, now: float) -> float | None:
        """For logIdle, in the caller's clock (`now`): when the instance last showed progress.

        None while it is Idle or WaitingForInput (silence is expected: never idle-killed). For a
        sampled screen, progress is a screen change beyond counters and spinners, so a session
        whose only output is a ticking timer ("Reconnecting... 24s") is silent. Otherwise the log.
        """
        track = self.tracks.get(rec.id)
        if track is None or track.run != rec.started_mono or track.reading is None:
            return log_last
        if track.reading.activity in QUIET:
            return None
        return now - (time.monotonic() - track.progress)

    def _provider(self, rec: InstanceRecord) -> str | None:
        agent = self.controller.agents.get(rec.agent)
        if agent is None or agent.desired is None or agent.desired.spec_hash != rec.spec_hash:
            return None
        provider: str | None = agent.desired.spec.provider
        return provider

    def _track(self, rec: InstanceRecord, provider: str, now: float) -> Track:
        track = self.tracks.get(rec.id)
        if track is None or track.run != rec.started_mono:
            track = self.tracks[rec.id] = Track(rec.started_mono, now, progress=now)
            # every running provider instance reports an activity: Unknown until a screen says more
            why = "NoScreen" if rec.supervisor != "tmux" else "NotSampled" if has_profile(provider) else "NoPatterns"
            self._publish(rec, Activity.UNKNOWN, why)
        return track

    async def _sample(self, rec: InstanceRecord, track: Track, provider: str) -> None:
        try:
            sup = self.controller.supervisors.get("tmux")
            if not isinstance(sup, TmuxSupervisor) or rec.handle is None:
                return
            try:
                screen = await asyncio.to_thread(capture, sup.ctx, rec.handle, False)
            except SupervisorError:
                return  # the session just ended: its exit is handled elsewhere
            if self.tracks.get(rec.id) is track:
                self._apply(rec, track, classify(screen, provider), time.monotonic())
        except Exception as exc:  # noqa: BLE001 - one failed sample is logged, sampling goes on
            log.error("%s activity sample failed: %r", rec.id, exc)
        finally:
            track.task = None

    def _apply(self, rec: InstanceRecord, track: Track, reading: Reading, now: float) -> None:
        before = track.reading
        if before is None or before.fingerprint != reading.fingerprint or reading.activity in QUIET:
            track.progress = now
        track.reading = reading
        shown = self.controller.activity.get(rec.id)
        if shown is None or (shown.activity, shown.reason) != (reading.activity, reading.reason):
            was = shown.activity.value if shown else "-"
            log.info("%s activity %s -> %s (%s)", rec.id, was, reading.activity.value, reading.reason)
            self._publish(rec, reading.activity, reading.reason)

    def _publish(self, rec: InstanceRecord, activity: Activity, reason: str) -> None:
        self.controller.activity[rec.id] = Observation(rec.started_mono, activity, reason, time.time())
        self.controller.mark(rec.agent)  # its status (and the metric) show the change

    def _forget(self, live: set[str]) -> None:
        for iid in [i for i in self.tracks if i not in live]:
            self.tracks.pop(iid)  # a capture still in flight finds its track gone and does nothing
        for iid in [i for i in self.controller.activity if i not in live]:
            self.controller.activity.pop(iid)

    async def cancel(self) -> None:
        tasks = [t.task for t in self.tracks.values() if t.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
