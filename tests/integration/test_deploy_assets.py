"""Checks the deploy/ assets: Prometheus rules, configs, Grafana dashboard, systemd units.

Uses promtool (Debian package `prometheus`), a real Prometheus server on
127.0.0.1 and systemd-analyze when they are installed; each test that needs a
missing tool skips and says which. Nothing here reaches beyond 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROM_DIR = DEPLOY / "prometheus"
ALERTS = PROM_DIR / "alerts.yml"
ALERTS_TEST = PROM_DIR / "alerts_test.yml"
PROM_CONFIGS = [PROM_DIR / "prometheus.yml", PROM_DIR / "fleet.yml"]
DASHBOARD = DEPLOY / "grafana" / "agentctl-dashboard.json"
UNIT = DEPLOY / "agentctl.service"
USER_UNIT = DEPLOY / "agentctl-user.service"

# Contract §5, the metrics table. `up` is Prometheus's own.
CONTRACT_METRICS = frozenset(
    {
        "agentctl_agent_info",
        "agentctl_agent_phase",
        "agentctl_agent_replicas_desired",
        "agentctl_agent_replicas_ready",
        "agentctl_agent_restarts_total",
        "agentctl_agent_last_exit_code",
        "agentctl_agent_start_time_seconds",
        "agentctl_agent_resident_memory_bytes",
        "agentctl_agent_cpu_seconds_total",
        "agentctl_manifest_valid",
        "agentctl_reconcile_total",
        "agentctl_reconcile_duration_seconds",
        "agentctl_workqueue_depth",
        "agentctl_build_info",
    }
)
HISTOGRAMS = frozenset({"agentctl_reconcile_duration_seconds", "agentctl_fleet_lease_renewal_seconds"})  # fleet: §10
# Exposed beyond §5, as listed in docs/CONTRACT.md ("Where this implementation adds").
EXTRA_METRICS = frozenset({
    "agentctl_source_info",
    "agentctl_source_last_sync_timestamp_seconds",
    "agentctl_state_write_errors_total",
    # fleet: CONTRACT §10, and the two beyond it listed in docs/CONTRACT.md
    "agentctl_fleet_hosts",
    "agentctl_fleet_leader",
    "agentctl_fleet_lease_renewal_seconds",
    "agentctl_fleet_lease_ttl_seconds",
    "agentctl_fleet_unassigned_oldest_seconds",
})
# Contract §9 (v1.1): the activity of AI sessions (activity: one-hot per agent).
V11_METRICS = frozenset({"agentctl_agent_activity"})
ALLOWED_NAMES = (
    CONTRACT_METRICS
    | EXTRA_METRICS
    | V11_METRICS
    | {f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
    | {"up"}
)
# Where the project may keep its twin of the contract; checked when present.
CONTRACT_DOCS = [
    ROOT / "docs" / "CONTRACT.md",
    ROOT / "CONTRACT.md",
    ROOT / "docs" / "contract.md",
]

PROMQL_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "offset",
        "bool",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "inf",
        "nan",
        "atan2",
    }
)
# Grafana's built-in interval variables, replaced to make plain PromQL.
GRAFANA_VARS = {
    "$__rate_interval": "10s",
    "$__interval": "5s",
    "$__range": "1m",
}


# --------------------------------------------------------------- helpers


def metric_names(expr: str) -> set[str]:
    """Metric names used in a PromQL expression (a regex pass, not a full parser)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"'(?:[^'\\]|\\.)*'", "''", text)
    text = re.sub(r"`[^`]*`", "``", text)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text
    )
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # Grafana variables
    names: set[str] = set()
    for match in re.finditer(r"(?<![\w.:$])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", text):
        token, is_call = match.group(1), match.group(2)
        if is_call or token.lower() in PROMQL_KEYWORDS:
            continue
        names.add(token)
    return names


