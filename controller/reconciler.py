"""The reconcile loop: load -> desire -> observe -> plan -> execute -> publish, per agent.

Runtime layer. One asyncio loop is the only writer of state. File events, child exits
(pidfd), timers, restart requests and the periodic resync only mark agents dirty; each
dirty agent is then reconciled under its own lock, so one slow agent never holds another.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal as signals
import sqlite3
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from controller import logfiles, procfs, redact
from controller.desired import DesiredAgent, desire, placed_here
from controller.gitsource import GitSource
from controller.loader import Loaded, LoadResult, ManifestSource, resolve_doc
from controller.manifests import AgentManifest, ParsedDocument
from controller.model import (
    ExitInfo,
    ExitReason,
    Finish,
    Forget,
    Handle,
    InstanceRecord,
    Kill,
    Plan,
    RunState,
    Schedule,
    Start,
    Stop,
)
from controller.planner import AgentView, agent_phase, plan_agent
from controller.providers import Preset, merge_presets
from controller.settings import Settings
from controller.status import Clock, StatusInput, StatusWriter, render
from controller.store import AgentRow, Event, Store
from controller.supervisors.base import Context, ExitStatus, Supervisor, SupervisorError
from controller.supervisors.registry import build

log = logging.getLogger("agentctl")
T = TypeVar("T")
LOG_TAIL_LINES = 20
PUBLISH_EVERY = 0.05  # seconds between snapshots for the HTTP thread during a burst


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


def clock() -> Clock:
    return Clock(time.time(), time.monotonic())


class Controller:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state_dir = settings.state_dir
        self.presets: dict[str, Preset] = merge_presets(settings.providers)
        self.source = ManifestSource(settings.manifests, base_dir=settings.base_dir, providers=frozenset(self.presets),
                                     allow_insecure=settings.allow_insecure_manifests)
        self.git: GitSource | None = None
        if settings.git is not None:
            g = settings.git
            self.git = GitSource(g.url, ref=g.ref, path=g.path, workdir=settings.state_dir / "git")
        self.agents: dict[str, AgentState] = {}
        self.instances: dict[str, InstanceRecord] = {}  # change only through put() and drop()
        self.by_agent: dict[str, set[str]] = {}  # agent -> its instance ids
        self.counters: dict[tuple[str, str], int] = {}
        self.last_exit_codes: dict[str, int] = {}
        self.manifest_valid: dict[str, bool] = {}
        self.snapshot = Snapshot()
        self.dirty: set[str] = set()
        self.timers: dict[str, float] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.exit_tasks: set[asyncio.Task[None]] = set()
        self.background: set[asyncio.Task[None]] = set()  # sweeps: not part of quiet()
        self.starting: set[str] = set()  # instance ids whose supervisor start is in flight
        self.pidfds: dict[str, int] = {}
        self.remnants: dict[str, ExitStatus] = {}  # leader gone, group members still alive
        self.run_secrets: dict[str, tuple[str, ...]] = {}  # adapters: env values of each instance's current run
        self.action_failures = 0
        self.write_errors = 0  # store and status writes that failed (disk full, read-only...)
        self.state_error: str | None = None
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._published_at = 0.0
        self._logged_file_errors: set[str] = set()
        self.observe: Callable[[str, float], None] = lambda result, seconds: None  # metrics hook
        self.ready = False
        self.stopping = False
        self.manifests_changed = True
        self.on_publish: list[Callable[[], None]] = []
        self.on_start: list[Callable[[], None]] = []
        self._wake: asyncio.Event | None = None
        self.store: Store | None = None
        self.supervisors: dict[str, Supervisor] = {}
        self.status: StatusWriter | None = None
        self.controller_id = ""

    # -- setup --------------------------------------------------------------
    def open(self) -> None:
        """Create the state dir, open the store, load records. Call once, before run()."""
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        for sub in ("logs", "status", "requests"):
            (self.state_dir / sub).mkdir(mode=0o700, exist_ok=True)
        self.store = Store(self.state_dir / "state.db")
        if self.store.recovered_from:
            log.error("state store was unusable and was moved aside to %s; rebuilding from live processes",
                      self.store.recovered_from)
        self.controller_id = self._controller_id()
        self.store.set_meta("controller_id", self.controller_id)
        self.supervisors = build(Context(self.state_dir, self.controller_id))
        self.status = StatusWriter(self.settings.status_dir)
        self.counters = self.store.counters()
        boot, stored_boot = procfs.boot_id(), self.store.meta("boot_id")
        rebooted = bool(stored_boot) and stored_boot != boot
        for rec in self.store.instances():
            if rebooted and rec.handle is not None:
                rec = replace(rec, handle=None)  # recorded before a reboot: not ours to adopt or signal
            self._index(rec)
        if rebooted:
            log.warning("the host rebooted since the last run: no recorded process is adopted")
        self.store.set_meta("boot_id", boot)
        for row in self.store.agents().values():
            self.agents[row.name] = self._restore_agent(row)
        for rec in self.instances.values():
            if rec.agent not in self.agents:
                self.agents[rec.agent] = AgentState(rec.agent, "", time.time(), present=False)
        self.store.commit()

    def _controller_id(self) -> str:
        """Stable per state dir, kept beside the store too: it marks our processes if the store is lost."""
        assert self.store is not None
        id_file = self.state_dir / "controller.id"
        try:
            from_file = id_file.read_text().strip()
        except OSError:
            from_file = ""
        cid = self.store.meta("controller_id") or from_file or os.urandom(4).hex()
        if from_file != cid:
            from controller.status import atomic_write

            atomic_write(id_file, cid + "\n")
        return cid

    def open_readonly(self) -> None:
        """For `plan`: the same state, read without writing anything."""
        from controller.store import open_readonly

        self.store = open_readonly(self.state_dir)
        self.controller_id = (self.store.meta("controller_id") if self.store else None) or "none"
        self.supervisors = build(Context(self.state_dir, self.controller_id))
        if self.store is not None:
            self.counters = self.store.counters()
            for rec in self.store.instances():
                self._index(rec)
            for row in self.store.agents().values():
                self.agents[row.name] = self._restore_agent(row)
        for rec in self.instances.values():
            if rec.agent not in self.agents:
                self.agents[rec.agent] = AgentState(rec.agent, "", time.time(), present=False)

    def _restore_agent(self, row: AgentRow) -> AgentState:
        """An agent known before the restart, on its last valid spec until the manifests say otherwise."""
        # present until a successful load of the manifests says otherwise (a Git source may not answer yet)
        state = AgentState(row.name, row.source, row.first_seen, present=True, source_revision=row.source_revision)
        if row.manifest is None:
            return state
        try:
            manifest = AgentManifest.model_validate(row.manifest)
            loaded, _ = resolve_doc(ParsedDocument(manifest, 1), self.settings.base_dir, row.source, frozenset(self.presets))
        except ValueError as exc:
            log.warning("stored spec of %s is no longer usable: %s", row.name, exc)
            return state
        if loaded is not None:
            state.desired = self._desire(loaded)
            state.placed = placed_here(manifest, self.settings.host_name, self.settings.host_labels)
        return state

    def _desire(self, loaded: Loaded) -> DesiredAgent:
        return desire(loaded, presets=self.presets, default_env=self.settings.env, log_dir=str(self.settings.log_dir.resolve()))

    # -- manifests ----------------------------------------------------------
    def sync_manifests(self, result: LoadResult | None = None) -> None:
        """Fold a fresh load of the manifests into the agents; mark what changed dirty."""
        if result is None:
            if self.git is not None:
                root = self.git.manifests_root()
                if root is None or not root.is_dir():
                    return  # nothing fetched yet: keep every agent as it is
                self.source.roots = [(root, self.git.display_root())]
            result = self.source.load({n: a.source for n, a in self.agents.items() if a.desired is not None})
        declared: set[str] = set()
        for name, loaded in result.manifests.items():
            declared.add(name)
            self._take_valid(name, loaded)
        errors_by_agent: dict[str, list[str]] = {}
        for err in result.errors:
            if err.agent:
                errors_by_agent.setdefault(err.agent, []).append(str(err))
        self._log_file_errors(result)
        for file in result.broken_files:
            message = "; ".join(str(e) for e in result.errors if e.file == file and not e.agent)
            for name, agent in self.agents.items():
                if agent.source == file and agent.present:
                    errors_by_agent.setdefault(name, []).append(message)
        for name, messages in errors_by_agent.items():
            declared.add(name)
            self._take_invalid(name, result, messages)
        for name, agent in self.agents.items():
            if name not in declared and agent.present:
                agent.present = False
                log.info("%s manifest removed -> stopping", name)
                self.event(name, None, "Deleted", ExitReason.MANIFEST_DELETED, f"manifest {agent.source} is gone")
                self.mark(name)
        self.manifest_valid = self._validity(result)

    def _log_file_errors(self, result: LoadResult) -> None:
        """A file whose agent cannot even be named gets a log line (once per distinct error)."""
        current = {str(e) for e in result.errors if not e.agent}
        for message in sorted(current - self._logged_file_errors):
            log.warning("invalid manifest file: %s", message)
        self._logged_file_errors = current

    def _clear_failed(self, name: str) -> None:
        """Any edit of the spec (also of policy fields that restart nothing) ends a Failed crash loop."""
        for rec in self._instances_of(name).values():
            if rec.terminal == "Failed":
                self.put(replace(rec, terminal=None, terminal_reason="", terminal_message="", next_start=None,
                                 failures_in_row=0, restart_times=()))
                self.event(name, rec.id, "Retry", "SpecChanged", "the spec was edited: restarting a Failed instance")

    def _validity(self, result: LoadResult) -> dict[str, bool]:
        valid = {file: True for file in result.names_by_file}
        for err in result.errors:
            valid[err.file] = False
        return valid

    def _take_valid(self, name: str, loaded: Loaded) -> None:
        agent = self.agents.get(name)
        if agent is None:
            agent = self.agents[name] = AgentState(name, loaded.source, time.time())
            self.event(name, None, "Created", "ManifestAdded", f"from {loaded.source}")
        revision = self.git.revision if self.git is not None else None
        if agent.loaded is loaded and agent.valid and agent.present and agent.source_revision == revision:
            return  # the loader's cache says nothing this agent reads has changed
        agent.loaded = loaded
        desired = self._desire(loaded)
        placed = placed_here(loaded.manifest, self.settings.host_name, self.settings.host_labels)
        before = (agent.desired, agent.valid, agent.present, agent.placed, agent.source, agent.source_revision)
        agent.desired, agent.valid, agent.errors, agent.present = desired, True, [], True
        agent.placed, agent.source, agent.source_revision = placed, loaded.source, revision
        if before != (desired, True, True, placed, loaded.source, revision):
            if before[0] is not None and before[0].spec != desired.spec:
                self._clear_failed(name)
            self._save_agent(agent)
            self.mark(name)

    def _take_invalid(self, name: str, result: LoadResult, messages: list[str]) -> None:
        agent = self.agents.get(name)
        if name in result.manifests and agent is not None:
            # a valid document of this name runs; the errors belong to a duplicate elsewhere
            agent.errors = messages
            self.mark(name)
            return
        if agent is None:
            agent = self.agents[name] = AgentState(name, messages[0].split(":", 1)[0], time.time())
        if agent.valid or agent.errors != messages or not agent.present:
            log.warning("%s invalid manifest, keeping the last valid spec: %s", name, messages[0])
            self.event(name, None, "InvalidManifest", "InvalidManifest", messages[0])
        agent.valid, agent.errors, agent.present = False, messages, True
        self.mark(name)

    def _save_agent(self, agent: AgentState) -> None:
        if self.store is None or self.store.readonly:
            return
        manifest = agent.desired.manifest.model_dump(by_alias=True, exclude_none=True) if agent.desired else None
        self.store.put_agent(AgentRow(agent.name, agent.source, manifest,
                                      agent.desired.spec_hash if agent.desired else None,
                                      agent.first_seen, agent.source_revision))

    # -- scheduling -----------------------------------------------------------
    def mark(self, name: str) -> None:
        self.dirty.add(name)
        if self._wake is not None:
            self._wake.set()

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _due_timers(self, now: float) -> None:
        for name, at in list(self.timers.items()):
            if at <= now:
                del self.timers[name]
                self.dirty.add(name)

    def _next_timeout(self, now: float) -> float | None:
        return max(0.0, min(self.timers.values()) - now) if self.timers else None

    def _dispatch(self) -> None:
        order = sorted(self.dirty, key=lambda n: (self.agents[n].first_seen if n in self.agents else 0.0, n))
        self.dirty.clear()
        for name in order:
            if name in self.tasks:
                self.dirty.add(name)  # runs again once the current reconcile of it is done
                continue
            task = asyncio.get_running_loop().create_task(self._reconcile(name))
            self.tasks[name] = task
            task.add_done_callback(lambda t, n=name: self._task_done(n, t))  # type: ignore[misc]

    def _task_done(self, name: str, task: asyncio.Task[None]) -> None:
        self.tasks.pop(name, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("reconcile of %s failed: %r", name, task.exception())
            self.observe("error", 0.0)
            self.timers[name] = time.monotonic() + 1.0
        if name in self.dirty or not self.tasks:
            self.wake()

    # -- observe + plan -----------------------------------------------------
    def _instances_of(self, name: str) -> dict[str, InstanceRecord]:
        return {i: self.instances[i] for i in self.by_agent.get(name, ())}

    def _view(self, agent: AgentState) -> AgentView:
        target = agent.target
        unavailable = None
        if target is not None:
            sup = self.supervisors.get(target.spec.supervisor)
            unavailable = sup.unavailable_reason() if sup else f"no {target.spec.supervisor} adapter"
        last = agent.desired
        return AgentView(
            agent.name,
            target,
            self._instances_of(agent.name),
            gone_reason=agent.gone_reason,
            unavailable=unavailable,
            last_signal=last.stop_signal if last else signals.SIGTERM,
            last_grace=last.spec.stop.grace_period_seconds if last else 10.0,
        )

    def _capacity(self) -> int:
        if self.settings.max_agents is None:
            return 1 << 30
        live = {r.id for r in self.instances.values() if r.state != RunState.EXITED} | self.starting
        return max(0, self.settings.max_agents - len(live))

    async def _reconcile(self, name: str) -> None:
        lock = self.locks.setdefault(name, asyncio.Lock())
        started = time.perf_counter()
        async with lock:
            agent = self.agents.get(name)
            if agent is None:
                return
            await self._check_remnants(name)
            view = self._view(agent)
            plan = plan_agent(view, time.monotonic(), capacity=self._capacity())
            for action in plan.actions:
                await self._apply(agent, action)
            self._after_plan(agent, plan)
        self.observe("success", time.perf_counter() - started)

    def _after_plan(self, agent: AgentState, plan: Plan) -> None:
        name = agent.name
        if plan.requeue_after is not None:
            self.timers[name] = time.monotonic() + plan.requeue_after
        if name in self.remnants or any(r.killed for r in self._instances_of(name).values()):
            self.timers[name] = min(self.timers.get(name, float("inf")), time.monotonic() + 0.05)
        agent.pending_reason = plan.pending_reason
        was_full = self.settings.max_agents is not None
        if not agent.present and not self._instances_of(name):
            self._drop_agent(name)
            if was_full:
                self._mark_pending()
            return
        self._publish_status(agent)

    def _mark_pending(self) -> None:
        """Capacity freed: agents waiting for it go first, oldest manifest first."""
        for other in self.agents.values():
            if other.pending_reason == "HostCapacity":
                self.mark(other.name)

    def _drop_agent(self, name: str) -> None:
        assert self.store is not None and self.status is not None
        agent = self.agents.pop(name)
        self.locks.pop(name, None)
        self.timers.pop(name, None)
        self.store.delete_agent(name)
        self.status.remove(name)
        for key in [k for k in self.counters if k[0] == name]:
            del self.counters[key]
        self.store.drop_counters(name)
        self.last_exit_codes.pop(name, None)
        log.info("%s removed (no process of it is left)", name)
        self.event(name, None, "Removed", "ManifestDeleted", f"status of {agent.source} removed")

    # -- execute ------------------------------------------------------------
    async def call(self, sup: Supervisor, fn: Callable[..., T], *args: Any) -> T:
        if sup.blocking:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    async def _apply(self, agent: AgentState, action: Any) -> None:
        if isinstance(action, Start):
            await self._start(agent, action)
        elif isinstance(action, Stop):
            await self._stop(action)
        elif isinstance(action, Kill):
            await self._kill(action.instance)
        elif isinstance(action, Schedule):
            self._schedule(action)
        elif isinstance(action, Finish):
            self._finish(action)
        elif isinstance(action, Forget):
            self._forget(action.instance)

    def put(self, rec: InstanceRecord) -> None:
        """Memory is authoritative; a failed store write is reported and redone with the next change."""
        assert self.store is not None
        self.instances[rec.id] = rec
        self.by_agent.setdefault(rec.agent, set()).add(rec.id)
        try:
            self.store.put_instance(rec)
        except sqlite3.Error as exc:
            self._write_failed(f"state store write for {rec.id} failed: {exc}")
        else:
            self.state_error = None

    def _index(self, rec: InstanceRecord) -> None:
        """A record loaded from the store: into memory without writing it back."""
        self.instances[rec.id] = rec
        self.by_agent.setdefault(rec.agent, set()).add(rec.id)

    def drop(self, instance_id: str) -> InstanceRecord | None:
        rec = self.instances.pop(instance_id, None)
        if rec is not None:
            ids = self.by_agent.get(rec.agent, set())
            ids.discard(instance_id)
            if not ids:
                self.by_agent.pop(rec.agent, None)
        return rec

    def _commit(self) -> None:
        if self.store is None or self.store.readonly:
            return
        try:
            self.store.commit()
        except sqlite3.Error as exc:
            self._write_failed(f"state store commit failed: {exc}")

    def _write_failed(self, message: str) -> None:
        self.write_errors += 1
        if self.state_error != message:
            log.error("%s", message)
        self.state_error = message

    def log_path(self, instance_id: str) -> Path:
        return self.settings.log_dir / f"{instance_id}.log"

    async def _start(self, agent: AgentState, action: Start) -> None:
        spec = action.spec
        sup = self.supervisors[spec.supervisor]
        prev = self.instances.get(spec.id)
        same_spec = prev is not None and prev.spec_hash == spec.spec_hash
        now_mono, now_wall = time.monotonic(), time.time()
        restarts = (prev.restarts if prev and same_spec else 0) + action.counts_as_restart
        # a person's restart gives a fresh crash-loop budget: it is not one of the automatic restarts
        automatic = action.counts_as_restart and action.reason != ExitReason.MANUAL_RESTART
        times = (prev.restart_times if prev and same_spec else ()) + ((now_mono,) if automatic else ())
        base = InstanceRecord(
            id=spec.id, agent=spec.agent, index=spec.index, supervisor=spec.supervisor, spec_hash=spec.spec_hash,
            state=RunState.RUNNING, started_at=now_wall, started_mono=now_mono, restarts=restarts,
            failures_in_row=prev.failures_in_row if prev and same_spec else 0,
            restart_times=times[-200:], last_exit=prev.last_exit if prev else None,
            log_offset=logfiles.size(self.log_path(spec.id)),
        )
        if action.counts_as_restart:
            reason = prev.last_exit.reason if prev and prev.last_exit else action.reason
            self._count_restart(agent.name, reason)
        run_id = os.urandom(6).hex()
        base = replace(base, run_id=run_id)
        spec = replace(spec, env=spec.env + (("AGENTCTL_CONTROLLER_ID", self.controller_id), ("AGENTCTL_RUN", run_id)))
        self.run_secrets[spec.id] = redact.secret_values(spec.env)  # adapters: for redacting this run's log tail
        self.starting.add(spec.id)  # holds its --max-agents slot while the start is in flight
        try:
            self._check_cwd(spec.cwd)
            handle = await self.call(sup, sup.start, spec, self.log_path(spec.id))
        except SupervisorError as exc:
            self.action_failures += 1
            log.error("%s start failed: %s", spec.id, exc)
            self.event(agent.name, spec.id, "FailedStart", "Error", str(exc))
            failed = ExitInfo(127, None, now_wall, 0.0, ExitReason.ERROR, (), str(exc))
            self.put(replace(base, state=RunState.EXITED, last_exit=failed))
            self.mark(agent.name)
            return
        finally:
            self.starting.discard(spec.id)
        self.put(replace(base, handle=handle))
        self.watch(spec.id, handle)
        desired_spec = agent.desired.spec if agent.desired is not None else None
        if desired_spec is not None and (desired_spec.liveness or desired_spec.resources.memory_limit_mib):
            for hook in self.on_start:  # only starts that need a probe or memory schedule wake the sampler
                hook()
        verb = "Restarted" if prev is not None else "Started"
        log.info("%s %s -> Running pid %d (%s)", spec.id, action.reason, handle.pid, verb)
        self.event(agent.name, spec.id, verb, action.reason, f"pid {handle.pid}")

    def _check_cwd(self, cwd: str) -> None:
        """Checked again at spawn time: a symlink swapped after validation must not lead outside."""
        real = os.path.realpath(cwd)
        base = str(self.settings.base_dir.resolve())
        if real != cwd or not (real == base or real.startswith(base.rstrip("/") + "/")):
            raise SupervisorError(f"cwd {cwd} now resolves to {real}, outside the base dir {base}", retryable=False)

    def _count_restart(self, agent: str, reason: str) -> None:
        assert self.store is not None
        key = (agent, reason)
        self.counters[key] = self.counters.get(key, 0) + 1
        self.store.bump_counter(agent, reason)

    async def _stop(self, action: Stop) -> None:
        rec = self.instances[action.instance]
        sup = self.supervisors.get(rec.supervisor)
        if rec.handle is None or sup is None:
            self.put(replace(rec, state=RunState.EXITED, handle=None))
            return
        deadline = time.monotonic() + action.grace
        self.put(replace(rec, state=RunState.STOPPING, stop_reason=str(action.reason), stop_deadline=deadline))
        log.info("%s Running -> Stopping (%s, %s, grace %gs)", rec.id, action.reason,
                 signals.Signals(action.signal).name, action.grace)
        self.event(rec.agent, rec.id, "Stopping", action.reason, f"signal {signals.Signals(action.signal).name}")
        await self.call(sup, sup.signal, rec.handle, action.signal)
        if action.grace <= 0:
            await self._kill(rec.id)

    async def _kill(self, instance_id: str) -> None:
        rec = self.instances[instance_id]
        sup = self.supervisors.get(rec.supervisor)
        if rec.handle is None or sup is None:
            return
        log.warning("%s grace period over -> SIGKILL to the group", rec.id)
        self.event(rec.agent, rec.id, "Killed", rec.stop_reason or "", "grace period over: SIGKILL")
        self.put(replace(rec, killed=True))
        await self.call(sup, sup.signal, rec.handle, signals.SIGKILL)
        # an adopted leader that ignored nothing but is not our child: no pidfd event may come
        if not await self.call(sup, sup.alive, rec.handle):
            await self.finish_exit(rec.id, ExitStatus(None, int(signals.SIGKILL)))

    def _schedule(self, action: Schedule) -> None:
        rec = self.instances[action.instance]
        self.put(replace(rec, next_start=action.at, failures_in_row=action.attempt))
        if action.delay > 0:
            code = rec.last_exit.exit_code if rec.last_exit else None
            log.info("%s Exited(%s) -> BackOff %gs", rec.id, code, action.delay)
            self.event(rec.agent, rec.id, "BackOff", rec.last_exit.reason if rec.last_exit else "",
                        f"restart {action.attempt} in a row, in {action.delay:g}s")

    def _finish(self, action: Finish) -> None:
        rec = self.instances[action.instance]
        self.put(replace(rec, terminal=str(action.phase), terminal_reason=str(action.reason),
                          terminal_message=action.message))
        log.info("%s Exited -> %s %s", rec.id, action.reason, action.message)
        self.event(rec.agent, rec.id, action.reason, action.reason, action.message or "no restart (restartPolicy)")

    def _forget(self, instance_id: str) -> None:
        assert self.store is not None
        rec = self.drop(instance_id)
        self.store.delete_instance(instance_id)
        if rec is not None:
            reason = rec.last_exit.reason if rec.last_exit else ""
            self.event(rec.agent, instance_id, "Stopped", reason, "instance removed")

    # -- exits --------------------------------------------------------------
    def watch(self, instance_id: str, handle: Handle) -> None:
        loop = asyncio.get_running_loop()
        try:
            fd = os.pidfd_open(handle.pid)
        except ProcessLookupError:
            self._spawn_exit(instance_id)
            return
        self.pidfds[instance_id] = fd
        loop.add_reader(fd, self._spawn_exit, instance_id)

    def _unwatch(self, instance_id: str) -> None:
        fd = self.pidfds.pop(instance_id, None)
        if fd is not None:
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)

    def _spawn_exit(self, instance_id: str) -> None:
        self._unwatch(instance_id)
        task = asyncio.get_running_loop().create_task(self._on_exit(instance_id))
        self.exit_tasks.add(task)
        task.add_done_callback(self._exit_done)

    def _exit_done(self, task: asyncio.Task[None]) -> None:
        self.exit_tasks.discard(task)
        self.wake()  # an idle loop waiting with no timer must see that quiet() may hold now

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self.background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed: %r", task.exception())

    async def _on_exit(self, instance_id: str) -> None:
        rec = self.instances.get(instance_id)
        if rec is None:
            return
        async with self.locks.setdefault(rec.agent, asyncio.Lock()):
            rec = self.instances.get(instance_id)
            if rec is None or rec.handle is None or rec.state == RunState.EXITED:
                return
            sup = self.supervisors[rec.supervisor]
            status = await self.call(sup, sup.exit_status, rec.handle)
            if await self.call(sup, sup.alive, rec.handle):
                # the leader is gone, so the instance is over; what is left of its group dies with it
                self.remnants[instance_id] = status
                await self.call(sup, sup.signal, rec.handle, signals.SIGKILL)
                self.mark(rec.agent)
                return
            await self.finish_exit(instance_id, status)

    async def _check_remnants(self, name: str) -> None:
        mine = self._instances_of(name)
        for rec in mine.values():
            if rec.state != RunState.EXITED and rec.handle is not None and rec.id not in self.pidfds \
                    and rec.id not in self.remnants:
                self.watch(rec.id, rec.handle)  # drift: an exit we did not hear of is heard now
        for iid in [i for i in mine if i in self.remnants]:
            rec = self.instances[iid]
            sup = self.supervisors[rec.supervisor]
            if rec.handle is not None and await self.call(sup, sup.alive, rec.handle):
                await self.call(sup, sup.signal, rec.handle, signals.SIGKILL)
                continue
            await self.finish_exit(iid, self.remnants.pop(iid))
        for rec in [r for r in self._instances_of(name).values() if r.killed and r.handle]:
            sup = self.supervisors[rec.supervisor]
            if rec.handle and not await self.call(sup, sup.alive, rec.handle):
                await self.finish_exit(rec.id, ExitStatus(None, int(signals.SIGKILL)))

    async def finish_exit(self, instance_id: str, status: ExitStatus) -> None:
        """Every process of the instance is gone: record the exit (CONTRACT §4 lastExit)."""
        rec = self.instances[instance_id]
        status = ExitStatus(None if status.code is None else int(status.code),
                            None if status.signal is None else int(status.signal))  # plain ints in status files
        self._unwatch(instance_id)
        self.remnants.pop(instance_id, None)
        sup = self.supervisors.get(rec.supervisor)
        if sup is not None and rec.handle is not None:
            await self.call(sup, sup.cleanup, rec.handle)
        now = time.time()
        reason = str(self._exit_reason(rec, status))
        tail = tuple(logfiles.tail_lines(self.log_path(instance_id), LOG_TAIL_LINES, since=rec.log_offset))
        # adapters: the tail never shows a value of the env this run was given, nor of the current spec's
        agent_now = self.agents.get(rec.agent)
        tail = redact.redact_lines(tail, (*self.run_secrets.pop(instance_id, ()), *redact.instance_secrets(
            agent_now.desired.instances if agent_now and agent_now.desired else (), rec.index)))
        info = ExitInfo(status.code, status.signal, now, max(0.0, now - rec.started_at), reason, tail,
                        rec.health_message if rec.stop_reason == rec.health else "")
        self.put(replace(rec, state=RunState.EXITED, handle=None, last_exit=info, stop_reason=None,
                          stop_deadline=None, killed=False, next_start=None, health=None, health_message=""))
        if status.code is not None:
            self.last_exit_codes[rec.agent] = status.code
        elif status.signal is not None:
            self.last_exit_codes[rec.agent] = 128 + status.signal  # as a shell reports it
        what = f"Exited({status.code})" if status.code is not None else (
            f"Signaled({signals.Signals(status.signal).name})" if status.signal else "Exited(unknown)")
        log.info("%s %s after %.1fs, reason %s", instance_id, what, info.runtime_seconds, reason)
        self.event(rec.agent, instance_id, "Exited", reason, f"{what} after {info.runtime_seconds:.1f}s")
        self.mark(rec.agent)
        self._request_sweep()
        if self.settings.max_agents is not None:
            self._mark_pending()

    def _request_sweep(self) -> None:
        """Soon after an exit, kill what escaped the instance's process group (at most once a second)."""
        if self._sweep_handle is not None or self.stopping:
            return

        def run() -> None:
            from controller.recovery import sweep_orphans_soon

            self._sweep_handle = None
            task = asyncio.get_running_loop().create_task(sweep_orphans_soon(self))
            self.background.add(task)
            task.add_done_callback(self._background_done)

        self._sweep_handle = asyncio.get_running_loop().call_later(1.0, run)

    @staticmethod
    def _exit_reason(rec: InstanceRecord, status: ExitStatus) -> str:
        if rec.stop_reason:
            return rec.stop_reason
        if not status.known:
            return ExitReason.LOST
        if status.signal is not None:
            return ExitReason.SIGNALED
        return ExitReason.COMPLETED if status.code == 0 else ExitReason.ERROR

    # -- health -------------------------------------------------------------
    def request_stop(self, instance_id: str, reason: str, message: str) -> None:
        """A liveness, memory or manual request: the planner stops (and restarts) the instance."""
        rec = self.instances.get(instance_id)
        if rec is None or rec.health is not None:
            return
        if rec.state == RunState.EXITED and reason != ExitReason.MANUAL_RESTART:
            return
        if reason == ExitReason.MANUAL_RESTART and rec.state == RunState.EXITED:
            rec = replace(rec, terminal=None, terminal_reason="", terminal_message="", next_start=None,
                          failures_in_row=0, restart_times=())
        elif reason == ExitReason.MANUAL_RESTART:
            rec = replace(rec, failures_in_row=0, restart_times=())
        self.put(replace(rec, health=str(reason), health_message=message))
        log.warning("%s %s: %s", instance_id, reason, message)
        self.event(rec.agent, instance_id, reason, reason, message)
        self.mark(rec.agent)

    def manual_restart(self, name: str) -> bool:
        if name not in self.agents:
            return False
        for rec in self._instances_of(name).values():
            self.request_stop(rec.id, ExitReason.MANUAL_RESTART, "agentctl restart")
        self.mark(name)
        return True

    # -- publish ------------------------------------------------------------
    def agent_restarts(self, name: str, spec_hash: str | None) -> int:
        return sum(r.restarts for r in self._instances_of(name).values() if r.spec_hash == spec_hash)

    def _publish_status(self, agent: AgentState) -> None:
        assert self.status is not None
        if not agent.placed and agent.present and not self._instances_of(agent.name):
            self.status.remove(agent.name)  # moved elsewhere and nothing of it is left here
            return
        view = self._view(agent)
        phase = agent_phase(view, ever_valid=agent.desired is not None, pending_reason=agent.pending_reason)
        spec_hash = agent.desired.spec_hash if agent.desired else None
        desired = agent.desired
        doc = render(
            StatusInput(
                name=agent.name, source=agent.source, phase=phase, spec_hash=spec_hash,
                instances=list(view.instances.values()), restarts=self.agent_restarts(agent.name, spec_hash),
                valid=agent.valid, errors=agent.errors,
                labels=dict(desired.manifest.metadata.labels) if desired else {},
                supervisor=desired.spec.supervisor if desired else "process",
                source_revision=agent.source_revision,
                source_ready=self._source_ready(),
                created_at=agent.first_seen,
            ),
            clock(),
            self.status.previous(agent.name),
        )
        self.status.write(agent.name, doc)

    def _source_ready(self) -> tuple[bool, str] | None:
        if self.git is None:
            return None
        if self.git.last_error:
            return False, self.git.last_error
        return True, f"{self.git.url} at {self.git.revision}"

    def publish(self) -> None:
        """Commit the store's pending writes and swap in a new immutable snapshot for the HTTP thread."""
        assert self.status is not None
        self._published_at = time.monotonic()
        self._commit()
        handles = {r.id: (r.agent, r.handle) for r in self.instances.values()
                   if r.handle is not None and r.state != RunState.EXITED}
        live = {r.agent for r in self.instances.values()}
        placed = {n for n, a in self.agents.items() if a.placed or not a.present or n in live}
        self.snapshot = Snapshot(
            statuses={n: d for n, d in self.status.docs.items() if n in self.agents and n in placed},
            handles=handles,
            start_times={r.id: (r.agent, r.started_at) for r in self.instances.values()
                         if r.handle is not None and r.state != RunState.EXITED},
            counters=dict(self.counters),
            last_exit_codes=dict(self.last_exit_codes),
            manifest_valid=dict(self.manifest_valid),
            ready=self.ready,
            state_error=self.state_error or self.status.last_error,
            write_errors=self.write_errors + self.status.failures,
            source=(self.git.url, self.git.revision, self.git.last_sync) if self.git is not None else None,
        )
        for hook in self.on_publish:
            hook()

    # -- events -------------------------------------------------------------
    def event(self, agent: str, instance: str | None, kind: str, reason: str, message: str) -> None:
        if self.store is None or self.store.readonly:
            return
        try:
            self.store.add_event(Event(time.time(), agent, instance, kind, str(reason), message))
        except Exception as exc:  # noqa: BLE001 - an event lost is logged, never fatal
            log.error("cannot record event %s for %s: %s", kind, agent, exc)

    # -- the loop -----------------------------------------------------------
    def quiet(self) -> bool:
        """Nothing in flight: no reconcile running, nothing stopping, nothing due at once."""
        stopping = any(r.state == RunState.STOPPING for r in self.instances.values())
        return not self.tasks and not self.dirty and not self.remnants and not stopping and not self.exit_tasks

    async def run(self, stop_event: asyncio.Event, background: list[Coroutine[Any, Any, None]] | None = None) -> int:
        self._wake = asyncio.Event()
        tasks = [asyncio.get_running_loop().create_task(c) for c in background or []]
        try:
            return await self._loop(stop_event)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _loop(self, stop_event: asyncio.Event) -> int:
        assert self._wake is not None
        from controller.recovery import adopt_all, recover_unrecorded

        await adopt_all(self)
        self.sync_manifests()
        recover_unrecorded(self)
        self.manifests_changed = False
        self.dirty |= set(self.agents)
        first_pass = True
        once_deadline = time.monotonic() + 60.0
        while not stop_event.is_set():
            if self.manifests_changed:
                self.manifests_changed = False
                self.sync_manifests()
            self._due_timers(time.monotonic())
            self._dispatch()
            if self.tasks:
                await asyncio.wait(list(self.tasks.values()) + list(self.exit_tasks), timeout=self._next_timeout(time.monotonic()),
                                   return_when=asyncio.FIRST_COMPLETED)
                if time.monotonic() - self._published_at >= PUBLISH_EVERY:
                    self.publish()  # during a burst at most every PUBLISH_EVERY; at once when idle
                continue
            if first_pass:
                first_pass = False
                assert self.status is not None
                await asyncio.to_thread(self.status.flush)  # status files are there when /readyz says so
                self.ready = True
                log.info("first reconcile pass done: %d agents, %d instances", len(self.agents), len(self.instances))
            self.publish()
            if self.settings.once and (self.quiet() and self._nothing_to_start() or time.monotonic() > once_deadline):
                assert self.status is not None
                await asyncio.to_thread(self.status.flush)
                return 1 if self.action_failures else 0
            self._wake.clear()
            if self.dirty or stop_event.is_set():
                continue
            waiter = asyncio.ensure_future(self._wake.wait())
            stopper = asyncio.ensure_future(stop_event.wait())
            await asyncio.wait([waiter, stopper], timeout=self._next_timeout(time.monotonic()),
                               return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()
        return 0

    def _nothing_to_start(self) -> bool:
        """--once: every agent's plan holds only waits (the pass's actions have all finished)."""
        now = time.monotonic()
        for agent in self.agents.values():
            plan = plan_agent(self._view(agent), now, capacity=self._capacity())
            if any(isinstance(a, (Start, Stop, Kill, Forget)) for a in plan.actions):
                return False
        return True

    async def shutdown(self, *, stop_agents: bool) -> None:
        """Leave agents running (they are adopted next time) unless asked to stop them."""
        if stop_agents:
            await self.stop_all()
        self.stopping = True
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
        for iid in list(self.pidfds):
            self._unwatch(iid)
        if self.status is not None:
            self.status.flush()
        if self.store is not None:
            self.store.close()

    async def stop_all(self) -> None:
        """--stop-agents-on-exit: every agent is stopped as if deleted. One Stop each, then the loop
        waits on exits (pidfd) and grace deadlines; nothing is polled."""
        for agent in self.agents.values():
            agent.halted = True  # its manifest still stands: it ends Stopped, not deleted
        self.dirty |= set(self.agents)
        grace = max((a.desired.spec.stop.grace_period_seconds for a in self.agents.values() if a.desired), default=10.0)
        deadline = time.monotonic() + grace + 10.0
        wake = self._wake or asyncio.Event()
        while any(r.state != RunState.EXITED for r in self.instances.values()) and time.monotonic() < deadline:
            self._due_timers(time.monotonic())
            wake.clear()
            self._dispatch()
            pending: list[asyncio.Future[Any]] = [*self.tasks.values(), *self.exit_tasks]
            waiter = asyncio.ensure_future(wake.wait())
            timeout = min(self._next_timeout(time.monotonic()) or 1.0, 1.0, max(0.0, deadline - time.monotonic()))
            await asyncio.wait([*pending, waiter], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
        await self._settle(deadline)  # the exits just recorded reach the status files
        self.publish()

    async def _settle(self, deadline: float) -> None:
        """Reconcile everything once more and wait for it (and for exit handling) to finish."""
        if self.exit_tasks:
            await asyncio.wait(list(self.exit_tasks), timeout=max(0.0, deadline - time.monotonic()))
        self.dirty |= set(self.agents)
        self._dispatch()
        if self.tasks:
            await asyncio.wait(list(self.tasks.values()), timeout=max(0.1, deadline - time.monotonic()))

    def resync(self) -> None:
        """Periodic: re-read manifests and look again at every agent (drift, e.g. a process killed by hand).
        No orphan sweep here: orphans come from exits, which are swept a second later, and from a
        previous controller's life, which startup recovery covers."""
        self.manifests_changed = True
        for name in self.agents:
            self.dirty.add(name)
        self.wake()

