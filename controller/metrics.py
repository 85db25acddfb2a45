"""Prometheus metrics of CONTRACT §5, on a registry of the controller's own.

Per-agent series come from a custom collector that reads the controller's immutable
snapshot at scrape time, so a deleted agent's series vanish. Process-tree memory and CPU
come from one /proc pass per scrape, cached for a second.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controller import __version__, procfs
from controller.model import Phase

PHASES = [p.value for p in Phase]


class Usage:
    """Whole-tree RSS and CPU per agent, one /proc pass per second at most."""

    def __init__(self, ttl: float = 1.0) -> None:
        self.ttl = ttl
        self._at = 0.0
        self._value: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()

    def get(self, handles: dict[str, tuple[str, object]]) -> dict[str, tuple[int, float]]:
        with self._lock:
            now = time.monotonic()
            if now - self._at >= self.ttl:
                self._value = self._measure(handles)
                self._at = now
            return self._value

    @staticmethod
    def _measure(handles: dict[str, tuple[str, object]]) -> dict[str, tuple[int, float]]:
        snap = procfs.snapshot()
        out: dict[str, tuple[int, float]] = {}
        for agent, handle in handles.values():
            pids = snap.instance_pids(handle.pid, handle.pgid)  # type: ignore[attr-defined]
            rss, cpu = snap.usage(pids)
            old = out.get(agent, (0, 0.0))
            out[agent] = (old[0] + rss, old[1] + cpu)
        return out


class AgentCollector(Collector):
    def __init__(self, snapshot: Callable[[], object], usage: Usage) -> None:
        self.snapshot = snapshot
        self.usage = usage

    def collect(self) -> Iterator[Metric]:  # noqa: C901 - one family after another
        snap = self.snapshot()
        statuses = snap.statuses  # type: ignore[attr-defined]
        info = GaugeMetricFamily("agentctl_agent_info", "Agent known to this controller (1).",
                                 labels=["agent", "supervisor", "spec_hash", "source"])
        phase = GaugeMetricFamily("agentctl_agent_phase", "1 for the agent's current phase, 0 for the others.",
                                  labels=["agent", "phase"])
        desired = GaugeMetricFamily("agentctl_agent_replicas_desired", "Desired instances.", labels=["agent"])
        ready = GaugeMetricFamily("agentctl_agent_replicas_ready", "Ready instances.", labels=["agent"])
        for name, doc in sorted(statuses.items()):
            info.add_metric([name, doc.get("supervisor") or "", doc.get("specHash") or "", doc.get("source") or ""], 1)
            for p in PHASES:
                phase.add_metric([name, p], 1 if doc.get("phase") == p else 0)
            desired.add_metric([name], doc["replicas"]["desired"])
            ready.add_metric([name], doc["replicas"]["ready"])
        yield from (info, phase, desired, ready)
        restarts = CounterMetricFamily("agentctl_agent_restarts", "Restarts by reason, across spec changes.",
                                       labels=["agent", "reason"])
        for (agent, reason), value in sorted(snap.counters.items()):  # type: ignore[attr-defined]
            if agent in statuses:
                restarts.add_metric([agent, reason], value)
        yield restarts
        exit_code = GaugeMetricFamily("agentctl_agent_last_exit_code", "Exit code of the last exit.", labels=["agent"])
        for agent, code in sorted(snap.last_exit_codes.items()):  # type: ignore[attr-defined]
            if agent in statuses:
                exit_code.add_metric([agent], code)
        yield exit_code
        yield from self._instances(snap, statuses)
        valid = GaugeMetricFamily("agentctl_manifest_valid", "1 if the manifest file is valid.", labels=["source"])
        for source, ok in sorted(snap.manifest_valid.items()):  # type: ignore[attr-defined]
            valid.add_metric([source], 1 if ok else 0)
        yield valid

    def _instances(self, snap: object, statuses: dict[str, dict[str, object]]) -> Iterator[Metric]:
        start = GaugeMetricFamily("agentctl_agent_start_time_seconds", "Start time of the instance, unix seconds.",
                                  labels=["agent", "instance"])
        for iid, (agent, wall) in sorted(snap.start_times.items()):  # type: ignore[attr-defined]
            if agent in statuses:
                start.add_metric([agent, iid], wall)
        yield start
        usage = self.usage.get(snap.handles)  # type: ignore[attr-defined]
        rss = GaugeMetricFamily("agentctl_agent_resident_memory_bytes", "Resident memory of every process of the agent.",
                                labels=["agent"])
        cpu = CounterMetricFamily("agentctl_agent_cpu_seconds", "CPU time of the agent's live processes.",
                                  labels=["agent"])
        for agent in sorted(statuses):
            mem, seconds = usage.get(agent, (0, 0.0))
            rss.add_metric([agent], mem)
            cpu.add_metric([agent], seconds)
        yield rss
        yield cpu


class Metrics:
    """The controller's own registry: scrape-time agent series plus loop counters."""

    def __init__(self, snapshot: Callable[[], object], queue_depth: Callable[[], float]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(AgentCollector(snapshot, Usage()))
        self.reconciles = Counter("agentctl_reconcile", "Reconciles of one agent, by result.", ["result"],
                                  registry=self.registry)
        for result in ("success", "error"):
            self.reconciles.labels(result)
        self.duration = Histogram("agentctl_reconcile_duration_seconds", "Time to reconcile one agent.",
                                  buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
                                  registry=self.registry)
        depth = Gauge("agentctl_workqueue_depth", "Agents waiting to be reconciled.", registry=self.registry)
        depth.set_function(queue_depth)
        build = Gauge("agentctl_build_info", "Build of this controller (1).", ["version"], registry=self.registry)
        build.labels(__version__).set(1)

    def observe(self, result: str, seconds: float) -> None:
        self.reconciles.labels(result).inc()
        if result == "success":
            self.duration.observe(seconds)
