"""The read-only HTTP listener and the §5 metrics, first against fake snapshots, then live.

Handler tests serve a hand-made reconciler.Snapshot on 127.0.0.1:0 (states that are hard to
catch in a running controller, such as /readyz before the first pass). The live tests run the
real `agentctl run` with real agents and read what it serves; promtool checks the exposition
when it is installed.
"""

from __future__ import annotations

import copy
import http.client
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller import procfs
from controller.http import serve
from controller.metrics import DURATION_BUCKETS, PHASES, RESTART_REASONS, Metrics, Usage
from controller.model import Handle
from controller.reconciler import Snapshot
from tests.helpers import Controller, py, sleeper, wait_for

# CONTRACT §5, as exposed (counters carry _total, the histogram its _bucket/_sum/_count).
CONTRACT_METRICS = {
    "agentctl_agent_info": ("gauge", {"agent", "supervisor", "spec_hash", "source"}),
    "agentctl_agent_phase": ("gauge", {"agent", "phase"}),
    "agentctl_agent_replicas_desired": ("gauge", {"agent"}),
    "agentctl_agent_replicas_ready": ("gauge", {"agent"}),
    "agentctl_agent_restarts_total": ("counter", {"agent", "reason"}),
    "agentctl_agent_last_exit_code": ("gauge", {"agent"}),
    "agentctl_agent_start_time_seconds": ("gauge", {"agent", "instance"}),
    "agentctl_agent_resident_memory_bytes": ("gauge", {"agent"}),
    "agentctl_agent_cpu_seconds_total": ("counter", {"agent"}),
    "agentctl_manifest_valid": ("gauge", {"source"}),
    "agentctl_reconcile_total": ("counter", {"result"}),
    "agentctl_reconcile_duration_seconds": ("histogram", set()),
    "agentctl_workqueue_depth": ("gauge", set()),
    "agentctl_build_info": ("gauge", {"version"}),
}
# Beyond the contract (documented in docs/CONTRACT.md): Git source metrics of §7 appear only
# with a Git source; failed state writes are always counted.
EXTRA_METRICS = {
    "agentctl_state_write_errors_total": ("counter", set()),
}
EXPOSED_METRICS = CONTRACT_METRICS | EXTRA_METRICS
REFUSED = ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "BREW")


# --------------------------------------------------------------- helpers


def status_doc(name: str, phase: str = "Running", desired: int = 1, ready: int = 1) -> dict[str, Any]:
    return {"name": name, "source": f"manifests/{name}.yaml", "phase": phase, "specHash": f"sha256:{name}",
            "supervisor": "process", "replicas": {"desired": desired, "ready": ready}, "restarts": 0,
            "instances": [], "conditions": [], "lastError": None}


def fake_snapshot(*, ready: bool = True) -> Snapshot:
    statuses = {"alpha": status_doc("alpha"), "beta": status_doc("beta", "BackOff", 2, 1)}
    return Snapshot(
        statuses=statuses,
        handles={},
        start_times={"alpha-0": ("alpha", 1_700_000_000.5), "beta-0": ("beta", 1_700_000_001.0)},
        counters={("beta", "Error"): 4, ("beta", "ManualRestart"): 1, ("gone", "Error"): 9},
        last_exit_codes={"beta": 3, "gone": 1},
        manifest_valid={"manifests/alpha.yaml": True, "manifests/beta.yaml": True, "manifests/bad.yaml": False},
        ready=ready,
    )


