"""Fakes for speed, never for truth: a simulated world of processes, a supervisor that runs in
it, a clock that moves only when told, a store that commits (or fails) on command.

The deterministic simulation (tests/sim) runs the real reconcile code against these; the e2e
suite proves the same behaviour with real processes. Everything here is deterministic given
the order of calls: pids come from a counter, nothing reads the real clock or /proc.
"""

from __future__ import annotations

import asyncio
import copy
import signal
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller import procfs
from controller.model import Handle, InstanceSpec, InstanceRecord
from controller.store import AgentRow, Event
from controller.supervisors.base import Context, ExitStatus, SupervisorError


class FakeClock:
    """Monotonic and wall time that advance together, only through advance()."""

    def __init__(self, mono: float = 1000.0, wall: float = 1_800_000_000.0) -> None:
        self.mono = mono
        self.wall_offset = wall - mono

    def monotonic(self) -> float:
        return self.mono

    def wall(self) -> float:
        return self.mono + self.wall_offset

    def advance(self, seconds: float) -> None:
        self.mono += seconds

    def step_wall(self, seconds: float) -> None:
        """A wall-clock step (NTP, a person): monotonic time does not move."""
        self.wall_offset += seconds


class FakeTimers:
    """call_later on the fake clock: `later(delay, fn)` runs fn once the clock has passed it."""

    @dataclass
    class Timer:
        due: float
        seq: int
        fn: Callable[[], None]
        cancelled: bool = False

        def cancel(self) -> None:
            self.cancelled = True

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.timers: list[FakeTimers.Timer] = []
        self._seq = 0

    def later(self, delay: float, fn: Callable[[], None]) -> FakeTimers.Timer:
        self._seq += 1
        timer = FakeTimers.Timer(self.clock.monotonic() + delay, self._seq, fn)
        self.timers.append(timer)
        return timer

    def fire_due(self) -> int:
        due = sorted((t for t in self.timers if t.due <= self.clock.monotonic()), key=lambda t: (t.due, t.seq))
        self.timers = [t for t in self.timers if t not in due]
        for t in due:
            if not t.cancelled:
                t.fn()
        return len(due)

    def next_due(self) -> float | None:
        live = [t.due for t in self.timers if not t.cancelled]
        return min(live) if live else None


@dataclass
class FakeProcess:
    pid: int
    pgid: int
    ppid: int
    instance: str
    agent: str
    controller_id: str
    run: str
    spec_hash: str
    argv: tuple[str, ...]
    generation: int  # which controller life started it (its parent, for exit statuses)
    ignores_term: bool = False
    alive: bool = True
    exit_code: int | None = None
    exit_signal: int | None = None
    escapee: bool = False  # left the instance's process group (setsid)
    main: bool = False  # the command's own process, leader of the instance's group

    @property
    def start_ticks(self) -> int:
        return self.pid * 7  # unique per pid: a reused pid never matches


@dataclass
class Behaviour:
    """What the next process started for an instance does, set by the schedule."""

    ignores_term: bool = False
    group_child: bool = False
    escapee: bool = False


class FakeWorld:
    """Every process of every controller life, and who listens for which exit."""

    def __init__(self) -> None:
        self.processes: dict[int, FakeProcess] = {}
        self._next_pid = 100
        self.listeners: dict[int, Callable[[int], None]] = {}  # pid -> on exit (current watcher only)
        self.generation = 0
        self.behaviour: dict[str, Behaviour] = {}  # instance -> what its next start does
        self.start_failures: dict[str, bool] = {}  # instance -> next start fails (retryable?)
        self.starts: list[tuple[str, int]] = []  # (instance, pid), every start ever
        self.attempts: list[tuple[str, int | None]] = []  # every supervisor start call: (instance, pid or None)

    def spawn(self, spec: InstanceSpec) -> FakeProcess:
        env = dict(spec.env)
        self._next_pid += 1
        pid = self._next_pid
        proc = FakeProcess(pid, pid, 1, spec.id, spec.agent, env.get("AGENTCTL_CONTROLLER_ID", ""),
                           env.get("AGENTCTL_RUN", ""), spec.spec_hash, spec.argv, self.generation, main=True)
        how = self.behaviour.pop(spec.id, Behaviour())
        proc.ignores_term = how.ignores_term
        self.processes[pid] = proc
        self.starts.append((spec.id, pid))
        if how.group_child:
            self._child(proc, escapee=False)
        if how.escapee:
            self._child(proc, escapee=True)
        return proc

    def _child(self, parent: FakeProcess, *, escapee: bool) -> FakeProcess:
        self._next_pid += 1
        pid = self._next_pid
        child = copy.copy(parent)
        child.pid, child.ppid, child.main, child.escapee = pid, parent.pid, False, escapee
        child.pgid = pid if escapee else parent.pgid
        self.processes[pid] = child
        return child

    def live(self) -> list[FakeProcess]:
        return [p for p in self.processes.values() if p.alive]

    def group(self, pgid: int) -> list[FakeProcess]:
        return [p for p in self.processes.values() if p.alive and p.pgid == pgid]

    def die(self, proc: FakeProcess, *, code: int | None = None, sig: int | None = None) -> None:
        if not proc.alive:
            return
        proc.alive, proc.exit_code, proc.exit_signal = False, code, sig
        listener = self.listeners.pop(proc.pid, None)
        if listener is not None:
            asyncio.get_running_loop().call_soon(listener, proc.pid)

    def signal_group(self, pgid: int, sig: int) -> None:
        for proc in self.group(pgid):
            if sig == signal.SIGKILL or not proc.ignores_term:
                self.die(proc, sig=sig)

    def crash(self, proc: FakeProcess, code: int = 1) -> None:
        """The command exits on its own; its group members outlive it (the controller kills them)."""
        self.die(proc, code=code)


