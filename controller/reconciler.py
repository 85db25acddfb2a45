"""The reconcile loop: take a dirty name, load, desire, observe, plan, execute, publish.

Runtime layer, the top of it: it only drives the rooms of controller.runtime (queue, intake,
table, executor, exits, publish) and owns none of their state. One asyncio loop is the only
writer; each dirty agent is reconciled in its own task under its own lock, so one slow agent
never holds another. Supervisors, clock, store, host and exit watcher are parameters: the
deterministic simulation (tests/sim) runs this very code against fakes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal as signals
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controller import opsrequests, records, redact
from controller.activity import Observation
from controller.clock import SystemClock, TimeSource
from controller.desired import DesiredAgent
from controller.gitsource import GitSource
from controller.loader import LoadResult
from controller.model import Forget, InstanceRecord, Kill, Plan, RunState, Start, Stop, Wait
from controller.planner import AgentView, plan_agent
from controller.providers import Preset
from controller.runtime.calls import Caller, call
from controller.runtime.executor import Executor
from controller.runtime.exits import Exits, ExitWatcher, PidfdWatcher
from controller.runtime.host import Host, ProcHost
from controller.runtime.intake import Intake
from controller.runtime.publish import Publisher, Snapshot
from controller.runtime.queue import WorkQueue
from controller.runtime.table import AgentState, AgentTable
from controller.settings import Settings
from controller.sourcehealth import SourceHealth
from controller.status import StatusWriter, atomic_write
from controller.store import Store, open_readonly
from controller.supervisors.base import Context, Supervisor, SupervisorError
from controller.supervisors.registry import build

if TYPE_CHECKING:
    from controller.fleet.wiring import FleetHooks  # only the type: etcd is never imported on one host

log = logging.getLogger("agentctl")
PUBLISH_EVERY = 0.05  # seconds between snapshots for the HTTP thread during a burst
ONCE_DEADLINE = 60.0  # `run --once` gives up waiting for its pass after this long
PROGRESS_EVERY = 1.0  # seconds between progress lines of the first pass, when a person watches

__all__ = ["AgentState", "Controller", "Snapshot"]


class Controller:
    """The wiring of the rooms, and the loop that drives them."""

    def __init__(self, settings: Settings, *, clock: TimeSource | None = None, host: Host | None = None,
                 supervisors: Callable[[Context], dict[str, Supervisor]] = build,
                 store: Callable[[Path], Store] | None = None, watcher: ExitWatcher | None = None,
                 caller: Caller = call, status: StatusWriter | None = None,
                 exits_options: dict[str, Any] | None = None) -> None:
        self.settings = settings
        self.state_dir = settings.state_dir
        self.clock: TimeSource = clock or SystemClock()
        self.host: Host = host or ProcHost()
        self._build_supervisors = supervisors
        self._open_store = store or (lambda path: Store(path))
        self._watcher = watcher or PidfdWatcher()
        self._status = status
        self.call = caller
        self._exits_options = exits_options or {}  # the simulation's timers and off-loop runner
        self.queue = WorkQueue()
        self.locks: dict[str, asyncio.Lock] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.observe: Callable[[str, float], None] = lambda result, seconds: None  # metrics hook
        self.on_start: list[Callable[[], None]] = []
        # operator overrides (`agentctl suspend`) and reconcile requests; acks go out after a publish
        self.ops = opsrequests.OpsState(settings.state_dir)
        self.ready = False
        self.manifests_changed = True
        self.controller_id = ""
        self._published_at = 0.0
        self._first_pass_seen: set[str] = set()  # agents reconciled since start-up, until ready
        self._commit_retry: asyncio.TimerHandle | None = None
        self._fleet: FleetHooks | None = None
        self._stop_event: asyncio.Event | None = None
        # agent -> the inputs its last reconcile planned on, kept only when that plan only waited:
        # a periodic resync reconciles an agent again only when these differ (or drift is seen)
        self._planned_on: dict[str, tuple[object, ...]] = {}
        self._drift_check = False
        self._touched: set[str] = set()  # manifest files a watch event named, read at the next step

    # -- setup --------------------------------------------------------------
    def open(self) -> None:
        """Create the state dir, open the store, load records. Call once, before run()."""
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        for sub in ("logs", "status", "requests"):
            (self.state_dir / sub).mkdir(mode=0o700, exist_ok=True)
        store = self._open_store(self.state_dir / "state.db")
        if store.recovered_from:  # only real corruption: a locked store is waited for in Store
            log.error("state store was corrupt and was moved aside to %s; rebuilding from live processes",
                      store.recovered_from)
            store.set_meta("recovered_from", store.recovered_from)
        self.controller_id = self._controller_id(store)
        store.set_meta("controller_id", self.controller_id)
        self._wire(store)
        self.publisher = Publisher(self.table, self._status or StatusWriter(self.settings.status_dir, mirror=True), self.clock)
        self.publisher.hooks.append(lambda: opsrequests.after_publish(self))
        self._load(store, boot=self.host.boot_id())
        self.table.commit()  # a lock taken since the open is retried by the loop, not a crash

    def open_readonly(self) -> None:
        """For `plan`: the same state, read without writing anything."""
        store = open_readonly(self.state_dir)
        self.controller_id = (store.meta("controller_id") if store else None) or "none"
        self._wire(store or Store.empty())  # no publisher: `plan` writes nothing
        self._load(self.table.store, boot=None)

    def _controller_id(self, store: Store) -> str:
        """Stable per state dir, kept beside the store too: it marks our processes if the store is lost."""
        id_file = self.state_dir / "controller.id"
        try:
            from_file = id_file.read_text().strip()
        except OSError:
            from_file = ""
        cid = store.meta("controller_id") or from_file or os.urandom(4).hex()
        if from_file != cid:
            atomic_write(id_file, cid + "\n")
        return cid

    def _wire(self, store: Store) -> None:
        self.supervisors = self._build_supervisors(Context(self.state_dir, self.controller_id))
        self.table = AgentTable(store, self.clock)
        self.intake = Intake(self.settings, self.table, self.queue, self.clock)
        self.exits = Exits(self.table, self.queue, self.supervisors, clock=self.clock, host=self.host,
                           call=self.call, watcher=self._watcher, log_dir=self.settings.log_dir,
                           controller_id=self.controller_id, **self._exits_options)
        self.exits.locks = self.locks
        self.exits.on_finished.append(self._after_exit)
        self.executor: Executor = Executor(self.table, self.queue, self.exits, self.supervisors, clock=self.clock,
                                 call=self.call, controller_id=self.controller_id, check_cwd=self._check_cwd,
                                 presets=self.intake.presets)
        self.executor.on_start.append(self._started)
        self.exits.starting = self.executor.starting  # one set: the sweep spares what is being started

    def _load(self, store: Store, *, boot: str | None) -> None:
        self.table.counters = store.counters()
        stored_boot = store.meta("boot_id")
        rebooted = boot is not None and bool(stored_boot) and stored_boot != boot
        for rec in store.instances():
            # recorded before a reboot: not ours to adopt or signal
            self.table.index(records.forgotten_handle(rec) if rebooted else rec)
        if rebooted:
            log.warning("the host rebooted since the last run: no recorded process is adopted")
        if boot is not None:
            store.set_meta("boot_id", boot)
        for row in store.agents().values():
            self.table.agents[row.name] = self.intake.restore(row)
        for rec in self.table.instances.values():
            if rec.agent not in self.table.agents:
                self.table.agents[rec.agent] = AgentState(rec.agent, "", self.clock.wall(), present=False)

    # -- a coordinated fleet (CONTRACT §10) -----------------------------------
    @property
    def fleet(self) -> FleetHooks | None:
        return self._fleet

    @fleet.setter
    def fleet(self, hooks: FleetHooks | None) -> None:
        """Set by controller.fleet.wiring: placement becomes per instance (the leader's assignment),
        every start needs this host's claim and carries a fencing token, statuses show the fleet."""
        self._fleet = hooks
        self.intake.per_instance_placement = hooks is not None
        self.executor.start_token = hooks.token if hooks is not None else None
        self.publisher.decorate = hooks.decorate if hooks is not None else None

    @property
    def starting(self) -> set[str]:
        return self.executor.starting

    # -- what other parts of the program read --------------------------------
    @property
    def agents(self) -> dict[str, AgentState]:
        return self.table.agents

    @property
    def instances(self) -> dict[str, InstanceRecord]:
        return self.table.instances

    @property
    def store(self) -> Store:
        return self.table.store

    @property
    def status(self) -> StatusWriter:
        return self.publisher.status

    @property
    def git(self) -> GitSource | None:
        return self.intake.git

    @git.setter
    def git(self, value: GitSource | None) -> None:
        self.intake.git = value

    @property
    def presets(self) -> dict[str, Preset]:
        return self.intake.presets

    @property
    def source_health(self) -> SourceHealth:
        return self.intake.source_health

    @property
    def snapshot(self) -> Snapshot:
        return self.publisher.snapshot

    @property
    def activity(self) -> dict[str, Observation]:
        """instance -> what its screen shows, written by the activity sampler (health loop)."""
        return self.publisher.activity

    @property
    def dirty(self) -> set[str]:
        return self.queue.dirty

    @property
    def on_publish(self) -> list[Callable[[], None]]:
        return self.publisher.hooks

    @property
    def background(self) -> set[asyncio.Task[None]]:
        return self.exits.background

    def event(self, agent: str, instance: str | None, kind: str, reason: str, message: str) -> None:
        self.table.event(agent, instance, kind, reason, message)

    def secrets_of(self, name: str) -> tuple[str, ...]:
        """The env values an agent's instances run with, for pages that show its lines (redacted).
        Read from the HTTP thread: one dict lookup of a frozen value."""
        agent = self.table.agents.get(name)
        if agent is None or agent.desired is None:
            return ()
        return redact.secret_values([pair for inst in agent.desired.instances for pair in inst.env])

    def log_path(self, instance_id: str) -> Path:
        return self.exits.log_path(instance_id)

    def wake(self) -> None:
        self.queue.wake()

    def mark(self, name: str) -> None:
        self.queue.mark(name)

    def request_stop(self, instance_id: str, reason: str, message: str) -> None:
        self.executor.request_stop(instance_id, reason, message)

    def manual_restart(self, name: str, *, fresh: bool = False) -> bool:
        if name not in self.table.agents:
            return False
        for rec in self.table.of(name).values():
            if fresh:  # `restart --fresh` forgets the sessions: the next start picks new ids
                self.table.put(records.sessions_forgotten(rec))
            self.executor.request_stop(rec.id, "ManualRestart", "agentctl restart")
        # a first start still in flight has no record yet: the request waits for the record it writes
        for iid in sorted(i for i in self.executor.starting if i.rsplit("-", 1)[0] == name):
            if iid not in self.table.instances:
                self.executor.request_stop(iid, "ManualRestart", "agentctl restart")
        self.queue.mark(name)
        return True

    def manifests_touched(self, paths: set[str]) -> None:
        """A file event named these manifest files: the next step re-reads only them (a walk and a
        re-read of everything is what manifests_changed asks for)."""
        self._touched |= paths
        self.queue.wake()

    def sync_manifests(self, result: LoadResult | None = None) -> None:
        self.intake.sync(result)

    def resync(self, *, full: bool = False) -> None:
        """Periodic: re-read manifests and look again at every agent (drift, e.g. a process killed by
        hand). No orphan sweep here: orphans come from exits, swept a second later, and from a
        previous controller's life, which startup recovery covers.

        The re-read stats every file and re-reads only changed ones; then only agents whose inputs
        changed since their last plan, or whose processes are no longer watched, are reconciled
        (`_mark_drifted`). full=True (`agentctl reconcile`) reconciles every agent."""
        self.manifests_changed = True
        if full:
            self.queue.mark_all(self.table.agents)
        else:
            self._drift_check = True
            self.queue.wake()

    # -- observe + plan -----------------------------------------------------
    def view(self, agent: AgentState) -> AgentView:
        target = agent.target
        if target is not None and self._fleet is not None:
            target = self._fleet.filter(target)  # only the instances this host has claimed run here
        unavailable = None
        if target is not None:
            sup = self.supervisors.get(target.spec.supervisor)
            unavailable = sup.unavailable_reason() if sup else f"no {target.spec.supervisor} adapter"
        last = agent.desired
        return AgentView(
            agent.name, target, self.table.of(agent.name), gone_reason=agent.gone_reason, unavailable=unavailable,
            hold=last is None and agent.present and agent.placed and not agent.halted,
            operator_suspended=self.ops.is_suspended(agent.name),  # `agentctl suspend`
            last_signal=last.stop_signal if last else signals.SIGTERM,
            last_grace=last.spec.stop.grace_period_seconds if last else 10.0,
        )

    def _inputs(self, agent: AgentState, shared: tuple[object, ...]) -> tuple[object, ...]:
        """Everything plan_agent and the status of agent are computed from, other than time (which
        the plan's requeue deadline covers). Records are immutable and replaced on every change, so
        comparing them is mostly an identity check."""
        ids = self.table.by_agent.get(agent.name)
        recs = tuple(self.table.instances[i] for i in sorted(ids)) if ids else ()
        desired = agent.desired
        sup = self.supervisors.get(desired.spec.supervisor) if desired is not None else None
        return (desired, agent.present, agent.placed, agent.halted, agent.valid, tuple(agent.errors),
                agent.source, agent.source_revision, agent.pending_reason, recs,
                sup.unavailable_reason() if sup is not None else None, self.ops.is_suspended(agent.name), shared)

    def _shared_inputs(self) -> tuple[object, ...]:
        """Inputs every agent's plan and status share: the source's readiness and, under
        --max-agents, whether a slot is free."""
        return (self.intake.source_ready(), self.intake.source_reason(),
                self.capacity() > 0 if self.settings.max_agents is not None else None)

    def _drifted(self, name: str) -> bool:
        """A live instance that nothing watches any more (an exit it would not hear), or one whose
        remnants or kill are still being finished: a reconcile must look (exits.check)."""
        for iid in self.table.by_agent.get(name, ()):
            rec = self.table.instances[iid]
            if iid in self.exits.remnants or rec.killed:
                return True
            if rec.state != RunState.EXITED and rec.handle is not None and not self.exits.watcher.watching(iid):
                return True
        return False

    def _mark_drifted(self) -> None:
        """The resync's drift check: reconcile only agents whose inputs changed since their last
        plan (which then only waited) or whose processes are no longer watched."""
        if self._fleet is not None:  # the fleet's claims are inputs too: look at everything
            self.queue.mark_all(self.table.agents)
            return
        shared, seen, busy = self._shared_inputs(), self._planned_on, self.queue.dirty
        for name, agent in self.table.agents.items():
            if name in busy or name in self.tasks:
                continue
            if seen.get(name) != self._inputs(agent, shared) or self._drifted(name):
                self.queue.mark(name)

    def capacity(self) -> int:
        if self.settings.max_agents is None:
            return 1 << 30
        live = {r.id for r in self.table.instances.values() if r.state != RunState.EXITED} | self.executor.starting
        return max(0, self.settings.max_agents - len(live))

    def plan(self, agent: AgentState) -> Plan:
        return plan_agent(self.view(agent), self.clock.monotonic(), capacity=self.capacity())

    async def reconcile(self, name: str) -> None:
        """One agent: observe (exits not yet recorded), plan, execute, publish."""
        started = self.clock.monotonic()
        async with self.locks.setdefault(name, asyncio.Lock()):
            agent = self.table.agents.get(name)
            if agent is None:
                return
            await self.exits.check(name)
            plan = self.plan(agent)
            for action in plan.actions:
                await self.executor.apply(agent, action)
            self._after_plan(agent, plan)
        self.observe("success", self.clock.monotonic() - started)

    def _after_plan(self, agent: AgentState, plan: Plan) -> None:
        name, now = agent.name, self.clock.monotonic()
        if plan.requeue_after is not None:
            self.queue.at(name, now + plan.requeue_after)
        if self.exits.pending(name):
            self.queue.at_most(name, now + 0.05)
        if plan.pending_reason == "HostCapacity":
            # freed capacity wakes waiting agents at once (_mark_pending); this look a second later
            # catches what no exit announced (a slot freed while another controller life ran)
            self.queue.at_most(name, now + 1.0)
        agent.pending_reason = plan.pending_reason
        if not self.ready:
            self._first_pass_seen.add(name)
        if not agent.present and not self.table.of(name):
            self._planned_on.pop(name, None)
            self._drop_agent(name)
            return
        if self._settled(agent, plan, now):
            self._planned_on[name] = self._inputs(agent, self._shared_inputs())
        else:  # more to do once something happens: the next resync looks again
            self._planned_on.pop(name, None)
        self.publisher.agent(agent, self.view(agent), source_ready=self.intake.source_ready(),
                             source_reason=self.intake.source_reason())

    def _settled(self, agent: AgentState, plan: Plan, now: float) -> bool:
        """The plan only waited, or, after its actions, a plan on the state they left only waits
        (a start that went through): then the inputs are worth keeping for the resync's skip.
        That second plan's deadline is kept too, so nothing it waits for is left to the resync."""
        if all(isinstance(a, Wait) for a in plan.actions):
            return True
        again = self.plan(agent)
        if not all(isinstance(a, Wait) for a in again.actions):
            return False
        if again.requeue_after is not None:
            self.queue.at_most(agent.name, now + again.requeue_after)
        return True

    def _drop_agent(self, name: str) -> None:
        agent = self.table.drop_agent(name)
        self.locks.pop(name, None)
        self.queue.forget(name)
        self.publisher.remove(name)
        log.info("%s removed (no process of it is left)", name)
        self.table.event(name, None, "Removed", "ManifestDeleted",
                         f"status of {agent.source if agent else name} removed")
        self._mark_pending()

    def _mark_pending(self) -> None:
        """Capacity freed: agents waiting for it go first, oldest manifest first."""
        if self.settings.max_agents is None:
            return
        for other in self.table.agents.values():
            if other.pending_reason == "HostCapacity":
                self.queue.mark(other.name)

    def _after_exit(self, rec: InstanceRecord) -> None:
        self._mark_pending()

    def _started(self, agent: AgentState) -> None:
        spec = agent.desired.spec if agent.desired is not None else None
        # a provider instance is sampled for its activity (Working, Idle, WaitingForInput) from its start
        if spec is not None and (spec.liveness or spec.resources.memory_limit_mib or spec.provider):
            for hook in self.on_start:  # only starts that need a probe or memory schedule wake the sampler
                hook()

    def _check_cwd(self, cwd: str) -> None:
        """Checked again at spawn time: a symlink swapped after validation must not lead outside."""
        real = os.path.realpath(cwd)
        base = str(self.settings.base_dir.resolve())
        if real != cwd or not (real == base or real.startswith(base.rstrip("/") + "/")):
            raise SupervisorError(f"cwd {cwd} now resolves to {real}, outside the base dir {base}", retryable=False)

    # -- the loop -----------------------------------------------------------
    def dispatch(self) -> None:
        """A task per dirty agent, oldest manifest first; a name already being reconciled runs again after."""
        agents = self.table.agents
        for name in self.queue.take(lambda n: (agents[n].first_seen if n in agents else 0.0, n)):
            if name in self.tasks:
                self.queue.dirty.add(name)
                continue
            task = asyncio.get_running_loop().create_task(self.reconcile(name))
            self.tasks[name] = task
            task.add_done_callback(lambda t, n=name: self._task_done(n, t))  # type: ignore[misc]

    def _task_done(self, name: str, task: asyncio.Task[None]) -> None:
        self.tasks.pop(name, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("reconcile of %s failed: %r", name, task.exception())
            self.observe("error", 0.0)
            self.queue.at(name, self.clock.monotonic() + 1.0)
        if name in self.queue.dirty or not self.tasks:
            self.queue.wake()

    def quiet(self) -> bool:
        """Nothing in flight: no reconcile running, nothing stopping, nothing due at once."""
        stopping = any(r.state == RunState.STOPPING for r in self.table.instances.values())
        return not self.tasks and not self.queue.dirty and not self.exits.remnants and not stopping \
            and not self.exits.tasks

    async def start_up(self) -> None:
        """Recovery before the first pass: adopt what the store knows, load the manifests, recover
        what only the marker env knows, then look at every agent."""
        await self.exits.adopt_all()
        self.intake.sync()
        self.exits.recover_unrecorded(self._desired_argv)
        self.exits.request_sweep()  # leftovers of runs that ended while no controller listened
        self.manifests_changed = False
        self.queue.mark_all(self.table.agents)

    def _desired_argv(self, instance: str) -> tuple[str, ...] | None:
        """The argv an instance's process must run to be adopted by its marker; () when the agent
        is declared but no valid spec of it is known (any leader of ours is its process); None
        when nothing declares it (its processes are orphans)."""
        agent = self.table.agents.get(instance.rsplit("-", 1)[0])
        if agent is None or not agent.present:
            return None
        desired: DesiredAgent | None = agent.desired
        if desired is None:
            return ()
        return next((i.argv for i in desired.instances if i.id == instance), None)

    def step(self) -> None:
        """Fold in what changed (manifests, due timers) and start the reconciles it calls for."""
        if self.manifests_changed:
            self.manifests_changed = False
            self._touched.clear()  # the full sync reads them too
            self.intake.sync()
        elif self._touched:
            touched, self._touched = self._touched, set()
            self.intake.sync_paths(touched)
        self.queue.due(self.clock.monotonic())
        if self._drift_check:  # after the sync and the timers: what they marked is not looked at twice
            self._drift_check = False
            self._mark_drifted()
        self.dispatch()

    def publish(self) -> None:
        """Commit the store's pending writes and swap in a new snapshot for the HTTP thread."""
        self._published_at = self.clock.monotonic()
        if not self.table.commit():
            self._retry_commit_soon()
        git = self.intake.git
        self.publisher.snapshot_now(ready=self.ready, manifest_valid=self.intake.manifest_valid,
                                    source=(git.url, git.revision, git.last_sync) if git is not None else None,
                                    fleet_error=self._fleet.ready_error() if self._fleet is not None else None)

    def _retry_commit_soon(self) -> None:
        """Writes wait in memory while the store refuses them; an idle loop must still try again."""
        if self._commit_retry is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not running yet (open()): the first pass commits

        def fire() -> None:
            self._commit_retry = None
            self.queue.wake()

        self._commit_retry = loop.call_later(1.0, fire)

    async def run(self, stop_event: asyncio.Event, background: list[Coroutine[Any, Any, None]] | None = None) -> int:
        wake = self.queue.bind()
        self._stop_event = stop_event
        tasks = [asyncio.get_running_loop().create_task(c) for c in background or []]
        try:
            return await self._loop(stop_event, wake)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _loop(self, stop_event: asyncio.Event, wake: asyncio.Event) -> int:
        await self.start_up()
        first_pass = True
        once_deadline = self.clock.monotonic() + ONCE_DEADLINE
        # a person watching the terminal sees the first pass over many agents progress
        shown = self.clock.monotonic() if sys.stderr.isatty() else None
        while not stop_event.is_set():
            self.step()
            if self.tasks:
                await asyncio.wait([*self.tasks.values(), *self.exits.tasks],
                                   timeout=PROGRESS_EVERY if shown is not None and first_pass
                                   else self.queue.next_timeout(self.clock.monotonic()),
                                   return_when=asyncio.FIRST_COMPLETED)
                if first_pass and shown is not None and self.clock.monotonic() - shown >= PROGRESS_EVERY:
                    shown = self.clock.monotonic()
                    log.info("first reconcile pass: %d of %d agents", len(self._first_pass_seen), len(self.agents))
                if self.clock.monotonic() - self._published_at >= PUBLISH_EVERY:
                    self.publish()  # during a burst at most every PUBLISH_EVERY; at once when idle
                continue
            if first_pass:
                first_pass = False
                await asyncio.to_thread(self.status.flush)  # status files are there when /readyz says so
                self.ready = True
                self._first_pass_seen.clear()
                log.info("first reconcile pass done: %d agents, %d instances", len(self.agents), len(self.instances))
            self.publish()
            if self.settings.once and (self.quiet() and self._nothing_to_start()
                                       or self.clock.monotonic() > once_deadline):
                await asyncio.to_thread(self.status.flush)
                return 1 if self.executor.failures else 0
            wake.clear()
            if self.queue.dirty or stop_event.is_set():
                continue
            await _first_of(wake, stop_event, timeout=self.queue.next_timeout(self.clock.monotonic()))
        return 0

    def _nothing_to_start(self) -> bool:
        """--once: every agent's plan holds only waits (the pass's actions have all finished)."""
        for agent in self.table.agents.values():
            if any(isinstance(a, (Start, Stop, Kill, Forget)) for a in self.plan(agent).actions):
                return False
        return True

    async def shutdown(self, *, stop_agents: bool) -> None:
        """Leave agents running (they are adopted next time) unless asked to stop them."""
        if stop_agents:
            await self.stop_all()
        self.exits.close()
        self.status.flush()
        self.table.store.close()

    async def stop_all(self) -> None:
        """--stop-agents-on-exit: every agent is stopped as if deleted. One Stop each, then the loop
        waits on exits (pidfd) and grace deadlines; nothing is polled."""
        for agent in self.table.agents.values():
            agent.halted = True  # its manifest still stands: it ends Stopped, not deleted
        self.queue.mark_all(self.table.agents)
        grace = max((a.desired.spec.stop.grace_period_seconds for a in self.agents.values() if a.desired), default=10.0)
        deadline = self.clock.monotonic() + grace + 10.0
        wake = self.queue.event()
        while any(r.state != RunState.EXITED for r in self.instances.values()) and self.clock.monotonic() < deadline:
            self.queue.due(self.clock.monotonic())
            wake.clear()
            self.dispatch()
            pending: list[asyncio.Future[Any]] = [*self.tasks.values(), *self.exits.tasks]
            timeout = min(self.queue.next_timeout(self.clock.monotonic()) or 1.0, 1.0,
                          max(0.0, deadline - self.clock.monotonic()))
            waiter = asyncio.ensure_future(wake.wait())
            await asyncio.wait([*pending, waiter], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
        await self._settle(deadline)  # the exits just recorded reach the status files
        self.publish()

    async def _settle(self, deadline: float) -> None:
        """Reconcile everything once more and wait for it (and for exit handling) to finish."""
        if self.exits.tasks:
            await asyncio.wait(list(self.exits.tasks), timeout=max(0.0, deadline - self.clock.monotonic()))
        self.queue.mark_all(self.table.agents)
        self.dispatch()
        if self.tasks:
            await asyncio.wait(list(self.tasks.values()), timeout=max(0.1, deadline - self.clock.monotonic()))


async def _first_of(*events: asyncio.Event, timeout: float | None) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    for waiter in waiters:
        waiter.cancel()
