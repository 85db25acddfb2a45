"""Prometheus metrics of CONTRACT §5, on a registry of the controller's own.

Effects layer; the runner builds one `Metrics`, the HTTP thread renders it. Every series is
made at scrape time from the controller's immutable snapshot (a deleted agent's series
vanish with it), so nothing here writes controller state. Process-tree memory and CPU come
from one /proc pass per scrape, cached for a second.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

from controller import __version__, procfs
from controller.exposition import Family, render
from controller.activity import Activity, agent_activity
from controller.model import ExitReason, Handle, Phase

PHASES = tuple(p.value for p in Phase)
ACTIVITIES = tuple(a.value for a in Activity)
# The exit reasons a restart can be counted under (reconciler._count_restart). Each agent
# gets a 0-valued restarts_total series for every one of them from its first scrape on, so
# that increase()/rate() (the crash-loop alert) see the first restart too: a counter series
# that appears at 1 has no earlier sample to increase from.
RESTART_REASONS = tuple(str(r) for r in (
    ExitReason.ERROR, ExitReason.SIGNALED, ExitReason.COMPLETED, ExitReason.LOST, ExitReason.LIVENESS_FAILED,
    ExitReason.MEMORY_LIMIT_EXCEEDED, ExitReason.MANUAL_RESTART,
))
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class SnapshotView(Protocol):
    """What the collector reads of reconciler.Snapshot (kept structural: no upward import)."""

    @property
    def statuses(self) -> Mapping[str, Mapping[str, Any]]: ...
    @property
    def handles(self) -> Mapping[str, tuple[str, Handle]]: ...
    @property
    def start_times(self) -> Mapping[str, tuple[str, float]]: ...
    @property
    def counters(self) -> Mapping[tuple[str, str], int]: ...
    @property
    def last_exit_codes(self) -> Mapping[str, int]: ...
    @property
    def manifest_valid(self) -> Mapping[str, bool]: ...
    @property
    def ready(self) -> bool: ...


class Collector(Protocol):
    """A source of families, asked again at every scrape (or snapshot, for the static part)."""

    def collect(self) -> Iterator[Family]: ...


class Usage:
    """Whole-tree RSS and monotonic CPU seconds per agent, one /proc pass per `ttl` at most.

    CPU is summed per process (pid, start time): a process that is gone keeps the CPU it was
    last seen with, folded into its agent's total, so neither an exiting child nor one replica
    restarting makes the counter go down (which Prometheus would read as a reset). CPU used
    after the last pass before a process exits is not seen. The totals start afresh when the
    controller restarts or the agent is deleted.
    """

    def __init__(self, ttl: float = 1.0, *, read: Callable[[], procfs.Snapshot] = procfs.snapshot) -> None:
        self.ttl = ttl
        self._read = read
        self._at = float("-inf")
        self._value: dict[str, tuple[int, float]] = {}
        self._seen: dict[tuple[int, int], tuple[str, float]] = {}  # (pid, start ticks) -> (agent, cpu)
        self._folded: dict[str, float] = {}  # agent -> cpu of its processes that are gone
        self._lock = threading.Lock()

    def get(self, handles: Mapping[str, tuple[str, Handle]], agents: frozenset[str]) -> dict[str, tuple[int, float]]:
        """agent -> (resident bytes, cpu seconds) for the known agents; cached for ttl seconds."""
        with self._lock:
            now = time.monotonic()
            if now - self._at >= self.ttl:
                self._value = self._measure(handles, agents)
                self._at = now
            return self._value

    def _measure(self, handles: Mapping[str, tuple[str, Handle]], agents: frozenset[str]) -> dict[str, tuple[int, float]]:
        snap = self._read()
        rss: dict[str, int] = {}
        seen: dict[tuple[int, int], tuple[str, float]] = {}
        for agent, handle in handles.values():
            for pid in snap.instance_pids(handle.pid, handle.pgid, handle.cgroup):  # adapters: cgroup members too
                stat = snap.stats.get(pid)
                if stat is None:
                    continue
                rss[agent] = rss.get(agent, 0) + stat.rss_pages * procfs.PAGE_SIZE
                seen[(pid, stat.start_ticks)] = (agent, (stat.utime + stat.stime) / procfs.CLK_TCK)
        for key, (agent, cpu) in self._seen.items():
            if key not in seen:
                self._folded[agent] = self._folded.get(agent, 0.0) + cpu
        self._seen = seen
        self._folded = {a: v for a, v in self._folded.items() if a in agents}
        cpu_now = dict(self._folded)
        for agent, cpu in seen.values():
            cpu_now[agent] = cpu_now.get(agent, 0.0) + cpu
        return {a: (rss.get(a, 0), cpu_now.get(a, 0.0)) for a in agents}


class AgentCollector:
    """Per-agent series of §5, rebuilt from the snapshot at every scrape."""

    def __init__(self, snapshot: Callable[[], SnapshotView], usage: Usage, *, part: str = "all") -> None:
        self.snapshot = snapshot
        self.usage = usage
        self.part = part  # "all", "snapshot" (what only changes with the snapshot) or "usage"
        # agent -> (its status document, its lines of info/phase/desired/ready/activity): a document
        # object is kept as long as it does not change (StatusWriter), so a new snapshot re-renders
        # only the agents whose status changed
        self._by_doc: dict[str, tuple[Mapping[str, Any], tuple[str, ...]]] = {}
        # agent -> (its restart counts, their lines)
        self._by_counts: dict[str, tuple[tuple[tuple[str, float], ...], str]] = {}

    def collect(self) -> Iterator[Family]:
        snap = self.snapshot()
        names = sorted(snap.statuses)
        if self.part in ("all", "snapshot"):
            yield from self._status_families(snap, names)
            yield self._restarts(snap, names)
            yield self._last_exit(snap, names)
            yield self._start_times(snap, names)
        if self.part in ("all", "usage"):
            yield from self._usage(snap, names)
        if self.part in ("all", "snapshot"):
            yield self._manifests(snap)
            yield from self._controller(snap)

    def _status_families(self, snap: SnapshotView, names: list[str]) -> Iterator[Family]:
        """info, phase, replicas and then activity: one-hot per agent, like the phase; with several
        instances the most urgent one's activity (WaitingForInput, then Unknown, Working, Idle).
        Agents with no running provider instance have no activity, and with no such agent at all
        that family is left out (as the Git source's are)."""
        families = (
            Family("agentctl_agent_info", "Agent known to this controller, always 1.",
                   labels=["agent", "supervisor", "spec_hash", "source"]),
            Family("agentctl_agent_phase", "1 for the agent's current phase, 0 for each other phase.",
                   labels=["agent", "phase"]),
            Family("agentctl_agent_replicas_desired", "Instances the agent's spec asks for.", labels=["agent"]),
            Family("agentctl_agent_replicas_ready", "Instances of the agent that are running now.", labels=["agent"]),
            Family("agentctl_agent_activity", "1 for what the agent's AI session is doing (the most urgent of its "
                   "instances), 0 for each other activity.", labels=["agent", "activity"]),
        )
        cache, self._by_doc = self._by_doc, {}
        for name in names:
            doc = snap.statuses[name]
            hit = cache.get(name)
            lines = hit[1] if hit is not None and hit[0] is doc else self._agent_lines(families, name, doc)
            self._by_doc[name] = (doc, lines)
            for family, text in zip(families, lines, strict=True):
                family.extend(text)
        yield from families[:4]
        if families[4].samples:
            yield families[4]

    @staticmethod
    def _agent_lines(families: tuple[Family, ...], name: str, doc: Mapping[str, Any]) -> tuple[str, ...]:
        info, phase, desired, ready, activity = families
        current = doc.get("phase")
        replicas = doc.get("replicas") or {}
        doing = agent_activity(doc)
        return (
            info.line([name, str(doc.get("supervisor") or ""), str(doc.get("specHash") or ""),
                       str(doc.get("source") or "")], 1),
            "".join(phase.line([name, p], 1 if current == p else 0) for p in PHASES),
            desired.line([name], replicas.get("desired", 0)),
            ready.line([name], replicas.get("ready", 0)),
            "" if doing is None else "".join(activity.line([name, a], 1 if doing == a else 0) for a in ACTIVITIES),
        )

    def _restarts(self, snap: SnapshotView, names: list[str]) -> Family:
        family = Family(
            "agentctl_agent_restarts", "Restarts of the agent's instances by the exit reason that caused them, "
            "across spec changes; 0 for each reason that has not happened yet.", "counter", labels=["agent", "reason"])
        counts: dict[str, dict[str, float]] = {n: dict.fromkeys(RESTART_REASONS, 0) for n in names}
        for (agent, reason), value in snap.counters.items():
            if agent in counts:
                counts[agent][reason] = value
        cache, self._by_counts = self._by_counts, {}
        for name in names:
            key = tuple(sorted(counts[name].items()))
            hit = cache.get(name)
            text = hit[1] if hit is not None and hit[0] == key else "".join(family.line([name, r], v) for r, v in key)
            self._by_counts[name] = (key, text)
            family.extend(text)
        return family

    @staticmethod
    def _last_exit(snap: SnapshotView, names: list[str]) -> Family:
        family = Family("agentctl_agent_last_exit_code",
                                   "Exit code of the agent's last instance exit that had one.", labels=["agent"])
        for name in names:
            if name in snap.last_exit_codes:
                family.add([name], snap.last_exit_codes[name])
        return family

    @staticmethod
    def _start_times(snap: SnapshotView, names: list[str]) -> Family:
        family = Family("agentctl_agent_start_time_seconds",
                                   "Start time of the instance's current process, seconds since the epoch.",
                                   labels=["agent", "instance"])
        known = set(names)
        for iid, (agent, wall) in sorted(snap.start_times.items()):
            if agent in known:
                family.add([agent, iid], wall)
        return family

    def _usage(self, snap: SnapshotView, names: list[str]) -> Iterator[Family]:
        usage = self.usage.get(snap.handles, frozenset(names))
        rss = Family("agentctl_agent_resident_memory_bytes",
                                "Resident memory of every process of the agent's instances (whole trees).",
                                labels=["agent"])
        cpu = Family("agentctl_agent_cpu_seconds",
                                  "CPU time (user and system) used by the processes of the agent's instances.",
                                  "counter", labels=["agent"])
        for name in names:
            mem, seconds = usage.get(name, (0, 0.0))
            rss.add([name], mem)
            cpu.add([name], seconds)
        yield rss
        yield cpu

    @staticmethod
    def _manifests(snap: SnapshotView) -> Family:
        family = Family("agentctl_manifest_valid", "1 if the manifest file parses and validates, else 0.",
                                   labels=["source"])
        for source, ok in sorted(snap.manifest_valid.items()):
            family.add([source], 1 if ok else 0)
        return family


    @staticmethod
    def _controller(snap: SnapshotView) -> Iterator[Family]:
        """The Git source (when there is one) and failed state writes."""
        source = getattr(snap, "source", None)
        if source is not None:
            url, revision, last_sync = source
            info = Family("agentctl_source_info", "The Git source and the revision applied (1).",
                                     labels=["url", "revision"])
            info.add([url, revision or ""], 1)
            yield info
            if last_sync is not None:
                yield Family("agentctl_source_last_sync_timestamp_seconds",
                                        "When the last successful fetch of the Git source finished.", value=last_sync)
        yield Family("agentctl_state_write_errors", "Store and status file writes that failed.", "counter",
                                  value=getattr(snap, "write_errors", 0))


class LoopCollector:
    """Reconcile counters, their duration histogram, queue depth and build info.

    Kept by hand (no `_created` series, as before, when prometheus_client rendered them).
    """

    def __init__(self, queue_depth: Callable[[], float]) -> None:
        self.queue_depth = queue_depth
        self._lock = threading.Lock()
        self._results = {"success": 0, "error": 0}
        self._buckets = [0] * (len(DURATION_BUCKETS) + 1)  # the last one is +Inf
        self._sum = 0.0

    def observe(self, result: str, seconds: float) -> None:
        """Called by the reconcile loop; the duration is recorded for successful reconciles only."""
        with self._lock:
            self._results[result] = self._results.get(result, 0) + 1
            if result == "success":
                self._buckets[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
                self._sum += seconds

    def collect(self) -> Iterator[Family]:
        with self._lock:
            results, counts, total = dict(self._results), list(self._buckets), self._sum
        reconciles = Family("agentctl_reconcile", "Reconciles of one agent, by result.", "counter",
                                         labels=["result"])
        for result, value in sorted(results.items()):
            reconciles.add([result], value)
        yield reconciles
        cumulative, buckets = 0, []
        for bound, count in zip((*DURATION_BUCKETS, float("inf")), counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        duration = Family("agentctl_reconcile_duration_seconds",
                          "Time a successful reconcile of one agent took.", "histogram")
        duration.add_histogram([], buckets, total)
        yield duration
        yield Family("agentctl_workqueue_depth", "Agents waiting to be reconciled or being reconciled.",
                                value=self.queue_depth())
        build = Family("agentctl_build_info", "Version of this controller, always 1.", labels=["version"])
        build.add([__version__], 1)
        yield build


class Metrics:
    """The controller's own series (no global registry: nothing else can add to them)."""

    def __init__(self, snapshot: Callable[[], SnapshotView], queue_depth: Callable[[], float], *,
                 usage: Usage | None = None) -> None:
        usage = usage or Usage()
        self.snapshot = snapshot
        self.loop = LoopCollector(queue_depth)
        # render(): the snapshot's families are rendered once per snapshot, the rest per scrape
        self._by_snapshot = AgentCollector(snapshot, usage, part="snapshot")
        self._per_scrape: list[Collector] = [AgentCollector(snapshot, usage, part="usage"), self.loop]
        self._cache_lock = threading.Lock()
        self._cached: tuple[object, bytes] | None = None

    def render(self) -> bytes:
        """The text exposition. A snapshot is immutable, so its part is rendered once: a scrape of
        1000 idle agents then costs the usage and loop series only."""
        snap = self.snapshot()
        with self._cache_lock:
            if self._cached is None or self._cached[0] is not snap:
                self._cached = (snap, render(self._by_snapshot.collect()))
            static = self._cached[1]
        return static + render(f for c in self._per_scrape for f in c.collect())

    def observe(self, result: str, seconds: float) -> None:
        self.loop.observe(result, seconds)

    def add_fleet(self, collector: Collector) -> None:
        """Fleet series, rendered on every scrape (they change without a new snapshot)."""
        self._per_scrape.append(collector)


@dataclass(frozen=True)
class FleetStats:
    hosts: int  # live hosts
    leader: bool  # this host assigns instances
    renewals: tuple[tuple[float, ...], list[int], float]  # bucket bounds, counts (+Inf last), sum
    lease_ttl: float
    unowned_seconds: float  # leader: age of the oldest wanted instance no host has claimed


class FleetCollector:
    """CONTRACT §10's fleet metrics, registered only when the controller is coordinated."""

    def __init__(self, stats: Callable[[], FleetStats]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Family]:
        st = self.stats()
        yield Family("agentctl_fleet_hosts", "Live hosts of the fleet (host records on a live lease).",
                                value=st.hosts)
        yield Family("agentctl_fleet_leader", "1 on the host that assigns instances to hosts, else 0.",
                                value=1 if st.leader else 0)
        bounds, counts, total = st.renewals
        cumulative, buckets = 0, []
        for bound, count in zip((*bounds, float("inf")), counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        renewal = Family("agentctl_fleet_lease_renewal_seconds",
                         "Round trip of each lease renewal (keep-alive) to etcd, failed ones included.", "histogram")
        renewal.add_histogram([], buckets, total)
        yield renewal
        yield Family("agentctl_fleet_lease_ttl_seconds", "The lease TTL of this host (--lease-ttl).",
                                value=st.lease_ttl)
        yield Family("agentctl_fleet_unassigned_oldest_seconds",
                                "On the leader: how long the oldest wanted instance has run on no host (0: none).",
                                value=st.unowned_seconds)
