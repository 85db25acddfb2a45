"""Exits and recovery: hearing that an instance's process ended, and finding our processes
again after a controller restart (adoption, recovery by marker, the orphan sweep).

Runtime layer. A pidfd per instance wakes the loop when its main process exits; the exit is
recorded once every process of the instance is gone (remnants of its group are killed first).
After a restart, recorded instances are adopted by pid + start time + marker env; processes
the store does not know (a crash between spawn and store write, a lost store) are found by
their AGENTCTL_CONTROLLER_ID / AGENTCTL_INSTANCE marker. Never writes status.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal as signals
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from controller import logfiles, opsview, procfs, records, redact
from controller.clock import TimeSource
from controller.model import Handle, InstanceRecord, RunState
from controller.runtime.calls import Caller
from controller.runtime.host import Host
from controller.runtime.queue import WorkQueue
from controller.runtime.table import AgentState, AgentTable
from controller.supervisors.base import ExitStatus, Supervisor

log = logging.getLogger("agentctl")
LOG_TAIL_LINES = 20
SWEEP_DELAY = 1.0  # seconds after an exit before the orphan sweep


class ExitWatcher(Protocol):
    def watch(self, instance_id: str, handle: Handle, on_exit: Callable[[str], None]) -> bool:
        """Call on_exit(instance_id) once the main process exits; False if it is gone already."""

    def unwatch(self, instance_id: str) -> None: ...

    def watching(self, instance_id: str) -> bool: ...


class PidfdWatcher:
    """pidfd_open + the event loop's reader: a crash is heard in microseconds, nothing polls."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}

    def watch(self, instance_id: str, handle: Handle, on_exit: Callable[[str], None]) -> bool:
        try:
            fd = os.pidfd_open(handle.pid)
        except ProcessLookupError:
            return False
        self.fds[instance_id] = fd
        asyncio.get_running_loop().add_reader(fd, on_exit, instance_id)
        return True

    def unwatch(self, instance_id: str) -> None:
        fd = self.fds.pop(instance_id, None)
        if fd is not None:
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)

    def watching(self, instance_id: str) -> bool:
        return instance_id in self.fds


