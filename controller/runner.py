"""Wiring for `agentctl run` and `agentctl plan`: controller, HTTP, watchers, signals.

Runtime layer. Owns the process-level concerns (signal handlers, the controller.json
file that tells CLI commands where the HTTP listener is) and nothing of reconciling.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

from controller import sessions, status
from controller.desired import DesiredAgent
from controller.http import WebOptions, serve
from controller.metrics import Metrics
from controller.gitsource import fetch_error
from controller.model import Forget, Kill, RunState, Schedule, Start, Stop, Wait
from controller.planner import plan_agent
from controller.providers import display_argv
from controller.reconciler import Controller
from controller.settings import Settings
from controller.storefaults import StoreError
from controller.web.pages import screen_reader
from controller.watch import git_poller, resync_ticker, watch_files

log = logging.getLogger("agentctl")


def run_controller(settings: Settings, host: str, port: int) -> int:
    # the loop thread makes many short syscalls; with the default 5 ms switch interval each one
    # could wait that long for the GIL behind the status writer or an HTTP scrape
    sys.setswitchinterval(0.0005)
    _raise_open_files()
    controller = Controller(settings)
    try:
        controller.open()
    except StoreError as exc:  # storefix: locked past the wait, or unusable (not corrupt): exit 2, keep the file
        log.error("%s", exc)
        return 2
    metrics = Metrics(lambda: controller.snapshot, lambda: float(len(controller.dirty) + len(controller.tasks)))
    controller.observe = metrics.observe
    fleet = None
    if settings.coordination is not None:  # fleet: coordinated by etcd (CONTRACT §10); never imported otherwise
        from controller.fleet.wiring import attach, start_fence
        from controller.metrics import FleetCollector

        fleet = attach(controller, settings)
        metrics.add_fleet(FleetCollector(fleet.stats))
        start_fence(settings.state_dir)
    try:
        # http: the status page reads tokens/events/logs under the state dir and tmux screens
        web = WebOptions(settings.state_dir, settings.http_allowed_hosts,
                         screen_reader(settings.state_dir, controller.controller_id), controller.secrets_of)
        server = serve(host, port, lambda: controller.snapshot, metrics, web)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", host, port, exc.strerror or exc)
        if controller.store is not None:
            controller.store.close()
        return 2
    bound_host, bound_port = str(server.server_address[0]), int(server.server_address[1])
    source = settings.git.url if settings.git else settings.manifests
    log.info("agentctl %s watching %s, state in %s, HTTP on http://%s:%d", _version(), source,
             settings.state_dir, bound_host, bound_port)
    status.atomic_write(settings.state_dir / "controller.json", json.dumps(
        {"pid": os.getpid(), "metricsAddr": f"{bound_host}:{bound_port}", "startedAt": time.time()}) + "\n")
    try:
        return asyncio.run(_main(controller, settings, fleet))
    finally:
        server.shutdown()
        server.server_close()


def _raise_open_files() -> None:
    """Each live instance holds a pidfd: lift the soft open-file limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d: %s", soft, exc)
    if soft < 4096:
        log.warning("open-file limit is %d: about %d agents can be supervised (raise LimitNOFILE)", soft, soft - 64)


def _version() -> str:
    from controller import __version__

    return __version__