def variable_query_exprs(query: str) -> list[str]:
    """The PromQL inside a Grafana Prometheus variable query."""
    query = query.strip()
    m = re.fullmatch(r"label_values\((.*),\s*\w+\s*\)", query, re.DOTALL)
    if m:
        return [m.group(1)]
    if re.fullmatch(
        r"label_values\(\s*\w+\s*\)|label_names\(\s*\)|metrics\(.*\)", query
    ):
        return []
    m = re.fullmatch(r"query_result\((.*)\)", query, re.DOTALL)
    if m:
        return [m.group(1)]
    return [query]


def load_dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows keep their panels inside


def dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) for every panel target and every query variable."""
    found: list[tuple[str, str]] = []
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            if target.get("expr"):
                found.append(
                    (f"panel {panel['title']!r} {target['refId']}", target["expr"])
                )
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = (
            var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        )
        for expr in variable_query_exprs(query):
            found.append((f"variable ${var['name']}", expr))
    return found


def plain_promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced by real values."""
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return re.sub(r"\$\{?(instance|agent)\}?", ".*", expr)


def load_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, check=False, **kwargs
    )


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not on PATH (Debian/Ubuntu: apt-get install prometheus)")
    return path


# -------------------------------------------------------- metric parsing


def test_metric_name_parser_finds_names_and_ignores_the_rest() -> None:
    expr = (
        'sum by (le, instance) (rate(agentctl_reconcile_duration_seconds_bucket{instance=~"$instance"}'
        "[$__rate_interval])) > 1e3 unless on (agent) up offset 10m "
        'or label_replace(foo:bar_total{a="b c"}, "x", "$1", "y", "(.*)") > bool 0.5'
    )
    assert metric_names(expr) == {
        "agentctl_reconcile_duration_seconds_bucket",
        "up",
        "foo:bar_total",
    }


def test_contract_twin_lists_the_same_metrics() -> None:
    docs = [p for p in CONTRACT_DOCS if p.is_file()]
    if not docs:
        pytest.skip(
            "no contract twin in the repository (looked for docs/CONTRACT.md, CONTRACT.md)"
        )
    table_rows = [
        line
        for line in docs[0].read_text().splitlines()
        if line.startswith("| `agentctl_")
    ]
    names = {
        name for row in table_rows for name in re.findall(r"`(agentctl_\w+)`", row)
    }
    assert names == CONTRACT_METRICS, f"{docs[0]} §5 differs from this test's list"


# ------------------------------------------------------------ Prometheus


