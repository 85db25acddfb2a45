"""Deterministic simulation: the real reconcile code (controller.reconciler and the rooms of
controller.runtime) against the fakes of tests/fakes.py, under a seeded random schedule of
events and faults, with invariants checked after every step.

One seed is one schedule; the same seed replays the same schedule exactly (in one process:
`python -m tests.sim --seed N -v` prints it). What it cannot model is listed in
docs/reliability.md (real timing, the kernel, tmux and systemd themselves, file reads).
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from controller.loader import Loaded, LoadResult, resolve_doc
from controller.manifests import AgentManifest, ManifestError, ParsedDocument
from controller.model import RunState
from controller.reconciler import Controller
from controller.settings import Settings
from controller.supervisors.base import Context, Supervisor
from tests.fakes import (
    Behaviour,
    FakeClock,
    FakeHost,
    FakeStatusWriter,
    FakeStore,
    FakeSupervisor,
    FakeTimers,
    FakeWatcher,
    FakeWorld,
    StoreData,
)

T = TypeVar("T")
NAMES = ("alpha", "beta", "gamma", "delta", "eps")
QUIET_LIMIT = 900.0  # simulated seconds for the agents to converge once events stop


class ControllerKilled(Exception):
    """SIGKILL of the controller, raised at an await point inside its own code."""


class InvariantViolation(AssertionError):
    pass


@dataclass
class AgentModel:
    """What the schedule has written for one manifest file."""

    name: str
    spec: dict[str, Any]
    valid: bool = True
    version: int = 0


@dataclass
class Sim:
    seed: int
    steps: int = 40
    verbose: bool = False
    rng: random.Random = field(init=False)
    log: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.clock = FakeClock()
        self.world = FakeWorld()
        self.disk = StoreData()
        self.files: dict[str, AgentModel] = {}
        self.last_valid: dict[str, dict[str, Any]] = {}  # name -> the spec that should run
        self.loaded_cache: dict[tuple[str, str], Loaded] = {}
        self.tmp = tempfile.TemporaryDirectory(prefix="agentctl-sim-")
        self.base = Path(self.tmp.name)
        (self.base / "manifests").mkdir()
        self.killed = False
        self.ctl: Controller | None = None
        self.timers = FakeTimers(self.clock)
        self.watcher: FakeWatcher | None = None
        self.store: FakeStore | None = None
        self.max_agents: int | None = None
        self.chaos_on = True
        # `agentctl restart` taken by the controller: (instance, starts before it, a start was in flight)
        self.restarts_asked: list[tuple[str, int, bool]] = []
        self.called: dict[str, bool] = {}  # instance -> its in-flight start has called the supervisor
        self.lossy = False  # store writes have failed at some point
        # the periodic resync and lost exit watches draw from their own stream: the schedules of
        # the other events stay what they were for every seed
        self.drift_rng = random.Random(self.seed * 7919 + 1)
        self.next_resync = 30.0  # simulated seconds: the periodic resync (settings resync=30)

    # -- the schedule --------------------------------------------------------
    def note(self, text: str) -> None:
        line = f"t={self.clock.monotonic() - 1000:8.2f} {text}"
        self.log.append(line)
        if self.verbose:
            print(line)

    def new_spec(self) -> dict[str, Any]:
        r = self.rng
        spec: dict[str, Any] = {
            "command": ["/bin/agent", f"v{r.randint(0, 3)}"],
            "replicas": r.choice([1, 1, 2, 3]),
            "restartPolicy": r.choice(["Always", "Always", "Always", "OnFailure", "Never"]),
            "backoff": {"initialSeconds": r.choice([0, 1, 1, 2]), "maxSeconds": 8, "resetAfterSeconds": 30},
            "stop": {"gracePeriodSeconds": r.choice([0, 1, 3])},
            "supervisor": r.choice(["process", "process", "tmux", "systemd"]),
        }
        if r.random() < 0.2:
            spec["maxRestarts"] = {"count": 3, "windowSeconds": 60}
        if r.random() < 0.08:
            spec["command"] = ["/nonexistent"]
        return spec

    def loaded(self, model: AgentModel) -> Loaded:
        key = (model.name, repr(model.spec))
        if key not in self.loaded_cache:
            doc = {"apiVersion": "agentctl/v1", "kind": "Agent", "metadata": {"name": model.name}, "spec": model.spec}
            manifest = AgentManifest.model_validate(doc)
            loaded, errors = resolve_doc(ParsedDocument(manifest, 1), self.base, f"manifests/{model.name}.yaml",
                                         frozenset({"claude", "codex"}))
            assert loaded is not None, errors
            self.loaded_cache[key] = loaded
        return self.loaded_cache[key]

    def load_result(self) -> LoadResult:
        """What the loader would return for the files as the schedule left them."""
        result = LoadResult()
        for name, model in self.files.items():
            file = f"manifests/{name}.yaml"
            result.names_by_file[file] = {name}
            if model.valid:
                result.manifests[name] = self.loaded(model)
            else:
                result.errors.append(ManifestError(file, 4, "spec.replicas: not an integer", agent=name))
        return result

    # -- the controller's life -------------------------------------------------
    def settings(self) -> Settings:
        return Settings(manifests=self.base / "manifests", state_dir=self.base / "state", base_dir=self.base,
                        max_agents=self.max_agents, host_name="sim", resync=30.0)

    def supervisors(self, ctx: Context) -> dict[str, Supervisor]:
        w = self.world
        return {  # type: ignore[dict-item]
            "process": FakeSupervisor(w, ctx, kind="process"),
            "tmux": FakeSupervisor(w, ctx, kind="tmux", blocking=True),  # slow: starts yield to others
            "systemd": FakeSupervisor(w, ctx, kind="systemd", unavailable="no systemd user manager (simulated)"),
        }

    async def call(self, sup: Supervisor, fn: Callable[..., T], *args: Any) -> T:
        if not sup.blocking:
            return fn(*args)
        starting = args[0].id if getattr(fn, "__name__", "") == "start" else None
        if starting is not None:
            self.called[starting] = False  # the start's supervisor call has not run yet
        await self.chaos(f"{getattr(fn, '__name__', fn)} in flight")
        if starting is not None:
            self.called[starting] = True
        result = fn(*args)
        await self.chaos(f"{getattr(fn, '__name__', fn)} returned")
        return result

    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        await asyncio.sleep(0)
        return fn(*args)

    async def chaos(self, where: str) -> None:
        """Interleavings real timing almost never hits: something happens while a call is in flight."""
        for _ in range(self.rng.randint(0, 2)):
            await asyncio.sleep(0)
        if not self.chaos_on or self.killed:
            return
        roll = self.rng.random()
        if roll < 0.06:
            self.note(f"  !! controller SIGKILL while {where}")
            self.killed = True
            raise ControllerKilled(where)
        if roll < 0.16:
            name = self.rng.choice(NAMES)
            if self.ctl is not None and name in self.ctl.agents:
                self.note(f"  !! agentctl restart {name} while {where}")
                self.restart_request(name)
        elif roll < 0.22:
            self.crash_one(f"while {where}")

    def boot(self) -> None:
        """A controller life: a new process on the store as last committed."""
        self.world.generation += 1
        self.killed = False
        self.store = FakeStore(self.disk)
        self.watcher = FakeWatcher(self.world)
        self.timers = FakeTimers(self.clock)
        store = self.store
        ctl = Controller(self.settings(), clock=self.clock, host=FakeHost(self.world), supervisors=self.supervisors,
                         store=lambda path: store, watcher=self.watcher, caller=self.call,
                         status=FakeStatusWriter(),  # type: ignore[arg-type]
                         exits_options={"later": self.timers.later, "offload": self.offload})
        ctl.open()
        ctl.intake.load = self.load_result  # type: ignore[method-assign]
        ctl.queue.bind()
        self.ctl = ctl

    async def start_up(self) -> None:
        assert self.ctl is not None
        await self.ctl.start_up()

    def restart_request(self, name: str) -> None:
        """A person's restart: every instance of the agent that runs (or is being started) now must
        be replaced by a run that starts after it (checked at quiescence)."""
        ctl = self.ctl
        assert ctl is not None
        ids = set(ctl.table.by_agent.get(name, ())) | {i for i in ctl.executor.starting if i.rsplit("-", 1)[0] == name}
        for iid in sorted(ids):
            # a start in flight that has not yet called the supervisor: its attempt is the old run
            pending = iid in ctl.executor.starting and not self.called.get(iid, True)
            self.restarts_asked.append((iid, len(self.world.attempts), pending))
        ctl.manual_restart(name)

    async def kill_controller(self) -> None:
        """SIGKILL: its tasks end where they stand, nothing uncommitted reaches the disk."""
        ctl = self.ctl
        assert ctl is not None and self.watcher is not None and self.store is not None
        self.watcher.close()
        self.store.dead = True
        tasks = [*ctl.tasks.values(), *ctl.exits.tasks, *ctl.exits.background]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.ctl = None
        # a request the dead controller had taken but not acted on is gone with it (the CLI's file
        # was consumed): not a broken promise of the loop, so no longer checked
        self.restarts_asked.clear()

    async def restart_controller(self, why: str, *, same_settings: bool = False) -> None:
        self.note(f"controller restart ({why})")
        if self.ctl is not None:
            await self.kill_controller()
        if not same_settings and self.rng.random() < 0.3:
            self.max_agents = self.rng.choice([None, 2, 4, 6])
            self.note(f"  --max-agents {self.max_agents}")
        self.boot()
        await self.run_guarded(self.start_up())

    async def run_guarded(self, coro: Any) -> None:
        try:
            await coro
        except ControllerKilled:
            pass
        if self.killed:
            await self.restart_controller("killed mid-flight")

    async def settle(self) -> None:
        """Run the loop until nothing is in flight (or the controller was killed in flight)."""
        for _ in range(200):
            ctl = self.ctl
            assert ctl is not None
            self.timers.fire_due()
            ctl.step()
            pending = [*ctl.tasks.values(), *ctl.exits.tasks, *ctl.exits.background]
            if pending:
                await asyncio.wait(pending)
            else:
                for _ in range(3):
                    await asyncio.sleep(0)  # exits delivered with call_soon
                if not (ctl.tasks or ctl.exits.tasks or ctl.exits.background or ctl.queue.dirty or self.killed):
                    break
            if self.killed:
                await self.kill_controller()
                await self.restart_controller("killed mid-flight")
        assert self.ctl is not None
        self.ctl.publish()
        for name, model in self.files.items():
            if model.valid:  # what the controller has now seen: the spec to run while the file is broken
                self.last_valid[name] = model.spec
        for name in [n for n in self.last_valid if n not in self.files]:
            del self.last_valid[name]

    # -- events ----------------------------------------------------------------
    def crash_one(self, why: str) -> None:
        mains = [p for p in self.world.live() if p.main]
        if mains:
            proc = self.rng.choice(sorted(mains, key=lambda p: p.pid))
            code = self.rng.choice([0, 1, 1, 2])
            self.note(f"  crash {proc.instance} pid {proc.pid} exit {code} ({why})")
            self.world.crash(proc, code)

    async def event(self) -> None:
        r, ctl = self.rng, self.ctl
        assert ctl is not None
        name = r.choice(NAMES)
        kind = r.choices(
            ["create", "edit", "scale", "policy", "invalid", "fix", "delete", "crash", "behaviour", "startfail",
             "restart", "suspend", "kill", "store", "time"],
            weights=[8, 5, 3, 2, 3, 3, 3, 8, 4, 2, 3, 2, 3, 3, 10])[0]
        model = self.files.get(name)
        if kind == "create" and model is None:
            self.files[name] = AgentModel(name, self.new_spec())
            self.note(f"create {name} {self.files[name].spec}")
        elif kind == "edit" and model is not None:
            model.spec = {**model.spec, "command": ["/bin/agent", f"v{r.randint(0, 5)}"]}
            model.version += 1
            model.valid = True
            self.note(f"edit {name} command {model.spec['command']}")
        elif kind == "scale" and model is not None:
            model.spec = {**model.spec, "replicas": r.choice([0, 1, 2, 3])}
            model.version += 1
            model.valid = True
            self.note(f"scale {name} to {model.spec['replicas']}")
        elif kind == "policy" and model is not None:
            model.spec = {**model.spec, "restartPolicy": r.choice(["Always", "OnFailure", "Never"])}
            model.version += 1
            model.valid = True
            self.note(f"policy {name} {model.spec['restartPolicy']}")
        elif kind == "suspend" and model is not None:
            model.spec = {**model.spec, "suspend": not model.spec.get("suspend", False)}
            model.version += 1
            model.valid = True
            self.note(f"suspend {name} = {model.spec['suspend']}")
        elif kind == "invalid" and model is not None:
            model.valid = False
            self.note(f"invalid edit of {name}")
        elif kind == "fix" and model is not None and not model.valid:
            model.valid = True
            self.note(f"fix {name}")
        elif kind == "delete" and model is not None:
            del self.files[name]
            self.note(f"delete {name}")
        elif kind == "crash":
            self.crash_one("event")
            return
        elif kind == "behaviour":
            inst = f"{name}-{r.randint(0, 2)}"
            how = Behaviour(ignores_term=r.random() < 0.5, group_child=r.random() < 0.5, escapee=r.random() < 0.3)
            self.world.behaviour[inst] = how
            self.note(f"next start of {inst}: {how}")
            return
        elif kind == "startfail":
            inst = f"{name}-{r.randint(0, 2)}"
            retry = r.random() < 0.7
            self.world.start_failures[inst] = retry
            self.note(f"next start of {inst} fails (retryable={retry})")
            return
        elif kind == "restart" and name in ctl.agents:
            self.note(f"agentctl restart {name}")
            self.restart_request(name)
            return
        elif kind == "kill":
            await self.restart_controller("SIGKILL between passes")
            return
        elif kind == "store":
            assert self.store is not None
            self.store.failing = r.choice([None, None, "full", "busy"])
            self.lossy = self.lossy or self.store.failing is not None
            self.note(f"store writes now: {self.store.failing or 'ok'}")
            return
        elif kind == "time":
            dt = r.choice([0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 12.0])
            self.clock.advance(dt)
            self.note(f"time +{dt}s")
            return
        else:
            return
        ctl.manifests_changed = True  # a file event

    async def drift(self) -> None:
        """What only the periodic resync finds: an exit watch lost without a word (a later crash of
        that process sends no event), and the resync itself, after which a full pass must find
        nothing more to do (check_resync_hid_nothing)."""
        r, ctl = self.drift_rng, self.ctl
        assert ctl is not None and self.watcher is not None
        if r.random() < 0.08 and self.watcher.watched:
            iid = r.choice(sorted(self.watcher.watched))
            self.watcher.unwatch(iid)
            self.note(f"  exit watch of {iid} lost")
            if r.random() < 0.5:
                self.crash_one("unwatched, maybe")
        if r.random() < 0.3:
            self.note("periodic resync")
            ctl.resync()
            await self.settle()
            await self.check_resync_hid_nothing()

    async def check_resync_hid_nothing(self) -> None:
        """The resync reconciled only agents whose inputs changed: a full pass right after it, at the
        same instant and without faults, must change no record, no status, and start nothing."""
        ctl = self.ctl
        if ctl is None or self.killed or not ctl.quiet():
            return

        def seen() -> tuple[object, ...]:
            docs = {n: {k: v for k, v in d.items() if k != "updatedAt"} for n, d in ctl.status.docs.items()}
            return dict(ctl.instances), docs, len(self.world.starts)

        chaos, self.chaos_on = self.chaos_on, False
        try:
            # what the pass itself changed (a slot freed) is for the next resync: run them to a fixpoint
            before = seen()
            for _ in range(5):
                ctl.resync()
                await self.settle()
                if self.ctl is not ctl or seen() == before:
                    break
                before = seen()
            ctl.resync(full=True)
            await self.settle()
        finally:
            self.chaos_on = chaos
        if self.ctl is ctl and seen() != before:
            after = seen()
            changed = sorted({*before[0], *after[0]} - {k for k in before[0] if before[0].get(k) == after[0].get(k)}) \
                if isinstance(before[0], dict) and isinstance(after[0], dict) else []
            raise InvariantViolation(f"a resync skipped what a full pass then changed: records {changed}, "
                                     f"starts {before[2]} -> {after[2]}")

    # -- invariants --------------------------------------------------------------
    def check_always(self) -> None:
        ctl = self.ctl
        assert ctl is not None
        mains: dict[str, list[int]] = {}
        for proc in self.world.live():
            if proc.main:
                mains.setdefault(proc.instance, []).append(proc.pid)
        for inst, pids in mains.items():
            if len(pids) > 1:
                raise InvariantViolation(f"two live processes for {inst}: pids {pids}")
        for proc in self.world.live():
            if proc.escapee:
                continue
            rec = ctl.instances.get(proc.instance)
            owned = rec is not None and rec.state != RunState.EXITED and rec.handle is not None \
                and rec.handle.pgid == proc.pgid and rec.run_id == proc.run
            if not owned:
                raise InvariantViolation(
                    f"pid {proc.pid} of {proc.instance} (run {proc.run}) is alive but no record owns it "
                    f"(record: {rec.state if rec else None}, pid {rec.handle.pid if rec and rec.handle else None},"
                    f" run {rec.run_id if rec else None})")

    def check_restarts_honoured(self) -> None:
        """Every restart a person asked for happened: the instance now runs a process started after
        the request (and not by the start that was already in flight when it came)."""
        ctl = self.ctl
        assert ctl is not None
        for iid, before, pending in self.restarts_asked:
            rec = ctl.instances.get(iid)
            if rec is None or rec.handle is None or rec.terminal is not None or rec.state != RunState.RUNNING:
                continue  # deleted, scaled down, suspended, failed since: nothing runs to be restarted
            later = [n for n, (inst, _) in enumerate(self.world.attempts) if inst == iid and n >= before]
            needed = later[1:] if pending else later  # the in-flight start's own attempt is the old run
            current = next((n for n, (inst, pid) in enumerate(self.world.attempts)
                            if inst == iid and pid == rec.handle.pid), -1)
            if current not in needed:
                raise InvariantViolation(f"agentctl restart of {iid} was lost: pid {rec.handle.pid} started "
                                         f"before the request was acted on")
        self.restarts_asked.clear()

    def check_quiescent(self) -> None:
        """After the sweep had its chance: no process of a dead run is left, escapees included."""
        ctl = self.ctl
        assert ctl is not None
        for proc in self.world.live():
            rec = ctl.instances.get(proc.instance)
            if rec is None or rec.state == RunState.EXITED or rec.run_id != proc.run:
                raise InvariantViolation(f"leftover pid {proc.pid} of {proc.instance} run {proc.run}"
                                         f"{' (escapee)' if proc.escapee else ''} outlived its run")

    def converged(self) -> str | None:
        """None when every agent matches its manifest, else what does not yet."""
        ctl = self.ctl
        assert ctl is not None
        live_slots = sum(1 for r in ctl.instances.values() if r.state != RunState.EXITED)
        full = self.max_agents is not None and live_slots >= self.max_agents
        # more than --max-agents may run after it was lowered: adopted instances are never stopped for it
        for name in NAMES:
            model = self.files.get(name)
            live = [p for p in self.world.live() if p.agent == name]
            recs = {r.id: r for r in ctl.instances.values() if r.agent == name}
            if model is None:
                if live or recs or name in ctl.agents:
                    return f"{name}: deleted but {len(live)} processes, {len(recs)} records"
                continue
            spec = self.last_valid.get(name) if not model.valid else model.spec
            if spec is None:
                if live:
                    return f"{name}: never valid but running"
                continue
            agent = ctl.agents.get(name)
            if not model.valid and self.lossy:
                # the newest valid spec may never have reached a full disk: after a restart the
                # agent runs (or holds) the last spec the store has, which the model cannot know
                continue
            if agent is None or agent.desired is None:
                return f"{name}: not known to the controller"
            desired = agent.desired
            want = 0 if spec.get("suspend") else spec["replicas"]
            if spec.get("supervisor") == "systemd":
                want_live = 0  # its supervisor cannot run here: nothing starts, nothing else is disturbed
            else:
                want_live = want
            for rec in recs.values():
                if rec.index >= want and rec.state != RunState.EXITED:
                    return f"{rec.id}: runs beyond replicas {want}"
            ok = 0
            for inst in desired.instances[:want_live]:
                rec = recs.get(inst.id)
                waits = rec is None or (rec.state == RunState.EXITED
                                        and (rec.terminal is None or rec.spec_hash != inst.spec_hash))
                if waits and full and agent.pending_reason == "HostCapacity":
                    continue  # no room on this host: waiting is what it should do
                if rec is None:
                    return f"{inst.id}: no record"
                if rec.spec_hash != inst.spec_hash:
                    return f"{inst.id}: runs an old spec"
                if rec.terminal is not None:
                    ok += 1
                    continue
                if rec.state != RunState.RUNNING or rec.handle is None:
                    return f"{inst.id}: {rec.state}, next start {rec.next_start}"
                proc = self.world.processes.get(rec.handle.pid)
                if proc is None or not proc.alive:
                    return f"{inst.id}: recorded running, process dead"
                ok += 1
            mains = [p for p in live if p.main]
            if len(mains) > want_live:
                return f"{name}: {len(mains)} processes, want {want_live}"
        return None

    # -- the whole schedule --------------------------------------------------------
    async def run(self) -> None:
        self.boot()
        await self.run_guarded(self.start_up())
        for step in range(self.steps):
            await self.event()
            if self.ctl is not None and self.ctl.queue.dirty and self.drift_rng.random() < 0.1:
                # the event's mark is lost (never a file read, a record or a timer): only the resync's
                # comparison of inputs can find what it changed
                self.note(f"  marks of {sorted(self.ctl.queue.dirty)} lost")
                self.ctl.queue.dirty.clear()
            await self.settle()
            self.check_always()
            if self.ctl is not None:
                await self.drift()
                self.check_always()
        # events stop: no faults, no failing store; time passes until everything converged
        self.chaos_on = False
        if self.store is not None:
            self.store.failing = None
        self.note("-- quiet --")
        waited = resynced = 0.0
        while True:
            self.clock.advance(1.0)
            waited += 1.0
            if waited % self.next_resync == 1 and self.ctl is not None:
                self.ctl.resync()  # the periodic resync: what no event announced (a lost watch) is found
                resynced = waited
            await self.settle()
            self.check_always()
            why = self.converged()
            # an exit the resync found has its orphan sweep a second later: give it that second
            if why is None and waited > 3.0 and waited - resynced > 2.0:
                break
            if waited > QUIET_LIMIT:
                raise InvariantViolation(f"not converged {QUIET_LIMIT:g}s after the last event: {why}")
        self.check_quiescent()
        self.check_restarts_honoured()
        await self.restart_controller("final: a restart adopts everything, starts nothing", same_settings=True)
        starts = len(self.world.starts)
        await self.settle()
        self.check_always()
        if len(self.world.starts) != starts:
            raise InvariantViolation("a controller restart after convergence started something")
        await self.kill_controller()


def run_seed(seed: int, *, steps: int = 40, verbose: bool = False) -> Sim:
    sim = Sim(seed, steps=steps, verbose=verbose)
    logging.getLogger("agentctl").disabled = not verbose
    try:
        asyncio.run(sim.run())
    except Exception as exc:
        tail = "\n".join(sim.log[-60:])
        raise InvariantViolation(
            f"seed {seed} failed: {exc}\nreplay: python -m tests.sim --seed {seed} -v\nlast steps:\n{tail}") from exc
    finally:
        sim.tmp.cleanup()
    return sim


_ = signal  # the schedule speaks of signals through the fakes