@dataclass
class Served:
    """A listener on 127.0.0.1:0 over a snapshot the test can swap, as the reconciler does."""

    snap: Snapshot
    metrics: Metrics = field(init=False)
    port: int = 0

    def request(self, path: str, method: str = "GET", body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def scrape(self) -> dict[str, Any]:
        code, _, body = self.request("/metrics")
        assert code == 200
        return {f.name: f for f in text_string_to_metric_families(body.decode())}


@pytest.fixture
def served() -> Iterator[Served]:
    s = Served(fake_snapshot())
    s.metrics = Metrics(lambda: s.snap, lambda: 2.0)
    server = serve("127.0.0.1", 0, lambda: s.snap, s.metrics)
    s.port = int(server.server_address[1])
    try:
        yield s
    finally:
        server.shutdown()
        server.server_close()


def samples(families: dict[str, Any], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """{sorted label items: value} of one sample name, e.g. agentctl_agent_restarts_total."""
    out = {}
    for family in families.values():
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(families: dict[str, Any], name: str, **labels: str) -> float | None:
    for key, v in samples(families, name).items():
        if all(dict(key).get(k) == want for k, want in labels.items()):
            return v
    return None


def exposed_names(families: dict[str, Any]) -> dict[str, tuple[str, set[str]]]:
    """Contract name -> (type, label names) as parsed from an exposition."""
    out: dict[str, tuple[str, set[str]]] = {}
    for family in families.values():
        name = f"{family.name}_total" if family.type == "counter" else family.name
        labels: set[str] = set()
        for s in family.samples:
            labels |= set(s.labels) - {"le"}
        out[name] = (family.type, labels)
    return out


def promtool_check(text: bytes) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        return
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60, check=False)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        result.stdout.decode() + result.stderr.decode())


# ------------------------------------------------------- handler level


def test_readyz_is_503_until_the_first_pass_is_published(served: Served) -> None:
    served.snap = replace(served.snap, ready=False)
    code, _headers, body = served.request("/readyz")
    assert code == 503 and b"first reconcile" in body
    served.snap = replace(served.snap, ready=True)
    assert served.request("/readyz")[0] == 200
    assert served.request("/healthz")[0] == 200


def test_agents_api_lists_statuses_by_name_and_serves_one(served: Served) -> None:
    code, headers, body = served.request("/api/v1/agents")
    assert code == 200 and headers["content-type"] == "application/json"
    assert [d["name"] for d in json.loads(body)["items"]] == ["alpha", "beta"]
    code, _, body = served.request("/api/v1/agents/beta")
    assert code == 200 and json.loads(body) == served.snap.statuses["beta"]
    assert served.request("/api/v1/agents/?x=1")[0] == 200
    assert served.request("/api/v1/agents/alpha/")[0] == 200


@pytest.mark.parametrize("path", ["/api/v1/agents/nope", "/api/v1/agents/alpha/extra", "/nope", "/metricsx"])
def test_unknown_agent_or_path_is_404_with_a_json_error(served: Served, path: str) -> None:
    code, headers, body = served.request(path)
    assert code == 404 and headers["content-type"] == "application/json"
    assert "error" in json.loads(body)


@pytest.mark.parametrize("method", REFUSED)
def test_every_method_but_get_and_head_is_405_with_allow(served: Served, method: str) -> None:
    before = copy.deepcopy(served.snap)
    for path in ("/metrics", "/api/v1/agents/alpha", "/readyz", "/nope"):
        code, headers, body = served.request(path, method, body=b'{"replicas": 0}' * 100,
                                             headers={"Content-Type": "application/json"})
        assert code == 405, (method, path)
        assert headers["allow"] == "GET, HEAD"
        assert "error" in json.loads(body)
    assert served.snap == before
    assert served.request("/api/v1/agents/alpha")[0] == 200


def test_head_answers_like_get_without_a_body(served: Served) -> None:
    for path in ("/api/v1/agents", "/healthz", "/api/v1/agents/nope"):
        get_code, _get_headers, get_body = served.request(path)
        code, headers, body = served.request(path, "HEAD")
        assert (code, body) == (get_code, b"")
        assert headers["content-length"] == str(len(get_body))
    code, headers, body = served.request("/metrics", "HEAD")
    assert code == 200 and body == b"" and headers["content-type"].startswith("text/plain; version=0.0.4")


def test_a_failing_scrape_is_a_500_and_the_listener_keeps_serving(served: Served) -> None:
    good = served.snap
    served.snap = replace(good, counters={("alpha", "Error"): "x"})  # type: ignore[dict-item]
    code, _, body = served.request("/metrics")
    assert code == 500 and "error" in json.loads(body)
    served.snap = good
    assert served.request("/metrics")[0] == 200