def test_promtool_check_rules(promtool: str) -> None:
    result = run([promtool, "check", "rules", str(ALERTS)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_pass(promtool: str) -> None:
    result = run([promtool, "test", "rules", str(ALERTS_TEST)], cwd=PROM_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize("config", PROM_CONFIGS, ids=lambda p: p.name)
def test_promtool_check_config(promtool: str, config: Path) -> None:
    result = run([promtool, "check", "config", str(config)])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "SUCCESS: 1 rule files found" in output, output


@pytest.mark.parametrize("config", PROM_CONFIGS, ids=lambda p: p.name)
def test_configs_scrape_job_agentctl_and_load_the_rules(config: Path) -> None:
    data = yaml.safe_load(config.read_text())
    assert data["rule_files"] == ["alerts.yml"]
    (job,) = [j for j in data["scrape_configs"] if j["job_name"] == "agentctl"]
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert all(t.endswith(":9478") for t in targets), targets
    if config.name == "prometheus.yml":
        assert targets == ["127.0.0.1:9478"]
    else:
        assert len(targets) >= 2


def test_every_alert_is_well_formed() -> None:
    rules = load_rules()
    assert len(rules) >= 9
    for rule in rules:
        assert "alert" in rule, f"unexpected recording rule {rule}"
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule[
            "alert"
        ]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), (
            f"{rule['alert']} has no `for`"
        )


def test_alerts_cover_the_contract_situations() -> None:
    exprs = {rule["alert"]: " ".join(rule["expr"].split()) for rule in load_rules()}
    joined = "\n".join(exprs.values())
    for needle in (
        'agentctl_agent_phase{phase="Failed"} == 1',
        "increase(agentctl_agent_restarts_total",
        "agentctl_agent_replicas_ready < agentctl_agent_replicas_desired",
        "agentctl_manifest_valid == 0",
        'rate(agentctl_reconcile_total{result="error"}[5m])',
        'up{job="agentctl"} == 0',
        'absent(up{job="agentctl"})',
        "count by (agent) (agentctl_agent_info) > 1",
        "last_over_time(agentctl_agent_info[",
        'agentctl_agent_activity{activity="WaitingForInput"} == 1',  # activity: §9
    ):
        assert needle in joined, needle


def test_every_alert_has_a_firing_and_a_silent_unit_test() -> None:
    names = {rule["alert"] for rule in load_rules()}
    cases = [
        case
        for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    ]
    fires = {c["alertname"] for c in cases if c.get("exp_alerts")}
    silent = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert names - fires == set(), "alerts never shown firing"
    assert names - silent == set(), "alerts never shown silent"


def test_alert_exprs_use_only_contract_metrics() -> None:
    for rule in load_rules():
        names = metric_names(rule["expr"])
        assert names, f"no metric found in {rule['alert']} (parser broken?)"
        assert names <= ALLOWED_NAMES, (
            f"{rule['alert']}: unknown {names - ALLOWED_NAMES}"
        )


# --------------------------------------------------------------- Grafana


def test_dashboard_is_valid_json_with_variables() -> None:
    dashboard = load_dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["type"] == "query"
    ids = [p["id"] for p in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in all_panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_has_the_required_panels() -> None:
    exprs = "\n".join(expr for _, expr in dashboard_exprs(load_dashboard()))
    for needle in (
        "agentctl_agent_phase",
        "increase(agentctl_agent_restarts_total",
        "agentctl_agent_resident_memory_bytes",
        "rate(agentctl_agent_cpu_seconds_total",
        "histogram_quantile(0.99, sum by (le, instance) (rate(agentctl_reconcile_duration_seconds_bucket",
        "agentctl_workqueue_depth",
        "agentctl_manifest_valid",
        "count by (instance) (agentctl_agent_info",
        "count by (agent) (agentctl_agent_info) > 1",
        "count by (activity) (agentctl_agent_activity",  # activity: §9
    ):
        assert needle in exprs, needle


def test_dashboard_exprs_use_only_contract_metrics() -> None:
    found = dashboard_exprs(load_dashboard())
    assert len(found) >= 10
    for where, expr in found:
        names = metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r} (parser broken?)"
        assert names <= ALLOWED_NAMES, (
            f"{where}: unknown {names - ALLOWED_NAMES} in {expr!r}"
        )


def test_dashboard_exprs_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    # promtool has no "check this expression"; a recording rule per expression
    # gets each one through Prometheus's own parser.
    rules = [
        {"record": f"dashboard:expr_{i}", "expr": plain_promql(expr)}
        for i, (_, expr) in enumerate(dashboard_exprs(load_dashboard()))
    ]
    rule_file = tmp_path / "dashboard_rules.yml"
    rule_file.write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
    )
    result = run([promtool, "check", "rules", str(rule_file)])
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------- a real Prometheus, end to end


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def prom_query(base: str, expr: str) -> Any:
    return http_json(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))


def wait_for(check: Any, *, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except OSError as exc:  # server not up yet
            last = exc
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}: {last!r}")


