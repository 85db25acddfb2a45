"""A real Prometheus scrapes a real controller running a real agent.

Starts /usr/bin/prometheus (Debian package `prometheus`) on a free loopback port with a
config whose only target is the live controller, then asks Prometheus's HTTP API for the
agent's phase. Skips, saying why, only when the binary is absent.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import Controller, kill_group, sleeper, wait_for

DEADLINE = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get_json(url: str) -> Any:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as resp:
        return json.load(resp)


class Prometheus:
    def __init__(self, base: str, log: Path) -> None:
        self.base = base
        self.log = log

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = get_json(f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert answer["status"] == "success", answer
        return list(answer["data"]["result"])

    def poll(self, expr: str, pred: Any, what: str) -> list[dict[str, Any]]:
        def check() -> list[dict[str, Any]] | None:
            try:
                result = self.query(expr)
            except OSError:
                return None
            return result if pred(result) else None
        try:
            return wait_for(check, DEADLINE, interval=0.5, message=what)
        except AssertionError as exc:
            targets = get_json(f"{self.base}/api/v1/targets")["data"]["activeTargets"]
            raise AssertionError(f"{exc}\ntargets: {targets}\nprometheus log:\n{self.log.read_text()[-3000:]}") from None


def prometheus_binary() -> str:
    path = "/usr/bin/prometheus" if os.access("/usr/bin/prometheus", os.X_OK) else shutil.which("prometheus")
    if path is None:
        pytest.skip("no prometheus binary (/usr/bin/prometheus; Debian/Ubuntu: apt-get install prometheus)")
    return path


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Any]:
    """Call with the controller's port; the server is killed (its whole group) at the end."""
    binary = prometheus_binary()
    procs: list[subprocess.Popen[bytes]] = []

    def start(target_port: int) -> Prometheus:
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "agentctl", "metrics_path": "/metrics",
                                "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}],
        }
        config_file = tmp_path / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        port = free_port()
        log_path = tmp_path / "prometheus.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [binary, f"--config.file={config_file}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        procs.append(proc)
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"prometheus exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            try:
                with opener.open(f"{base}/-/ready", timeout=5) as resp:
                    return bool(resp.status == 200)
            except OSError:
                return False

        wait_for(ready, DEADLINE, interval=0.25, message="Prometheus /-/ready")
        return Prometheus(base, log_path)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        kill_group(proc.pid)
        proc.wait(15)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_prometheus_scrapes_the_running_agent(ctl: Controller, prometheus_for: Any) -> None:
    ctl.apply("worker", sleeper())
    ctl.start()
    ctl.wait_phase("worker", "Running", timeout=DEADLINE)
    prom = prometheus_for(ctl.port)

    result = prom.poll('agentctl_agent_phase{phase="Running"} == 1',
                       lambda r: any(s["metric"].get("agent") == "worker" for s in r),
                       "Prometheus to report worker Running")
    (sample,) = [s for s in result if s["metric"]["agent"] == "worker"]
    assert sample["metric"]["job"] == "agentctl"
    assert sample["metric"]["instance"] == f"127.0.0.1:{ctl.port}"
    assert sample["value"][1] == "1"

    # The scrape itself was clean, and the zero-valued restart series were ingested.
    targets = get_json(f"{prom.base}/api/v1/targets")["data"]["activeTargets"]
    assert [(t["health"], t["lastError"]) for t in targets] == [("up", "")]
    restarts = prom.query('agentctl_agent_restarts_total{agent="worker"}')
    assert len(restarts) == 7 and {s["value"][1] for s in restarts} == {"0"}
    info = prom.query('agentctl_agent_info{agent="worker"}')
    assert info and info[0]["metric"]["spec_hash"] == ctl.status("worker")["specHash"]  # type: ignore[index]
