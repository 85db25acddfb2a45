"""One manifest, three supervisors: only `spec.supervisor` differs (issue 5).

The same manifests run under `process`, `tmux` and `systemd` (systemd only where a user
manager answers; skipped here otherwise) with output, env, exit diagnostics, stop and
adoption behaving alike. Every test drives the real `agentctl run` CLI as a subprocess.
For tmux agents the controller's private tmux server is killed and reaped at the end.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.model import InstanceSpec
from controller.supervisors import systemd as systemd_adapter
from controller.supervisors import tmux as tmux_adapter
from controller.supervisors.base import Context
from tests.helpers import (
    PY,
    Controller,
    kill_group,
    log_text,
    pid_alive,
    py,
    reap,
    remove_cgroups,
    sleeper,
    wait_for,
    wait_log,
)

DEADLINE = 30.0  # a noisy shared 2-core box: generous, never relied on for speed
SUPERVISORS = ["process", "tmux", "systemd"]
# Where an exit's code or signal is asserted (tmux included: a SIGCHLD that tmux loses is read
# from the zombie, see test_tmux_adapter_knows_how_a_lone_pane_stopped_with_sigterm_ended)
EXIT_SUPERVISORS = SUPERVISORS


# -- availability and cleanup -----------------------------------------------------------
def user_manager_problem() -> str | None:
    """None when `systemctl --user show-environment` works, else what it said."""
    try:
        proc = subprocess.run(["systemctl", "--user", "show-environment"], capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return None if proc.returncode == 0 else (proc.stderr.strip() or f"exit code {proc.returncode}")


def skip_unless_available(supervisor: str) -> None:
    if supervisor == "tmux" and shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    if supervisor == "systemd":
        problem = user_manager_problem()
        if problem is not None:
            pytest.skip(f"no systemd user manager: systemctl --user show-environment failed: {problem}")


def kill_tmux_server(ctl: Controller) -> None:
    """kill-server on the controller's private socket, then reap the server (orphaned to us)."""
    if shutil.which("tmux") is None:
        return
    ctx = Context(ctl.state, ctl.controller_id() or "")
    tmux = ["tmux", *tmux_adapter.socket_args(ctx)]
    found = subprocess.run([*tmux, "display-message", "-p", "#{pid}"], capture_output=True, text=True,
                           timeout=10, check=False)
    server = int(found.stdout.strip()) if found.returncode == 0 and found.stdout.strip().isdigit() else None
    # its children (panes, the `sh -c cat >> log` of pipe-pane) are orphaned to us as well
    children = [pid for pid in all_pids() if parent_of(pid) == server] if server else []
    subprocess.run([*tmux, "kill-server"], capture_output=True, timeout=10, check=False)
    for pid in [*children, *([server] if server else [])]:
        wait_for(lambda pid=pid: dead(pid), 10, message=f"tmux server process {pid} gone")  # type: ignore[misc]
    # tmux exits by itself once its last session is gone (after a crash, on delete): such an
    # earlier server of this test, and the pipe-pane shells it left, are zombie children of ours
    for pid in all_pids():
        if parent_of(pid) == os.getpid() and comm_of(pid) in ("tmux: server", "sh", "cat"):
            dead(pid)


def stop_systemd_units(ctl: Controller) -> None:
    """Best effort, only where a user manager answers: the transient units of this controller."""
    cid = ctl.controller_id()
    if not cid or shutil.which("systemctl") is None or user_manager_problem() is not None:
        return
    pattern = f"agentctl-{systemd_adapter.escape_name(cid)}-*"
    for verb in (["kill", "--signal=SIGKILL"], ["stop"], ["reset-failed"]):
        subprocess.run(["systemctl", "--user", *verb, "--", pattern], capture_output=True, timeout=30, check=False)


@pytest.fixture
def cleanup_supervisors() -> Iterator[Callable[[Controller], None]]:
    """Register a controller: at teardown its agents, tmux server and systemd units are ended.

    Torn down before the `ctl` fixture: the controller is killed first, so it cannot start a
    new tmux server (or unit) while the old one is being killed.
    """
    made: list[Controller] = []
    yield made.append
    for ctl in made:
        ctl.cleanup()
        kill_tmux_server(ctl)
        stop_systemd_units(ctl)