class FakeWatcher:
    """The exit watcher of one controller life (pidfds die with their process)."""

    def __init__(self, world: FakeWorld) -> None:
        self.world = world
        self.watched: dict[str, int] = {}  # instance -> pid
        self.closed = False

    def watch(self, instance_id: str, handle: Handle, on_exit: Callable[[str], None]) -> bool:
        proc = self.world.processes.get(handle.pid)
        if proc is None or not proc.alive or self.closed:
            return False
        self.watched[instance_id] = handle.pid
        self.world.listeners[handle.pid] = lambda pid, iid=instance_id: self._fire(iid, pid, on_exit)
        return True

    def _fire(self, instance_id: str, pid: int, on_exit: Callable[[str], None]) -> None:
        if not self.closed and self.watched.get(instance_id) == pid:
            on_exit(instance_id)

    def unwatch(self, instance_id: str) -> None:
        pid = self.watched.pop(instance_id, None)
        if pid is not None:
            self.world.listeners.pop(pid, None)

    def watching(self, instance_id: str) -> bool:
        return instance_id in self.watched

    def close(self) -> None:
        """The controller died: nothing it listened for reaches anyone."""
        self.closed = True
        for pid in self.watched.values():
            self.world.listeners.pop(pid, None)
        self.watched.clear()


class FakeSupervisor:
    """A supervisor adapter whose processes live in the FakeWorld."""

    kind = "process"

    def __init__(self, world: FakeWorld, ctx: Context, *, kind: str = "process", blocking: bool = False,
                 unavailable: str | None = None) -> None:
        self.world = world
        self.ctx = ctx
        self.kind = kind
        self.blocking = blocking
        self.unavailable = unavailable

    def unavailable_reason(self) -> str | None:
        return self.unavailable

    def start(self, spec: InstanceSpec, log_path: Path) -> Handle:
        fail = self.world.start_failures.pop(spec.id, None)
        if fail is not None:
            self.world.attempts.append((spec.id, None))
            raise SupervisorError(f"simulated start failure of {spec.id}", retryable=fail)
        if spec.argv and spec.argv[0] == "/nonexistent":
            self.world.attempts.append((spec.id, None))
            raise SupervisorError(f"cannot start {spec.argv[0]!r}: No such file or directory", retryable=False)
        proc = self.world.spawn(spec)
        self.world.attempts.append((spec.id, proc.pid))
        return Handle(pid=proc.pid, pgid=proc.pgid, start_ticks=proc.start_ticks)

    def _leader(self, handle: Handle) -> FakeProcess | None:
        proc = self.world.processes.get(handle.pid)
        return proc if proc is not None and proc.start_ticks == handle.start_ticks else None

    def signal(self, handle: Handle, sig: int) -> None:
        self.world.signal_group(handle.pgid, sig)

    def alive(self, handle: Handle) -> bool:
        leader = self._leader(handle)
        return (leader is not None and leader.alive) or bool(self.world.group(handle.pgid))

    def adopt(self, handle: Handle) -> bool:
        leader = self._leader(handle)
        return leader is not None and leader.alive

    def exit_status(self, handle: Handle) -> ExitStatus:
        leader = self._leader(handle)
        if leader is None or leader.alive or leader.generation != self.world.generation:
            return ExitStatus(None, None)  # not our child: unknown, as for an adopted process
        return ExitStatus(leader.exit_code, leader.exit_signal)

    def cleanup(self, handle: Handle) -> None:
        pass