async def _main(controller: Controller, settings: Settings, fleet: Any = None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    from controller.health import health_loop

    if controller.git is not None:  # the first revision, before the first pass; a clone can take a while
        began = time.monotonic()
        log.info("fetching %s (the first revision, before the first pass)", controller.git.url)
        result = await asyncio.to_thread(controller.git.sync)
        if result.error:
            log.error("%s", fetch_error(controller.git.url, result.error))  # opscli: says "git fetch" once
        else:
            log.info("fetched %s at %s in %.1fs", controller.git.url, result.revision, time.monotonic() - began)
    background = [] if settings.once else [watch_files(controller, stop), resync_ticker(controller, stop, settings.resync),
                                           health_loop(controller, stop)]
    if controller.git is not None and not settings.once:
        background.append(git_poller(controller, stop, settings.git.interval if settings.git else 30.0))
    if fleet is not None:  # fleet: our lease and claims are known before the first pass plans anything
        await fleet.start()
        background.append(fleet.run(stop))
    code = await controller.run(stop, background)
    if stop.is_set():
        log.info("signal received: stopping the controller%s", ", and its agents" if settings.stop_agents_on_exit else
                 " (agents keep running and are adopted on the next start)")
    await controller.shutdown(stop_agents=settings.stop_agents_on_exit)
    if fleet is not None and settings.stop_agents_on_exit:
        await fleet.release_all()  # fleet: all stopped here, so other hosts may take them over at once
    return code


def _line(action: object, running: bool) -> str | None:
    if isinstance(action, Start):
        verb = "create" if action.reason == "Created" else "restart"
        return f"{verb} {action.spec.id} {action.reason}"
    if isinstance(action, Stop):
        verb = "restart" if action.reason in ("SpecChanged", "ManualRestart", "LivenessFailed", "MemoryLimitExceeded") else "stop"
        return f"{verb} {action.instance} {action.reason}"
    if isinstance(action, Kill):
        return f"stop {action.instance} GracePeriodOver"
    if isinstance(action, Schedule):
        return f"restart {action.instance} BackOff"
    if isinstance(action, Wait):
        return f"noop {action.instance} {action.reason}"
    if isinstance(action, Forget):
        return None
    return f"noop {getattr(action, 'instance', '?')} {getattr(action, 'reason', '')}".rstrip()


def _argv_line(controller: Controller, desired: DesiredAgent | None, line: str) -> list[str]:
    """presets: under a create/restart line of a provider agent, the argv that start would run
    (preset and session ids applied), indented so that `ACTION INSTANCE REASON` lines stay as
    they are. A plain command agent runs its `command` as written: no extra line."""
    verb, iid = line.split()[:2]
    spec = next((i for i in desired.instances if i.id == iid), None) if desired else None
    if verb not in ("create", "restart") or spec is None or desired is None or desired.spec.provider is None:
        return []
    spec, _ = sessions.prepare(spec, desired.spec, controller.presets, controller.instances.get(iid),
                               log_path=controller.log_path(iid), write_files=False)
    return [f"    argv: {display_argv(spec.argv)}"]


def dry_run(settings: Settings, *, running: bool) -> list[str]:
    """`agentctl plan`: the next reconcile's actions, computed without changing anything."""
    controller = Controller(settings)
    controller.open_readonly()
    if controller.git is not None:
        import tempfile

        # fetch into a scratch dir: `plan` changes nothing under the state dir
        with tempfile.TemporaryDirectory(prefix="agentctl-plan-") as scratch:
            from controller.gitsource import GitError, GitSource

            g = controller.git
            controller.git = GitSource(g.url, ref=g.ref, path=g.path.strip("/") or None, workdir=Path(scratch),
                                       max_bytes=g.max_bytes)  # intake: --git-max-bytes
            result = controller.git.sync()
            if result.error:
                raise GitError(fetch_error(g.url, result.error))  # opscli: says "git fetch" once
            controller.sync_manifests()
    else:
        controller.sync_manifests()
    lines: list[str] = []
    now = time.monotonic()
    for name in sorted(controller.agents):
        agent = controller.agents[name]
        if agent.present and not agent.placed:
            lines.append(f"noop {name} NotPlaced")
            continue
        if agent.desired is None and agent.present:
            lines.append(f"noop {name} InvalidManifest")
            continue
        view = controller.view(agent)
        adopted = []
        for rec in view.instances.values():
            sup = controller.supervisors.get(rec.supervisor)
            if rec.state == RunState.EXITED or rec.handle is None or sup is None:
                continue
            if not running and sup.adopt(rec.handle):
                adopted.append(rec.id)
        plan = plan_agent(view, now, capacity=controller.capacity())
        own = [_line(a, running) for a in plan.actions]
        # opscli: forgetting an exited instance of a deleted (or scaled-down) agent is still its stop
        gone = agent.gone_reason if agent.target is None else "ScaledDown"
        own = [f"stop {a.instance} {gone}" if isinstance(a, Forget) else line for a, line in zip(plan.actions, own)]
        for iid in adopted:
            lines.append(f"adopt {iid} ControllerRestart")
        for line in own:
            if line and not (line.startswith("noop") and line.split()[1] in adopted):
                lines.append(line)
                lines.extend(_argv_line(controller, agent.desired, line))  # presets: the argv it would run
        if not plan.actions and not adopted:
            # opscli: a deleted agent with no process left still has its status removed: a stop
            lines.append(f"stop {name} {agent.gone_reason}" if not agent.present else
                         f"noop {name} {'ScaledToZero' if agent.target else 'Gone'}")
    if controller.store is not None:
        controller.store.close()
    return lines
