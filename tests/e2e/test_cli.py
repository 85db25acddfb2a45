"""The `agentctl` command line as a user drives it: every command through a real subprocess.

`validate`, `schema` and `plan` need no controller; `get`, `describe` and `logs` read the
state dir; `restart` talks to a running controller; `run` refuses what it cannot use (exit 2).
"""

from __future__ import annotations

import json
import os
import queue
import re
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import PY, Controller, log_text, pid_alive, py, sleeper, wait_for

DEADLINE = 30.0
ROOT = Path(__file__).resolve().parents[2]
ERROR_LINE = re.compile(r"^(?P<file>[^:\s]+):(?P<line>\d+): \S.*$")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """For commands that must not get the helper's --state-dir (validate, --help)."""
    return subprocess.run([PY, "-m", "controller", *args], capture_output=True, text=True, timeout=60, cwd=cwd,
                          check=False)


def source_flags(ctl: Controller) -> tuple[str, ...]:
    return ("--manifests", str(ctl.manifests), "--base-dir", str(ctl.base))


def run_flags(ctl: Controller) -> tuple[str, ...]:
    return ("run", *source_flags(ctl), "--metrics-addr", "127.0.0.1:0")


def running_pid(ctl: Controller, name: str) -> int:
    doc = ctl.wait_status(name, lambda d: d.get("phase") == "Running" and bool(d["instances"])
                          and bool(d["instances"][0].get("pid")), DEADLINE, f"{name} Running")
    return int(doc["instances"][0]["pid"])