class FakeHost:
    """What /proc would say about the FakeWorld's processes."""

    def __init__(self, world: FakeWorld) -> None:
        self.world = world

    def boot_id(self) -> str:
        return "sim-boot"

    def marked(self, controller_id: str) -> list[procfs.Marked]:
        return [procfs.Marked(p.pid, procfs.Stat(p.pid, "S", p.ppid, p.pgid, 0, 0, p.start_ticks, 0),
                              p.instance, p.agent, p.spec_hash, p.run)
                for p in self.world.live() if p.controller_id == controller_id]

    def marker_of(self, pid: int) -> tuple[str, str] | None:
        proc = self.world.processes.get(pid)
        return (proc.instance, proc.controller_id) if proc is not None and proc.alive else None

    def cmdline(self, pid: int) -> tuple[str, ...] | None:
        proc = self.world.processes.get(pid)
        return proc.argv if proc is not None and proc.alive else None

    def descends_from(self, pid: int, ancestor: int) -> bool:
        seen = 0
        proc = self.world.processes.get(pid)
        while proc is not None and seen < 64:
            if proc.ppid == ancestor:
                return True
            proc = self.world.processes.get(proc.ppid)
            seen += 1
        return False

    def in_tmux_pane(self, marked: procfs.Marked) -> bool:
        return False

    def prune_cgroups(self, controller_id: str, *, keep: set[str], starting: set[str]) -> None:
        pass

    def kill(self, pid: int) -> None:
        proc = self.world.processes.get(pid)
        if proc is not None:
            self.world.die(proc, sig=signal.SIGKILL)


@dataclass
class StoreData:
    """What a store holds: committed to disk, or pending in a transaction."""

    meta: dict[str, str] = field(default_factory=dict)
    instances: dict[str, InstanceRecord] = field(default_factory=dict)
    agents: dict[str, AgentRow] = field(default_factory=dict)
    counters: dict[tuple[str, str], int] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)

    def copy(self) -> StoreData:
        return StoreData(dict(self.meta), dict(self.instances), dict(self.agents), dict(self.counters),
                         list(self.events[-200:]))


class FakeStore:
    """The Store's interface over StoreData, with failures on command (disk full, busy)."""

    readonly = False
    recovered_from: str | None = None

    def __init__(self, disk: StoreData) -> None:
        self.disk = disk  # shared with the simulation: survives the controller's death
        self.tx = disk.copy()
        self.failing: str | None = None  # "full" or "busy": every write raises
        self.dead = False  # its controller was killed: nothing more reaches the disk

    def _write(self) -> None:
        if self.failing == "full":
            raise sqlite3.OperationalError("database or disk is full")
        if self.failing == "busy":
            raise sqlite3.OperationalError("database is locked")

    def close(self) -> None:
        try:
            self.commit()
        except sqlite3.Error:
            pass

    def commit(self) -> None:
        self._write()
        if self.dead:
            return
        fresh = self.tx.copy()
        self.disk.meta, self.disk.instances, self.disk.agents = fresh.meta, fresh.instances, fresh.agents
        self.disk.counters, self.disk.events = fresh.counters, fresh.events

    def meta(self, key: str) -> str | None:
        return self.tx.meta.get(key)

    def set_meta(self, key: str, value: str) -> None:
        self._write()
        self.tx.meta[key] = value

    def instances(self) -> list[InstanceRecord]:
        return list(self.tx.instances.values())

    def put_instance(self, rec: InstanceRecord) -> None:
        self._write()
        self.tx.instances[rec.id] = rec

    def delete_instance(self, instance_id: str) -> None:
        self._write()
        self.tx.instances.pop(instance_id, None)

    def agents(self) -> dict[str, AgentRow]:
        return dict(self.tx.agents)

    def put_agent(self, row: AgentRow) -> None:
        self._write()
        self.tx.agents[row.name] = row

    def delete_agent(self, name: str) -> None:
        self._write()
        self.tx.agents.pop(name, None)

    def counters(self) -> dict[tuple[str, str], int]:
        return dict(self.tx.counters)

    def bump_counter(self, agent: str, reason: str) -> None:
        self._write()
        self.tx.counters[(agent, reason)] = self.tx.counters.get((agent, reason), 0) + 1

    def set_counter(self, agent: str, reason: str, value: int) -> None:
        self._write()
        self.tx.counters[(agent, reason)] = max(value, self.tx.counters.get((agent, reason), 0))

    def drop_counters(self, agent: str) -> None:
        self._write()
        for key in [k for k in self.tx.counters if k[0] == agent]:
            del self.tx.counters[key]

    def add_event(self, ev: Event) -> None:
        self._write()
        self.tx.events.append(ev)

    def events(self, agent: str, limit: int = 20) -> list[Event]:
        return [e for e in self.tx.events if e.agent == agent][-limit:]


class FakeStatusWriter:
    """The status writer without files or threads: the documents, kept in memory."""

    def __init__(self) -> None:
        self.docs: dict[str, dict[str, Any]] = {}
        self.failures = 0
        self.last_error: str | None = None

    def previous(self, name: str) -> dict[str, Any] | None:
        return self.docs.get(name)

    def write(self, name: str, doc: dict[str, Any]) -> bool:
        self.docs[name] = doc
        return True

    def remove(self, name: str) -> None:
        self.docs.pop(name, None)

    def flush(self, timeout: float = 10.0) -> None:
        pass
