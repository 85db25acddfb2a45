"""The executor: a plan's actions -> supervisor calls -> new records in the table.

Runtime layer. It applies what the planner decided and records what happened; it computes no
policy (backoff, restart budgets and exit reasons come from the planner and controller.records).
"""

from __future__ import annotations

import logging
import os
import signal as signals
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace

from controller import hooks, logfiles, opsview, records, redact, sessions
from controller.clock import TimeSource
from controller.providers import Preset
from controller.model import Action, ExitReason, Finish, Forget, InstanceRecord, Kill, Schedule, Start, Stop
from controller.runtime.calls import Caller
from controller.runtime.exits import Exits
from controller.runtime.queue import WorkQueue
from controller.runtime.table import AgentState, AgentTable
from controller.supervisors.base import ExitStatus, Supervisor, SupervisorError

log = logging.getLogger("agentctl")


class Executor:
    def __init__(self, table: AgentTable, queue: WorkQueue, exits: Exits, supervisors: dict[str, Supervisor], *,
                 clock: TimeSource, call: Caller, controller_id: str,
                 check_cwd: Callable[[str], None] = lambda cwd: None,
                 presets: Mapping[str, Preset] | None = None) -> None:
        self.table = table
        self.queue = queue
        self.exits = exits
        self.supervisors = supervisors
        self.clock = clock
        self.call = call
        self.controller_id = controller_id
        self.check_cwd = check_cwd
        self.presets: Mapping[str, Preset] = presets or {}
        self.starting: set[str] = set()  # instance ids whose supervisor start is in flight
        self.asked_while_starting: dict[str, tuple[str, str]] = {}  # instance -> (reason, message)
        self.failures = 0
        self.on_start: list[Callable[[AgentState], None]] = []
        # a fleet: no start without this host's claim; each start gets a larger fencing token
        self.start_token: Callable[[str], Awaitable[int]] | None = None

    async def apply(self, agent: AgentState, action: Action) -> None:
        if isinstance(action, Start):
            await self.start(agent, action)
        elif isinstance(action, Stop):
            await self.stop(action)
        elif isinstance(action, Kill):
            await self.kill(action.instance)
        elif isinstance(action, Schedule):
            self.schedule(action)
        elif isinstance(action, Finish):
            self.finish(action)
        elif isinstance(action, Forget):
            self.forget(action.instance)

    async def start(self, agent: AgentState, action: Start) -> None:
        spec = action.spec
        sup = self.supervisors[spec.supervisor]
        prev = self.table.instances.get(spec.id)
        run_id = os.urandom(6).hex()
        base = records.started(prev, spec, action, mono=self.clock.monotonic(), wall=self.clock.wall(),
                               log_offset=logfiles.size(self.exits.log_path(spec.id)), run_id=run_id)
        counted = records.restart_counter_reason(prev, action)
        if counted is not None:
            self.table.count_restart(agent.name, counted)
        spec = spec.with_env(("AGENTCTL_CONTROLLER_ID", self.controller_id), ("AGENTCTL_RUN", run_id))
        # session ids (CONTRACT §9) and the argv this start runs, kept on the record
        taken = [r.provider_session_id for i, r in self.table.instances.items() if i != spec.id]
        spec, session = sessions.prepare(spec, agent.desired.spec if agent.desired else None, self.presets, prev,
                                         log_path=self.exits.log_path(spec.id), taken=taken)
        base = replace(base, session_id=session.session_id, provider_session_id=session.provider_session_id,
                       argv=session.argv)
        self.exits.run_secrets[spec.id] = redact.secret_values(spec.env)  # for redacting this run's log tail
        self.starting.add(spec.id)  # holds its --max-agents slot while the start is in flight
        try:
            self.check_cwd(spec.cwd)
            if self.start_token is not None:
                spec = spec.with_env(("AGENTCTL_FENCING_TOKEN", str(await self.start_token(spec.id))))
            handle = await self.call(sup, sup.start, spec, self.exits.log_path(spec.id))
        except SupervisorError as exc:
            self._start_failed(agent, base, exc)
            return
        finally:
            self.starting.discard(spec.id)
        self.table.put(replace(records.running(base, handle), session_started=bool(base.session_id)))  # then resumes
        self.exits.watch(spec.id, handle)
        self._replay_request(spec.id)
        for hook in self.on_start:
            hook(agent)
        verb = "Restarted" if prev is not None else "Started"
        log.info("%s %s -> Running pid %d (%s)", spec.id, action.reason, handle.pid, verb,
                 extra=opsview.logfields(agent.name, spec.id, verb.lower(), action.reason))
        self.table.event(agent.name, spec.id, verb, action.reason, f"pid {handle.pid}")

    def _start_failed(self, agent: AgentState, base: InstanceRecord, exc: SupervisorError) -> None:
        self.failures += 1
        final = "" if exc.retryable else " (will not retry until the spec changes or a person restarts it)"
        log.error("%s start failed: %s%s", base.id, exc, final,
                  extra=opsview.logfields(agent.name, base.id, "start", "Error"))
        self.table.event(agent.name, base.id, "FailedStart", "Error", str(exc))
        self.table.put(records.start_failed(base, str(exc), wall=self.clock.wall(), retryable=exc.retryable))
        self.starting.discard(base.id)
        self._replay_request(base.id)
        self.queue.mark(agent.name)

    def _replay_request(self, instance_id: str) -> None:
        """A request that arrived while the start was in flight applies to the record the start
        wrote (a person's restart of a tmux start that takes a second is never lost)."""
        if instance_id in self.starting or instance_id not in self.table.instances:
            return
        asked = self.asked_while_starting.pop(instance_id, None)
        if asked is not None:
            self.request_stop(instance_id, *asked)

    async def stop(self, action: Stop) -> None:
        rec = self.table.instances[action.instance]
        sup = self.supervisors.get(rec.supervisor)
        if rec.handle is None or sup is None:
            self.table.put(records.stopped_without_process(rec))
            return
        self.table.put(records.stopping(rec, action.reason, self.clock.monotonic() + action.grace))
        log.info("%s Running -> Stopping (%s, %s, grace %gs)", rec.id, action.reason,
                 signals.Signals(action.signal).name, action.grace,
                 extra=opsview.logfields(rec.agent, rec.id, "stop", str(action.reason)))
        self.table.event(rec.agent, rec.id, "Stopping", action.reason, f"signal {signals.Signals(action.signal).name}")
        await self.call(sup, sup.signal, rec.handle, action.signal)
        if action.grace <= 0:
            await self.kill(rec.id)

    async def kill(self, instance_id: str) -> None:
        rec = self.table.instances[instance_id]
        sup = self.supervisors.get(rec.supervisor)
        if rec.handle is None or sup is None:
            return
        log.warning("%s grace period over -> SIGKILL to the group", rec.id,
                    extra=opsview.logfields(rec.agent, rec.id, "kill", rec.stop_reason or ""))
        self.table.event(rec.agent, rec.id, "Killed", rec.stop_reason or "", "grace period over: SIGKILL")
        self.table.put(records.kill_sent(rec))
        await self.call(sup, sup.signal, rec.handle, signals.SIGKILL)
        # an adopted leader that ignored nothing but is not our child: no pidfd event may come
        if not await self.call(sup, sup.alive, rec.handle):
            await self.exits.finish(rec.id, ExitStatus(None, int(signals.SIGKILL)))

    def schedule(self, action: Schedule) -> None:
        rec = self.table.instances[action.instance]
        self.table.put(records.scheduled(rec, action))
        if action.delay > 0:
            exit_ = rec.last_exit  # a signal exit reads Signaled(SIGKILL), not Exited(None)
            what = opsview.exit_word(exit_.exit_code, exit_.signal) if exit_ else "Exited(unknown)"
            log.info("%s %s -> BackOff %gs", rec.id, what, action.delay,
                     extra=opsview.logfields(rec.agent, rec.id, "backoff", "BackOff"))
            self.table.event(rec.agent, rec.id, "BackOff", exit_.reason if exit_ else "",
                             f"restart {action.attempt} in a row, in {action.delay:g}s")

    def finish(self, action: Finish) -> None:
        rec = self.table.instances[action.instance]
        self.table.put(records.finished(rec, action))
        log.info("%s Exited -> %s %s", rec.id, action.reason, action.message,
                 extra=opsview.logfields(rec.agent, rec.id, "finish", str(action.reason)))
        self.table.event(rec.agent, rec.id, action.reason, action.reason, action.message or "no restart (restartPolicy)")

    def forget(self, instance_id: str) -> None:
        rec = self.table.drop(instance_id)
        hooks.forget_files(self.exits.log_path(instance_id), instance_id)  # its activity hook files
        if rec is not None:
            reason = rec.last_exit.reason if rec.last_exit else ""
            self.table.event(rec.agent, instance_id, "Stopped", reason, "instance removed")

    def request_stop(self, instance_id: str, reason: str, message: str) -> None:
        """A liveness, memory or manual request: the planner stops (and restarts) the instance."""
        if instance_id in self.starting:
            self.asked_while_starting[instance_id] = (reason, message)
            return
        rec = self.table.instances.get(instance_id)
        if rec is None:
            return
        asked = records.restart_requested(rec, reason, message)
        if asked is None:
            return
        self.table.put(asked)
        log.warning("%s %s: %s", instance_id, reason, message,
                    extra=opsview.logfields(rec.agent, instance_id, "stop", str(reason)))
        self.table.event(rec.agent, instance_id, reason, reason, message)
        self.queue.mark(rec.agent)