def write_manifest(path: Path, name: str, *extra_spec_lines: str) -> Path:
    """Hand-written so that line numbers are known: extra spec lines start at line 7."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = f"apiVersion: agentctl/v1\nkind: Agent\nmetadata:\n  name: {name}\nspec:\n  command: [\"true\"]\n"
    path.write_text(body + "".join(f"  {line}\n" for line in extra_spec_lines))
    return path


# -- validate / schema ------------------------------------------------------------
def test_validate_prints_one_file_line_message_per_error_and_exits_1(tmp_path: Path) -> None:
    write_manifest(tmp_path / "m" / "good.yaml", "good")
    write_manifest(tmp_path / "m" / "bad.yaml", "bad", "replicas: lots")
    write_manifest(tmp_path / "m" / "sub" / "unknown.yaml", "unknown", "command2: [x]")
    (tmp_path / "m" / "broken.yml").write_text("apiVersion: agentctl/v1\nkind: [\n")
    result = run_cli("validate", "m", cwd=tmp_path)
    assert result.returncode == 1, result
    lines = result.stdout.splitlines()
    assert len(lines) == 3, result.stdout
    assert all(ERROR_LINE.match(line) for line in lines), result.stdout
    found = {(m["file"], m["line"]) for m in map(ERROR_LINE.match, lines) if m}
    assert ("m/bad.yaml", "7") in found
    assert ("m/sub/unknown.yaml", "7") in found
    assert any(f == "m/broken.yml" for f, _ in found)
    assert "replicas" in next(line for line in lines if line.startswith("m/bad.yaml"))
    assert "command2" in next(line for line in lines if line.startswith("m/sub/unknown.yaml"))


def test_validate_exits_0_on_valid_dirs_and_handles_several_paths(tmp_path: Path) -> None:
    write_manifest(tmp_path / "a" / "one.yaml", "one")
    write_manifest(tmp_path / "b" / "two.yml", "two")
    write_manifest(tmp_path / "c" / "three.yaml", "three", "replicas: -1")
    ok = run_cli("validate", "a", "b", cwd=tmp_path)
    assert ok.returncode == 0, ok
    assert ok.stdout == ""
    mixed = run_cli("validate", "a/one.yaml", "c", "b", cwd=tmp_path)
    assert mixed.returncode == 1
    assert len(mixed.stdout.splitlines()) == 1, mixed.stdout
    assert mixed.stdout.startswith("c/three.yaml:7: "), mixed.stdout


def test_validate_names_both_files_of_a_duplicate_name(tmp_path: Path) -> None:
    write_manifest(tmp_path / "m" / "first.yaml", "twin")
    write_manifest(tmp_path / "m" / "second.yaml", "twin")
    result = run_cli("validate", "m", cwd=tmp_path)
    assert result.returncode == 1
    assert all(ERROR_LINE.match(line) for line in result.stdout.splitlines()), result.stdout
    assert "m/first.yaml" in result.stdout and "m/second.yaml" in result.stdout
    assert "twin" in result.stdout


def test_schema_prints_the_manifest_json_schema(tmp_path: Path) -> None:
    result = run_cli("schema", cwd=tmp_path)
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert {"apiVersion", "kind", "metadata", "spec"} <= set(schema["properties"])

    def property_sets(node: Any) -> list[set[str]]:
        if isinstance(node, dict):
            own = [set(node["properties"])] if isinstance(node.get("properties"), dict) else []
            return own + [s for v in node.values() for s in property_sets(v)]
        if isinstance(node, list):
            return [s for v in node for s in property_sets(v)]
        return []

    sets = property_sets(schema)
    assert any({"command", "replicas", "restartPolicy", "backoff", "stop", "env"} <= s for s in sets)
    assert any({"name", "labels"} <= s for s in sets)


# -- plan ---------------------------------------------------------------------------
def plan_lines(ctl: Controller) -> list[str]:
    result = ctl.cli("plan", *source_flags(ctl))
    assert result.returncode == 0, result
    return result.stdout.splitlines()


def test_plan_prints_create_noop_restart_and_stop_without_acting(ctl: Controller) -> None:
    ctl.apply("planned", sleeper("v1"))
    assert "create planned-0 Created" in plan_lines(ctl)
    assert not (ctl.state / "status" / "planned.yaml").exists(), "plan must not act"
    ctl.start()
    pid = running_pid(ctl, "planned")
    lines = plan_lines(ctl)
    assert lines and all(line.startswith("noop ") for line in lines), lines
    assert any(line.startswith("noop planned-0") for line in lines), lines
    assert ctl.stop() == 0
    ctl.apply("planned", sleeper("v2"))
    assert "restart planned-0 SpecChanged" in plan_lines(ctl)
    ctl.delete("planned.yaml")
    assert "stop planned-0 ManifestDeleted" in plan_lines(ctl)
    assert pid_alive(pid) and ctl.pids("planned") == [pid], "plan must not act"


# -- get ------------------------------------------------------------------------------
def test_get_prints_a_table_json_and_yaml(ctl: Controller) -> None:
    ctl.apply("alpha", sleeper())
    ctl.apply("beta", sleeper(), replicas=2)
    ctl.start()
    running_pid(ctl, "alpha")
    ctl.wait_status("beta", lambda d: d["replicas"]["ready"] == 2, DEADLINE)
    table = ctl.cli("get")
    assert table.returncode == 0
    rows = [line.split() for line in table.stdout.splitlines()]
    assert rows[0] == ["NAME", "PHASE", "READY", "RESTARTS", "AGE", "SUPERVISOR", "REASON"]  # REASON: CONTRACT §8
    by_name = {r[0]: r for r in rows[1:]}
    assert by_name["alpha"][1:4] == ["Running", "1/1", "0"]
    assert by_name["beta"][1:4] == ["Running", "2/2", "0"]
    assert by_name["beta"][5] == "process"
    listed = ctl.cli("get", "-o", "json")
    assert listed.returncode == 0
    items = json.loads(listed.stdout)["items"]
    assert sorted(i["name"] for i in items) == ["alpha", "beta"]
    assert all(i["phase"] == "Running" and i["specHash"] for i in items)
    one = ctl.cli("get", "beta", "-o", "yaml")
    assert one.returncode == 0
    doc = yaml.safe_load(one.stdout)
    assert doc["name"] == "beta" and [i["id"] for i in doc["instances"]] == ["beta-0", "beta-1"]
    one_json = ctl.cli("get", "alpha", "-o", "json")
    assert json.loads(one_json.stdout)["name"] == "alpha"
    unknown = ctl.cli("get", "nobody")
    assert unknown.returncode == 1
    assert "nobody" in unknown.stderr


def test_get_works_while_no_controller_runs(ctl: Controller) -> None:
    ctl.apply("offline", sleeper())
    ctl.start()
    running_pid(ctl, "offline")
    assert ctl.stop() == 0
    result = ctl.cli("get", "offline", "-o", "json")
    assert result.returncode == 0
    assert json.loads(result.stdout)["phase"] == "Running"


# -- describe ---------------------------------------------------------------------------
def test_describe_shows_conditions_instances_last_exit_and_events(ctl: Controller) -> None:
    ctl.apply("told", py("import sys\nprint('describe me please', flush=True)\nsys.exit(4)"), restartPolicy="Never",
              labels={"team": "infra"})
    ctl.start()
    ctl.wait_phase("told", "Failed", DEADLINE)
    result = ctl.cli("describe", "told")
    assert result.returncode == 0, result
    out = result.stdout
    assert re.search(r"^Name:\s+told$", out, re.MULTILINE), out
    assert re.search(r"^Phase:\s+Failed$", out, re.MULTILINE), out
    assert "team=infra" in out
    conditions = out.split("Conditions:\n", 1)[1].split("Instances:\n", 1)[0]
    assert re.search(r"Valid\s+True", conditions) and re.search(r"Ready\s+False", conditions), out
    instances = out.split("Instances:\n", 1)[1].split("Events:\n", 1)[0]
    assert "told-0" in instances
    assert "Last exit" in instances and "Error" in instances and "exit code 4" in instances, out
    assert "describe me please" in instances, "the last exit shows the log tail"
    events = out.split("Events:\n", 1)[1]
    assert "told-0" in events and "<none>" not in events, out
    unknown = ctl.cli("describe", "nobody")
    assert unknown.returncode == 1
    assert "nobody" in unknown.stderr


# -- logs ---------------------------------------------------------------------------------
TALKER = py("""
    import os, time
    print("\\x1b[31mred\\x1b[0m", flush=True)
    for i in range(1, 4):
        print(f"line {i}", flush=True)
    while not os.path.exists("trigger"):
        time.sleep(0.05)
    print("after the trigger", flush=True)
    while True: time.sleep(1)
