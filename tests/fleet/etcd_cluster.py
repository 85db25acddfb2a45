"""A real 3-member etcd cluster (Debian's `etcd`) on free loopback ports, for the fleet tests.

Members are started and stopped by pid; each keeps its data dir, so a stopped member can
rejoin. Heartbeat 100 ms, election 1000 ms, as in the groundwork measurements.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.helpers import wait_for

ETCD = shutil.which("etcd")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Member:
    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.client_port = free_port()
        self.peer_port = free_port()
        self.data = root / name
        self.log = root / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"


class Cluster:
    def __init__(self, root: Path, size: int = 3, extra_ip: str | None = None) -> None:
        self.root = root
        self.extra_ip = extra_ip  # clients may also connect on this address (a veth into a netns)
        self.members = [Member(f"m{i}", root) for i in range(size)]
        self.initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    @property
    def endpoints(self) -> str:
        return ",".join(m.client_url for m in self.members)

    def endpoints_on(self, ip: str) -> str:
        return ",".join(f"http://{ip}:{m.client_port}" for m in self.members)

    def start(self, member: Member) -> None:
        assert ETCD is not None
        log = open(member.log, "ab")
        member.proc = subprocess.Popen([
            ETCD, "--name", member.name, "--data-dir", str(member.data),
            "--listen-client-urls", member.client_url + (
                f",http://{self.extra_ip}:{member.client_port}" if self.extra_ip else ""),
            "--advertise-client-urls", member.client_url,
            "--listen-peer-urls", member.peer_url, "--initial-advertise-peer-urls", member.peer_url,
            "--initial-cluster", self.initial, "--initial-cluster-state", "new",
            "--initial-cluster-token", f"agentctl-test-{os.getpid()}",
            "--heartbeat-interval", "100", "--election-timeout", "1000", "--log-outputs", "stderr",
        ], stdout=log, stderr=log, start_new_session=True)
        log.close()

    def start_all(self) -> None:
        for m in self.members:
            self.start(m)
        wait_for(self.healthy, 60, 0.1, "etcd cluster healthy")

    def stop(self, member: Member, sig: int = signal.SIGKILL) -> None:
        if member.proc is not None and member.proc.poll() is None:
            member.proc.send_signal(sig)
            member.proc.wait(30)
        member.proc = None

    def stop_all(self) -> None:
        for m in self.members:
            self.stop(m)

    def status(self, member: Member) -> dict[str, object] | None:
        req = urllib.request.Request(f"{member.client_url}/v3/maintenance/status", data=b"{}", method="POST")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=1) as resp:
                return json.loads(resp.read())  # type: ignore[no-any-return]
        except (OSError, ValueError):
            return None

    def healthy(self) -> bool:
        """Every running member answers and agrees on one leader."""
        leaders = set()
        for m in self.members:
            if m.proc is None:
                continue
            st = self.status(m)
            if st is None or not st.get("leader"):
                return False
            leaders.add(st["leader"])
        return len(leaders) == 1

    def leader(self) -> Member:
        for m in self.members:
            st = self.status(m) if m.proc is not None else None
            if st and st.get("leader") == st.get("header", {}).get("member_id"):  # type: ignore[union-attr]
                return m
        raise AssertionError("no etcd leader")

    def wipe(self, prefix: str) -> None:
        """Delete every key under prefix (between tests, through etcdctl)."""
        subprocess.run(["etcdctl", "--endpoints", self.endpoints, "del", "--prefix", prefix],
                       env={**os.environ, "ETCDCTL_API": "3"}, capture_output=True, timeout=30, check=True)

    def wait_until(self, deadline_s: float = 60) -> None:
        wait_for(self.healthy, deadline_s, 0.1, "etcd cluster healthy")
        time.sleep(0)  # no settling: healthy() is the condition
