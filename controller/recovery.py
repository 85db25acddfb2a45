"""Finding our processes again after a restart: adoption, recovery by marker, orphan sweep.

Runtime layer, called by the reconciler at startup and on each resync. The store says
which process each instance had; the AGENTCTL_CONTROLLER_ID / AGENTCTL_INSTANCE env marks
every process an instance started, which covers what the store cannot: a crash between
spawn and store write, a store that was lost, and processes that escaped their group.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal as signals
import time
from dataclasses import replace

from controller import cgroups, procfs
from controller.model import Handle, InstanceRecord, RunState
from controller.reconciler import AgentState, Controller
from controller.supervisors.base import ExitStatus

log = logging.getLogger("agentctl")


async def adopt_all(ctl: Controller) -> None:
    """Re-attach live recorded instances (same pid and start time), record the rest as Lost."""
    for rec in list(ctl.instances.values()):
        if rec.state == RunState.EXITED:
            continue
        if rec.handle is None:
            await ctl.finish_exit(rec.id, ExitStatus(None, None))  # lost to a reboot
            continue
        sup = ctl.supervisors.get(rec.supervisor)
        if sup is None:
            continue
        if not _marker_agrees(rec, ctl.controller_id):
            log.warning("%s pid %d now belongs to another process: not adopted, not signalled", rec.id, rec.handle.pid)
            ctl.put(replace(rec, handle=None))
            await ctl.finish_exit(rec.id, ExitStatus(None, None))
            continue
        if await ctl.call(sup, sup.adopt, rec.handle):
            log.info("%s adopted pid %d", rec.id, rec.handle.pid)
            ctl.event(rec.agent, rec.id, "Adopted", "ControllerRestart", f"pid {rec.handle.pid}")
            ctl.watch(rec.id, rec.handle)
            continue
        # the main process is gone. Its process group id may since name a stranger's group: nothing
        # is signalled by group; what is left of ours carries our marker and is killed by pid
        # (recover_unrecorded, right after the manifests are loaded)
        ctl.put(replace(rec, handle=None))
        await ctl.finish_exit(rec.id, ExitStatus(None, None))


def _marker_agrees(rec: InstanceRecord, controller_id: str) -> bool:
    """The recorded process must carry this instance's marker: a record naming a stranger (forged,
    corrupt, or from a reused pid) is never adopted. An agent that exec's with a cleared
    environment therefore cannot be adopted after a controller restart."""
    assert rec.handle is not None
    env = procfs.read_environ(rec.handle.pid)
    if not env:
        return True  # gone, or not ours to read: pid and start ticks decide
    return env.get("AGENTCTL_INSTANCE") == rec.id and env.get("AGENTCTL_CONTROLLER_ID") == controller_id


def _is_leader(m: procfs.Marked) -> bool:
    return m.stat.pgid == m.pid and m.instance != ""


def _desired_argv(ctl: Controller, instance: str) -> tuple[str, ...] | None:
    agent = ctl.agents.get(instance.rsplit("-", 1)[0])
    if agent is None or agent.desired is None:
        return None
    return next((i.argv for i in agent.desired.instances if i.id == instance), None)


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


def recover_unrecorded(ctl: Controller) -> None:
    """Marked processes of instances the store shows as not running (a crash between spawn and
    store write, a lost store): the oldest group leader running the instance's argv is adopted,
    its descendants are left to it, anything else is an orphan and is killed. Needs the manifests
    loaded. Instances recorded as running are left alone: their other processes are their own."""
    by_instance: dict[str, list[procfs.Marked]] = {}
    for m in procfs.marked_processes(ctl.controller_id):
        by_instance.setdefault(m.instance, []).append(m)
    for instance, procs in by_instance.items():
        rec = ctl.instances.get(instance)
        if rec is not None and rec.state != RunState.EXITED and rec.handle is not None:
            continue
        if any(procfs.parent_is_tmux(m.stat) for m in procs):
            continue  # a tmux pane: its session is the tmux adapter's to find
        argv = _desired_argv(ctl, instance)
        mains = [m for m in sorted(procs, key=lambda m: m.stat.start_ticks)
                 if _is_leader(m) and runs_argv(procfs.cmdline(m.pid), argv)]
        main = mains[0] if mains else None
        if main is not None:
            _adopt_marked(ctl, main, rec)
        for m in procs:
            if main is not None and (m.pid == main.pid or procfs.descends_from(m.pid, main.pid)):
                continue
            log.warning("%s orphaned process pid %d: killing it", instance or "?", m.pid)
            ctl.event(m.agent, instance, "OrphanKilled", "Recovered", f"pid {m.pid}")
            _kill(m.pid)
    prune_cgroups(ctl)  # adapters: cgroups of runs that died while no controller ran


def _adopt_marked(ctl: Controller, m: procfs.Marked, rec: InstanceRecord | None) -> None:
    index = int(m.instance.rsplit("-", 1)[1]) if m.instance.rsplit("-", 1)[-1].isdigit() else 0
    started = time.time() - (time.monotonic() - _mono_start(m.stat.start_ticks))
    handle = Handle(pid=m.pid, pgid=m.pid, start_ticks=m.stat.start_ticks, cgroup=m.cgroup)  # adapters: cgroup
    base = rec or InstanceRecord(id=m.instance, agent=m.agent, index=index, supervisor="process",
                                 spec_hash=m.spec_hash, state=RunState.RUNNING)
    ctl.put(InstanceRecord(**{**base.__dict__, "state": RunState.RUNNING, "handle": handle,
                              "spec_hash": m.spec_hash, "started_at": started,
                              "started_mono": _mono_start(m.stat.start_ticks), "next_start": None,
                              "terminal": None, "stop_reason": None, "stop_deadline": None, "killed": False}))
    if m.agent not in ctl.agents:
        ctl.agents[m.agent] = AgentState(m.agent, "", time.time(), present=False)
    log.warning("%s recovered unrecorded process pid %d by its marker", m.instance, m.pid)
    ctl.event(m.agent, m.instance, "Adopted", "Recovered", f"pid {m.pid} found by its marker env")
    ctl.watch(m.instance, handle)


def _mono_start(ticks: int) -> float:
    """A process's start on the monotonic clock (both count from boot)."""
    return ticks / procfs.CLK_TCK


