"""logIdleSeconds measures silence on the monotonic clock (CONTRACT §11 "Time").

The clocks are injected: the monotonic one is a number the test advances, the wall clock
is stepped by an hour (time.time patched, the log's mtime set an hour off, as a clock step
leaves it), and neither step may make a quiet-but-recent agent look idle.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from controller.activity_sampler import ActivitySampler
from controller.health import Health, IdleClock
from controller.model import InstanceRecord, RunState


class FakeController:
    """What Health._log_idle uses of the controller: the log path and request_stop."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.stops: list[tuple[str, str, str]] = []

    def log_path(self, instance_id: str) -> Path:
        return self.log

    def request_stop(self, instance_id: str, reason: str, message: str) -> None:
        self.stops.append((instance_id, reason, message))


def record(started_mono: float, log_offset: int = 0) -> InstanceRecord:
    return InstanceRecord(id="quiet-0", agent="quiet", index=0, supervisor="process", spec_hash="h",
                          state=RunState.RUNNING, started_at=1_000.0, started_mono=started_mono, log_offset=log_offset)


def health_on(log: Path) -> tuple[Health, FakeController]:
    fake = FakeController(log)
    health = Health.__new__(Health)  # only the idle clock and the controller are used here
    health.controller = fake  # type: ignore[assignment]
    health.idle = IdleClock()
    health.activity = ActivitySampler(fake)  # type: ignore[arg-type]  # no screen sampled: the log decides
    return health, fake


def test_a_wall_clock_step_forward_restarts_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "quiet-0.log"
    log.write_text("started\n")
    health, fake = health_on(log)
    rec = record(started_mono=100.0, log_offset=0)
    assert health._log_idle(rec, 60.0, 101.0) > 0  # wrote at start: silent for ~0 s
    real = time.time()
    monkeypatch.setattr(time, "time", lambda: real + 3600.0)  # the wall clock jumps an hour ahead
    for mono in (110.0, 130.0, 150.0):
        assert health._log_idle(rec, 60.0, mono) > 0
    assert fake.stops == []


def test_an_mtime_an_hour_off_is_output_not_an_hour_of_silence(tmp_path: Path) -> None:
    log = tmp_path / "quiet-0.log"
    log.write_text("started\n")
    health, fake = health_on(log)
    rec = record(started_mono=100.0)
    health._log_idle(rec, 60.0, 101.0)
    hour_ago = time.time() - 3600.0
    os.utime(log, (hour_ago, hour_ago))  # a step backwards as seen on the file
    assert health._log_idle(rec, 60.0, 140.0) == pytest.approx(60.0)  # the change was just seen
    assert fake.stops == []


def test_silence_longer_than_the_limit_on_the_monotonic_clock_fires(tmp_path: Path) -> None:
    log = tmp_path / "quiet-0.log"
    log.write_text("started\n")
    health, fake = health_on(log)
    rec = record(started_mono=100.0)
    health._log_idle(rec, 60.0, 101.0)
    assert health._log_idle(rec, 60.0, 150.0) == pytest.approx(11.0)
    health._log_idle(rec, 60.0, 161.5)
    assert [(i, r) for i, r, _ in fake.stops] == [("quiet-0", "LivenessFailed")]
    assert "no output for 60.5s" in fake.stops[0][2]


def test_output_resets_the_silence(tmp_path: Path) -> None:
    log = tmp_path / "quiet-0.log"
    log.write_text("a\n")
    health, fake = health_on(log)
    rec = record(started_mono=100.0)
    health._log_idle(rec, 60.0, 101.0)
    with log.open("a") as fh:
        fh.write("b\n")
    assert health._log_idle(rec, 60.0, 150.0) == pytest.approx(60.0)
    assert health._log_idle(rec, 60.0, 200.0) == pytest.approx(10.0)
    assert fake.stops == []


def test_a_log_that_did_not_grow_since_the_start_is_silent_since_the_start() -> None:
    clock = IdleClock()
    sig = (1, 8, 5)
    assert clock.silent_for("a-0", run=100.0, seen=sig, size_at_start=8, now=130.0) == 30.0
    assert clock.silent_for("a-0", run=100.0, seen=sig, size_at_start=8, now=170.0) == 70.0


def test_a_new_run_starts_a_new_silence() -> None:
    clock = IdleClock()
    sig = (1, 8, 5)
    clock.silent_for("a-0", run=100.0, seen=sig, size_at_start=8, now=170.0)
    assert clock.silent_for("a-0", run=175.0, seen=sig, size_at_start=8, now=176.0) == 1.0


def test_forgetting_drops_instances_no_longer_live() -> None:
    clock = IdleClock()
    for key in ("a-0", "b-0"):
        clock.silent_for(key, run=1.0, seen=None, size_at_start=0, now=2.0)
    clock.forget_all_but({"b-0"})
    assert set(clock._seen) == {"b-0"}

