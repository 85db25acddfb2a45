"""Samples the activity of running provider instances (CONTRACT §9) for status, metrics, logIdle.

Runtime layer, driven from health.py's loop: every SAMPLE_EVERY seconds, off the loop thread
and a few at a time, it reads each provider instance's best signal: a headless instance's JSON
events at the end of its log (events.py); an interactive one's hook state (hooks.py) weighed
against its tmux screen (activity.py). It writes only `controller.activity`, marking an agent
dirty when one of its instances changes activity; it never stops or starts anything itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from controller import events, hooks
from controller.activity import QUIET, Activity, Observation, Reading, classify, has_profile
from controller.model import InstanceRecord
from controller.providers import HEADLESS, mode_of
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
    screen: Reading | None = None  # the last screen reading, and since when (wall clock) it shows
    screen_since: float = 0.0
    log_size: int = -1  # of the instance log at the last events reading: unchanged, nothing to parse


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
            provider, source = self._source(rec)
            if provider is None:
                continue
            track = self._track(rec, provider, source, now)
            if source is None:
                continue  # no screen and no events to read: Unknown, logIdle reads the log
            if track.task is None and now >= track.next_at and in_flight < MAX_IN_FLIGHT:
                track.next_at = now + period
                sample = self._sample_events if source == "events" else self._sample
                track.task = asyncio.get_running_loop().create_task(sample(rec, track, provider))
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

    def _source(self, rec: InstanceRecord) -> tuple[str | None, str | None]:
        """The instance's provider and what tells its activity: "events" (headless: its JSON
        events), "screen" (tmux: screen and hooks) or None."""
        agent = self.controller.agents.get(rec.agent)
        if agent is None or agent.desired is None or agent.desired.spec_hash != rec.spec_hash:
            return None, None
        provider: str | None = agent.desired.spec.provider
        if provider is None:
            return None, None
        if mode_of(agent.desired.spec) == HEADLESS and events.has_events(provider):
            return provider, "events"
        return provider, "screen" if rec.supervisor == "tmux" and has_profile(provider) else None

    def _track(self, rec: InstanceRecord, provider: str, source: str | None, now: float) -> Track:
        track = self.tracks.get(rec.id)
        if track is None or track.run != rec.started_mono:
            track = self.tracks[rec.id] = Track(rec.started_mono, now, progress=now)
            # every running provider instance reports an activity: Unknown until a sample says more
            why = "NotSampled" if source else "NoScreen" if rec.supervisor != "tmux" else "NoPatterns"
            self._publish(rec, Activity.UNKNOWN, why)
        return track

    async def _sample(self, rec: InstanceRecord, track: Track, provider: str) -> None:
        try:
            sup = self.controller.supervisors.get("tmux")
            if not isinstance(sup, TmuxSupervisor) or rec.handle is None:
                return
            state = hooks.state_path(hooks.run_dir(self.controller.log_path(rec.id)), rec.id)
            try:
                screen, hook = await asyncio.to_thread(_capture_and_hook, sup, rec, state)
            except SupervisorError:
                return  # the session just ended: its exit is handled elsewhere
            if self.tracks.get(rec.id) is track:
                self._apply(rec, track, self._weigh(rec, track, classify(screen, provider), hook, provider),
                            time.monotonic())
        except Exception as exc:  # noqa: BLE001 - one failed sample is logged, sampling goes on
            log.error("%s activity sample failed: %r", rec.id, exc)
        finally:
            track.task = None

    def _weigh(self, rec: InstanceRecord, track: Track, screen: Reading, hook: hooks.HookState | None,
               provider: str) -> Reading:
        """A fresh hook state over the screen, except a dialog the screen shows since (hooks.combine)."""
        if track.screen is None or (track.screen.activity, track.screen.reason) != (screen.activity, screen.reason):
            track.screen_since = time.time()
        track.screen = screen
        return hooks.combine(screen, hook, screen_since=track.screen_since, provider=provider,
                             run_started=rec.started_at) or screen

    async def _sample_events(self, rec: InstanceRecord, track: Track, provider: str) -> None:
        try:
            path = self.controller.log_path(rec.id)
            size, tail = await asyncio.to_thread(_log_tail, path, rec.log_offset, seen_size=track.log_size)
            if self.tracks.get(rec.id) is not track or tail is None:
                return  # gone, or the log has not grown since the last look
            track.log_size = size
            reading = events.classify_tail(tail, provider, from_start=size - len(tail) <= rec.log_offset)
            if reading is None and track.reading is None:
                reading = Reading(Activity.UNKNOWN, "NoEvents")
            if reading is not None:
                self._apply(rec, track, reading, time.monotonic())
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


def _capture_and_hook(sup: TmuxSupervisor, rec: InstanceRecord, state: Path) -> tuple[str, hooks.HookState | None]:
    """In a worker thread: the screen, then the hook state (read second, so a hook that ran
    while the screen was captured is not older than the screen reading it answers)."""
    assert rec.handle is not None
    screen = capture(sup.ctx, rec.handle, False)
    return screen, hooks.read_state(state)


def _log_tail(path: Path, offset: int, *, seen_size: int) -> tuple[int, bytes | None]:
    """In a worker thread: the log's size and its last events.TAIL_BYTES of this run (None when
    its size is what it was at the last look: nothing new to parse)."""
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, 2)
            if size == seen_size:
                return size, None
            start = max(offset if offset <= size else 0, size - events.TAIL_BYTES)  # 0: rotated since
            fh.seek(start)
            return size, fh.read(size - start)
    except OSError:
        return seen_size, None