def test_per_agent_series_follow_the_snapshot(served: Served) -> None:
    fams = served.scrape()
    assert exposed_names(fams) == EXPOSED_METRICS
    phases = samples(fams, "agentctl_agent_phase")
    assert len(phases) == 2 * len(PHASES) == 20
    assert {dict(k)["phase"] for k, v in phases.items() if dict(k)["agent"] == "beta" and v == 1} == {"BackOff"}
    assert value(fams, "agentctl_agent_replicas_desired", agent="beta") == 2
    assert value(fams, "agentctl_agent_replicas_ready", agent="beta") == 1
    assert value(fams, "agentctl_agent_last_exit_code", agent="beta") == 3
    assert value(fams, "agentctl_agent_start_time_seconds", agent="alpha", instance="alpha-0") == 1_700_000_000.5
    assert value(fams, "agentctl_agent_info", agent="alpha", supervisor="process", spec_hash="sha256:alpha",
                 source="manifests/alpha.yaml") == 1
    assert value(fams, "agentctl_manifest_valid", source="manifests/bad.yaml") == 0
    assert value(fams, "agentctl_workqueue_depth") == 2
    # counters and exit codes of an agent the controller no longer knows are not shown
    assert all(dict(k)["agent"] != "gone" for k in samples(fams, "agentctl_agent_restarts_total"))
    assert value(fams, "agentctl_agent_last_exit_code", agent="gone") is None

    served.snap = replace(served.snap, statuses={"alpha": served.snap.statuses["alpha"]})
    fams = served.scrape()
    for name in ("agentctl_agent_info", "agentctl_agent_phase", "agentctl_agent_restarts_total",
                 "agentctl_agent_start_time_seconds", "agentctl_agent_cpu_seconds_total",
                 "agentctl_agent_resident_memory_bytes", "agentctl_agent_last_exit_code"):
        assert all(dict(k)["agent"] == "alpha" for k in samples(fams, name)), name


def test_restart_counters_start_at_zero_for_every_reason(served: Served) -> None:
    restarts = samples(served.scrape(), "agentctl_agent_restarts_total")
    for agent in ("alpha", "beta"):
        reasons = {dict(k)["reason"]: v for k, v in restarts.items() if dict(k)["agent"] == agent}
        assert set(reasons) == set(RESTART_REASONS)
    assert restarts[(("agent", "beta"), ("reason", "Error"))] == 4
    assert restarts[(("agent", "beta"), ("reason", "ManualRestart"))] == 1
    assert restarts[(("agent", "alpha"), ("reason", "Error"))] == 0


def test_reconcile_counters_and_histogram(served: Served) -> None:
    for seconds in (0.0004, 0.003, 0.003, 7.0, 60.0):
        served.metrics.observe("success", seconds)
    served.metrics.observe("error", 0.0)
    fams = served.scrape()
    assert value(fams, "agentctl_reconcile_total", result="success") == 5
    assert value(fams, "agentctl_reconcile_total", result="error") == 1
    buckets = {dict(k)["le"]: v for k, v in samples(fams, "agentctl_reconcile_duration_seconds_bucket").items()}
    assert len(buckets) == len(DURATION_BUCKETS) + 1
    assert (buckets["0.0005"], buckets["0.005"], buckets["10.0"], buckets["+Inf"]) == (1, 3, 4, 5)
    assert value(fams, "agentctl_reconcile_duration_seconds_count") == 5
    assert value(fams, "agentctl_reconcile_duration_seconds_sum") == pytest.approx(67.0064)
    assert not [n for n in samples_names(fams) if n.endswith("_created")]


def samples_names(families: dict[str, Any]) -> set[str]:
    return {s.name for f in families.values() for s in f.samples}


def test_metrics_live_on_their_own_registry(served: Served) -> None:
    served.scrape()
    leaked = [n for n in prometheus_client.REGISTRY._names_to_collectors if n.startswith("agentctl")]
    assert leaked == []
    assert b"python_gc" not in served.request("/metrics")[2]