@pytest.fixture
def fake_agentctl_metrics() -> Iterator[str]:
    """A /metrics endpoint on 127.0.0.1 shaped like contract §5, with counters moving."""
    prom = pytest.importorskip("prometheus_client")
    registry = prom.CollectorRegistry()
    g = {
        name: prom.Gauge(name, name, labels, registry=registry)
        for name, labels in [
            ("agentctl_agent_info", ["agent", "supervisor", "spec_hash", "source"]),
            ("agentctl_agent_phase", ["agent", "phase"]),
            ("agentctl_agent_replicas_desired", ["agent"]),
            ("agentctl_agent_replicas_ready", ["agent"]),
            ("agentctl_agent_last_exit_code", ["agent"]),
            ("agentctl_agent_start_time_seconds", ["agent", "instance"]),
            ("agentctl_agent_resident_memory_bytes", ["agent"]),
            ("agentctl_manifest_valid", ["source"]),
            ("agentctl_workqueue_depth", []),
            ("agentctl_build_info", ["version"]),
            ("agentctl_agent_activity", ["agent", "activity"]),  # activity: §9
        ]
    }
    restarts = prom.Counter(
        "agentctl_agent_restarts_total", "r", ["agent", "reason"], registry=registry
    )
    cpu = prom.Counter(
        "agentctl_agent_cpu_seconds_total", "c", ["agent"], registry=registry
    )
    reconciles = prom.Counter(
        "agentctl_reconcile_total", "t", ["result"], registry=registry
    )
    duration = prom.Histogram(
        "agentctl_reconcile_duration_seconds", "d", registry=registry
    )
    phases = [
        "Pending",
        "Starting",
        "Running",
        "BackOff",
        "Stopping",
        "Stopped",
        "Completed",
        "Failed",
        "Suspended",
        "Invalid",
    ]
    agents = {
        "reviewer": ("Running", 2, 2),
        "writer": ("BackOff", 1, 0),
        "triage": ("Failed", 1, 0),
    }
    for agent, (phase, desired, ready) in agents.items():
        g["agentctl_agent_info"].labels(
            agent, "process", "sha256:5f1c", f"manifests/{agent}.yaml"
        ).set(1)
        for p in phases:
            g["agentctl_agent_phase"].labels(agent, p).set(1 if p == phase else 0)
        g["agentctl_agent_replicas_desired"].labels(agent).set(desired)
        g["agentctl_agent_replicas_ready"].labels(agent).set(ready)
        g["agentctl_agent_last_exit_code"].labels(agent).set(1)
        g["agentctl_agent_start_time_seconds"].labels(agent, f"{agent}-0").set(
            time.time()
        )
        g["agentctl_agent_resident_memory_bytes"].labels(agent).set(200 * 2**20)
        g["agentctl_manifest_valid"].labels(f"manifests/{agent}.yaml").set(1)
    g["agentctl_manifest_valid"].labels("manifests/broken.yaml").set(0)
    for agent, current in {"reviewer": "Working", "writer": "WaitingForInput"}.items():  # activity: §9
        for activity in ("Working", "Idle", "WaitingForInput", "Unknown"):
            g["agentctl_agent_activity"].labels(agent, activity).set(1 if activity == current else 0)
    g["agentctl_workqueue_depth"].set(2)
    g["agentctl_build_info"].labels("0.1.0").set(1)

    stop = threading.Event()

    def churn() -> None:
        while not stop.wait(0.2):
            restarts.labels("writer", "Error").inc()
            restarts.labels("reviewer", "ManualRestart").inc()
            for agent in agents:
                cpu.labels(agent).inc(0.05)
            reconciles.labels("success").inc()
            reconciles.labels("error").inc()
            duration.observe(0.02)

    server, _ = prom.start_http_server(0, addr="127.0.0.1", registry=registry)
    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        stop.set()
        thread.join()
        server.shutdown()
        server.server_close()


