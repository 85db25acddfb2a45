"""Value types shared by every layer: phases, exit reasons, instance records, actions.

Pure: no I/O, no clock. Everything here is a frozen value that can be printed and
compared in tests; the reconciler turns them into effects.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum


class Phase(StrEnum):
    PENDING = "Pending"
    STARTING = "Starting"
    RUNNING = "Running"
    BACKOFF = "BackOff"
    STOPPING = "Stopping"
    STOPPED = "Stopped"
    COMPLETED = "Completed"
    FAILED = "Failed"
    SUSPENDED = "Suspended"
    INVALID = "Invalid"


class ExitReason(StrEnum):
    COMPLETED = "Completed"
    ERROR = "Error"
    SIGNALED = "Signaled"
    LIVENESS_FAILED = "LivenessFailed"
    MEMORY_LIMIT_EXCEEDED = "MemoryLimitExceeded"
    SPEC_CHANGED = "SpecChanged"
    MANUAL_RESTART = "ManualRestart"
    MANIFEST_DELETED = "ManifestDeleted"
    LOST = "Lost"
    # Not in the contract's list, which has no word for these intentional stops.
    SUSPENDED = "Suspended"
    SCALED_DOWN = "ScaledDown"
    NOT_PLACED = "NotPlaced"
    CONTROLLER_STOPPED = "ControllerStopped"  # agentctl run --stop-agents-on-exit


# Stops after which the slot is started again at once, without backoff.
RESTART_NOW_REASONS = frozenset(
    {ExitReason.SPEC_CHANGED, ExitReason.MANUAL_RESTART}
)


class RunState(StrEnum):
    """Where one instance slot stands, as recorded in the store."""

    RUNNING = "running"  # a process is (believed) alive
    STOPPING = "stopping"  # stop signal sent, waiting for the group to die
    EXITED = "exited"  # no process; the planner decides what comes next


@dataclass(frozen=True)
class Handle:
    """How a supervisor finds an instance's processes again, also after a controller restart."""

    pid: int
    pgid: int
    start_ticks: int  # /proc/<pid>/stat field 22: tells a reused pid apart
    unit: str = ""  # tmux session or systemd unit name; empty for plain processes
    cgroup: str = ""  # adapters: the instance's own cgroup (CONTRACT §11); empty: tracked by process group


@dataclass(frozen=True)
class ExitInfo:
    exit_code: int | None
    signal: int | None
    at: float  # wall clock
    runtime_seconds: float
    reason: str
    log_tail: tuple[str, ...] = ()
    message: str = ""

    @property
    def failed(self) -> bool:
        return self.reason != ExitReason.COMPLETED


@dataclass(frozen=True)
class InstanceSpec:
    """Everything a supervisor needs to start one instance: computed from a manifest, pure."""

    id: str
    agent: str
    index: int
    supervisor: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    cwd: str
    spec_hash: str

    def with_env(self, *pairs: tuple[str, str]) -> InstanceSpec:
        return replace(self, env=self.env + pairs)


@dataclass(frozen=True)
class InstanceRecord:
    """An instance slot as the store keeps it: the observed half of a reconcile."""

    id: str
    agent: str
    index: int
    supervisor: str
    spec_hash: str
    state: RunState
    handle: Handle | None = None
    started_at: float = 0.0  # wall clock, for people
    started_mono: float = 0.0  # monotonic, for resetAfterSeconds
    restarts: int = 0  # since the current spec was applied
    failures_in_row: int = 0  # n of the backoff formula
    restart_times: tuple[float, ...] = ()  # monotonic, for maxRestarts windows
    last_exit: ExitInfo | None = None
    next_start: float | None = None  # monotonic backoff deadline
    stop_reason: str | None = None
    stop_deadline: float | None = None  # monotonic: SIGKILL when due
    killed: bool = False
    terminal: str | None = None  # "Completed" or "Failed": no restart until the spec changes
    terminal_reason: str = ""  # Completed | Failed | CrashLoop, with terminal_message
    terminal_message: str = ""
    health: str | None = None  # a failed liveness/memory check, waiting to be acted on
    health_message: str = ""
    log_offset: int = 0  # size of the instance log when this run started: its exit tail starts there
    run_id: str = ""  # AGENTCTL_RUN of this run's processes: tells them from an earlier run's leftovers
    # session.resume (CONTRACT §9): our stable id (AGENTCTL_SESSION_ID, status sessionId), kept across
    # restarts until `restart --fresh`; the provider's own id once known (codex); whether a start used it
    session_id: str = ""
    provider_session_id: str = ""
    session_started: bool = False
    argv: tuple[str, ...] = ()  # as executed by this run, after presets and session ids (describe, plan)


@dataclass(frozen=True)
class Start:
    spec: InstanceSpec
    reason: str
    counts_as_restart: bool = False


@dataclass(frozen=True)
class Stop:
    instance: str
    reason: str
    signal: int
    grace: float


@dataclass(frozen=True)
class Kill:
    instance: str


@dataclass(frozen=True)
class Schedule:
    """Exited slot: wait in BackOff until `at`, then start again."""

    instance: str
    at: float
    delay: float
    attempt: int  # n of the backoff formula, kept as failures_in_row


@dataclass(frozen=True)
class Finish:
    """Exited slot that will not be restarted: Completed or Failed."""

    instance: str
    phase: str  # Completed | Failed
    reason: str  # Completed | Failed | CrashLoop
    message: str = ""


@dataclass(frozen=True)
class Forget:
    """Drop the record of a slot that is gone and no longer desired."""

    instance: str


@dataclass(frozen=True)
class Wait:
    """Nothing to do for this slot now; says why (shown by `plan`)."""

    instance: str
    reason: str


Action = Start | Stop | Kill | Schedule | Finish | Forget | Wait


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...] = ()
    requeue_after: float | None = None
    pending_reason: str | None = None  # why a desired slot is not started (HostCapacity...)
    notes: tuple[str, ...] = field(default=())
