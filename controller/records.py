"""Instance record bookkeeping: the next record after a start, an exit, a request or a plan step.

Pure, beside the planner: the runtime decides *when* (it owns the clock and the effects),
these functions decide *what the record becomes*. Restart counts and the crash-loop budget
(failures in a row, restart times) change here and nowhere else.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from controller.model import (
    ExitInfo,
    ExitReason,
    Finish,
    Handle,
    InstanceRecord,
    InstanceSpec,
    RunState,
    Schedule,
    Start,
)

RESTART_TIMES_KEPT = 200


def budget_reset(rec: InstanceRecord) -> InstanceRecord:
    """A person's restart or an edit of the spec: a fresh crash-loop budget."""
    return replace(rec, failures_in_row=0, restart_times=())


def failure_cleared(rec: InstanceRecord) -> InstanceRecord:
    """FAILED/COMPLETED -> restartable: no terminal state, no pending backoff, a fresh budget."""
    return budget_reset(replace(rec, terminal=None, terminal_reason="", terminal_message="", next_start=None))


def started(prev: InstanceRecord | None, spec: InstanceSpec, action: Start, *, mono: float, wall: float,
            log_offset: int, run_id: str) -> InstanceRecord:
    """(none|EXITED) -> RUNNING, before the supervisor is asked: restarts and the budget carry over
    only while the spec stays the same; a person's restart is not one of the automatic ones."""
    same = prev is not None and prev.spec_hash == spec.spec_hash
    kept = prev if same else None
    automatic = action.counts_as_restart and action.reason != ExitReason.MANUAL_RESTART
    times = (kept.restart_times if kept else ()) + ((mono,) if automatic else ())
    return InstanceRecord(
        id=spec.id, agent=spec.agent, index=spec.index, supervisor=spec.supervisor, spec_hash=spec.spec_hash,
        state=RunState.RUNNING, started_at=wall, started_mono=mono,
        restarts=(kept.restarts if kept else 0) + action.counts_as_restart,
        failures_in_row=kept.failures_in_row if kept else 0,
        restart_times=times[-RESTART_TIMES_KEPT:], last_exit=prev.last_exit if prev else None,
        log_offset=log_offset, run_id=run_id,
    )


def restart_counter_reason(prev: InstanceRecord | None, action: Start) -> str | None:
    """Which agentctl_agent_restarts_total{reason} a start bumps: the exit that caused it."""
    if not action.counts_as_restart:
        return None
    return prev.last_exit.reason if prev is not None and prev.last_exit is not None else action.reason


def start_failed(rec: InstanceRecord, message: str, *, wall: float, retryable: bool) -> InstanceRecord:
    """STARTING -> EXITED (code 127, through backoff like a crash) or -> FAILED when trying again
    can never help (the executable does not exist, the cwd left the base dir)."""
    failed = ExitInfo(127, None, wall, 0.0, ExitReason.ERROR, (), message)
    rec = replace(rec, state=RunState.EXITED, handle=None, last_exit=failed)
    if retryable:
        return rec
    return replace(rec, terminal="Failed", terminal_reason="StartFailed", terminal_message=message)


def running(rec: InstanceRecord, handle: Handle) -> InstanceRecord:
    return replace(rec, handle=handle)


def exit_reason(rec: InstanceRecord, code: int | None, signal: int | None) -> str:
    if rec.stop_reason:
        return rec.stop_reason
    if code is None and signal is None:
        return ExitReason.LOST
    if signal is not None:
        return ExitReason.SIGNALED
    return ExitReason.COMPLETED if code == 0 else ExitReason.ERROR


def exited(rec: InstanceRecord, code: int | None, signal: int | None, *, mono: float, wall: float,
           tail: tuple[str, ...]) -> InstanceRecord:
    """RUNNING|STOPPING -> EXITED once no process of the instance lives. The runtime is measured on
    the monotonic clock: a wall-clock step changes no runtime (nor the backoff reset it feeds)."""
    runtime = max(0.0, mono - rec.started_mono) if rec.started_mono else 0.0
    message = rec.health_message if rec.stop_reason is not None and rec.stop_reason == rec.health else ""
    info = ExitInfo(code, signal, wall, runtime, exit_reason(rec, code, signal), tail, message)
    return replace(rec, state=RunState.EXITED, handle=None, last_exit=info, stop_reason=None,
                   stop_deadline=None, killed=False, next_start=None, **_person_request(rec))


def _person_request(rec: InstanceRecord) -> dict[str, Any]:
    """A person's restart not yet acted on outlives the process it was meant for (it crashed, or
    was found dead or replaced after a controller restart): the next run starts because of it.
    A check's request (liveness, memory) dies with the run it was about."""
    if rec.health == ExitReason.MANUAL_RESTART:
        return {"health": rec.health, "health_message": rec.health_message}
    return {"health": None, "health_message": ""}


def restart_requested(rec: InstanceRecord, reason: str, message: str) -> InstanceRecord | None:
    """A liveness failure, a memory limit or a person's restart, for the planner to act on.
    None when there is nothing to do: a request is pending already, or a check fired on a slot
    that has exited (only a person may restart an exited slot)."""
    if rec.health is not None:
        return None
    manual = reason == ExitReason.MANUAL_RESTART
    if rec.state == RunState.EXITED and not manual:
        return None
    if manual:
        rec = failure_cleared(rec) if rec.state == RunState.EXITED else budget_reset(rec)
    return replace(rec, health=str(reason), health_message=message)


def stopping(rec: InstanceRecord, reason: str, deadline: float) -> InstanceRecord:
    """RUNNING -> STOPPING: the signal is on its way, SIGKILL at the deadline."""
    return replace(rec, state=RunState.STOPPING, stop_reason=str(reason), stop_deadline=deadline)


def stopped_without_process(rec: InstanceRecord) -> InstanceRecord:
    return replace(rec, state=RunState.EXITED, handle=None)


def kill_sent(rec: InstanceRecord) -> InstanceRecord:
    return replace(rec, killed=True)


def scheduled(rec: InstanceRecord, action: Schedule) -> InstanceRecord:
    """EXITED -> BACKOFF until action.at."""
    return replace(rec, next_start=action.at, failures_in_row=action.attempt)


def finished(rec: InstanceRecord, action: Finish) -> InstanceRecord:
    """EXITED -> COMPLETED | FAILED: no restart until the spec changes or a person asks."""
    return replace(rec, terminal=str(action.phase), terminal_reason=str(action.reason),
                   terminal_message=action.message)


def recovered(base: InstanceRecord, handle: Handle, *, spec_hash: str, run_id: str, started_mono: float,
              started_wall: float) -> InstanceRecord:
    """A process found by its marker after a crash between spawn and store write: it becomes the
    instance's current run (its own run id, so the orphan sweep never takes it for a leftover)."""
    return replace(base, state=RunState.RUNNING, handle=handle, spec_hash=spec_hash, run_id=run_id,
                   started_at=started_wall, started_mono=started_mono, next_start=None, terminal=None,
                   terminal_reason="", terminal_message="", stop_reason=None, stop_deadline=None,
                   killed=False, **_person_request(base))


def sessions_forgotten(rec: InstanceRecord) -> InstanceRecord:
    """`agentctl restart --fresh`: the next start begins new conversations."""
    return replace(rec, session_id="", provider_session_id="", session_started=False)


def forgotten_handle(rec: InstanceRecord) -> InstanceRecord:
    """The recorded pid is not ours (reused, rebooted, forged): never adopted, never signalled."""
    return replace(rec, handle=None)