# -- small helpers ----------------------------------------------------------------------
def all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return int(fh.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def comm_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def dead(pid: int) -> bool:
    reap(pid)
    return not pid_alive(pid)


def inst(doc: dict[str, Any], index: int = 0) -> dict[str, Any]:
    found: dict[str, Any] = doc["instances"][index]
    return found


def condition(doc: dict[str, Any], kind: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in doc["conditions"] if c["type"] == kind)
    return found


def running(ctl: Controller, name: str, not_pid: int | None = None, timeout: float = DEADLINE) -> dict[str, Any]:
    def ok(d: dict[str, Any]) -> bool:
        return (d.get("phase") == "Running" and bool(d.get("instances")) and bool(inst(d).get("pid"))
                and inst(d)["pid"] != not_pid)
    return ctl.wait_status(name, ok, timeout, f"{name} Running with a pid other than {not_pid}")


def logs_lines(ctl: Controller, name: str, *extra: str) -> list[str]:
    """`agentctl logs NAME`; a tmux pane's output passes a terminal (\\r\\n line ends)."""
    result = ctl.cli("logs", name, *extra)
    assert result.returncode == 0, result.stderr
    return [line.rstrip("\r") for line in result.stdout.splitlines()]


def instance_processes(cid: str, instance: str) -> list[int]:
    """Live processes running an agent command (argv[0] is this Python) of this controller's instance."""
    marks = {f"AGENTCTL_CONTROLLER_ID={cid}".encode(), f"AGENTCTL_INSTANCE={instance}".encode()}
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as fh:
                env = set(fh.read().split(b"\0"))
            with open(f"/proc/{name}/cmdline", "rb") as fh:
                argv0 = fh.read().split(b"\0")[0]
        except OSError:
            continue
        if marks <= env and argv0 == os.fsencode(PY) and pid_alive(int(name)):
            found.append(int(name))
    return found


# -- the agents: the same commands under every supervisor --------------------------------
ECHO = py("""
    import os, time
    print(f"hello pid={os.getpid()}", flush=True)
    print("\\x1b[32mcolored text\\x1b[0m", flush=True)
    for key in sorted(os.environ):
        if key.startswith("AGENTCTL_") or key == "GREETING":
            print(f"ENV {key}={os.environ[key]}", flush=True)
    print("env-done", flush=True)
    while True: time.sleep(1)
""")


def crash_once(marker: str) -> list[str]:
    """First run: three lines, then exit 3. Later runs: how long after that exit they began."""
    return py("""
        import os, sys, time
        marker = sys.argv[1]
        if not os.path.exists(marker):
            for i in range(3):
                print(f"crash line {i}", flush=True)
            with open(marker + ".tmp", "w") as fh:
                fh.write(repr(time.time()))
            os.replace(marker + ".tmp", marker)
            sys.exit(3)
        with open(marker) as fh:
            gap = time.time() - float(fh.read())
        print(f"second run gap={gap:.3f}", flush=True)
        while True: time.sleep(1)
    """) + [marker]


CHILD_IGNORING_TERM = (
    "import os, signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print(f'child-ready {os.getpid()}', flush=True)\n"
    "while True: time.sleep(1)\n"
)

STUBBORN = py(f"""
    import os, signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-u", "-c", {CHILD_IGNORING_TERM!r}])
    print(f"parent-ready {{os.getpid()}}", flush=True)
    while True: time.sleep(1)
""")


# -- the same manifest under each supervisor ---------------------------------------------
@pytest.mark.parametrize("supervisor", SUPERVISORS)
def test_output_env_and_terminal_commands_under_each_supervisor(
        ctl: Controller, cleanup_supervisors: Callable[[Controller], None], supervisor: str) -> None:
    skip_unless_available(supervisor)
    cleanup_supervisors(ctl)
    ctl.apply("echo", ECHO, supervisor=supervisor, env={"GREETING": "hi"})
    ctl.start()
    doc = running(ctl, "echo")
    assert doc["supervisor"] == supervisor
    pid = inst(doc)["pid"]
    wait_log(ctl, "echo-0", "env-done")

    lines = logs_lines(ctl, "echo")
    assert f"hello pid={pid}" in lines, lines  # the instance's pid is the command's own process
    assert "colored text" in lines, lines
    assert not any("\x1b" in line for line in lines), lines
    raw = ctl.cli("logs", "echo", "--raw")
    assert raw.returncode == 0 and "\x1b[32mcolored text" in raw.stdout, raw.stdout

    env = dict(line[4:].split("=", 1) for line in lines if line.startswith("ENV "))
    assert env["AGENTCTL_AGENT"] == "echo"
    assert env["AGENTCTL_INSTANCE"] == "echo-0"
    assert env["AGENTCTL_SPEC_HASH"] == doc["specHash"]
    assert os.path.realpath(env["AGENTCTL_LOG_FILE"]) == os.path.realpath(ctl.state / "logs" / "echo-0.log")
    assert env["GREETING"] == "hi"

    table = ctl.cli("get")
    assert re.search(rf"^echo\s+Running\s+1/1\s+0\s+\S+\s+{supervisor}$", table.stdout, re.MULTILINE), table.stdout

    capture = ctl.cli("capture", "echo")
    if supervisor == "tmux":
        assert capture.returncode == 0, capture.stderr
        assert f"hello pid={pid}" in capture.stdout and "colored text" in capture.stdout, capture.stdout
        assert "\x1b" not in capture.stdout
    else:
        assert capture.returncode == 1
        assert f"runs under {supervisor}, not tmux" in capture.stderr, capture.stderr
        attach = ctl.cli("attach", "echo", timeout=30, input="")
        assert attach.returncode == 1
        assert f"runs under {supervisor}, not tmux" in attach.stderr, attach.stderr
    assert ctl.cli("capture", "nobody").returncode == 1
    assert ctl.cli("attach", "nobody").returncode == 1


@pytest.mark.parametrize("supervisor", EXIT_SUPERVISORS)
def test_crash_is_diagnosed_restarted_after_backoff_and_adopted_after_controller_sigkill(
        ctl: Controller, cleanup_supervisors: Callable[[Controller], None], supervisor: str) -> None:
    skip_unless_available(supervisor)
    cleanup_supervisors(ctl)
    ctl.apply("crash", crash_once(str(ctl.root / "crashed-once")), supervisor=supervisor,
              backoff={"initialSeconds": 1, "maxSeconds": 2})
    ctl.start()

    doc = ctl.wait_status("crash", lambda d: d["restarts"] == 1 and d["phase"] == "Running"
                          and bool(d["instances"]) and bool(inst(d).get("pid")), DEADLINE, "crash restarted once and Running")
    assert doc["supervisor"] == supervisor
    crashed = inst(doc)["lastExit"]  # its code is checked last (the tmux race, see EXIT_SUPERVISORS)
    assert crashed["logTail"][-3:] == ["crash line 0", "crash line 1", "crash line 2"], crashed["logTail"]
    assert not any("\r" in line or "\x1b" in line for line in crashed["logTail"]), crashed["logTail"]
    pid = inst(doc)["pid"]
    gap = float(re.search(r"second run gap=([0-9.]+)", wait_log(ctl, "crash-0", "second run gap="))[1])  # type: ignore[index]
    assert gap >= 0.9, f"restarted {gap}s after the exit, before the 1 s backoff was over"
    described = ctl.cli("describe", "crash").stdout
    assert "crash line 2" in described, described

    # controller SIGKILL + restart: the same process is adopted, nothing is started twice
    cid = ctl.controller_id()
    assert cid
    ctl.kill()
    assert pid_alive(pid)
    ctl.start()
    wait_for(lambda: f"crash-0 adopted pid {pid}" in ctl.log(), DEADLINE, message="adoption in the controller log")
    doc = running(ctl, "crash")
    assert inst(doc)["pid"] == pid
    assert doc["restarts"] == 1, "adoption never counts as a restart"
    assert inst(doc)["lastExit"] == crashed, "the last exit survives a controller restart"
    assert instance_processes(cid, "crash-0") == [pid], "a duplicate instance was started"
    assert log_text(ctl, "crash-0").count("second run gap=") == 1

    # the adopted instance is stopped like any other
    ctl.delete("crash.yaml")
    wait_for(lambda: ctl.status("crash") is None, DEADLINE, message="status of the deleted agent removed")
    wait_for(lambda: dead(pid), DEADLINE, message="adopted agent gone")

    assert (crashed["exitCode"], crashed["signal"], crashed["reason"]) == (3, None, "Error"), crashed
    assert "Error (exit code 3)" in described, described


@pytest.mark.parametrize("supervisor", SUPERVISORS)
def test_sigterm_ignoring_agent_is_killed_after_its_grace_period_on_delete(
        ctl: Controller, cleanup_supervisors: Callable[[Controller], None], supervisor: str) -> None:
    skip_unless_available(supervisor)
    cleanup_supervisors(ctl)
    ctl.apply("stubborn", STUBBORN, supervisor=supervisor, stop={"gracePeriodSeconds": 1})
    ctl.start()
    pid = inst(running(ctl, "stubborn"))["pid"]
    text = wait_log(ctl, "stubborn-0", "child-ready")
    wait_log(ctl, "stubborn-0", "parent-ready")
    child = int(re.search(r"child-ready (\d+)", text)[1])  # type: ignore[index]
    cid = ctl.controller_id()
    assert cid and sorted(instance_processes(cid, "stubborn-0")) == sorted([pid, child])

    started = time.monotonic()
    ctl.delete("stubborn.yaml")
    wait_for(lambda: ctl.status("stubborn") is None, DEADLINE, message="status of the deleted agent removed")
    took = time.monotonic() - started
    # the status goes only once no process of the agent is left
    assert not pid_alive(pid) and not pid_alive(child)
    assert instance_processes(cid, "stubborn-0") == []
    assert took >= 0.9, f"stopped after {took:.2f}s: SIGTERM is ignored, only SIGKILL after 1 s grace ends it"
    reap(child)


@pytest.mark.parametrize("supervisor", EXIT_SUPERVISORS)
def test_agent_killed_by_hand_and_while_the_controller_is_down_is_diagnosed_and_restarted(
        ctl: Controller, cleanup_supervisors: Callable[[Controller], None], supervisor: str) -> None:
    skip_unless_available(supervisor)
    cleanup_supervisors(ctl)
    ctl.apply("victim", ECHO, supervisor=supervisor, backoff={"initialSeconds": 0.2, "maxSeconds": 0.5})
    ctl.start()
    first = inst(running(ctl, "victim"))["pid"]
    os.kill(first, signal.SIGKILL)
    doc = running(ctl, "victim", not_pid=first)
    killed = inst(doc)["lastExit"]  # checked last (the tmux race, see EXIT_SUPERVISORS)
    assert doc["restarts"] == 1

    second = inst(doc)["pid"]
    ctl.kill()
    os.kill(second, signal.SIGKILL)
    wait_for(lambda: dead(second), DEADLINE, message="agent dead")
    ctl.start()
    doc = running(ctl, "victim", not_pid=second)
    last = inst(doc)["lastExit"]
    assert last["reason"] == "Lost", f"exited while the controller was down: {last}"
    assert doc["restarts"] == 2
    assert (killed["exitCode"], killed["signal"], killed["reason"]) == (None, signal.SIGKILL, "Signaled"), killed


def test_tmux_adapter_knows_how_a_lone_pane_stopped_with_sigterm_ended() -> None:
    """The adapter alone (no controller): start a lone pane, SIGTERM its group, wait until the
    process has exited, then ask how it ended. Up to 20 times: here the race is lost about every other time."""
    skip_unless_available("tmux")
    for attempt in range(20):
        root = Path(tempfile.mkdtemp(prefix="acs", dir="/tmp"))  # short: a socket path has a length limit
        ctx = Context(root / "state", f"race{attempt}-{os.urandom(3).hex()}")
        adapter = tmux_adapter.TmuxSupervisor(ctx)
        spec = InstanceSpec(id="lone-0", agent="lone", index=0, supervisor="tmux", argv=tuple(sleeper()),
                            env=(), cwd=str(root), spec_hash="sha256:test")
        handle = adapter.start(spec, root / "logs" / "lone-0.log")
        server = subprocess.run(tmux_adapter.tmux_argv(ctx, ["display-message", "-p", "#{pid}"]),
                                capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        try:
            log = root / "logs" / "lone-0.log"
            wait_for(lambda log=log: "up" in log.read_text(), DEADLINE, message="the agent is up")  # type: ignore[misc]
            time.sleep(0.3)  # part of the reproduction: a quiet tmux server, with no other child about to exit
            os.killpg(handle.pgid, signal.SIGTERM)
            wait_for(lambda h=handle: not pid_alive(h.pid), DEADLINE, interval=0.005,  # type: ignore[misc]
                     message="the pane's process exited")
            ended = adapter.exit_status(handle)
            zombie = comm_of(handle.pid) != "" and not pid_alive(handle.pid)
            assert (ended.code, ended.signal) == (None, signal.SIGTERM), (
                f"attempt {attempt}: {ended}; pane {tmux_adapter.read_pane(ctx, handle.unit)}; "
                f"process still an unreaped zombie of tmux: {zombie}")
        finally:
            kill_group(handle.pgid)
            subprocess.run(tmux_adapter.tmux_argv(ctx, ["kill-server"]), capture_output=True, timeout=10, check=False)
            if server.isdigit():
                wait_for(lambda pid=int(server): dead(pid), 10, message="tmux server gone")  # type: ignore[misc]
            remove_cgroups(ctx.controller_id)
            shutil.rmtree(root, ignore_errors=True)


# -- switching supervisors, and one that cannot run here ---------------------------------
def test_switching_a_running_agent_from_process_to_tmux_restarts_it_under_tmux(
        ctl: Controller, cleanup_supervisors: Callable[[Controller], None]) -> None:
    skip_unless_available("tmux")
    cleanup_supervisors(ctl)
    ctl.apply("switch", ECHO, supervisor="process", env={"GREETING": "hi"})
    ctl.start()
    before = running(ctl, "switch")
    old = inst(before)["pid"]
    assert before["supervisor"] == "process"

    ctl.apply("switch", ECHO, supervisor="tmux", env={"GREETING": "hi"})
    doc = ctl.wait_status("switch", lambda d: d["supervisor"] == "tmux" and d["phase"] == "Running"
                          and bool(d["instances"]) and inst(d).get("pid") not in (None, old), DEADLINE, "switch Running under tmux")
    new = inst(doc)["pid"]
    wait_for(lambda: dead(old), DEADLINE, message="the process instance gone")
    assert inst(doc)["lastExit"]["reason"] == "SpecChanged", inst(doc)["lastExit"]
    assert doc["specHash"] != before["specHash"]
    assert doc["restarts"] == 0, "a spec change resets the restart count"
    wait_log(ctl, "switch-0", f"hello pid={new}")
    lines = logs_lines(ctl, "switch")
    assert f"hello pid={old}" in lines and f"hello pid={new}" in lines, lines

    got = ctl.cli("get", "switch", "-o", "json")
    assert got.returncode == 0 and '"supervisor": "tmux"' in got.stdout, got.stdout
    capture = ctl.cli("capture", "switch")
    assert capture.returncode == 0 and f"hello pid={new}" in capture.stdout, (capture.stdout, capture.stderr)

    # and back: the tmux session goes with its instance
    ctl.apply("switch", ECHO, supervisor="process", env={"GREETING": "hi"})
    doc = ctl.wait_status("switch", lambda d: d["supervisor"] == "process" and d["phase"] == "Running"
                          and bool(d["instances"]) and inst(d).get("pid") not in (None, old, new),
                          DEADLINE, "switch Running under process again")
    wait_for(lambda: dead(new), DEADLINE, message="the tmux instance gone")
    sessions = subprocess.run(
        ["tmux", *tmux_adapter.socket_args(Context(ctl.state, ctl.controller_id() or "")), "list-sessions"],
        capture_output=True, text=True, timeout=10, check=False)
    assert "switch-0" not in sessions.stdout, sessions.stdout
    assert ctl.cli("capture", "switch").returncode == 1


def test_systemd_agent_without_a_user_manager_is_unavailable_and_disturbs_nothing(
        ctl: Controller, cleanup_supervisors: Callable[[Controller], None]) -> None:
    if user_manager_problem() is None:
        pytest.skip("a systemd user manager answers here")
    cleanup_supervisors(ctl)
    ctl.apply("other", sleeper())
    ctl.start()
    other = running(ctl, "other")
    pid = inst(other)["pid"]

    ctl.apply("unit", ECHO, supervisor="systemd", env={"GREETING": "hi"})
    doc = ctl.wait_status("unit", lambda d: condition(d, "Ready")["reason"] == "SupervisorUnavailable",
                          DEADLINE, "unit Ready=False SupervisorUnavailable")
    ready = condition(doc, "Ready")
    assert ready["status"] == "False"
    assert "systemctl --user show-environment" in ready["message"], ready
    assert doc["supervisor"] == "systemd"
    assert doc["phase"] == "Pending"
    assert not any(i.get("pid") for i in doc["instances"]), doc["instances"]
    cid = ctl.controller_id()
    assert cid and instance_processes(cid, "unit-0") == [], "never replaced by another supervisor"

    after = running(ctl, "other")
    assert inst(after)["pid"] == pid and after["restarts"] == 0
    assert pid_alive(pid)
    table = ctl.cli("get")
    # REASON (CONTRACT §8) says why it is Pending
    assert re.search(r"^unit\s+Pending\s+0/1\s+0\s+\S+\s+systemd\s+SupervisorUnavailable$", table.stdout,
                     re.MULTILINE), table.stdout
