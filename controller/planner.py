"""The planner: (desired agent, observed instance records, now) -> Plan of actions.

Pure. Called by the reconciler for one agent at a time and by `agentctl plan`. It never
sleeps: every wait (grace period, backoff) is a deadline it returns as `requeue_after`.
Stop comes before start: a restart is a Stop now and a Start once the old instance is gone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from controller import backoff
from controller.desired import DesiredAgent
from controller.model import (
    RESTART_NOW_REASONS,
    Action,
    ExitReason,
    Finish,
    Forget,
    InstanceRecord,
    InstanceSpec,
    Kill,
    Phase,
    Plan,
    RunState,
    Schedule,
    Start,
    Stop,
    Wait,
)


_OUR_OWN_STOPS = frozenset({ExitReason.SUSPENDED, ExitReason.SCALED_DOWN, ExitReason.MANIFEST_DELETED,
                            ExitReason.NOT_PLACED, ExitReason.CONTROLLER_STOPPED})


@dataclass(frozen=True)
class AgentView:
    """One agent as the planner sees it."""

    name: str
    desired: DesiredAgent | None  # None: not to run here (deleted, not placed)
    instances: Mapping[str, InstanceRecord] = field(default_factory=dict)
    gone_reason: str = ExitReason.MANIFEST_DELETED
    unavailable: str | None = None  # the supervisor cannot run on this host: why
    # defaults for stopping an agent whose manifest is gone (its last valid spec)
    last_signal: int = 15
    last_grace: float = 10.0
    # the manifest is declared but no valid spec of it is known (invalid since before a lost
    # store write): what runs is left alone, never stopped for want of a spec
    hold: bool = False
    operator_suspended: bool = False  # opscli: `agentctl suspend`, an override kept in the state dir


@dataclass
class _Builder:
    now: float
    capacity: int
    actions: list[Action] = field(default_factory=list)
    deadlines: list[float] = field(default_factory=list)
    pending_reason: str | None = None

    def at(self, deadline: float) -> None:
        self.deadlines.append(deadline)

    def plan(self) -> Plan:
        requeue = max(0.0, min(self.deadlines) - self.now) if self.deadlines else None
        return Plan(tuple(self.actions), requeue, self.pending_reason)


def plan_agent(view: AgentView, now: float, *, capacity: int = 1 << 30) -> Plan:
    b = _Builder(now, capacity)
    desired = view.desired
    if desired is None and view.hold:
        # RUNNING stays RUNNING, EXITED stays EXITED: only a valid spec decides what comes next
        b.actions.extend(Wait(rec.id, "InvalidManifest") for rec in view.instances.values())
        return b.plan()
    if desired is None:
        for rec in view.instances.values():
            _retire(b, rec, view.gone_reason, view.last_signal, view.last_grace)
        return b.plan()
    spec = desired.spec
    suspend = spec.suspend or view.operator_suspended  # opscli: the operator's override stops it like spec.suspend
    wanted = {} if suspend else {i.id: i for i in desired.instances}
    signal, grace = desired.stop_signal, spec.stop.grace_period_seconds
    for rec in sorted(view.instances.values(), key=lambda r: -r.index):
        if rec.id not in wanted:
            reason = ExitReason.SUSPENDED if suspend else ExitReason.SCALED_DOWN
            if not suspend and rec.index < spec.replicas:
                reason = ExitReason.NOT_PLACED  # fleet: still wanted, but assigned to another host
            _retire(b, rec, reason, signal, grace)
    for inst in wanted.values():
        _plan_slot(b, view, desired, inst, view.instances.get(inst.id))
    return b.plan()


def _retire(b: _Builder, rec: InstanceRecord, reason: str, signal: int, grace: float) -> None:
    """A slot that should not run: stop it, then forget it once nothing of it lives."""
    if rec.state == RunState.RUNNING:
        # RUNNING -> STOPPING
        b.actions.append(Stop(rec.id, reason, signal, grace))
        b.at(b.now + grace)
    elif rec.state == RunState.STOPPING:
        _stopping(b, rec)
    elif reason == ExitReason.CONTROLLER_STOPPED:
        # EXITED stays recorded: the manifest stands, the next controller starts it again
        b.actions.append(Wait(rec.id, reason))
    else:
        # EXITED -> (gone)
        b.actions.append(Forget(rec.id))


def _stopping(b: _Builder, rec: InstanceRecord) -> None:
    if rec.killed:
        return  # SIGKILL sent; the reconciler rechecks the group until it is empty
    if rec.stop_deadline is not None and b.now >= rec.stop_deadline:
        # STOPPING -> KILLED: grace period over
        b.actions.append(Kill(rec.id))
    elif rec.stop_deadline is not None:
        b.at(rec.stop_deadline)


def _start(b: _Builder, view: AgentView, inst: InstanceSpec, reason: str, *, counted: bool) -> None:
    if view.unavailable is not None:
        b.actions.append(Wait(inst.id, "SupervisorUnavailable"))
        b.pending_reason = "SupervisorUnavailable"
    elif b.capacity <= 0:
        b.actions.append(Wait(inst.id, "HostCapacity"))
        b.pending_reason = "HostCapacity"
    else:
        b.capacity -= 1
        b.actions.append(Start(inst, reason, counted))


def _plan_slot(b: _Builder, view: AgentView, desired: DesiredAgent, inst: InstanceSpec,
               rec: InstanceRecord | None) -> None:
    spec = desired.spec
    if rec is None:
        # (none) -> STARTING
        _start(b, view, inst, "Created", counted=False)
    elif rec.state == RunState.RUNNING:
        if rec.spec_hash != inst.spec_hash and view.unavailable is not None:
            # RUNNING stays: the new spec's supervisor cannot run here, so keep the old one (like an invalid edit)
            b.actions.append(Wait(rec.id, "SupervisorUnavailable"))
            b.pending_reason = "SupervisorUnavailable"
        elif rec.spec_hash != inst.spec_hash:
            # RUNNING -> STOPPING: the process runs an old spec
            b.actions.append(Stop(rec.id, ExitReason.SPEC_CHANGED, desired.stop_signal, spec.stop.grace_period_seconds))
            b.at(b.now + spec.stop.grace_period_seconds)
        elif rec.health is not None:
            # RUNNING -> STOPPING: liveness, memory limit or a person asked for it
            b.actions.append(Stop(rec.id, rec.health, desired.stop_signal, spec.stop.grace_period_seconds))
            b.at(b.now + spec.stop.grace_period_seconds)
        else:
            b.actions.append(Wait(rec.id, "UpToDate"))
    elif rec.state == RunState.STOPPING:
        _stopping(b, rec)
    else:
        _plan_exited(b, view, desired, inst, rec)


def _plan_exited(b: _Builder, view: AgentView, desired: DesiredAgent, inst: InstanceSpec,
                 rec: InstanceRecord) -> None:
    last = rec.last_exit
    if rec.spec_hash != inst.spec_hash:
        # EXITED/BACKOFF/FAILED -> STARTING: a new spec starts afresh, counters reset
        _start(b, view, inst, ExitReason.SPEC_CHANGED, counted=False)
    elif rec.health == ExitReason.MANUAL_RESTART:
        # FAILED/COMPLETED/BACKOFF -> STARTING: a person asked; clears a crash loop
        _start(b, view, inst, ExitReason.MANUAL_RESTART, counted=True)
    elif last is not None and last.reason in RESTART_NOW_REASONS:
        # STOPPED for a restart -> STARTING, no backoff
        _start(b, view, inst, last.reason, counted=last.reason == ExitReason.MANUAL_RESTART)
    elif last is not None and last.reason in _OUR_OWN_STOPS:
        # STOPPED on purpose (suspend, scale down, delete, placement), wanted again -> STARTING
        _start(b, view, inst, "Created", counted=False)
    elif rec.terminal is not None:
        b.actions.append(Wait(rec.id, rec.terminal))
    elif rec.next_start is not None:
        if b.now >= rec.next_start:
            # BACKOFF -> STARTING
            _start(b, view, inst, "BackOffExpired", counted=True)
        else:
            b.actions.append(Wait(rec.id, "BackOff"))
            b.at(rec.next_start)
    else:
        _decide_after_exit(b, view, desired, inst, rec)


def _decide_after_exit(b: _Builder, view: AgentView, desired: DesiredAgent, inst: InstanceSpec,
                       rec: InstanceRecord) -> None:
    """A fresh exit: restartPolicy, maxRestarts and backoff decide what follows (CONTRACT §3)."""
    spec = desired.spec
    failed = rec.last_exit is None or rec.last_exit.failed
    if spec.restart_policy == "Never" or (spec.restart_policy == "OnFailure" and not failed):
        # EXITED -> COMPLETED | FAILED
        phase = Phase.FAILED if failed else Phase.COMPLETED
        b.actions.append(Finish(rec.id, phase, phase))
        return
    limit = spec.max_restarts
    if limit is not None and backoff.restarts_in_window(rec.restart_times, b.now, limit.window_seconds) >= limit.count:
        # EXITED -> FAILED: one more restart would exceed maxRestarts
        message = f"more than {limit.count} restarts within {limit.window_seconds:g}s"
        b.actions.append(Finish(rec.id, Phase.FAILED, "CrashLoop", message))
        return
    runtime = rec.last_exit.runtime_seconds if rec.last_exit else 0.0
    attempt = backoff.next_attempt(rec.failures_in_row, runtime, spec.backoff.reset_after_seconds)
    wait = backoff.delay(attempt, spec.backoff.initial_seconds, spec.backoff.max_seconds)
    if wait <= 0:
        # EXITED -> STARTING at once (initialSeconds: 0)
        b.actions.append(Schedule(rec.id, b.now, 0.0, attempt))
        _start(b, view, inst, "Restarted", counted=True)
    else:
        # EXITED -> BACKOFF
        b.actions.append(Schedule(rec.id, b.now + wait, wait, attempt))
        b.at(b.now + wait)


@dataclass(frozen=True)
class PhaseView:
    phase: Phase
    ready: int
    desired: int
    reason: str  # of the Ready condition
    message: str = ""


def _slot_kind(rec: InstanceRecord | None, spec_hash: str) -> str:
    if rec is None:
        return "absent"
    if rec.state == RunState.RUNNING:
        return "ready" if rec.spec_hash == spec_hash and rec.health is None else "starting"
    if rec.state == RunState.STOPPING:
        return "stopping"
    if rec.terminal is not None and rec.spec_hash == spec_hash:
        return rec.terminal.lower()
    if rec.next_start is not None:
        return "backoff"
    return "starting"


def agent_phase(view: AgentView, *, ever_valid: bool = True, pending_reason: str | None = None) -> PhaseView:
    """The phase users see, from the instance records (CONTRACT §4)."""
    desired = view.desired
    live = [r for r in view.instances.values() if r.state != RunState.EXITED]
    if desired is None:
        if not ever_valid:
            return PhaseView(Phase.INVALID, 0, 0, "InvalidManifest")
        return PhaseView(Phase.STOPPING if live else Phase.STOPPED, 0, 0, view.gone_reason)
    spec = desired.spec
    suspend = spec.suspend or view.operator_suspended  # opscli
    want = 0 if suspend else spec.replicas
    slots = [_slot_kind(view.instances.get(i.id), i.spec_hash) for i in desired.instances[:want]]
    ready = slots.count("ready")
    if suspend:
        why = "SuspendedByOperator" if view.operator_suspended else "Suspended"  # opscli
        return PhaseView(Phase.STOPPING if live else Phase.SUSPENDED, 0, 0, why)
    if want == 0:
        return PhaseView(Phase.STOPPING if live else Phase.STOPPED, 0, 0, "ScaledToZero")
    if "failed" in slots:
        failed = [r for r in view.instances.values() if r.terminal == Phase.FAILED]
        reason = "CrashLoop" if any(r.terminal_reason == "CrashLoop" for r in failed) else "Failed"
        return PhaseView(Phase.FAILED, ready, want, reason, next((r.terminal_message for r in failed if r.terminal_message), ""))
    if all(s == "completed" for s in slots):
        return PhaseView(Phase.COMPLETED, ready, want, "Completed")
    if ready == want or (ready and all(s in ("ready", "completed") for s in slots)):
        # OnFailure: a replica that completed is done, the others running is all there is to run
        return PhaseView(Phase.RUNNING, ready, want, "Running")
    if view.unavailable is not None:
        return PhaseView(Phase.PENDING, ready, want, "SupervisorUnavailable", view.unavailable)
    if "backoff" in slots and not pending_reason:
        return PhaseView(Phase.BACKOFF, ready, want, "BackOff")
    if "stopping" in slots:
        return PhaseView(Phase.STOPPING, ready, want, "Restarting")
    if pending_reason and ("absent" in slots or "backoff" in slots):
        # a slot due to start finds no room (HostCapacity); a backoff slot here has its delay over
        return PhaseView(Phase.PENDING, ready, want, pending_reason)
    if ready or "starting" in slots:
        return PhaseView(Phase.STARTING, ready, want, "Starting")
    return PhaseView(Phase.PENDING, ready, want, pending_reason or "Pending")