@pytest.fixture
def prometheus_server(fake_agentctl_metrics: str, tmp_path: Path) -> Iterator[str]:
    """The shipped prometheus.yml and alerts.yml, run by a real Prometheus on 127.0.0.1."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip(
            "prometheus not on PATH (Debian/Ubuntu: apt-get install prometheus)"
        )
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(ALERTS)]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [fake_agentctl_metrics]}]
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: (
                proc.poll() is None
                and urllib.request.urlopen(f"{base}/-/ready", timeout=2).status == 200
            ),
            timeout=30,
            what="Prometheus to be ready",
        )
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.slow
def test_real_prometheus_scrapes_evaluates_rules_and_dashboard(
    prometheus_server: str,
) -> None:
    base = prometheus_server
    # Enough scrapes for rate()/increase() over the dashboards' 10s windows.
    wait_for(
        lambda: prom_query(base, 'count_over_time(up{job="agentctl"}[1m]) >= 5')[
            "data"
        ]["result"],
        timeout=60,
        what="five scrapes of the fake agentctl",
    )
    assert (
        prom_query(base, 'up{job="agentctl"}')["data"]["result"][0]["value"][1] == "1"
    )

    def rules_evaluated() -> list[dict[str, Any]]:
        groups = http_json(f"{base}/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if rules and all(r["health"] != "unknown" for r in rules) else []

    rules = wait_for(rules_evaluated, timeout=30, what="every rule to be evaluated")
    assert {r["name"] for r in rules} == {r["alert"] for r in load_rules()}
    assert [r for r in rules if r["health"] != "ok"] == []

    # The fake exports a Failed agent, an invalid manifest, a restarting agent
    # and reconcile errors: those alerts must at least be pending.
    active = {
        a["labels"]["alertname"]
        for a in http_json(f"{base}/api/v1/alerts")["data"]["alerts"]
    }
    expected = {
        "AgentctlAgentFailed",
        "AgentctlManifestInvalid",
        "AgentctlAgentCrashLooping",
        "AgentctlReconcileErrors",
        "AgentctlAgentNotReady",
    }
    assert expected <= active, f"missing {expected - active}"
    assert (
        "AgentctlControllerDown" not in active
        and "AgentctlControllerAbsent" not in active
    )

    # One host: "more than one host" is legitimately empty; all else has data.
    # fleet: an uncoordinated host exports no agentctl_fleet_* series at all (CONTRACT §10)
    may_be_empty = re.compile(r"count by \(agent\) \(agentctl_agent_info\) > 1$|agentctl_fleet_")
    for where, expr in dashboard_exprs(load_dashboard()):
        query = plain_promql(expr)
        if where.startswith("variable"):
            query = f"count({query})"
        answer = prom_query(base, query)
        assert answer["status"] == "success", (where, answer)
        if not may_be_empty.search(expr):
            assert answer["data"]["result"], f"{where}: no data for {query!r}"


# --------------------------------------------------------------- systemd


@pytest.mark.parametrize("unit", [UNIT, USER_UNIT], ids=lambda p: p.name)
def test_unit_keeps_agents_running_across_controller_restarts(unit: Path) -> None:
    directives = {
        line.strip()
        for line in unit.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    assert "KillMode=process" in directives
    assert "Restart=always" in directives
    assert "OOMPolicy=continue" in directives
    exec_start = [d for d in directives if d.startswith("ExecStart=")]
    assert (
        len(exec_start) == 1
        and " run " in exec_start[0]
        and "--config" in exec_start[0]
    )


@pytest.mark.parametrize("unit", [UNIT, USER_UNIT], ids=lambda p: p.name)
def test_unit_delegates_its_cgroup_subtree_for_per_instance_cgroups(unit: Path) -> None:
    """Contract §11: the controller may create a cgroup per instance only in a delegated,
    writable subtree; ProtectControlGroups would make cgroupfs read-only again."""
    directives = {
        line.strip()
        for line in unit.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    assert "Delegate=yes" in directives
    assert "ProtectControlGroups=yes" not in directives


# What systemd-analyze says about the machine rather than the unit: the
# agentctl binary is not installed where ExecStart points on a test machine.
ENVIRONMENT_NOISE = re.compile(r"Command \S+ is not executable")


@pytest.mark.parametrize("unit", [UNIT, USER_UNIT], ids=lambda p: p.name)
def test_systemd_analyze_verify(unit: Path, tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not on PATH")
    cmd = [tool, "verify", str(unit)]
    env = dict(os.environ, SYSTEMD_LOG_COLOR="0", SYSTEMD_PAGER="")
    if unit == USER_UNIT:
        runtime = tmp_path / "runtime"
        runtime.mkdir(mode=0o700)
        cmd.insert(1, "--user")
        env["XDG_RUNTIME_DIR"] = str(runtime)
    result = run(cmd, env=env)
    lines = (result.stdout + result.stderr).splitlines()
    about_unit = [line for line in lines if unit.name in line or str(unit) in line]
    problems = [line for line in about_unit if not ENVIRONMENT_NOISE.search(line)]
    assert problems == [], "\n".join(lines)
    if result.returncode != 0 and not about_unit:
        pytest.skip(
            f"systemd-analyze verify is unusable here: {' / '.join(lines) or result.returncode}"
        )
