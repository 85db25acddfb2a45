"""Publishing: status files per agent and the immutable snapshot for HTTP and metrics.

Runtime layer. Reads the table, renders status documents (controller.status is pure
rendering plus a writer thread) and swaps in a new Snapshot; it changes no state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from controller.activity import Observation
from controller import opsview
from controller.clock import TimeSource, reading
from controller.model import Handle, RunState
from controller.planner import AgentView, agent_phase
from controller.runtime.table import AgentState, AgentTable
from controller.status import StatusInput, StatusWriter, render


@dataclass(frozen=True)
class Snapshot:
    """Immutable view for the HTTP thread and the metrics collector."""

    statuses: dict[str, dict[str, Any]] = field(default_factory=dict)
    handles: dict[str, tuple[str, Handle]] = field(default_factory=dict)  # instance -> (agent, handle)
    start_times: dict[str, tuple[str, float]] = field(default_factory=dict)  # instance -> (agent, wall)
    counters: dict[tuple[str, str], int] = field(default_factory=dict)
    last_exit_codes: dict[str, int] = field(default_factory=dict)
    manifest_valid: dict[str, bool] = field(default_factory=dict)
    ready: bool = False
    state_error: str | None = None  # store or status writes failing right now
    write_errors: int = 0
    source: tuple[str, str | None, float | None] | None = None  # Git: (url, revision, last sync)
    fleet_error: str | None = None  # etcd unreachable or the lease in doubt: /readyz 503


class Publisher:
    def __init__(self, table: AgentTable, status: StatusWriter, clock: TimeSource) -> None:
        self.table = table
        self.status = status
        self.clock = clock
        self.snapshot = Snapshot()
        self.hooks: list[Callable[[], None]] = []
        self.activity: dict[str, Observation] = {}  # instance -> what its screen shows (activity sampler)
        # a fleet: every instance of the fleet with its host, and FleetReady (CONTRACT §10)
        self.decorate: Callable[[dict[str, Any], dict[str, Any] | None], dict[str, Any]] | None = None

    def agent(self, agent: AgentState, view: AgentView, *, source_ready: tuple[bool, str] | None,
              source_reason: str | None = None) -> None:
        """Render and write one agent's status file (only when it changed)."""
        if not agent.placed and agent.present and not self.table.of(agent.name):
            self.status.remove(agent.name)  # moved elsewhere and nothing of it is left here
            return
        phase = agent_phase(view, ever_valid=agent.desired is not None, pending_reason=agent.pending_reason)
        desired = agent.desired
        spec_hash = desired.spec_hash if desired else None
        doc = render(
            StatusInput(
                name=agent.name, source=agent.source, phase=phase, spec_hash=spec_hash,
                instances=list(view.instances.values()), restarts=self.table.restarts(agent.name, spec_hash),
                errors=agent.errors,
                # a valid agent that carries another file's errors: DuplicateName (CONTRACT §8)
                valid=agent.valid and not agent.errors,
                invalid_reason="DuplicateName" if agent.valid and agent.errors else "InvalidManifest",
                running_spec=opsview.spec_summary(desired) if desired is not None else None,
                labels=dict(desired.manifest.metadata.labels) if desired else {},
                supervisor=desired.spec.supervisor if desired else "process",
                source_revision=agent.source_revision,
                source_ready=source_ready,
                source_reason=source_reason,
                created_at=agent.first_seen,
                activity=self.activity,
            ),
            reading(self.clock),
            self.status.previous(agent.name),
        )
        if self.decorate is not None:
            doc = self.decorate(doc, self.status.previous(agent.name))
        self.status.write(agent.name, doc)

    def remove(self, name: str) -> None:
        self.status.remove(name)

    def snapshot_now(self, *, ready: bool, manifest_valid: dict[str, bool],
                     source: tuple[str, str | None, float | None] | None, fleet_error: str | None = None) -> None:
        """Swap in a new immutable snapshot for the HTTP thread (the store was committed before)."""
        table = self.table
        live = [r for r in table.instances.values() if r.handle is not None and r.state != RunState.EXITED]
        with_records = {r.agent for r in table.instances.values()}
        shown = {n for n, a in table.agents.items() if a.placed or not a.present or n in with_records}
        self.snapshot = Snapshot(
            statuses={n: d for n, d in self.status.docs.items() if n in shown},
            handles={r.id: (r.agent, r.handle) for r in live if r.handle is not None},
            start_times={r.id: (r.agent, r.started_at) for r in live},
            counters=dict(table.counters),
            last_exit_codes=dict(table.last_exit_codes),
            manifest_valid=dict(manifest_valid),
            ready=ready,
            state_error=table.state_error or self.status.last_error,
            write_errors=table.write_errors + self.status.failures,
            source=source,
            fleet_error=fleet_error,
        )
        for hook in self.hooks:
            hook()