def test_fake_scrape_passes_promtool(served: Served) -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool not on PATH (Debian/Ubuntu: apt-get install prometheus)")
    served.metrics.observe("success", 0.01)
    promtool_check(served.request("/metrics")[2])


# ------------------------------------------------------- /proc usage


def stat(pid: int, pgid: int, ppid: int, ticks: int, cpu_ticks: int, rss_pages: int) -> procfs.Stat:
    return procfs.Stat(pid=pid, state="S", ppid=ppid, pgid=pgid, utime=cpu_ticks, stime=0, start_ticks=ticks,
                       rss_pages=rss_pages)


def proc_snapshot(*stats: procfs.Stat) -> procfs.Snapshot:
    snap = procfs.Snapshot()
    for s in stats:
        snap.stats[s.pid] = s
        snap.by_pgid[s.pgid].append(s.pid)
        snap.children[s.ppid].append(s.pid)
    return snap


def test_cpu_counter_keeps_the_cpu_of_processes_that_are_gone() -> None:
    tck = procfs.CLK_TCK
    rounds = iter([
        # leader 10 with a child 11 in its group and a grandchild 12 that made its own group
        proc_snapshot(stat(10, 10, 1, 5, 2 * tck, 100), stat(11, 10, 10, 6, 3 * tck, 50), stat(12, 12, 11, 7, tck, 10),
                      stat(99, 99, 1, 1, 50 * tck, 999)),
        # the child exits; the leader goes on
        proc_snapshot(stat(10, 10, 1, 5, 4 * tck, 100), stat(99, 99, 1, 1, 60 * tck, 999)),
        # the leader restarted as a new process (same pid, new start time)
        proc_snapshot(stat(10, 10, 1, 8, tck, 100)),
    ])
    usage = Usage(ttl=0.0, read=lambda: next(rounds))
    handles = {"a-0": ("a", Handle(10, 10, 5))}
    page = procfs.PAGE_SIZE
    assert usage.get(handles, frozenset({"a"})) == {"a": (160 * page, 6.0)}
    assert usage.get(handles, frozenset({"a"})) == {"a": (100 * page, 4.0 + 3.0 + 1.0)}
    assert usage.get(handles, frozenset({"a"})) == {"a": (100 * page, 1.0 + 4.0 + 3.0 + 1.0)}


def test_usage_is_cached_for_its_ttl_and_forgets_deleted_agents() -> None:
    calls = []

    def read() -> procfs.Snapshot:
        calls.append(1)
        return proc_snapshot(stat(10, 10, 1, 5, procfs.CLK_TCK, 1))

    usage = Usage(ttl=60.0, read=read)
    handles = {"a-0": ("a", Handle(10, 10, 5))}
    usage.get(handles, frozenset({"a"}))
    usage.get(handles, frozenset({"a"}))
    assert len(calls) == 1
    usage = Usage(ttl=0.0, read=read)
    usage.get(handles, frozenset({"a"}))
    assert usage.get({}, frozenset()) == {}
    assert usage.get(handles, frozenset({"a"})) == {"a": (procfs.PAGE_SIZE, 1.0)}  # not 2.0: a fresh start


# ------------------------------------------------------- live controller


def crash_once(marker: str) -> list[str]:
    """Exits 3 the first time, then runs: one restart with reason Error."""
    return py(f"""
        import os, sys, time
        if not os.path.exists({marker!r}):
            open({marker!r}, "w").close()
            sys.exit(3)
        print("second life", flush=True)
        while True: time.sleep(1)
    """)


def with_big_child() -> list[str]:
    """A leader whose child holds 64 MiB in a session of its own: only the process tree finds it."""
    return py("""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c",
            "import time; b = bytearray(64 << 20); b[::4096] = b'x' * len(b[::4096]); "
            "print('child up', flush=True); time.sleep(3600)"], start_new_session=True)
        while True: time.sleep(1)
    """)


def scrape(ctl: Controller) -> tuple[bytes, dict[str, Any]]:
    code, body = ctl.http("/metrics")
    assert code == 200, (code, ctl.log()[-3000:])
    return body, {f.name: f for f in text_string_to_metric_families(body.decode())}


