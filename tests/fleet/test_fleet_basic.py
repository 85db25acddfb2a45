"""A fleet of real controllers on a real etcd cluster: spread, placement, drain (CONTRACT §10)."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from tests.helpers import sleeper, wait_for

DEADLINE = 60.0  # a noisy shared 2-core box: generous, never relied on for speed


def test_replicas_count_across_the_fleet_and_spread_by_free_capacity(fleet_factory: Any) -> None:
    fleet = fleet_factory()
    a = fleet.host("a", "--max-agents", "4")
    fleet.host("b", "--max-agents", "2")
    fleet.apply("w", command=sleeper(), replicas=4)
    placed = fleet.wait_placed("w-", 4, DEADLINE)
    assert sorted(placed) == ["w-0", "w-1", "w-2", "w-3"]
    assert sorted(Counter(placed.values()).values()) == [1, 3]  # free 4 vs 2: a, a, then b, a
    doc = a.wait_status("w", lambda d: d["replicas"]["ready"] == 4, DEADLINE)
    assert {i["id"]: i["host"] for i in doc["instances"]} == placed
    got = json.loads(a.cli("get", "w", "-o", "json").stdout)
    assert got["replicas"] == {"desired": 4, "ready": 4}
    wide = a.cli("get", "-o", "wide").stdout.splitlines()
    host = wide[0].split().index("HOST")
    assert wide[1].split()[host] == "a,b"
    fleet.assert_never_twice()


def test_placement_filters_the_hosts_of_each_instance(fleet_factory: Any) -> None:
    fleet = fleet_factory()
    fleet.host("a")
    fleet.host("b")
    fleet.host("c", "--host-labels", "gpu=true")
    fleet.apply("pinned", command=sleeper(), replicas=2, placement={"hosts": ["b"]})
    fleet.apply("gpu", command=sleeper(), replicas=2, placement={"hostLabels": {"gpu": "true"}})
    fleet.apply("none", command=sleeper(), replicas=1, placement={"hosts": []})
    assert set(fleet.wait_placed("pinned-", 2, DEADLINE).values()) == {"b"}
    assert set(fleet.wait_placed("gpu-", 2, DEADLINE).values()) == {"c"}
    doc = fleet.hosts["a"].wait_status("none", lambda d: d["phase"] == "Pending", DEADLINE)
    assert doc["replicas"] == {"desired": 1, "ready": 0}
    assert not [i for i in fleet.where() if i.startswith("none-")]
    fleet.assert_never_twice()


def test_drain_moves_instances_off_a_host_and_uncordon_lets_it_take_new_ones(fleet_factory: Any) -> None:
    fleet = fleet_factory()
    a = fleet.host("a")
    fleet.host("b")
    fleet.apply("d", command=sleeper(), replicas=4)
    before = fleet.wait_placed("d-", 4, DEADLINE)
    assert set(before.values()) == {"a", "b"}
    flags = ["--etcd-endpoints", fleet.etcd.endpoints, "--fleet", fleet.name]
    done = a.cli("drain", "b", *flags)
    assert done.returncode == 0, done.stderr
    after = fleet.wait_placed("d-", 4, DEADLINE, where={"a"})
    assert set(after) == set(before)
    doc = a.wait_status("d", lambda d: d["replicas"]["ready"] == 4 and all(i["host"] == "a" for i in d["instances"]),
                        DEADLINE)
    assert [i["host"] for i in doc["instances"]] == ["a"] * 4
    moved = [i for i, h in before.items() if h == "b"]
    assert all(json.loads(a.cli("get", "d", "-o", "json").stdout) for _ in moved)
    done = a.cli("uncordon", "b", *flags)
    assert done.returncode == 0, done.stderr
    fleet.apply("e", command=sleeper(), replicas=2)  # b has the most free capacity again
    assert set(fleet.wait_placed("e-", 2, DEADLINE).values()) == {"b"}
    assert fleet.placement("d-") == after  # uncordon moves nothing back
    fleet.assert_never_twice()


def test_fleet_metrics_and_readiness(fleet_factory: Any) -> None:
    fleet = fleet_factory()
    a = fleet.host("a")
    b = fleet.host("b")

    def gauge(ctl: Any, name: str) -> float | None:
        code, body = ctl.http("/metrics")
        for line in body.decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None

    wait_for(lambda: gauge(a, "agentctl_fleet_hosts") == 2 and gauge(b, "agentctl_fleet_hosts") == 2, DEADLINE,
             message="both hosts see 2 live hosts")
    assert (gauge(a, "agentctl_fleet_leader"), gauge(b, "agentctl_fleet_leader")) in ((1.0, 0.0), (0.0, 1.0))
    count = gauge(a, "agentctl_fleet_lease_renewal_seconds_count")
    assert count is not None and count >= 1
    assert gauge(a, "agentctl_fleet_lease_ttl_seconds") == fleet.ttl
    assert a.http("/readyz")[0] == 200
    # an instance no host may run: the leader reports how long it has waited (the alert's input)
    fleet.apply("nowhere", command=sleeper(), placement={"hosts": []})
    wait_for(lambda: max(gauge(c, "agentctl_fleet_unassigned_oldest_seconds") or 0 for c in (a, b)) > 1.0,
             DEADLINE, message="the leader reports an instance waiting for a host")


def _token(pid: int) -> int:
    with open(f"/proc/{pid}/environ", "rb") as fh:
        env = dict(item.split(b"=", 1) for item in fh.read().split(b"\0") if b"=" in item)
    return int(env[b"AGENTCTL_FENCING_TOKEN"])


def test_the_fencing_token_grows_with_every_start_anywhere(fleet_factory: Any) -> None:
    import os
    import signal

    fleet = fleet_factory()
    fleet.host("a")
    fleet.host("b")
    fleet.apply("t", command=sleeper(), replicas=1, backoff={"initialSeconds": 0.1, "maxSeconds": 1})
    first_host = fleet.wait_placed("t-", 1, DEADLINE)["t-0"]
    (pid,) = fleet.pids("t-")["t-0"]
    tokens = [_token(pid)]
    os.kill(pid, signal.SIGKILL)  # a crash: restarted on the same host
    pid2 = wait_for(lambda: next(iter(fleet.pids("t-").get("t-0", {pid})), pid) != pid and fleet.pids("t-")["t-0"],
                    DEADLINE, message="t-0 restarted")
    tokens.append(_token(next(iter(pid2))))
    done = fleet.hosts["a"].cli("drain", first_host, "--etcd-endpoints", fleet.etcd.endpoints, "--fleet", fleet.name)
    assert done.returncode == 0, done.stderr
    other_host = "b" if first_host == "a" else "a"
    fleet.wait_placed("t-", 1, DEADLINE, where={other_host})
    (pid3,) = fleet.pids("t-")["t-0"]
    tokens.append(_token(pid3))
    assert tokens == sorted(tokens) and len(set(tokens)) == 3, tokens
    doc = fleet.hosts[other_host].wait_status("t", lambda d: d["instances"][0].get("fencingToken") == tokens[-1],
                                              DEADLINE)
    assert doc["instances"][0]["host"] == other_host
    fleet.assert_never_twice()