class Exits:
    def __init__(self, table: AgentTable, queue: WorkQueue, supervisors: dict[str, Supervisor], *,
                 clock: TimeSource, host: Host, call: Caller, watcher: ExitWatcher, log_dir: Path,
                 controller_id: str, later: Callable[[float, Callable[[], None]], Any] | None = None,
                 offload: Callable[..., Awaitable[Any]] = asyncio.to_thread) -> None:
        self.table = table
        self.queue = queue
        self.supervisors = supervisors
        self.clock = clock
        self.host = host
        self.call = call
        self.watcher = watcher
        self.log_dir = log_dir
        self.controller_id = controller_id
        # timers and off-loop work go through these two, so the simulation can run them on its clock
        self.later = later or (lambda delay, fn: asyncio.get_running_loop().call_later(delay, fn))
        self.offload = offload
        self.remnants: dict[str, ExitStatus] = {}  # leader gone, group members still alive
        self.run_secrets: dict[str, tuple[str, ...]] = {}  # env values of each instance's current run
        self.tasks: set[asyncio.Task[None]] = set()
        self.background: set[asyncio.Task[None]] = set()  # sweeps: not part of quiet()
        self.locks: dict[str, asyncio.Lock] = {}  # shared with the loop: one per agent
        self.starting: set[str] = set()  # instance ids whose start is under way (the executor's own set)
        self.on_finished: list[Callable[[InstanceRecord], None]] = []
        self.stopping = False
        self._sweep_handle: Any = None  # what `later` returned: has cancel()

    def log_path(self, instance_id: str) -> Path:
        return self.log_dir / f"{instance_id}.log"

    # -- hearing exits -------------------------------------------------------
    def watch(self, instance_id: str, handle: Handle) -> None:
        if not self.watcher.watch(instance_id, handle, self._spawn_exit):
            self._spawn_exit(instance_id)

    def unwatch(self, instance_id: str) -> None:
        self.watcher.unwatch(instance_id)

    def _spawn_exit(self, instance_id: str) -> None:
        self.watcher.unwatch(instance_id)
        task = asyncio.get_running_loop().create_task(self._on_exit(instance_id))
        self.tasks.add(task)
        task.add_done_callback(self._exit_done)

    def _exit_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("exit handling failed: %r", task.exception())
        self.queue.wake()  # an idle loop waiting with no timer must see that quiet() may hold now

    async def _on_exit(self, instance_id: str) -> None:
        rec = self.table.instances.get(instance_id)
        if rec is None:
            return
        async with self.locks.setdefault(rec.agent, asyncio.Lock()):
            rec = self.table.instances.get(instance_id)
            if rec is None or rec.handle is None or rec.state == RunState.EXITED:
                return
            sup = self.supervisors[rec.supervisor]
            status = await self.call(sup, sup.exit_status, rec.handle)
            if await self.call(sup, sup.alive, rec.handle):
                # the leader is gone, so the instance is over; what is left of its group dies with it
                self.remnants[instance_id] = status
                await self.call(sup, sup.signal, rec.handle, signals.SIGKILL)
                self.queue.mark(rec.agent)
                return
            await self.finish(instance_id, status)

    async def check(self, name: str) -> None:
        """Before planning an agent: rewatch what we stopped hearing, finish emptied remnants."""
        mine = self.table.of(name)
        for rec in mine.values():
            if rec.state != RunState.EXITED and rec.handle is not None and not self.watcher.watching(rec.id) \
                    and rec.id not in self.remnants:
                self.watch(rec.id, rec.handle)  # drift: an exit we did not hear of is heard now
        for iid in [i for i in mine if i in self.remnants]:
            rec = self.table.instances[iid]
            sup = self.supervisors[rec.supervisor]
            if rec.handle is not None and await self.call(sup, sup.alive, rec.handle):
                await self.call(sup, sup.signal, rec.handle, signals.SIGKILL)
                continue
            await self.finish(iid, self.remnants.pop(iid))
        for rec in [r for r in self.table.of(name).values() if r.killed and r.handle]:
            sup = self.supervisors[rec.supervisor]
            if rec.handle and not await self.call(sup, sup.alive, rec.handle):
                await self.finish(rec.id, ExitStatus(None, int(signals.SIGKILL)))

    def pending(self, name: str) -> bool:
        """Something of the agent must be looked at again soon (remnants, a kill in flight)."""
        return any(i in self.remnants for i in self.table.by_agent.get(name, ())) or \
            any(r.killed for r in self.table.of(name).values())

    async def finish(self, instance_id: str, status: ExitStatus) -> None:
        """Every process of the instance is gone: record the exit (CONTRACT §4 lastExit)."""
        rec = self.table.instances[instance_id]
        code = None if status.code is None else int(status.code)  # plain ints in status files
        sig = None if status.signal is None else int(status.signal)
        self.watcher.unwatch(instance_id)
        self.remnants.pop(instance_id, None)
        sup = self.supervisors.get(rec.supervisor)
        if sup is not None and rec.handle is not None:
            await self.call(sup, sup.cleanup, rec.handle)
        tail = tuple(logfiles.tail_lines(self.log_path(instance_id), LOG_TAIL_LINES, since=rec.log_offset))
        # the tail never shows a value of the env this run was given, nor of the current spec's (§11)
        agent_now = self.table.agents.get(rec.agent)
        tail = redact.redact_lines(tail, (*self.run_secrets.pop(instance_id, ()), *redact.instance_secrets(
            agent_now.desired.instances if agent_now and agent_now.desired else (), rec.index)))
        done = records.exited(rec, code, sig, mono=self.clock.monotonic(), wall=self.clock.wall(), tail=tail)
        self.table.put(done)
        if code is not None:
            self.table.last_exit_codes[rec.agent] = code
        elif sig is not None:
            # one convention (docs/CONTRACT.md): a signal exit has no exit code; the gauge says -N
            self.table.last_exit_codes[rec.agent] = -sig
        info = done.last_exit
        assert info is not None
        what = opsview.exit_word(code, sig)  # Exited(3) | Signaled(SIGTERM) | Exited(unknown)
        log.info("%s %s after %.1fs, reason %s", instance_id, what, info.runtime_seconds, info.reason,
                 extra=opsview.logfields(rec.agent, instance_id, "exit", info.reason))
        self.table.event(rec.agent, instance_id, "Exited", info.reason, f"{what} after {info.runtime_seconds:.1f}s")
        self.queue.mark(rec.agent)
        self.request_sweep()
        for hook in self.on_finished:
            hook(done)

    # -- the orphan sweep ----------------------------------------------------
    def request_sweep(self) -> None:
        """Soon after an exit, kill what escaped the instance's process group (at most once a second)."""
        if self._sweep_handle is not None or self.stopping:
            return
        self._sweep_handle = self.later(SWEEP_DELAY, self._sweep_now)

    def _sweep_now(self) -> None:
        self._sweep_handle = None
        task = asyncio.get_running_loop().create_task(self._sweep_soon())
        self.background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self.background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed: %r", task.exception())

    async def _sweep_soon(self) -> None:
        """The /proc scan (every process's environ) runs in a worker thread; the kills in the loop."""
        marked: list[procfs.Marked] = await self.offload(self.host.marked, self.controller_id)
        self.sweep(marked)

    def sweep(self, marked: list[procfs.Marked]) -> None:
        """Marked processes of no live run: leftovers that escaped their group (setsid), also of an
        earlier run of an instance that has since restarted."""
        live = {r.id: r for r in self.table.instances.values() if r.state != RunState.EXITED and r.handle is not None}
        deferred = False
        for m in marked:
            rec = live.get(m.instance)
            if rec is not None and (not rec.run_id or not m.run or m.run == rec.run_id):
                continue  # a process of the instance's current run (records from before run ids: all spared)
            if m.instance in self.remnants or m.instance in self.starting:
                deferred = True  # its start is under way (in a worker thread): the record is not written yet
                continue
            log.warning("%s orphaned process pid %d (escaped its process group): killing it", m.instance, m.pid)
            self.table.event(m.agent, m.instance, "OrphanKilled", "Sweep", f"pid {m.pid}")
            self.host.kill(m.pid)
        if deferred:
            self.request_sweep()  # what was spared for now is looked at again, never forgotten
        self.prune_cgroups()  # the emptied cgroups of runs that are over go too

    def prune_cgroups(self) -> None:
        """Empty instance cgroups that no live record or in-flight start uses are removed."""
        keep = {r.handle.cgroup for r in self.table.instances.values() if r.handle is not None and r.handle.cgroup}
        self.host.prune_cgroups(self.controller_id, keep=keep, starting=set(self.starting))

    def close(self) -> None:
        self.stopping = True
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        for iid in list(self.table.instances):
            self.watcher.unwatch(iid)

    # -- recovery after a restart --------------------------------------------
    async def adopt_all(self) -> None:
        """Re-attach live recorded instances (same pid and start time), record the rest as Lost."""
        for iid in list(self.table.instances):
            rec = self.table.instances.get(iid)  # read again: an await below may let a request in
            if rec is None or rec.state == RunState.EXITED:
                continue
            if rec.handle is None:
                await self.finish(rec.id, ExitStatus(None, None))  # lost to a reboot
                continue
            sup = self.supervisors.get(rec.supervisor)
            if sup is None:
                continue
            if not self._marker_agrees(rec):
                log.warning("%s pid %d now belongs to another process: not adopted, not signalled",
                            rec.id, rec.handle.pid)
                self.table.put(records.forgotten_handle(rec))
                await self.finish(rec.id, ExitStatus(None, None))
                continue
            adopted = await self.call(sup, sup.adopt, rec.handle)
            rec = self.table.instances[iid]  # as it is now, after the await (a restart may have been asked)
            if rec.handle is None:
                continue
            if adopted:
                log.info("%s adopted pid %d", rec.id, rec.handle.pid)
                self.table.event(rec.agent, rec.id, "Adopted", "ControllerRestart", f"pid {rec.handle.pid}")
                self.watch(rec.id, rec.handle)
                continue
            # the main process is gone. Its process group id may since name a stranger's group: nothing
            # is signalled by group; what is left of ours carries our marker and is killed by pid
            # (recover_unrecorded, right after the manifests are loaded)
            self.table.put(records.forgotten_handle(rec))
            await self.finish(rec.id, ExitStatus(None, None))

    def _marker_agrees(self, rec: InstanceRecord) -> bool:
        """The recorded process must carry this instance's marker: a record naming a stranger (forged,
        corrupt, or from a reused pid) is never adopted. An agent that exec's with a cleared
        environment therefore cannot be adopted after a controller restart."""
        assert rec.handle is not None
        marker = self.host.marker_of(rec.handle.pid)
        if marker is None:
            return True  # gone, or not ours to read: pid and start ticks decide
        return marker == (rec.id, self.controller_id)

    def recover_unrecorded(self, desired_argv: Callable[[str], tuple[str, ...] | None]) -> None:
        """Marked processes of instances the store shows as not running (a crash between spawn and
        store write, a lost store): the oldest group leader running the instance's argv is adopted,
        its descendants are left to it, anything else is an orphan and is killed. Needs the manifests
        loaded. Instances recorded as running are left alone: their other processes are their own."""
        by_instance: dict[str, list[procfs.Marked]] = {}
        for m in self.host.marked(self.controller_id):
            by_instance.setdefault(m.instance, []).append(m)
        for instance, procs in by_instance.items():
            rec = self.table.instances.get(instance)
            if rec is not None and rec.state != RunState.EXITED and rec.handle is not None:
                continue
            if any(self.host.in_tmux_pane(m) for m in procs):
                continue  # a tmux pane: its session is the tmux adapter's to find
            argv = desired_argv(instance)
            mains = [m for m in sorted(procs, key=lambda m: m.stat.start_ticks)
                     if _is_leader(m) and (argv == () or runs_argv(self.host.cmdline(m.pid), argv))]
            main = mains[0] if mains else None
            if main is not None:
                self._adopt_marked(main, rec)
            for m in procs:
                if main is not None and (m.pid == main.pid or self.host.descends_from(m.pid, main.pid)):
                    continue
                log.warning("%s orphaned process pid %d: killing it", instance or "?", m.pid)
                self.table.event(m.agent, instance, "OrphanKilled", "Recovered", f"pid {m.pid}")
                self.host.kill(m.pid)
        self.prune_cgroups()  # cgroups of runs that died while no controller ran

    def _adopt_marked(self, m: procfs.Marked, rec: InstanceRecord | None) -> None:
        tail = m.instance.rsplit("-", 1)[-1]
        index = int(tail) if tail.isdigit() else 0
        started_mono = m.stat.start_ticks / procfs.CLK_TCK  # both count from boot
        started_wall = self.clock.wall() - (self.clock.monotonic() - started_mono)
        handle = Handle(pid=m.pid, pgid=m.pid, start_ticks=m.stat.start_ticks, cgroup=m.cgroup)
        base = rec or InstanceRecord(id=m.instance, agent=m.agent, index=index, supervisor="process",
                                     spec_hash=m.spec_hash, state=RunState.RUNNING)
        self.table.put(records.recovered(base, handle, spec_hash=m.spec_hash, run_id=m.run,
                                         started_mono=started_mono, started_wall=started_wall))
        if m.agent not in self.table.agents:
            self.table.agents[m.agent] = AgentState(m.agent, "", self.clock.wall(), present=False)
        log.warning("%s recovered unrecorded process pid %d by its marker", m.instance, m.pid)
        self.table.event(m.agent, m.instance, "Adopted", "Recovered", f"pid {m.pid} found by its marker env")
        self.watch(m.instance, handle)


def _is_leader(m: procfs.Marked) -> bool:
    return m.stat.pgid == m.pid and m.instance != ""


def runs_argv(cmdline: tuple[str, ...] | None, argv: tuple[str, ...] | None) -> bool:
    """Does a process run this argv? Interpreters (shebangs, pyenv shims) may prepend their own
    words and rewrite argv[0], so: the same arguments at the end, argv[0]'s basename before them."""
    if not cmdline or not argv:
        return False
    rest = argv[1:]
    if rest and tuple(cmdline[-len(rest):]) != rest:
        return False
    head = cmdline[: len(cmdline) - len(rest)]
    return any(os.path.basename(word) == os.path.basename(argv[0]) for word in head)
