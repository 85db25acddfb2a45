"""Record bookkeeping as tables: what a record becomes after a start, an exit, a request.

controller.records is the one place where restart counts and the crash-loop budget change;
these tests pin each rule a user sees in `restarts`, `lastExit` and the CrashLoop phase.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from controller import records
from controller.model import ExitReason, Finish, Handle, RunState, Schedule, Start
from tests.unit.builders import desired, exited, running

INST = desired().instances[0]
OTHER_SPEC = replace(INST, spec_hash="sha256:other")


def start(prev, action, mono=100.0):  # type: ignore[no-untyped-def]
    return records.started(prev, action.spec, action, mono=mono, wall=5000.0,
                           log_offset=7, run_id="r2")


@pytest.mark.parametrize(("prev_restarts", "same_spec", "counted", "reason", "restarts", "times"), [
    # a crash restart of the same spec counts and spends budget
    (2, True, True, "Restarted", 3, 2),
    # a person's restart counts as a restart but spends no crash-loop budget
    (2, True, True, ExitReason.MANUAL_RESTART, 3, 1),
    # a new spec starts afresh: no restarts, no budget spent
    (2, False, False, ExitReason.SPEC_CHANGED, 0, 0),
    # the first start of a slot
    (0, True, False, "Created", 0, 1),
])
def test_start_carries_counts_only_within_one_spec(prev_restarts: int, same_spec: bool, counted: bool,
                                                   reason: str, restarts: int, times: int) -> None:
    prev = exited(INST if same_spec else OTHER_SPEC)
    prev = replace(prev, restarts=prev_restarts, restart_times=(50.0,))
    rec = start(prev, Start(INST, reason, counted))
    assert rec.state == RunState.RUNNING and rec.handle is None
    assert rec.restarts == restarts
    assert len(rec.restart_times) == times
    assert rec.run_id == "r2" and rec.log_offset == 7 and rec.started_mono == 100.0


def test_restart_counter_names_the_exit_that_caused_it() -> None:
    prev = exited(INST, ExitReason.LIVENESS_FAILED)
    assert records.restart_counter_reason(prev, Start(INST, "Restarted", True)) == ExitReason.LIVENESS_FAILED
    assert records.restart_counter_reason(prev, Start(INST, "Created", False)) is None


def test_runtime_is_measured_on_the_monotonic_clock_not_the_wall_clock() -> None:
    rec = replace(running(INST), started_mono=100.0, started_at=1_000_000.0)
    # the wall clock stepped back an hour meanwhile: the runtime is still 12.5 s
    done = records.exited(rec, 3, None, mono=112.5, wall=1_000_000.0 - 3600, tail=("bye",))
    assert done.last_exit is not None
    assert done.last_exit.runtime_seconds == 12.5
    assert done.last_exit.reason == ExitReason.ERROR and done.state == RunState.EXITED and done.handle is None


@pytest.mark.parametrize(("code", "signal", "stop_reason", "reason"), [
    (0, None, None, ExitReason.COMPLETED),
    (2, None, None, ExitReason.ERROR),
    (None, 9, None, ExitReason.SIGNALED),
    (None, None, None, ExitReason.LOST),
    (None, 15, ExitReason.SPEC_CHANGED, ExitReason.SPEC_CHANGED),
])
def test_exit_reason(code: int | None, signal: int | None, stop_reason: str | None, reason: str) -> None:
    assert records.exit_reason(replace(running(INST), stop_reason=stop_reason), code, signal) == reason


def test_a_start_that_can_never_succeed_is_failed_with_its_reason() -> None:
    base = start(None, Start(INST, "Created"))
    final = records.start_failed(base, "cannot start 'x': No such file or directory", wall=1.0, retryable=False)
    assert final.terminal == "Failed" and final.terminal_reason == "StartFailed"
    assert "No such file" in final.terminal_message
    again = records.start_failed(base, "Resource temporarily unavailable", wall=1.0, retryable=True)
    assert again.terminal is None and again.last_exit is not None and again.last_exit.exit_code == 127


def test_manual_restart_of_a_failed_slot_clears_the_crash_loop() -> None:
    failed = replace(exited(INST), terminal="Failed", terminal_reason="CrashLoop", failures_in_row=4,
                     restart_times=(1.0, 2.0, 3.0), next_start=9.0)
    asked = records.restart_requested(failed, ExitReason.MANUAL_RESTART, "agentctl restart")
    assert asked is not None
    assert (asked.terminal, asked.failures_in_row, asked.restart_times, asked.next_start) == (None, 0, (), None)
    assert asked.health == ExitReason.MANUAL_RESTART


def test_checks_never_restart_an_exited_slot_and_requests_do_not_pile_up() -> None:
    assert records.restart_requested(exited(INST), ExitReason.LIVENESS_FAILED, "probe") is None
    pending = replace(running(INST), health=ExitReason.MEMORY_LIMIT_EXCEEDED)
    assert records.restart_requested(pending, ExitReason.LIVENESS_FAILED, "probe") is None


def test_a_recovered_process_becomes_the_current_run() -> None:
    old = replace(exited(INST), run_id="old", terminal="Failed", next_start=5.0)
    rec = records.recovered(old, Handle(42, 42, 4200), spec_hash=INST.spec_hash, run_id="new", started_mono=90.0,
                            started_wall=10.0)
    assert rec.state == RunState.RUNNING and rec.run_id == "new" and rec.terminal is None and rec.next_start is None


def test_schedule_and_finish() -> None:
    rec = exited(INST)
    assert records.scheduled(rec, Schedule(INST.id, 50.0, 4.0, 3)).next_start == 50.0
    done = records.finished(rec, Finish(INST.id, "Failed", "CrashLoop", "more than 3 restarts"))
    assert (done.terminal, done.terminal_reason) == ("Failed", "CrashLoop")
