"""Fixtures of the fleet tests: one real 3-member etcd cluster per session, and fleets of
`agentctl run` controllers (own --host-name and state dir each) reading one manifests dir,
watched by a sampler that fails the test if an instance is ever alive on two hosts."""

from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fleet.etcd_cluster import Cluster
from tests.helpers import Controller, kill_group, marked_pids, pid_alive, wait_for

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd (Debian etcd-server) is not installed")


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if shutil.which("etcd") is None:
        pytest.skip("etcd (Debian etcd-server) is not installed")
    cluster = Cluster(tmp_path_factory.mktemp("etcd"))
    try:
        cluster.start_all()
        yield cluster
    finally:
        cluster.stop_all()


def instance_hosts(controller_ids: dict[str, str], pids: dict[str, set[int]] | None = None) -> dict[str, set[str]]:
    """instance -> the hosts (by AGENTCTL_CONTROLLER_ID) on which a live process of it runs now."""
    found: dict[str, set[str]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
        except OSError:
            continue
        inst = cid = None
        for item in env:
            if item.startswith(b"AGENTCTL_INSTANCE="):
                inst = item.split(b"=", 1)[1].decode()
            elif item.startswith(b"AGENTCTL_CONTROLLER_ID="):
                cid = item.split(b"=", 1)[1].decode()
        if inst and cid in controller_ids and pid_alive(int(name)):
            found.setdefault(inst, set()).add(controller_ids[cid])
            if pids is not None:
                pids.setdefault(inst, set()).add(int(name))
    return found


class Sampler(threading.Thread):
    """Every 50 ms: no instance may be alive on two hosts at once (CONTRACT §10 'at most one')."""

    def __init__(self) -> None:
        super().__init__(daemon=True, name="at-most-one")
        self.ids: dict[str, str] = {}  # controller id -> host name
        self.violations: list[tuple[float, str, set[str]]] = []
        self.samples = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.05):
            for inst, hosts in instance_hosts(dict(self.ids)).items():
                if len(hosts) > 1:
                    self.violations.append((time.time(), inst, hosts))
            self.samples += 1


class Fleet:
    """Controllers of one fleet (a fresh fleet name per test) sharing one manifests dir."""

    def __init__(self, root: Path, etcd: Cluster, ttl: int) -> None:
        self.root, self.etcd, self.ttl = root, etcd, ttl
        self.name = "t" + uuid.uuid4().hex[:10]
        self.manifests = root / "manifests"
        self.manifests.mkdir(parents=True)
        self.hosts: dict[str, Controller] = {}
        self.sampler = Sampler()
        self.sampler.start()

    def host(self, name: str, *extra: str, start: bool = True, endpoints: str | None = None) -> Controller:
        ctl = self.hosts.get(name) or Controller(self.root / name, manifests=self.manifests)
        (self.root / name).mkdir(exist_ok=True)
        self.hosts[name] = ctl
        if start:
            ctl.start("--host-name", name, "--etcd-endpoints", endpoints or self.etcd.endpoints, "--fleet", self.name,
                      "--lease-ttl", str(self.ttl), *extra)
            cid = wait_for(ctl.controller_id, 30, message=f"controller id of {name}")
            self.sampler.ids[cid] = name
        return ctl

    def apply(self, name: str, **spec: object) -> None:
        any_ctl = next(iter(self.hosts.values()), None) or Controller(self.root / "writer", manifests=self.manifests)
        any_ctl.apply(name, **spec)  # type: ignore[arg-type]

    def where(self) -> dict[str, set[str]]:
        return instance_hosts(dict(self.sampler.ids))

    def pids(self, prefix: str = "") -> dict[str, set[int]]:
        """instance -> the pids of its live processes."""
        out: dict[str, set[int]] = {}
        instance_hosts(dict(self.sampler.ids), out)
        return {i: p for i, p in out.items() if i.startswith(prefix)}

    def crash(self, name: str) -> None:
        """The whole host dies: its controller, its fence and its agents, all SIGKILLed."""
        ctl = self.hosts[name]
        cid = ctl.controller_id()
        assert ctl.proc is not None
        kill_group(ctl.proc.pid)  # the controller and its fence share this group
        ctl.proc.wait(10)
        for pid in marked_pids(cid or "-"):
            kill_group(os.getpgid(pid) if pid_alive(pid) else pid)

    def placement(self, prefix: str = "") -> dict[str, str]:
        """instance -> its one host, once every instance runs on exactly one."""
        return {i: next(iter(h)) for i, h in self.where().items() if i.startswith(prefix) and len(h) == 1}

    def wait_placed(self, prefix: str, count: int, timeout: float = 60.0,
                    where: object = None) -> dict[str, str]:
        """Wait until exactly count instances of prefix run, each on one host (optionally: on these hosts)."""
        def check() -> dict[str, str] | None:
            placed = self.placement(prefix)
            if len(placed) != count or len([i for i in self.where() if i.startswith(prefix)]) != count:
                return None
            if where is not None and not all(h in where for h in placed.values()):  # type: ignore[operator]
                return None
            return placed
        try:
            return wait_for(check, timeout, message=f"{count} instances of {prefix} each on one host")
        except AssertionError as exc:
            logs = "\n".join(f"--- {n}:\n{c.log()[-3000:]}" for n, c in self.hosts.items())
            raise AssertionError(f"{exc}\nnow: {self.where()}\n{logs}") from None

    def close(self) -> None:
        self.sampler.halt.set()
        self.sampler.join(5)
        for ctl in self.hosts.values():
            ctl.cleanup()

    def assert_never_twice(self) -> None:
        assert self.sampler.samples > 0
        assert not self.sampler.violations, f"instances alive on two hosts at once: {self.sampler.violations[:5]}"


@pytest.fixture
def fleet_factory(tmp_path: Path, etcd: Cluster) -> Iterator[object]:
    made: list[Fleet] = []

    def make(ttl: int = 3) -> Fleet:
        f = Fleet(tmp_path / f"fleet{len(made)}", etcd, ttl)
        f.root.mkdir(parents=True, exist_ok=True)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()