@pytest.mark.slow
def test_live_controller_exposes_every_contract_metric(ctl: Controller) -> None:
    ctl.apply("steady", with_big_child())
    ctl.apply("crasher", crash_once(str(ctl.root / "crashed-once")))
    ctl.start()
    ctl.wait_phase("steady", "Running", timeout=60)
    ctl.wait_status("crasher", lambda d: d.get("phase") == "Running" and d.get("restarts") == 1, timeout=60,
                    message="crasher running again after one crash")
    mib = 1 << 20

    def settled() -> tuple[bytes, dict[str, Any]] | None:
        body, fams = scrape(ctl)
        ok = (value(fams, "agentctl_agent_resident_memory_bytes", agent="steady") or 0) > 64 * mib
        ok = ok and value(fams, "agentctl_agent_phase", agent="crasher", phase="Running") == 1
        return (body, fams) if ok else None

    body, fams = wait_for(settled, timeout=60, interval=0.5, message="steady's child counted, crasher Running")
    assert exposed_names(fams) == EXPOSED_METRICS
    for agent in ("steady", "crasher"):
        doc = ctl.status(agent) or {}
        assert value(fams, "agentctl_agent_info", agent=agent, supervisor="process", source=doc["source"],
                     spec_hash=doc["specHash"]) == 1
        assert sum(v for k, v in samples(fams, "agentctl_agent_phase").items() if dict(k)["agent"] == agent) == 1
        assert value(fams, "agentctl_agent_replicas_desired", agent=agent) == 1
        assert value(fams, "agentctl_agent_replicas_ready", agent=agent) == 1
        assert value(fams, "agentctl_agent_start_time_seconds", agent=agent, instance=f"{agent}-0") == \
            pytest.approx(time.time(), abs=120)
        assert value(fams, "agentctl_manifest_valid", source=doc["source"]) == 1
    assert value(fams, "agentctl_agent_restarts_total", agent="crasher", reason="Error") == 1
    assert value(fams, "agentctl_agent_restarts_total", agent="crasher", reason="Signaled") == 0
    assert value(fams, "agentctl_agent_restarts_total", agent="steady", reason="Error") == 0
    assert value(fams, "agentctl_agent_last_exit_code", agent="crasher") == 3
    assert value(fams, "agentctl_agent_last_exit_code", agent="steady") is None
    assert (value(fams, "agentctl_agent_cpu_seconds_total", agent="steady") or 0) > 0
    assert (value(fams, "agentctl_reconcile_total", result="success") or 0) >= 2
    assert value(fams, "agentctl_build_info", version=__import__("controller").__version__) == 1
    assert ctl.http("/readyz")[0] == 200
    promtool_check(body)

    code, api = ctl.http("/api/v1/agents/crasher")
    assert code == 200 and json.loads(api)["restarts"] == 1
    assert [d["name"] for d in json.loads(ctl.http("/api/v1/agents")[1])["items"]] == ["crasher", "steady"]

    ctl.delete("crasher.yaml")
    wait_for(lambda: ctl.status("crasher") is None, timeout=60, message="crasher's status removed")

    def crasher_gone() -> bool:
        text = ctl.http("/metrics")[1]
        return b'agent="crasher"' not in text and b"crasher.yaml" not in text

    wait_for(crasher_gone, timeout=30, interval=0.2, message="crasher's series gone from /metrics")
    _, fams = scrape(ctl)
    assert value(fams, "agentctl_agent_phase", agent="steady", phase="Running") == 1
    assert ctl.http("/api/v1/agents/crasher")[0] == 404


@pytest.mark.slow
def test_live_listener_refuses_writes(ctl: Controller) -> None:
    ctl.apply("steady", sleeper())
    ctl.start()
    ctl.wait_phase("steady", "Running", timeout=60)
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        assert ctl.http("/api/v1/agents/steady", method)[0] == 405
    assert ctl.http("/metrics", "HEAD") == (200, b"")
    assert ctl.wait_phase("steady", "Running")["restarts"] == 0
