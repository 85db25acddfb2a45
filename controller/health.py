"""Health policies: memory limits, liveness probes (logIdle, exec, httpGet); starts log rotation.

Runtime layer, driven by `health_loop` beside the reconcile loop. A memory round is one
/proc pass for all limited instances together. Probes run as tasks with timeouts, never
overlapping for one instance and never blocking the loop. A failure only asks the
controller to stop the instance (`request_stop`): the planner stops and restarts it per policy.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import urllib.parse
from dataclasses import dataclass, field

from controller import cgroups, logfiles, procfs, redact
from controller.activity_sampler import ActivitySampler
from controller.logrotate import rotation_loop
from controller.manifests import AgentSpec, Liveness
from controller.model import ExitReason, Handle, InstanceRecord, InstanceSpec, RunState
from controller.reconciler import Controller
from controller.supervisors.process import spawn_env

log = logging.getLogger("agentctl.health")
MEMORY_EVERY = 0.5
MAX_PERIOD = 5.0
MIN_WAIT = 0.02
OUTPUT_CHARS = 2000  # of a probe's output kept for the exit message and the event


@dataclass
class ProbeState:
    """The probe schedule of one run of one instance (a restart starts a fresh state)."""

    started: float  # monotonic start of the run this state belongs to
    next_at: float
    failures: int = 0
    running: asyncio.Task[None] | None = None
    last_output: str = ""


LogSignature = tuple[int, int, int]  # (inode, size, mtime in ns) of an instance log


@dataclass
class IdleClock:
    """When each instance's log last changed, on the monotonic clock (CONTRACT §11 "Time").

    The log's mtime is only compared with itself, never with a clock: a wall-clock step
    moves neither side of the subtraction. Pure: every time is given by the caller."""

    _seen: dict[str, tuple[float, LogSignature | None, float]] = field(default_factory=dict)  # id -> (run, sig, since)

    def silent_for(self, key: str, *, run: float, seen: LogSignature | None, size_at_start: int, now: float) -> float:
        before = self._seen.get(key)
        if before is None or before[0] != run:
            # first look at this run: output since its start (the log grew) counts as "just now",
            # a log that did not grow has been silent since the run started
            grew = seen is not None and seen[1] != size_at_start
            since = now if grew else min(run, now)
        else:
            since = before[2] if seen == before[1] else now
        self._seen[key] = (run, seen, since)
        return max(0.0, now - since)

    def forget_all_but(self, keys: set[str]) -> None:
        for key in [k for k in self._seen if k not in keys]:
            del self._seen[key]


@dataclass
class Health:
    controller: Controller
    probes: dict[str, ProbeState] = field(default_factory=dict)
    next_memory: float = float("-inf")
    idle: IdleClock = field(default_factory=IdleClock)
    # set by a finished probe: its result may call for the next one sooner than any timer
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    activity: ActivitySampler = field(init=False)  # activity: screen sampling of provider instances

    def __post_init__(self) -> None:
        self.activity = ActivitySampler(self.controller)  # activity: one sampler per health loop

    def live(self) -> list[InstanceRecord]:
        return [r for r in self.controller.instances.values() if r.state == RunState.RUNNING and r.handle is not None]

    def round(self, now: float) -> float:
        """One sampling round; returns seconds until the next one is useful."""
        live = self.live()
        waits = [MAX_PERIOD]  # intake: log rotation moved to controller/logrotate.py (its own task)
        waits.append(self._memory(live, now))
        waits.append(self._liveness(live, now))
        waits.append(self.activity.round(live, now))  # activity: captures due, before logIdle looks again
        ids = {r.id for r in live}
        for gone in [k for k in self.probes if k not in ids]:
            self.probes.pop(gone)  # a probe still in flight finds its run over and does nothing
        self.idle.forget_all_but(ids)
        return max(MIN_WAIT, min(waits))

    def _spec(self, rec: InstanceRecord) -> AgentSpec | None:
        """The spec the instance runs, or None while it runs an older one (it is being replaced)."""
        agent = self.controller.agents.get(rec.agent)
        if agent is None or agent.desired is None or agent.desired.spec_hash != rec.spec_hash:
            return None
        spec: AgentSpec = agent.desired.spec
        return spec

    def _current(self, rec: InstanceRecord) -> bool:
        """The same run of the instance is still up and nothing has asked to stop it yet."""
        now = self.controller.instances.get(rec.id)
        return (now is not None and now.state == RunState.RUNNING and now.started_mono == rec.started_mono
                and now.health is None)

    # -- memory ---------------------------------------------------------------
    def _memory(self, live: list[InstanceRecord], now: float) -> float:
        limited = [(r, s.resources.memory_limit_mib) for r in live
                   if (s := self._spec(r)) is not None and s.resources.memory_limit_mib and r.health is None]
        if not limited:
            return MAX_PERIOD
        if now < self.next_memory:
            return self.next_memory - now
        self.next_memory = now + MEMORY_EVERY
        snap = procfs.snapshot()  # one /proc pass for every limited instance
        for rec, limit in limited:
            assert rec.handle is not None and limit is not None
            # the cgroup's working set where the kernel keeps one, else PSS of the whole tree, not RSS
            # (shared pages of the CLIs' binaries would count once per agent): see docs/agents.md
            limit_bytes = int(limit * 1024 * 1024)
            used = instance_memory(snap, rec.handle, limit=limit_bytes)
            if used > limit_bytes:
                self.controller.request_stop(
                    rec.id, ExitReason.MEMORY_LIMIT_EXCEEDED,
                    f"resident memory {used / 1048576:.1f} MiB over the limit of {limit:g} MiB")
        return MEMORY_EVERY

    # -- liveness -------------------------------------------------------------
    def _liveness(self, live: list[InstanceRecord], now: float) -> float:
        wait = MAX_PERIOD
        for rec in live:
            spec = self._spec(rec)
            if spec is None or spec.liveness is None or rec.health is not None:
                continue
            probe = spec.liveness
            if probe.log_idle_seconds is not None:
                wait = min(wait, self._log_idle(rec, probe.log_idle_seconds, now))
                continue
            state = self.probes.get(rec.id)
            if state is None or state.started != rec.started_mono:
                # the first probe of a run comes one period after its start
                state = self.probes[rec.id] = ProbeState(rec.started_mono, now + probe.period_seconds)
            if state.running is not None:
                continue  # never two at once for one instance; its end sets `changed`
            if now >= state.next_at:
                state.next_at = now + probe.period_seconds
                state.running = asyncio.get_running_loop().create_task(self._probe(rec, state, probe))
            wait = min(wait, state.next_at - now)
        return wait

    def _log_idle(self, rec: InstanceRecord, idle: float, now: float) -> float:
        """Seconds of silence on the monotonic clock: a wall-clock step (or an mtime set by
        hand) changes nothing, only a change of the log's size, mtime or inode counts as output."""
        try:
            st = os.stat(self.controller.log_path(rec.id))
            seen: LogSignature | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            seen = None
        silent = self.idle.silent_for(rec.id, run=rec.started_mono, seen=seen, size_at_start=rec.log_offset, now=now)
        # a provider session Idle or WaitingForInput is never idle-killed (CONTRACT §9); for a sampled
        # screen, only a change beyond counters and spinners counts as output
        last = self.activity.last_output(rec, now - silent, now)
        if last is None:
            return MAX_PERIOD  # looked at again next sample
        silent = now - last
        if silent >= idle:
            self.controller.request_stop(rec.id, ExitReason.LIVENESS_FAILED,
                                         f"logIdle: no output for {silent:.1f}s (logIdleSeconds {idle:g})")
            return MAX_PERIOD
        return idle - silent

    async def _probe(self, rec: InstanceRecord, state: ProbeState, probe: Liveness) -> None:
        try:
            if probe.exec is not None:
                kind, (ok, output) = "exec", await self._exec(rec, probe.exec, probe.timeout_seconds)
            else:
                assert probe.http_get is not None
                kind, (ok, output) = "httpGet", await http_probe(probe.http_get.url, probe.timeout_seconds)
            if self.probes.get(rec.id) is not state or not self._current(rec):
                return  # the run this probe looked at is over: its result is of no use
            state.last_output = output
            state.failures = 0 if ok else state.failures + 1
            if not ok:
                log.info("%s %s probe failed (%d/%d): %s", rec.id, kind, state.failures, probe.failure_threshold,
                         output)
            if state.failures >= probe.failure_threshold:
                self.controller.request_stop(rec.id, ExitReason.LIVENESS_FAILED,
                                             f"{kind} probe failed {state.failures} times in a row: {output}")
        except Exception as exc:  # noqa: BLE001 - a broken probe is logged, the loop goes on
            log.error("%s probe crashed: %r", rec.id, exc)
        finally:
            state.running = None
            self.changed.set()

    def _instance_spec(self, rec: InstanceRecord) -> InstanceSpec | None:
        agent = self.controller.agents.get(rec.agent)
        if agent is None or agent.desired is None or rec.index >= len(agent.desired.instances):
            return None
        inst: InstanceSpec = agent.desired.instances[rec.index]
        return inst

    async def _exec(self, rec: InstanceRecord, argv: list[str], timeout: float) -> tuple[bool, str]:
        inst = self._instance_spec(rec)
        if inst is None:
            return True, ""
        # the instance's own environment, marker of this controller included
        env = {**spawn_env(inst), "AGENTCTL_CONTROLLER_ID": self.controller.controller_id}
        ok, output = await exec_probe(argv, cwd=inst.cwd, env=env, timeout=timeout)
        # the output goes to lastExit.message and events: never an env value there (CONTRACT §11)
        return ok, redact.redact_text(output, redact.secret_values(inst.env))

    async def cancel(self) -> None:
        await self.activity.cancel()  # activity: captures in flight
        tasks = [s.running for s in self.probes.values() if s.running is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def instance_memory(snap: procfs.Snapshot, handle: Handle, *, limit: int | None = None) -> int:
    """Bytes the instance uses: its cgroup's memory.current when the kernel keeps it for us,
    else resident memory summed over its group, its tree and (with a cgroup) every member;
    against a limit, the proportional set size once the resident memory is over it."""
    if handle.cgroup:
        exact = cgroups.memory_bytes(handle.cgroup)
        if exact is not None:
            return exact
    pids = snap.instance_pids(handle.pid, handle.pgid, handle.cgroup)
    if limit is not None:
        return procfs.tree_memory(snap, pids, limit=limit)
    rss, _ = snap.usage(pids)
    return rss


async def exec_probe(argv: list[str], *, cwd: str, env: dict[str, str], timeout: float) -> tuple[bool, str]:
    """Run argv in its own process group; (exit status 0, its output). Over time: the group is killed."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
    except OSError as exc:
        return False, f"cannot run {argv[0]!r}: {exc.strerror or exc}"
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except (TimeoutError, asyncio.CancelledError) as exc:
        _kill_group(proc.pid)
        await proc.wait()
        if isinstance(exc, asyncio.CancelledError):
            raise
        return False, f"timed out after {timeout:g}s"
    text = logfiles.strip_escapes(out[-OUTPUT_CHARS:].decode(errors="replace")).strip()
    return proc.returncode == 0, f"exit {proc.returncode}: {text}" if text else f"exit {proc.returncode}"


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


async def http_probe(url: str, timeout: float) -> tuple[bool, str]:
    """GET url (loopback only, so never through a proxy); 2xx and 3xx are success, redirects not followed."""
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "127.0.0.1").strip("[]")
    port = parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        return await asyncio.wait_for(_get(host, port, target, parts.netloc), timeout)
    except TimeoutError:
        return False, f"GET {url}: timed out after {timeout:g}s"
    except (OSError, ValueError) as exc:
        return False, f"GET {url}: {getattr(exc, 'strerror', None) or exc}"


async def _get(host: str, port: int, target: str, netloc: str) -> tuple[bool, str]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: {netloc}\r\nUser-Agent: agentctl-probe\r\n"
                     "Accept: */*\r\nConnection: close\r\n\r\n".encode("latin-1"))
        await writer.drain()
        line = (await reader.readline()).decode("latin-1").strip()
        fields = line.split(" ", 2)
        if len(fields) < 2 or not fields[0].startswith("HTTP/") or not fields[1].isdigit():
            return False, f"not an HTTP response: {line[:200]!r}"
        code = int(fields[1])
        body = await _body_start(reader)
        text = " ".join(logfiles.strip_escapes(body.decode(errors="replace")).split())
        return 200 <= code < 400, f"HTTP {code}" + (f": {text}" if text else "")
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def _body_start(reader: asyncio.StreamReader) -> bytes:
    """Skip the headers, then up to a few hundred bytes of the body: enough to say why a probe failed."""
    length: int | None = None
    while True:
        header = await reader.readline()
        if header in (b"\r\n", b"\n", b""):
            break
        name, _, value = header.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length" and value.strip().isdigit():
            length = int(value.strip())
    want = min(length, 300) if length is not None else 300
    if want <= 0:
        return b""
    try:
        return await asyncio.wait_for(reader.read(want), 0.5)
    except TimeoutError:
        return b""


async def health_loop(controller: Controller, stop: asyncio.Event) -> None:
    health = Health(controller)
    rotation = asyncio.ensure_future(rotation_loop(controller, stop))  # intake: rotation paced by write rate, off the loop
    started = asyncio.Event()
    controller.on_start.append(started.set)  # a new instance may need a probe schedule at once
    try:
        while not stop.is_set():
            started.clear()
            health.changed.clear()
            try:
                wait = health.round(time.monotonic())
            except Exception as exc:  # noqa: BLE001 - a sampling failure is logged, supervision goes on
                log.error("health round failed: %r", exc)
                wait = MAX_PERIOD
            waiters = [asyncio.ensure_future(e.wait()) for e in (stop, started, health.changed)]
            await asyncio.wait(waiters, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            for w in waiters:
                w.cancel()
    finally:
        controller.on_start.remove(started.set)
        rotation.cancel()  # intake
        await asyncio.gather(rotation, return_exceptions=True)  # intake
        await health.cancel()