""")


def test_logs_strip_escape_codes_unless_raw_and_tail_the_last_lines(ctl: Controller) -> None:
    ctl.apply("talk", TALKER)
    ctl.start()
    running_pid(ctl, "talk")
    wait_for(lambda: "line 3" in log_text(ctl, "talk-0"), DEADLINE, message="the agent's output")
    plain = ctl.cli("logs", "talk")
    assert plain.returncode == 0
    assert plain.stdout.splitlines()[:4] == ["red", "line 1", "line 2", "line 3"]
    assert "\x1b" not in plain.stdout
    raw = ctl.cli("logs", "talk", "--raw")
    assert raw.returncode == 0
    assert "\x1b[31mred\x1b[0m" in raw.stdout
    tail = ctl.cli("logs", "talk", "--tail", "2")
    assert tail.returncode == 0
    assert tail.stdout.splitlines() == ["line 2", "line 3"]
    unknown = ctl.cli("logs", "nobody")
    assert unknown.returncode == 1


def test_logs_follow_prints_new_output(ctl: Controller) -> None:
    ctl.apply("talk", TALKER)
    ctl.start()
    running_pid(ctl, "talk")
    wait_for(lambda: "line 3" in log_text(ctl, "talk-0"), DEADLINE, message="the agent's output")
    follower = subprocess.Popen([PY, "-m", "controller", "logs", "talk", "-f", "--state-dir", str(ctl.state)],
                                stdout=subprocess.PIPE, text=True, cwd=ctl.root, start_new_session=True)
    ctl.pgids.add(follower.pid)  # killed by the fixture too, whatever happens
    lines: queue.Queue[str] = queue.Queue()
    out = follower.stdout
    assert out is not None

    def pump() -> None:
        for line in out:
            lines.put(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        def next_line() -> str:
            try:
                return lines.get(timeout=DEADLINE)
            except queue.Empty:
                raise AssertionError("logs -f printed nothing") from None

        while next_line() != "line 3":
            pass
        (ctl.base / "trigger").write_text("")
        assert next_line() == "after the trigger"
        assert follower.poll() is None, "logs -f keeps following"
    finally:
        follower.kill()
        follower.wait(10)
        reader.join(10)
        out.close()


# -- restart ------------------------------------------------------------------------------
def test_restart_with_a_running_controller_gives_a_new_pid(ctl: Controller) -> None:
    ctl.apply("again", sleeper())
    ctl.start()
    pid = running_pid(ctl, "again")
    result = ctl.cli("restart", "again")
    assert result.returncode == 0, result
    doc = ctl.wait_status("again", lambda d: d["phase"] == "Running" and d["instances"][0]["pid"] not in (None, pid),
                          DEADLINE, "a new pid")
    assert not pid_alive(pid)
    assert doc["instances"][0]["lastExit"]["reason"] == "ManualRestart"
    assert doc["restarts"] == 1
    assert ctl.cli("restart", "nobody").returncode == 1


def test_restart_without_a_running_controller_fails_clearly(ctl: Controller) -> None:
    ctl.apply("idle", sleeper())
    ctl.start()
    pid = running_pid(ctl, "idle")
    assert ctl.stop() == 0
    result = ctl.cli("restart", "idle")
    assert result.returncode == 1
    assert "no controller" in result.stderr.lower(), result.stderr
    assert pid_alive(pid) and ctl.pids("idle") == [pid]
    assert not list((ctl.state / "requests").glob("*")), "no request is left behind for a later controller"


# -- run refuses what it cannot use -------------------------------------------------------
def test_run_with_a_missing_manifests_dir_exits_2(ctl: Controller) -> None:
    result = ctl.cli("run", "--manifests", str(ctl.root / "nowhere"), "--metrics-addr", "127.0.0.1:0")
    assert result.returncode == 2, result
    assert "nowhere" in result.stderr


def test_second_controller_on_the_same_state_dir_exits_2_naming_the_other(ctl: Controller) -> None:
    ctl.start()
    assert ctl.proc is not None
    result = ctl.cli(*run_flags(ctl))
    assert result.returncode == 2, result
    assert str(ctl.proc.pid) in result.stderr, result.stderr
    assert ctl.proc.poll() is None, "the first controller keeps running"


def test_bad_metrics_addr_exits_2(ctl: Controller) -> None:
    for addr in ("nonsense", "127.0.0.1:http", "127.0.0.1:70000"):
        result = ctl.cli("run", *source_flags(ctl), "--metrics-addr", addr)
        assert result.returncode == 2, (addr, result)
        assert "metrics-addr" in result.stderr, result.stderr


# -- files and entry points -------------------------------------------------------------
def test_state_dir_is_private(ctl: Controller) -> None:
    ctl.apply("secret", sleeper())
    ctl.start()
    running_pid(ctl, "secret")
    wait_for(lambda: log_text(ctl, "secret-0"), DEADLINE, message="some output")
    assert stat.S_IMODE(os.stat(ctl.state).st_mode) == 0o700
    for path in [ctl.state / "status" / "secret.yaml", ctl.state / "logs" / "secret-0.log", *ctl.state.rglob("*")]:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        assert mode & 0o077 == 0, f"{path} is mode {oct(mode)}"


def test_python_m_controller_help_and_console_script(tmp_path: Path) -> None:
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    for command in ("run", "validate", "plan", "get", "describe", "logs", "restart", "schema"):
        assert command in result.stdout
    script = Path(sys.executable).parent / "agentctl"
    if not script.exists():
        script = ROOT / ".venv" / "bin" / "agentctl"
    assert script.exists() and os.access(script, os.X_OK), script
    via_script = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                                check=False)
    assert via_script.returncode == 0
    assert via_script.stdout == result.stdout

