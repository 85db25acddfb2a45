"""Health policies: memory limits, liveness probes (logIdle, exec, httpGet), log rotation.

Runtime layer. A sampling round runs on a timer; it needs one /proc pass for all memory
limits together. Probes run as tasks with timeouts, never overlapping for one instance and
never blocking the loop. A failure only asks the controller to stop the instance
(`request_stop`): the planner then stops and restarts it per policy.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from controller import logfiles, procfs
from controller.model import ExitReason, InstanceRecord, RunState
from controller.reconciler import Controller
from controller.supervisors.process import spawn_env

log = logging.getLogger("agentctl.health")
ROTATE_EVERY = 2.0
MAX_PERIOD = 5.0


@dataclass
class ProbeState:
    started: float  # monotonic start of the instance this state belongs to
    next_at: float
    failures: int = 0
    running: asyncio.Task[None] | None = None
    last_output: str = ""


@dataclass
class Health:
    controller: Controller
    probes: dict[str, ProbeState] = field(default_factory=dict)
    last_rotate: float = 0.0

    def live(self) -> list[InstanceRecord]:
        return [r for r in self.controller.instances.values() if r.state == RunState.RUNNING and r.handle is not None]

    def round(self, now: float) -> float:
        """One sampling round; returns seconds until the next one is useful."""
        live = self.live()
        waits = [MAX_PERIOD, ROTATE_EVERY]
        if now - self.last_rotate >= ROTATE_EVERY:
            self.last_rotate = now
            self._rotate(live)
        waits.append(self._memory(live))
        waits.append(self._liveness(live, now))
        self.probes = {k: v for k, v in self.probes.items() if k in {r.id for r in live}}
        return max(0.05, min(waits))

    def _spec(self, rec: InstanceRecord):  # type: ignore[no-untyped-def]
        agent = self.controller.agents.get(rec.agent)
        if agent is None or agent.desired is None or agent.desired.spec_hash != rec.spec_hash:
            return None
        return agent.desired.spec

    def _rotate(self, live: list[InstanceRecord]) -> None:
        for rec in live:
            spec = self._spec(rec)
            limits = spec.logs if spec is not None else None
            if limits is None:
                continue
            try:
                if logfiles.rotate_if_needed(self.controller.log_path(rec.id), limits.max_bytes, limits.backups):
                    log.info("%s log rotated (over %d bytes)", rec.id, limits.max_bytes)
            except OSError as exc:
                log.error("%s log rotation failed: %s", rec.id, exc)

    def _memory(self, live: list[InstanceRecord]) -> float:
        limited = [(r, s.resources.memory_limit_mib) for r in live
                   if (s := self._spec(r)) is not None and s.resources.memory_limit_mib]
        if not limited:
            return MAX_PERIOD
        snap = procfs.snapshot()
        for rec, limit in limited:
            assert rec.handle is not None and limit is not None
            rss, _ = snap.usage(snap.instance_pids(rec.handle.pid, rec.handle.pgid))
            if rss > limit * 1024 * 1024:
                self.controller.request_stop(
                    rec.id, ExitReason.MEMORY_LIMIT_EXCEEDED,
                    f"resident memory {rss / 1048576:.1f} MiB over the limit of {limit:g} MiB")
        return 0.5

    def _liveness(self, live: list[InstanceRecord], now: float) -> float:
        wait = MAX_PERIOD
        for rec in live:
            spec = self._spec(rec)
            if spec is None or spec.liveness is None or rec.health is not None:
                continue
            probe = spec.liveness
            state = self.probes.get(rec.id)
            if state is None or state.started != rec.started_mono:
                state = self.probes[rec.id] = ProbeState(rec.started_mono, now + probe.period_seconds)
            if probe.log_idle_seconds is not None:
                wait = min(wait, self._log_idle(rec, probe.log_idle_seconds))
                continue
            if now >= state.next_at and state.running is None:
                state.next_at = now + probe.period_seconds
                state.running = asyncio.get_running_loop().create_task(self._probe(rec, state))
            wait = min(wait, max(0.05, state.next_at - now))
        return wait

    def _log_idle(self, rec: InstanceRecord, idle: float) -> float:
        try:
            mtime = os.stat(self.controller.log_path(rec.id)).st_mtime
        except OSError:
            mtime = 0.0
        last = max(mtime, rec.started_at)
        silent = time.time() - last
        if silent >= idle:
            self.controller.request_stop(rec.id, ExitReason.LIVENESS_FAILED,
                                         f"no output for {silent:.1f}s (logIdleSeconds {idle:g})")
            return MAX_PERIOD
        return max(0.05, idle - silent)

    async def _probe(self, rec: InstanceRecord, state: ProbeState) -> None:
        spec = self._spec(rec)
        try:
            if spec is None or spec.liveness is None:
                return
            probe = spec.liveness
            ok, output = await (self._exec(rec, probe.exec, probe.timeout_seconds) if probe.exec
                                else self._http(probe.http_get.url, probe.timeout_seconds))
            state.last_output = output
            state.failures = 0 if ok else state.failures + 1
            if state.failures >= probe.failure_threshold:
                kind = "exec" if probe.exec else "httpGet"
                self.controller.request_stop(rec.id, ExitReason.LIVENESS_FAILED,
                                             f"{kind} probe failed {state.failures} times in a row: {output}")
        finally:
            state.running = None

    async def _exec(self, rec: InstanceRecord, argv: list[str], timeout: float) -> tuple[bool, str]:
        agent = self.controller.agents[rec.agent]
        assert agent.desired is not None
        inst = agent.desired.instances[rec.index] if rec.index < len(agent.desired.instances) else None
        if inst is None:
            return True, ""
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, cwd=inst.cwd, env=spawn_env(inst), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            return False, f"cannot run {argv[0]!r}: {exc.strerror or exc}"
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass
            await proc.wait()
            return False, f"timed out after {timeout:g}s"
        text = logfiles.strip_escapes(out[-2000:].decode(errors="replace")).strip()
        return proc.returncode == 0, f"exit {proc.returncode}: {text}" if text else f"exit {proc.returncode}"

    async def _http(self, url: str, timeout: float) -> tuple[bool, str]:
        def get() -> tuple[bool, str]:
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
            try:
                with opener.open(url, timeout=timeout) as resp:
                    return 200 <= resp.status < 400, f"HTTP {resp.status}"
            except urllib.error.HTTPError as exc:
                return 200 <= exc.code < 400, f"HTTP {exc.code}"
            except (urllib.error.URLError, OSError) as exc:
                return False, f"GET {url}: {getattr(exc, 'reason', exc)}"

        return await asyncio.to_thread(get)


async def health_loop(controller: Controller, stop: asyncio.Event) -> None:
    health = Health(controller)
    started = asyncio.Event()
    controller.on_start.append(started.set)  # a new instance may need a probe schedule at once
    while not stop.is_set():
        started.clear()
        try:
            wait = health.round(time.monotonic())
        except Exception as exc:  # noqa: BLE001 - a sampling failure is logged, supervision goes on
            log.error("health round failed: %r", exc)
            wait = MAX_PERIOD
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(started.wait())]
        await asyncio.wait(waiters, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
