"""A real network partition (CONTRACT §10): one controller in its own network namespace,
joined to etcd by a veth pair; taking the link down cuts it off from etcd while it keeps
running. Its instances must stop before they start on the other host (never twice), and
start there within leaseTTL + 5 s. Traffic stays inside the machine (10.x on a veth)."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fleet.etcd_cluster import Cluster
from tests.helpers import Controller, sleeper, wait_for

DEADLINE = 60.0
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                reason="needs root and iproute2 for a network namespace")


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class Netns:
    """A namespace with one veth to the host: host side .1, namespace side .2 of a /30."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 10000}{random.randrange(100, 999)}"
        self.name, self.host_if, self.ns_if = f"agentctl-t{tag}", f"vh{tag}", f"vn{tag}"
        net = f"10.{random.randrange(200, 250)}.{random.randrange(0, 255)}"
        self.host_ip, self.ns_ip = f"{net}.1", f"{net}.2"
        ip("netns", "add", self.name)
        ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        ip("link", "set", self.ns_if, "netns", self.name)
        ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        ip("link", "set", self.host_if, "up")
        ip("-n", self.name, "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
        ip("-n", self.name, "link", "set", self.ns_if, "up")
        ip("-n", self.name, "link", "set", "lo", "up")

    def cut(self) -> None:
        ip("link", "set", self.host_if, "down")

    def heal(self) -> None:
        ip("link", "set", self.host_if, "up")

    def close(self) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)


class NsController(Controller):
    """`agentctl run` inside the namespace; its HTTP listener on the namespace's veth address."""

    def __init__(self, root: Path, ns: Netns, **kw: Any) -> None:
        super().__init__(root, **kw)
        self.ns = ns

    def args(self, *extra: str) -> list[str]:
        argv = super().args(*extra)
        argv[argv.index("--metrics-addr") + 1] = f"{self.ns.ns_ip}:0"
        return ["ip", "netns", "exec", self.ns.name, *argv]

    def http(self, path: str, method: str = "GET") -> tuple[int, bytes]:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        req = urllib.request.Request(f"http://{self.ns.ns_ip}:{self.port}{path}", method=method)
        try:
            with opener.open(req, timeout=5) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError:
            return 0, b""


@pytest.fixture
def netns() -> Iterator[Netns]:
    ns = Netns()
    try:
        yield ns
    finally:
        ns.close()


def test_a_host_cut_off_from_etcd_stops_its_instances_before_they_move(
        fleet_factory: Any, netns: Netns, tmp_path: Path) -> None:
    # a cluster of its own, also listening on the veth's host side
    cluster = Cluster(tmp_path / "etcd", extra_ip=netns.host_ip)
    cluster.root.mkdir()
    cluster.start_all()
    try:
        fleet = fleet_factory(ttl=3)
        fleet.etcd = cluster
        inside = NsController(fleet.root / "p", netns, manifests=fleet.manifests)
        (fleet.root / "p").mkdir()
        fleet.hosts["p"] = inside
        fleet.host("p", endpoints=cluster.endpoints_on(netns.host_ip))
        fleet.apply("n", command=sleeper(), replicas=2, placement={"hosts": ["p"]})
        fleet.wait_placed("n-", 2, DEADLINE, where={"p"})
        fleet.host("o")
        fleet.apply("n", command=sleeper(), replicas=2)  # may run anywhere now; stays on p (stable)
        assert fleet.wait_placed("n-", 2, DEADLINE, where={"p"})
        t0 = time.monotonic()
        netns.cut()
        try:
            moved = fleet.wait_placed("n-", 2, fleet.ttl + 5 + 10, where={"o"})
            elapsed = time.monotonic() - t0
            assert set(moved) == {"n-0", "n-1"}
            assert inside.proc is not None and inside.proc.poll() is None  # cut off, never stopped
        finally:
            netns.heal()
        wait_for(lambda: inside.http("/readyz")[0] == 200, DEADLINE, message="the cut-off host rejoins")
        assert fleet.placement("n-") == moved  # it takes nothing back
        print(f"\nnetwork partition (TTL {fleet.ttl}s): instances running on the other host after {elapsed:.2f}s")
        fleet.assert_never_twice()
    finally:
        for ctl in list(fleet.hosts.values()):
            ctl.cleanup()
        cluster.stop_all()
