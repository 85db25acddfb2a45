"""The agent and instance table: what the controller knows, written through to the store.

Runtime layer; the one writer of state. Memory is authoritative: a store write that fails is
reported (state_error, `/readyz` 503) and redone with the next change of that row. Nothing
here calls a supervisor or decides an action.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field

from controller.clock import TimeSource
from controller.desired import DesiredAgent
from controller.loader import Loaded
from controller.model import ExitReason, InstanceRecord
from controller.store import AgentRow, Event, Store

log = logging.getLogger("agentctl")


@dataclass
class AgentState:
    """What the controller knows of one agent name, valid or not."""

    name: str
    source: str
    first_seen: float
    desired: DesiredAgent | None = None  # the last valid spec
    present: bool = True  # declared by a manifest on disk now (valid or not)
    valid: bool = True
    errors: list[str] = field(default_factory=list)
    placed: bool = True
    pending_reason: str | None = None
    source_revision: str | None = None
    loaded: Loaded | None = None  # what desired was computed from (identity: unchanged input)

    halted: bool = False  # the controller is stopping and takes its agents with it

    @property
    def target(self) -> DesiredAgent | None:
        """What should run here: nothing once deleted, placed elsewhere, or halted."""
        return self.desired if self.present and self.placed and not self.halted else None

    @property
    def gone_reason(self) -> str:
        if self.halted:
            return ExitReason.CONTROLLER_STOPPED
        return ExitReason.NOT_PLACED if self.present and not self.placed else ExitReason.MANIFEST_DELETED


class AgentTable:
    def __init__(self, store: Store, clock: TimeSource) -> None:
        self.store = store
        self.clock = clock
        self.agents: dict[str, AgentState] = {}
        self.instances: dict[str, InstanceRecord] = {}  # change only through put(), index() and drop()
        self.by_agent: dict[str, set[str]] = {}  # agent -> its instance ids
        self.counters: dict[tuple[str, str], int] = {}
        self.last_exit_codes: dict[str, int] = {}
        self.write_errors = 0  # store writes that failed (disk full, read-only, busy...)
        self.state_error: str | None = None
        # row -> its newest write: since the last good commit, and of those, the ones not yet in the store
        Book = dict[tuple[str, ...], tuple[Callable[[], object], str]]
        self._pending: Book = {}
        self._unsaved: Book = {}

    # -- instances -----------------------------------------------------------
    def of(self, name: str) -> dict[str, InstanceRecord]:
        return {i: self.instances[i] for i in sorted(self.by_agent.get(name, ()))}  # a stable order

    def put(self, rec: InstanceRecord) -> None:
        self.index(rec)
        self._write(("instance", rec.id), lambda: self.store.put_instance(rec), f"state store write for {rec.id}")

    def index(self, rec: InstanceRecord) -> None:
        """Into memory without writing (a record loaded from the store)."""
        self.instances[rec.id] = rec
        self.by_agent.setdefault(rec.agent, set()).add(rec.id)

    def drop(self, instance_id: str) -> InstanceRecord | None:
        rec = self.instances.pop(instance_id, None)
        if rec is not None:
            ids = self.by_agent.get(rec.agent, set())
            ids.discard(instance_id)
            if not ids:
                self.by_agent.pop(rec.agent, None)
            self._write(("instance", instance_id), lambda: self.store.delete_instance(instance_id),
                        f"state store delete of {instance_id}")
        return rec

    # -- agents --------------------------------------------------------------
    def save_agent(self, agent: AgentState) -> None:
        desired = agent.desired
        manifest = desired.manifest.model_dump(by_alias=True, exclude_none=True) if desired else None
        row = AgentRow(agent.name, agent.source, manifest, desired.spec_hash if desired else None,
                       agent.first_seen, agent.source_revision)
        self._write(("agent", agent.name), lambda: self.store.put_agent(row), f"state store write of agent {agent.name}")

    def drop_agent(self, name: str) -> AgentState | None:
        agent = self.agents.pop(name, None)
        for key in [k for k in self.counters if k[0] == name]:
            del self.counters[key]
            self._pending.pop(("counter", *key), None)
            self._unsaved.pop(("counter", *key), None)
        self.last_exit_codes.pop(name, None)
        self._write(("agent", name), lambda: self.store.delete_agent(name), f"state store delete of agent {name}")
        self._write(("counters", name), lambda: self.store.drop_counters(name),
                    f"state store delete of counters of {name}")
        return agent

    def count_restart(self, agent: str, reason: str) -> None:
        key = (agent, reason)
        value = self.counters[key] = self.counters.get(key, 0) + 1
        self._write(("counter", agent, reason), lambda: self.store.set_counter(agent, reason, value),
                    f"state store counter of {agent}")

    def restarts(self, name: str, spec_hash: str | None) -> int:
        return sum(r.restarts for r in self.of(name).values() if r.spec_hash == spec_hash)

    # -- events and commits --------------------------------------------------
    def event(self, agent: str, instance: str | None, kind: str, reason: str, message: str) -> None:
        if self.store.readonly:
            return
        try:
            self.store.add_event(Event(self.clock.wall(), agent, instance, kind, str(reason), message))
        except Exception as exc:  # noqa: BLE001 - an event lost is logged, never fatal
            log.error("cannot record event %s for %s: %s", kind, agent, exc)

    def commit(self) -> bool:
        """Write again what failed, then commit; True once everything is on disk. A commit that
        fails may have lost the whole transaction: what was written since the last good commit
        is written again next time."""
        if self.store.readonly:
            return True
        for key, (write, what) in list(self._unsaved.items()):
            try:
                write()
            except sqlite3.Error as exc:
                self._write_failed(f"{what} failed: {exc}")
                return False
            del self._unsaved[key]
        try:
            saved = self.store.commit() is not False  # False: the store waits to retry a failed commit
        except sqlite3.Error as exc:
            for key, entry in self._pending.items():
                self._unsaved.pop(key, None)
                self._unsaved[key] = entry
            self._write_failed(f"state store commit failed: {exc}")
            return False
        if saved:
            self._pending.clear()
            if self.state_error is not None:
                log.info("state store writes succeed again")
            self.state_error = None
        return saved

    def _write(self, key: tuple[str, ...], write: Callable[[], object], what: str) -> None:
        """Memory is authoritative: a write that fails is kept (the newest per row) and redone."""
        if self.store.readonly:
            return
        for book in (self._pending, self._unsaved):
            book.pop(key, None)  # the newest write of a row goes last: replays keep the order
        self._pending[key] = (write, what)
        if self._unsaved:
            self._unsaved[key] = (write, what)  # earlier writes are waiting: keep the order
            return
        try:
            write()
        except sqlite3.Error as exc:
            self._unsaved[key] = (write, what)
            self._write_failed(f"{what} failed: {exc}")

    def _write_failed(self, message: str) -> None:
        self.write_errors += 1
        if self.state_error != message:
            log.error("%s", message)
        self.state_error = message
