"""Plugs the fleet into one controller: the hooks the reconciler calls, the fence process, metrics.

Runtime layer, called by the runner only when coordination is configured. The reconciler sees
the fleet through `FleetHooks` (which instances may run here, a fencing token per start, the
fleet-wide status); everything etcd-related stays behind it.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controller import procfs
from controller.desired import DesiredAgent
from controller.fleet.assign import Want
from controller.fleet.coordinator import Fleet, Local
from controller.fleet.kv import EtcdKV
from controller.model import RunState
from controller.settings import Coordination, Settings
from controller.status import iso

if TYPE_CHECKING:
    from controller.reconciler import Controller

log = logging.getLogger("agentctl")


class FleetHooks:
    """What the reconcile loop asks of the fleet (each call site is marked `# fleet:`)."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def filter(self, target: DesiredAgent) -> DesiredAgent:
        """Only the instances this host holds a claim on, while its lease is surely alive."""
        return replace(target, instances=tuple(i for i in target.instances if self.fleet.runnable(i.id)))

    async def token(self, instance_id: str) -> int:
        return await self.fleet.token(instance_id)

    def ready_error(self) -> str | None:
        return self.fleet.ready_error()

    def decorate(self, doc: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
        """The status of an agent across the fleet: every instance with its host, fleet-wide
        replicas and phase, and the FleetReady condition (CONTRACT §10)."""
        return fleet_status(doc, previous, host=self.fleet.host, remote=self.fleet.remote_instances(doc["name"]),
                            error=self.fleet.ready_error(), fleet=self.fleet.cfg.fleet,
                            hosts=len(self.fleet.view.hosts), tokens=self.fleet.owned)


def _condition(kind: str, ok: bool, reason: str, message: str, now: str,
               previous: dict[str, Any] | None) -> dict[str, Any]:
    status = "True" if ok else "False"
    before = next((c for c in (previous or {}).get("conditions", []) if c.get("type") == kind), None)
    since = before["lastTransitionTime"] if before and before.get("status") == status else now
    return {"type": kind, "status": status, "reason": reason, "message": message, "lastTransitionTime": since}


def fleet_status(doc: dict[str, Any], previous: dict[str, Any] | None, *, host: str,
                 remote: list[dict[str, Any]], error: str | None, fleet: str, hosts: int,
                 tokens: dict[str, int]) -> dict[str, Any]:
    local = [dict(i, host=host, **({"fencingToken": tokens[i["id"]]} if i["id"] in tokens else {}))
             for i in doc.get("instances", [])]
    local_ids = {i["id"] for i in local}
    others = [{"id": r["id"], "host": r["host"], "pid": r.get("pid"), "startedAt": iso(r.get("startedAt")),
               "state": r.get("state"), **({"fencingToken": r["token"]} if r.get("token") else {})}
              for r in remote if r["id"] not in local_ids]
    doc["instances"] = sorted(local + others, key=lambda i: int(str(i["id"]).rsplit("-", 1)[1]))
    ready = int(doc["replicas"]["ready"]) + sum(1 for r in remote if r["id"] not in local_ids and r.get("ready"))
    desired = int(doc["replicas"]["desired"])
    doc["replicas"] = {"desired": desired, "ready": ready}
    phase, now = doc["phase"], doc.get("updatedAt") or ""
    if phase not in ("Failed", "Invalid", "Suspended", "BackOff", "Stopping", "Stopped") and desired > 0:
        if ready >= desired:
            phase = "Running"
        elif not local or phase == "Running":
            phase = "Starting" if others or local else "Pending"
    ok = phase == "Running" and ready >= desired > 0
    before = next((c for c in doc["conditions"] if c["type"] == "Ready"), None)
    if phase != doc["phase"] or (before is not None and (before["status"] == "True") != ok):
        doc["phase"] = phase
        reason = {"Running": "Running", "Starting": "Starting", "Pending": "Unassigned"}.get(phase, phase)
        doc["conditions"] = [c if c["type"] != "Ready" else _condition("Ready", ok, reason, "", now, previous)
                             for c in doc["conditions"]]
    message = f"fleet {fleet}: {hosts} live hosts" if error is None else error
    doc["conditions"].append(_condition("FleetReady", error is None, "LeaseHeld" if error is None else "EtcdUnavailable",
                                        message, now, previous))
    return doc


def _wants(controller: Controller) -> list[Want]:
    """Every instance the manifests ask for, with its placement: the leader's input."""
    out: list[Want] = []
    for agent in controller.agents.values():
        d = agent.desired
        if d is None or not agent.present or agent.halted or d.spec.suspend:
            continue
        placement = d.spec.placement
        hosts = tuple(placement.hosts) if placement is not None and placement.hosts is not None else None
        labels = dict(placement.host_labels) if placement is not None and placement.host_labels is not None else None
        out.extend(Want(i.id, agent.name, i.index, hosts, labels) for i in d.instances)
    return out


def _local(controller: Controller) -> dict[str, Local]:
    """Instances with a live process here (or a start in flight): never released, always fenced."""
    out: dict[str, Local] = {}
    for rec in controller.instances.values():
        if rec.state == RunState.EXITED:
            continue
        agent = controller.agents.get(rec.agent)
        current = agent is not None and agent.desired is not None and agent.desired.spec_hash == rec.spec_hash
        ready = rec.state == RunState.RUNNING and rec.health is None and current
        out[rec.id] = Local(rec.agent, str(rec.state), rec.handle, ready, rec.started_at)
    for iid in controller.starting:
        out.setdefault(iid, Local(iid.rsplit("-", 1)[0], "starting", None, False, 0.0))
    return out


def make_kv(cfg: Coordination, timeout: float) -> EtcdKV:
    e = cfg.etcd
    return EtcdKV(e.endpoints, timeout=timeout, ca_file=e.ca_file, cert_file=e.cert_file, key_file=e.key_file)


def attach(controller: Controller, settings: Settings) -> Fleet:
    cfg = settings.coordination
    assert cfg is not None
    from controller.fleet.timing import Timing

    timeout = Timing(cfg.lease_ttl).request_timeout

    def mark(names: Any) -> None:
        for name in names:
            if name in controller.agents:
                controller.mark(name)

    def mark_all() -> None:
        mark(list(controller.agents))
        controller.wake()  # with no agent at all, the snapshot (/readyz) is still republished

    fleet = Fleet(cfg, make_kv(cfg, timeout), make_kv(cfg, timeout), host=settings.host_name,
                  labels=settings.host_labels, capacity=settings.max_agents, controller_id=controller.controller_id,
                  state_dir=settings.state_dir, wants=lambda: _wants(controller), local=lambda: _local(controller),
                  mark=mark, mark_all=mark_all,
                  revision=lambda: controller.git.revision if controller.git is not None else None,
                  can_lead=lambda: controller.ready and (controller.git is None or controller.git.revision is not None))
    controller.fleet = FleetHooks(fleet)
    for agent in controller.agents.values():
        agent.placed = True  # restored before the hooks existed: placement is per instance now
    controller.on_publish.append(fleet.write_fence)  # a new start reaches the fence without waiting for a renewal
    seen: list[object] = [None]

    def manifests_changed() -> None:
        """The leader reassigns as soon as replicas, placement or the agents themselves change."""
        key = [(w.instance, w.hosts, tuple(sorted((w.labels or {}).items()))) for w in _wants(controller)]
        if key != seen[0]:
            seen[0] = key
            fleet.poke()

    controller.on_publish.append(manifests_changed)
    return fleet


def start_fence(state_dir: Path) -> subprocess.Popen[bytes]:
    """The fence outlives a hung or killed controller; it shares our process group, so a crash
    of the whole service (or the test's kill of the group) takes it too."""
    import os

    ticks = procfs.start_ticks(os.getpid())
    argv = [sys.executable, "-m", "controller.fleet.fence", "--file", str(state_dir / "fence.json"),
            "--controller-pid", str(os.getpid())]
    if ticks is not None:
        argv += ["--controller-start", str(ticks)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, close_fds=True)
    log.info("fleet: fence process pid %d guards the coordinated instances", proc.pid)
    return proc
