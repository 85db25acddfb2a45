"""The fleet coordinator: this host's lease, host record, leadership, instance claims, fence file.

Runtime layer. Built by `fleet.wiring` when coordination is configured; the reconciler asks it
which instances may run here (`runnable`) and for a fencing token before each start (`token`).
etcd calls run in worker threads; its state is changed on the event loop only. It never starts,
signals or stops a process: the planner and the fence process do.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.fleet.assign import Want, assign
from controller.fleet.kv import KV, Compare, Delete, KVError, Put
from controller.fleet.records import HostRecord, Keys, Owner, View, encode_map, parse_view
from controller.fleet.timing import Timing
from controller.metrics import FleetStats
from controller.model import Handle
from controller.settings import Coordination
from controller.status import atomic_write
from controller.supervisors.base import SupervisorError

log = logging.getLogger("agentctl")
RENEWAL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass(frozen=True)
class Local:
    """One live instance of this host, as the fleet publishes it and the fence guards it."""

    agent: str
    state: str
    handle: Handle | None
    ready: bool
    started_at: float


@dataclass
class Histogram:
    bounds: tuple[float, ...] = RENEWAL_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(RENEWAL_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[next((i for i, b in enumerate(self.bounds) if seconds <= b), len(self.bounds))] += 1
        self.total += seconds


class Fleet:
    def __init__(self, cfg: Coordination, kv: KV, keepalive_kv: KV, *, host: str, labels: Mapping[str, str],
                 capacity: int | None, controller_id: str, state_dir: Path,
                 wants: Callable[[], list[Want]], local: Callable[[], dict[str, Local]],
                 mark: Callable[[Iterable[str]], None], mark_all: Callable[[], None],
                 revision: Callable[[], str | None], can_lead: Callable[[], bool]) -> None:
        self.cfg = cfg
        self.kv, self.ka = kv, keepalive_kv  # two sessions: a slow read never delays a renewal
        self.keys = Keys(cfg.fleet)
        self.host, self.labels, self.capacity = host, dict(labels), capacity
        self.controller_id = controller_id
        self.state_dir = state_dir
        self.wants, self.local, self.mark, self.revision = wants, local, mark, revision
        self.mark_all = mark_all  # FleetReady changed: every status shows it
        # a host that has not read its manifests yet would assign nothing, stopping the whole fleet
        self.can_lead = can_lead
        self.timing = Timing(cfg.lease_ttl)
        self.lease = 0
        self.acked_at: float | None = None  # monotonic send time of the last acknowledged renewal
        self.view = View()
        self.owned: dict[str, int] = {}  # instance -> mod revision of its owner key (the fencing token)
        self.renew_error: str | None = "not connected to etcd yet"  # the last renewal failed: why
        self.sync_error: str | None = None  # the last read/write of the fleet's keys failed: why
        self._inherited_deadline = self._previous_deadline()  # a predecessor's fence deadline, never extended
        self.renewals = Histogram()
        self.is_leader = False
        self._held = False
        self._ready: bool | None = None
        self._unowned_since: dict[str, float] = {}  # leader: wanted instances that run nowhere, since when
        self._published: bytes | None = None
        self._host_record: bytes | None = None
        self._fence_written: tuple[float, tuple[tuple[int, int, int], ...]] | None = None
        self._wake: asyncio.Event | None = None
        self._watch_cancel: Callable[[], None] | None = None
        self._watching = False

    # -- what the reconciler asks -------------------------------------------------
    def held(self, now: float | None = None) -> bool:
        """The lease is surely ours: renewed recently enough that it cannot have expired."""
        return self.acked_at is not None and (now or time.monotonic()) < self.timing.stop_at(self.acked_at)

    def runnable(self, instance_id: str) -> bool:
        """Claimed by us, still assigned to us (a drain or move stops it here first), lease held."""
        return (instance_id in self.owned and self.view.assignments.get(instance_id) == self.host
                and self.held())

    async def token(self, instance_id: str) -> int:
        """Rewrite the owner key (compare-and-swap on our claim) before a start: its new revision
        is AGENTCTL_FENCING_TOKEN, larger than any earlier start of this instance anywhere."""
        mod = self.owned.get(instance_id)
        if mod is None or not self.held():
            raise SupervisorError(f"{instance_id} is not claimed by this host in the fleet")
        key = self.keys.owner(instance_id)
        try:
            ok, rev = await asyncio.to_thread(self.kv.txn, [Compare(key, "MOD", mod)],
                                              [Put(key, Owner(self.host).encode(), self.lease)])
        except KVError as exc:
            raise SupervisorError(f"cannot renew the claim of {instance_id} in etcd: {exc}") from exc
        if not ok:
            self.owned.pop(instance_id, None)
            raise SupervisorError(f"the claim of {instance_id} changed in etcd: not starting it")
        self.owned[instance_id] = rev
        return rev

    def poke(self) -> None:
        """Something the leader assigns from changed here: read and assign again now."""
        if self._wake is not None:
            self._wake.set()

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Before the first reconcile pass: take back our lease if it still lives (a quick
        restart keeps its instances), else get a new one; then read the fleet once."""
        self._wake = asyncio.Event()
        try:
            await self._acquire()
        except KVError as exc:
            self._failed("renew", f"cannot get a lease from etcd: {exc}")
            return
        try:
            await self.sync()
        except KVError as exc:
            self._failed("sync", f"etcd: {exc}")

    async def run(self, stop: asyncio.Event) -> None:
        tasks = [asyncio.create_task(c) for c in (self._renew_loop(stop), self._sync_loop(stop), self._guard_loop(stop))]
        try:
            await stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._watch_cancel is not None:
                self._watch_cancel()

    async def release_all(self) -> None:
        """The controller stopped every instance (--stop-agents-on-exit): hand them over now."""
        if self.lease:
            try:
                await asyncio.to_thread(self.kv.revoke, self.lease)
            except KVError as exc:
                log.warning("fleet: cannot revoke lease %x: %s (it expires on its own)", self.lease, exc)
        self.owned.clear()
        self.write_fence(force=True)

    # -- the lease ---------------------------------------------------------------------
    def _lease_file(self) -> Path:
        return self.state_dir / "fleet.json"

    async def _acquire(self) -> None:
        stored = self._stored_lease()
        if stored and await self._renew(stored):
            log.info("fleet %s: took back lease %x of the previous controller", self.cfg.fleet, stored)
            return
        self.lease = await asyncio.to_thread(self.kv.grant, self.cfg.lease_ttl)
        self._host_record = self._published = None  # both lived on the old lease
        atomic_write(self._lease_file(), json.dumps({"fleet": self.cfg.fleet, "host": self.host,
                                                     "lease": self.lease}) + "\n")
        log.info("fleet %s: host %s joined with lease %x (TTL %ds)", self.cfg.fleet, self.host, self.lease,
                 self.cfg.lease_ttl)
        await self._renew(self.lease)

    def _stored_lease(self) -> int:
        try:
            data = json.loads(self._lease_file().read_text())
        except (OSError, ValueError):
            return 0
        if data.get("fleet") != self.cfg.fleet or data.get("host") != self.host:
            return 0
        return int(data.get("lease") or 0)

    async def _renew(self, lease: int) -> bool:
        sent = time.monotonic()
        try:
            ttl = await asyncio.to_thread(self.ka.keepalive, lease)
        finally:
            self.renewals.observe(time.monotonic() - sent)
        if ttl <= 0:
            return False
        self.lease, self.acked_at = lease, sent
        if self.renew_error is not None:
            log.info("fleet %s: lease %x renewed again", self.cfg.fleet, lease)
        self.renew_error = None
        self.write_fence()
        self._check_held()
        return True

    async def _renew_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                if not self.lease:
                    await self._acquire()  # etcd was unreachable when we started
                elif not await self._renew(self.lease):
                    await self._lost()
            except KVError as exc:
                self._failed("renew", f"lease renewal failed: {exc}")
            except Exception as exc:  # noqa: BLE001 - the renewal must never stop for good
                log.exception("fleet: renewal loop error")
                self._failed("renew", f"lease renewal failed: {exc!r}")
            await _sleep(stop, self.timing.renew_every)

    async def _lost(self) -> None:
        """Our lease expired (we were cut off or hung): every claim went with it."""
        log.error("fleet %s: lease %x expired: this host's instances are no longer its own", self.cfg.fleet,
                  self.lease)
        self.acked_at = None
        lost = set(self.owned)
        self.owned.clear()
        self.mark({_agent(i) for i in lost})
        self._check_held()
        await self._acquire()

    # -- reading and writing the fleet -------------------------------------------------
    async def _sync_loop(self, stop: asyncio.Event) -> None:
        assert self._wake is not None
        while not stop.is_set():
            self._wake.clear()
            try:
                if not self._watching:
                    self._start_watch()
                await self.sync()
            except KVError as exc:
                self._failed("sync", f"etcd: {exc}")
            except Exception as exc:  # noqa: BLE001 - never gone silently: reported, retried
                log.exception("fleet: sync error")
                self._failed("sync", f"fleet sync failed: {exc!r}")
            await _sleep(stop, self.timing.sync_every, self._wake)

    def _start_watch(self) -> None:
        loop = asyncio.get_running_loop()
        wake = self._wake
        assert wake is not None

        def closed() -> None:
            def note() -> None:
                self._watching = False
            loop.call_soon_threadsafe(note)

        def event() -> None:
            loop.call_soon_threadsafe(wake.set)

        self._watch_cancel = self.kv.watch(self.keys.root, event, closed)
        self._watching = True

    async def sync(self) -> None:
        """One full pass: read every key, then host record, leadership, assignments, claims, releases."""
        if not self.lease:
            return  # the renewal loop gets one; claims need it
        _, entries = await asyncio.to_thread(self.kv.range, self.keys.root)
        before = self._remote_digest()
        self.view = parse_view(self.keys, entries)
        await self._put_host_record()
        await self._lead()
        await self._claim_and_release()
        await self.publish_status()
        changed = before != self._remote_digest()
        if self.sync_error is not None:
            log.info("fleet %s: etcd answers again", self.cfg.fleet)
        self.sync_error = None
        if changed:
            self.mark({_agent(i) for i in self._all_instances()})

    async def _put_host_record(self) -> None:
        live = self.local()
        rec = HostRecord(self.host, self.labels, self.capacity, len(live), self.revision(), self.controller_id)
        raw = rec.encode()
        if raw == self._host_record and self.host in self.view.hosts:
            return
        await asyncio.to_thread(self.kv.txn, [], [Put(self.keys.host(self.host), raw, self.lease)])
        self._host_record = raw
        self.view.hosts[self.host] = rec

    async def _lead(self) -> None:
        if self.view.leader is None and self.can_lead():
            ok, _ = await asyncio.to_thread(self.kv.txn, [Compare(self.keys.leader, "CREATE", 0)],
                                            [Put(self.keys.leader, self.host.encode(), self.lease)])
            if ok:
                log.info("fleet %s: %s is the leader (assigns instances to hosts)", self.cfg.fleet, self.host)
                _, mine = await asyncio.to_thread(self.kv.range, self.keys.leader)
                self.view.leader_entry = mine[0] if mine else None
                self.view.leader = self.host if mine else None
        entry = self.view.leader_entry
        self.is_leader = entry is not None and self.view.leader == self.host and entry.lease == self.lease
        if not self.is_leader or entry is None:
            return
        hosts = {n: r.info(cordoned=n in self.view.drained) for n, r in self.view.hosts.items()}
        current = self.view.assignments
        wants = self.wants()
        self._track_unowned({w.instance for w in wants})
        new = assign(wants, hosts, current)
        if new == current:
            return
        # written only while our leader key is the one we read: a deposed leader's write fails
        ok, _ = await asyncio.to_thread(self.kv.txn, [Compare(self.keys.leader, "MOD", entry.mod_revision)],
                                        [Put(self.keys.assignments, encode_map(new))])
        if ok:
            moved = sorted(i for i in new if i in current and current[i] != new[i])
            log.info("fleet %s: assigned %d instances (%d moved%s)", self.cfg.fleet, len(new), len(moved),
                     f": {', '.join(moved[:10])}" if moved else "")
            self.view.assignments = new

    def _track_unowned(self, wanted: set[str]) -> None:
        now = time.monotonic()
        unowned = wanted - set(self.view.owners)
        self._unowned_since = {i: self._unowned_since.get(i, now) for i in unowned}

    def unowned_seconds(self) -> float:
        """How long the oldest wanted instance has been claimed by no host (leader only, else 0)."""
        if not self.is_leader or not self._unowned_since:
            return 0.0
        return time.monotonic() - min(self._unowned_since.values())

    async def _claim_and_release(self) -> None:
        mine = {i for i, h in self.view.assignments.items() if h == self.host}
        owned: dict[str, int] = {}
        for iid, (host, entry) in self.view.owners.items():
            if host == self.host and entry.lease == self.lease:
                # a start may have rewritten the key after our read: keep the newer revision
                owned[iid] = max(entry.mod_revision, self.owned.get(iid, 0))
        local = self.local()
        for iid in sorted(mine - set(self.view.owners)):
            key = self.keys.owner(iid)
            ok, rev = await asyncio.to_thread(self.kv.txn, [Compare(key, "CREATE", 0)],
                                              [Put(key, Owner(self.host).encode(), self.lease)])
            if ok:
                owned[iid] = rev
                log.info("fleet %s: %s claimed by %s", self.cfg.fleet, iid, self.host)
        for iid in sorted(set(owned) - mine):
            if iid in local:
                continue  # released only once nothing of it runs here
            ok, _ = await asyncio.to_thread(self.kv.txn, [Compare(self.keys.owner(iid), "MOD", owned[iid])],
                                            [Delete(self.keys.owner(iid))])
            if ok:
                owned.pop(iid)
                log.info("fleet %s: %s released by %s", self.cfg.fleet, iid, self.host)
        gained = set(owned) ^ set(self.owned)
        self.owned = owned
        if gained:
            self.mark({_agent(i) for i in gained})

    async def publish_status(self) -> None:
        """This host's instances for the other hosts' `get` (on our lease: gone with us)."""
        summary = {iid: {"agent": loc.agent, "state": loc.state, "ready": loc.ready,
                         "pid": loc.handle.pid if loc.handle else None, "startedAt": loc.started_at,
                         "token": self.owned.get(iid)}
                   for iid, loc in sorted(self.local().items())}
        raw = encode_map(summary)
        if raw == self._published:
            return
        await asyncio.to_thread(self.kv.txn, [], [Put(self.keys.host_status(self.host), raw, self.lease)])
        self._published = raw

    # -- health ----------------------------------------------------------------------------
    def _failed(self, what: str, message: str) -> None:
        before = self.renew_error if what == "renew" else self.sync_error
        if before != message:
            log.error("fleet %s: %s", self.cfg.fleet, message)
        if what == "renew":
            self.renew_error = message
        else:
            self.sync_error = message
        self._check_held()

    def _check_held(self) -> None:
        held = self.held()
        if held != self._held:
            self._held = held
            if not held:
                log.error("fleet %s: lease not renewed in time: stopping this host's %d coordinated instances",
                          self.cfg.fleet, len(self.owned))
            self.mark({_agent(i) for i in set(self.owned) | set(self.local())})

    async def _guard_loop(self, stop: asyncio.Event) -> None:
        """Notices the moment the lease can no longer be trusted, even while etcd calls hang."""
        while not stop.is_set():
            self._check_held()
            ready = self.ready_error() is None
            if ready != self._ready:
                self._ready = ready
                self.mark_all()
            await _sleep(stop, 0.05)

    def ready_error(self) -> str | None:
        """Why the fleet is not ready (FleetReady=False, /readyz 503), or None."""
        if not self.held():
            return self.renew_error or "lease not renewed in time"
        return self.renew_error or self.sync_error

    # -- the fence file ----------------------------------------------------------------------
    def write_fence(self, *, force: bool = False) -> None:
        """Tell the fence process when to kill and what: rewritten on every renewal and start."""
        # before our first renewal, keep the deadline a predecessor's renewal earned (never extend it)
        deadline = self.timing.fence_at(self.acked_at) if self.acked_at is not None else self._inherited_deadline
        targets = tuple(sorted((loc.handle.pid, loc.handle.pgid, loc.handle.start_ticks)
                               for loc in self.local().values() if loc.handle is not None))
        if not force and self._fence_written == (deadline, targets):
            return
        atomic_write(self.state_dir / "fence.json", json.dumps({
            "controller": os.getpid(), "controllerId": self.controller_id, "deadline": deadline,
            "targets": [list(t) for t in targets]}) + "\n")
        self._fence_written = (deadline, targets)

    def _previous_deadline(self) -> float:
        try:
            data = json.loads((self.state_dir / "fence.json").read_text())
            return float(data.get("deadline") or 0.0)
        except (OSError, ValueError, AttributeError):
            return 0.0

    # -- what the rest of the controller shows ----------------------------------------------------
    def _remote_digest(self) -> bytes:
        remote = {h: s for h, s in self.view.statuses.items() if h != self.host}
        return encode_map({"s": remote, "a": self.view.assignments})

    def _all_instances(self) -> set[str]:
        out = set(self.view.assignments) | set(self.owned)
        for summary in self.view.statuses.values():
            out |= set(summary)
        return out

    def remote_instances(self, agent: str) -> list[dict[str, Any]]:
        """Instances of agent that run on other hosts, as those hosts publish them."""
        out = []
        for host, summary in sorted(self.view.statuses.items()):
            if host == self.host or host not in self.view.hosts:
                continue
            for iid, info in sorted(summary.items()):
                if isinstance(info, dict) and info.get("agent") == agent:
                    out.append({"id": iid, "host": host, **{k: v for k, v in info.items() if k != "agent"}})
        return out

    def stats(self) -> FleetStats:
        r = self.renewals
        return FleetStats(len(self.view.hosts), self.is_leader, (r.bounds, list(r.counts), r.total),
                          self.cfg.lease_ttl, self.unowned_seconds())


def _agent(instance_id: str) -> str:
    return instance_id.rsplit("-", 1)[0]


async def _sleep(stop: asyncio.Event, seconds: float, wake: asyncio.Event | None = None) -> None:
    waiters = [asyncio.ensure_future(stop.wait())]
    if wake is not None:
        waiters.append(asyncio.ensure_future(wake.wait()))
    await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    for w in waiters:
        w.cancel()