async def sweep_orphans_soon(ctl: Controller) -> None:
    """The /proc scan (every process's environ) runs in a worker thread; the kills in the loop."""
    marked = await asyncio.to_thread(procfs.marked_processes, ctl.controller_id)
    sweep_orphans(ctl, marked)


def sweep_orphans(ctl: Controller, marked: list[procfs.Marked] | None = None) -> None:
    """Marked processes of no live run: leftovers that escaped their group (setsid), also of an
    earlier run of an instance that has since restarted."""
    live = {r.id: r for r in ctl.instances.values() if r.state != RunState.EXITED and r.handle is not None}
    for m in marked if marked is not None else procfs.marked_processes(ctl.controller_id):
        rec = live.get(m.instance)
        if rec is not None and (not rec.run_id or not m.run or m.run == rec.run_id):
            continue  # a process of the instance's current run (records from before run ids: all spared)
        if m.instance in ctl.remnants or m.agent in ctl.tasks:
            continue  # being reconciled right now: a start may be in flight in a worker thread
        log.warning("%s orphaned process pid %d (escaped its process group): killing it", m.instance, m.pid)
        ctl.event(m.agent, m.instance, "OrphanKilled", "Sweep", f"pid {m.pid}")
        _kill(m.pid)
    prune_cgroups(ctl)  # adapters: the emptied cgroups of runs that are over go too


def prune_cgroups(ctl: Controller) -> None:
    """adapters: remove empty instance cgroups that no live record or in-flight start uses."""
    keep = {r.handle.cgroup for r in ctl.instances.values() if r.handle is not None and r.handle.cgroup}
    cgroups.prune(ctl.controller_id, keep=keep, starting=set(ctl.starting))


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signals.SIGKILL)
    except ProcessLookupError:
        pass
