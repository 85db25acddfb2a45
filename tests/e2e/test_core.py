"""The core controller, end to end: `agentctl run` as a subprocess, manifests written as a user would.

Every test drives the real CLI against temp dirs and watches the status files, the instance
logs and /proc. Conditions are awaited with deadlines; where a test proves that something
does NOT happen it holds a bounded short window after a positive signal (see `holds`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    Controller,
    log_text,
    manifest,
    marked_pids,
    pid_alive,
    py,
    reap,
    sleeper,
    wait_for,
    wait_log,
)

DEADLINE = 30.0  # a noisy shared 2-core box: generous, never relied on for speed
FAST_BACKOFF = {"initialSeconds": 0.2, "maxSeconds": 0.5}


# -- small local helpers --------------------------------------------------------
def log_path(ctl: Controller, instance: str) -> Path:
    return ctl.state / "logs" / f"{instance}.log"


def condition(doc: dict[str, Any], kind: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in doc["conditions"] if c["type"] == kind)
    return found


def inst(doc: dict[str, Any], index: int = 0) -> dict[str, Any]:
    found: dict[str, Any] = doc["instances"][index]
    return found


def holds(pred: Callable[[], bool], seconds: float, message: str) -> None:
    """Assert pred stays true for a bounded window (only to prove that something does NOT happen)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert pred(), message
        time.sleep(0.05)


def running_pid(ctl: Controller, name: str, timeout: float = DEADLINE) -> int:
    doc = ctl.wait_status(name, lambda d: d.get("phase") == "Running" and bool(d["instances"])
                          and bool(inst(d).get("pid")), timeout, f"{name} Running with a pid")
    return int(inst(doc)["pid"])


def dead(pid: int) -> bool:
    """Gone for good: an orphan that came to us (the test process is a subreaper) is reaped first."""
    reap(pid)
    return not pid_alive(pid)


def environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as fh:
        items = fh.read().split(b"\0")
    return dict(i.decode().split("=", 1) for i in items if b"=" in i)


def ignore_term(text: str = "ready") -> list[str]:
    """Ignores SIGTERM; says `text` only once the handler is in place."""
    return py(f"""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print({text!r}, flush=True)
        while True: time.sleep(1)
    """)


def exits(code: int, text: str = "bye") -> list[str]:
    return py(f"import sys\nprint({text!r}, flush=True)\nsys.exit({code})")


ENV_PRINTER = py("""
    import os, time
    for key in ("AGENTCTL_AGENT", "AGENTCTL_INSTANCE", "AGENTCTL_SPEC_HASH", "AGENTCTL_LOG_FILE"):
        print(f"{key}={os.environ.get(key, '<missing>')}", flush=True)
    while True: time.sleep(1)
""")


# -- lifecycle ------------------------------------------------------------------
def test_created_agent_runs_with_its_identity_in_the_environment(ctl: Controller) -> None:
    ctl.start()
    ctl.apply("envy", ENV_PRINTER)
    pid = running_pid(ctl, "envy")
    assert pid_alive(pid)
    doc = ctl.status("envy")
    assert doc is not None
    assert doc["replicas"] == {"desired": 1, "ready": 1}
    assert condition(doc, "Ready")["status"] == "True"
    text = wait_log(ctl, "envy-0", "AGENTCTL_LOG_FILE=")
    printed = dict(line.split("=", 1) for line in text.splitlines() if line.startswith("AGENTCTL_"))
    assert printed["AGENTCTL_AGENT"] == "envy"
    assert printed["AGENTCTL_INSTANCE"] == "envy-0"
    assert printed["AGENTCTL_SPEC_HASH"] == doc["specHash"]
    assert doc["specHash"].startswith("sha256:")
    assert Path(printed["AGENTCTL_LOG_FILE"]).resolve() == log_path(ctl, "envy-0").resolve()
    assert environ(pid)["AGENTCTL_INSTANCE"] == "envy-0"


def test_command_edit_restarts_with_a_new_pid_and_the_old_one_gone(ctl: Controller) -> None:
    ctl.apply("edit", sleeper("v1"))
    ctl.start()
    old = running_pid(ctl, "edit")
    old_hash = ctl.status("edit")["specHash"]  # type: ignore[index]
    ctl.apply("edit", sleeper("v2"))
    doc = ctl.wait_status("edit", lambda d: d["phase"] == "Running" and inst(d)["pid"] not in (None, old),
                          DEADLINE, "a new pid")
    new = inst(doc)["pid"]
    assert not pid_alive(old), "the old process must be gone before the new one starts"
    assert pid_alive(new)
    assert doc["specHash"] != old_hash
    assert inst(doc)["lastExit"]["reason"] == "SpecChanged"
    assert doc["restarts"] == 0, "a spec change resets the restart count"
    wait_log(ctl, "edit-0", "v2")


def test_label_edit_keeps_the_same_process_and_updates_status_labels(ctl: Controller) -> None:
    ctl.apply("lab", sleeper(), labels={"team": "a"})
    ctl.start()
    pid = running_pid(ctl, "lab")
    spec_hash = ctl.status("lab")["specHash"]  # type: ignore[index]
    ctl.apply("lab", sleeper(), labels={"team": "b", "tier": "gold"})
    doc = ctl.wait_status("lab", lambda d: d.get("labels") == {"team": "b", "tier": "gold"}, DEADLINE, "new labels")
    assert inst(doc)["pid"] == pid
    assert doc["specHash"] == spec_hash
    assert doc["restarts"] == 0
    assert pid_alive(pid)


def test_deleted_manifest_stops_every_process_and_removes_the_status(ctl: Controller) -> None:
    ctl.apply("gone", sleeper())
    ctl.start()
    pid = running_pid(ctl, "gone")
    cid = ctl.controller_id()
    assert cid and marked_pids(cid) == [pid]
    ctl.delete("gone.yaml")
    wait_for(lambda: ctl.status("gone") is None, DEADLINE, message="status file removed")
    assert not (ctl.state / "status" / "gone.yaml").exists()
    assert not pid_alive(pid)
    assert marked_pids(cid) == []


# -- exits and restart policy ----------------------------------------------------
def test_crashing_agent_is_restarted_with_backoff_and_its_exit_recorded(ctl: Controller) -> None:
    ctl.apply("crash", exits(1, "crasher says goodbye"), backoff=FAST_BACKOFF)
    ctl.start()
    first = ctl.wait_status("crash", lambda d: d["restarts"] >= 1, DEADLINE, "a first restart")
    doc = ctl.wait_status("crash", lambda d: d["restarts"] > first["restarts"], DEADLINE, "restarts growing")
    last = inst(doc)["lastExit"]
    assert last["exitCode"] == 1
    assert last["signal"] is None
    assert last["reason"] == "Error"
    assert any("crasher says goodbye" in line for line in last["logTail"])
    assert inst(doc)["restarts"] == doc["restarts"]
    assert log_text(ctl, "crash-0").count("crasher says goodbye") >= 2


@pytest.mark.parametrize(("code", "phase"), [(3, "Failed"), (0, "Completed")])
def test_restart_policy_never_ends_in_failed_or_completed(ctl: Controller, code: int, phase: str) -> None:
    ctl.apply("once", exits(code, "only once"), restartPolicy="Never", backoff=FAST_BACKOFF)
    ctl.start()
    doc = ctl.wait_phase("once", phase, DEADLINE)
    last = inst(doc)["lastExit"]
    assert last["exitCode"] == code
    assert last["reason"] == ("Completed" if code == 0 else "Error")
    assert inst(doc)["pid"] is None
    # no restart: hold a window of several backoff periods after the terminal phase
    holds(lambda: (ctl.status("once") or {}).get("restarts") == 0 and log_text(ctl, "once-0").count("only once") == 1,
          1.5, "a Never agent was restarted")
    assert ctl.status("once")["phase"] == phase  # type: ignore[index]


def test_restart_policy_on_failure_completes_on_zero_and_restarts_on_error(ctl: Controller) -> None:
    ctl.apply("okay", exits(0, "fine"), restartPolicy="OnFailure", backoff=FAST_BACKOFF)
    ctl.apply("flaky", exits(1, "broken"), restartPolicy="OnFailure", backoff=FAST_BACKOFF)
    ctl.start()
    ctl.wait_status("flaky", lambda d: d["restarts"] >= 1 and inst(d)["lastExit"]["exitCode"] == 1, DEADLINE,
                    "flaky restarted")
    doc = ctl.wait_phase("okay", "Completed", DEADLINE)
    assert inst(doc)["lastExit"]["exitCode"] == 0
    holds(lambda: (ctl.status("okay") or {}).get("restarts") == 0 and log_text(ctl, "okay-0").count("fine") == 1,
          1.0, "an OnFailure agent that exited 0 was restarted")


# -- invalid manifests --------------------------------------------------------------
def raw_manifest(name: str, command: list[str], extra_spec_line: str = "") -> str:
    """Hand-written so that line numbers are known: `extra_spec_line` lands on line 7."""
    text = (f"apiVersion: agentctl/v1\nkind: Agent\nmetadata:\n  name: {name}\n"
            f"spec:\n  command: {json.dumps(command)}\n")
    return text + (f"  {extra_spec_line}\n" if extra_spec_line else "")


@pytest.mark.parametrize("breakage", ["syntax", "unknown-field"])
def test_invalid_edit_keeps_the_old_process_and_a_fix_clears_it_without_restart(ctl: Controller, breakage: str) -> None:
    cmd = sleeper()
    ctl.write("keep.yaml", raw_manifest("keep", cmd))
    ctl.start()
    pid = running_pid(ctl, "keep")
    if breakage == "syntax":
        ctl.write("keep.yaml", raw_manifest("keep", cmd, "env: {A: [unclosed"))
        where = re.compile(r"keep\.yaml:\d+: ")
    else:
        ctl.write("keep.yaml", raw_manifest("keep", cmd, "bogusField: 1"))
        where = re.compile(r"keep\.yaml:7: .*bogusField")
    doc = ctl.wait_status("keep", lambda d: condition(d, "Valid")["status"] == "False", DEADLINE, "Valid=False")
    message = condition(doc, "Valid")["message"]
    assert where.search(message), message
    assert doc["phase"] == "Running", "an invalid manifest still describes the running instance"
    assert inst(doc)["pid"] == pid and pid_alive(pid)
    ctl.write("keep.yaml", raw_manifest("keep", cmd))
    doc = ctl.wait_status("keep", lambda d: condition(d, "Valid")["status"] == "True", DEADLINE, "Valid=True again")
    assert inst(doc)["pid"] == pid and pid_alive(pid)
    assert doc["restarts"] == 0
    assert doc["phase"] == "Running"


def test_never_valid_manifest_gives_phase_invalid(ctl: Controller) -> None:
    ctl.write("bad.yaml", raw_manifest("bad", sleeper(), "replicas: lots"))
    ctl.start()
    doc = ctl.wait_phase("bad", "Invalid", DEADLINE)
    valid = condition(doc, "Valid")
    assert valid["status"] == "False"
    assert re.search(r"bad\.yaml:7: ", valid["message"]), valid["message"]
    assert doc["instances"] == []
    cid = ctl.controller_id()
    assert cid and marked_pids(cid) == []


# -- stopping --------------------------------------------------------------------
def test_sigterm_ignoring_child_is_killed_after_the_grace_period(ctl: Controller) -> None:
    ctl.apply("stubborn", ignore_term(), stop={"gracePeriodSeconds": 1})
    ctl.start()
    pid = running_pid(ctl, "stubborn")
    wait_log(ctl, "stubborn-0", "ready")
    began = time.monotonic()
    ctl.delete("stubborn.yaml")
    wait_for(lambda: not pid_alive(pid), DEADLINE, message="SIGKILL after the grace period")
    assert time.monotonic() - began >= 0.9, "the process died before its grace period was over"
    wait_for(lambda: ctl.status("stubborn") is None, DEADLINE, message="status removed after the stop")
    assert marked_pids(ctl.controller_id() or "?") == []


def test_sigterm_ignoring_child_is_killed_after_the_grace_period_on_a_command_edit(ctl: Controller) -> None:
    # Until the Signals-enum bug of the fleet test below is fixed, this fails whenever the SIGKILL
    # is over before the controller looks again (about 1 run in 7 here): the status then never updates.
    stop = {"gracePeriodSeconds": 1}
    ctl.apply("stubborn", ignore_term("v1"), stop=stop)
    ctl.start("--resync", "3600")  # only the grace deadline may wake the controller
    pid = running_pid(ctl, "stubborn")
    wait_log(ctl, "stubborn-0", "v1")
    began = time.monotonic()
    ctl.apply("stubborn", ignore_term("v2"), stop=stop)  # a restart: stop first, then start
    doc = ctl.wait_status("stubborn", lambda d: d["phase"] == "Running" and inst(d)["pid"] not in (None, pid),
                          10.0, "restarted once the 1 s grace is over")
    assert time.monotonic() - began >= 0.9, "SIGKILL came before the grace period was over"
    assert not pid_alive(pid)
    last = inst(doc)["lastExit"]
    assert last["signal"] == signal.SIGKILL and last["reason"] == "SpecChanged"
    wait_log(ctl, "stubborn-0", "v2")


FORKER = py("""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time\\nwhile True: time.sleep(1)"])
    with open("grandchild.pid", "w") as fh:
        fh.write(str(child.pid))
    print("forked", child.pid, flush=True)
    while True: time.sleep(1)
""")


def grandchild_pid(ctl: Controller) -> int:
    path = ctl.base / "grandchild.pid"
    return int(wait_for(lambda: path.exists() and path.read_text().strip(), DEADLINE, message="grandchild pid file"))


def test_stop_leaves_no_grandchild_behind(ctl: Controller) -> None:
    ctl.apply("forker", FORKER, stop={"gracePeriodSeconds": 2})
    ctl.start()
    pid = running_pid(ctl, "forker")
    grandchild = grandchild_pid(ctl)
    assert pid_alive(grandchild) and os.getpgid(grandchild) == pid
    ctl.delete("forker.yaml")
    wait_for(lambda: ctl.status("forker") is None, DEADLINE, message="status removed")
    reap(grandchild)  # an orphan comes to us (subreaper); reap it if it is a zombie
    assert not pid_alive(pid)
    assert not pid_alive(grandchild)


def test_leader_exit_kills_what_is_left_of_its_group_before_completing(ctl: Controller) -> None:
    leaves = py("""
        import subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", "import time\\nwhile True: time.sleep(1)"])
        open("grandchild.pid", "w").write(str(child.pid))
        print("leader leaves", flush=True)
    """)
    ctl.apply("leaver", leaves, restartPolicy="Never")
    ctl.start()
    grandchild = grandchild_pid(ctl)
    ctl.wait_phase("leaver", "Completed", DEADLINE)
    reap(grandchild)
    assert not pid_alive(grandchild), "an instance is never reported stopped while a process of it lives"


# -- controller restarts ---------------------------------------------------------
def test_controller_sigkill_and_restart_adopts_without_duplicates(ctl: Controller) -> None:
    ctl.apply("keeper", sleeper())
    ctl.apply("pair", sleeper(), replicas=2)
    ctl.start()
    pid = running_pid(ctl, "keeper")
    pair = ctl.wait_status("pair", lambda d: d["replicas"]["ready"] == 2, DEADLINE, "pair ready")
    pair_pids = [i["pid"] for i in pair["instances"]]
    cid = ctl.controller_id()
    assert cid
    ctl.kill()
    assert pid_alive(pid)
    plan = ctl.cli("plan", "--manifests", str(ctl.manifests), "--base-dir", str(ctl.base))
    assert plan.returncode == 0, plan.stderr
    lines = plan.stdout.splitlines()
    assert "adopt keeper-0 ControllerRestart" in lines, plan.stdout
    assert "adopt pair-0 ControllerRestart" in lines and "adopt pair-1 ControllerRestart" in lines, plan.stdout
    assert not [line for line in lines if line.startswith(("create", "restart", "stop"))], plan.stdout
    ctl.start()
    doc = ctl.wait_status("keeper", lambda d: d["phase"] == "Running", DEADLINE)
    assert inst(doc)["pid"] == pid
    assert doc["restarts"] == 0
    pair = ctl.wait_status("pair", lambda d: d["replicas"]["ready"] == 2, DEADLINE)
    assert [i["pid"] for i in pair["instances"]] == pair_pids
    assert pair["restarts"] == 0
    # no duplicate: hold a short window after the first pass of the new controller
    holds(lambda: sorted(marked_pids(cid)) == sorted([pid, *pair_pids]), 1.0, "a duplicate instance was started")


def test_agent_killed_while_the_controller_is_down_is_recorded_lost_and_restarted(ctl: Controller) -> None:
    ctl.apply("lost", sleeper(), backoff=FAST_BACKOFF)
    ctl.start()
    pid = running_pid(ctl, "lost")
    ctl.kill()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: dead(pid), DEADLINE, message="agent dead")
    ctl.start()
    doc = ctl.wait_status("lost", lambda d: d["phase"] == "Running" and inst(d)["pid"] not in (None, pid),
                          DEADLINE, "restarted after Lost")
    last = inst(doc)["lastExit"]
    assert last["reason"] == "Lost"
    assert last["exitCode"] is None
    assert doc["restarts"] == 1


def test_process_killed_by_hand_is_restarted(ctl: Controller) -> None:
    ctl.apply("drift", sleeper(), backoff=FAST_BACKOFF)
    ctl.start()
    pid = running_pid(ctl, "drift")
    os.kill(pid, signal.SIGKILL)
    doc = ctl.wait_status("drift", lambda d: d["phase"] == "Running" and inst(d)["pid"] not in (None, pid),
                          DEADLINE, "restarted after kill")
    last = inst(doc)["lastExit"]
    assert last["signal"] == signal.SIGKILL
    assert last["reason"] == "Signaled"
    assert doc["restarts"] == 1
    assert not pid_alive(pid)


def test_slow_stop_of_one_agent_does_not_delay_starting_another(ctl: Controller) -> None:
    ctl.apply("slow", ignore_term(), stop={"gracePeriodSeconds": 10})
    ctl.start()
    slow = running_pid(ctl, "slow")
    wait_log(ctl, "slow-0", "ready")
    began = time.monotonic()
    ctl.delete("slow.yaml")
    ctl.apply("quick", sleeper())
    running_pid(ctl, "quick", timeout=8.0)
    assert time.monotonic() - began < 8.0
    assert pid_alive(slow), "the slow agent's grace period is not over yet"
    assert ctl.status("slow")["phase"] == "Stopping"  # type: ignore[index]


def test_replicas_three_start_instances_zero_to_two(ctl: Controller) -> None:
    ctl.apply("trio", ENV_PRINTER, replicas=3)
    ctl.start()
    doc = ctl.wait_status("trio", lambda d: d["phase"] == "Running" and d["replicas"] == {"desired": 3, "ready": 3},
                          DEADLINE, "3 ready")
    assert [i["id"] for i in doc["instances"]] == ["trio-0", "trio-1", "trio-2"]
    pids = [i["pid"] for i in doc["instances"]]
    assert len(set(pids)) == 3 and all(pid_alive(p) for p in pids)
    for i, pid in enumerate(pids):
        assert environ(pid)["AGENTCTL_INSTANCE"] == f"trio-{i}"
        wait_log(ctl, f"trio-{i}", f"AGENTCTL_INSTANCE=trio-{i}")


def test_twenty_manifests_written_at_once_all_reach_running(ctl: Controller) -> None:
    ctl.start()
    names = [f"many-{i:02d}" for i in range(20)]
    for name in names:
        ctl.write(f"{name}.yaml", manifest(name, sleeper()))
    for name in names:
        ctl.wait_phase(name, "Running", DEADLINE)
    pids = {p for name in names for p in ctl.pids(name)}
    assert len(pids) == 20 and all(pid_alive(p) for p in pids)
    assert sorted(marked_pids(ctl.controller_id() or "?")) == sorted(pids)


# -- the controller's own exit --------------------------------------------------------
def test_sigterm_to_the_controller_exits_zero_and_leaves_agents_running(ctl: Controller) -> None:
    ctl.apply("stay", sleeper())
    ctl.start()
    pid = running_pid(ctl, "stay")
    assert ctl.stop(signal.SIGTERM) == 0
    assert pid_alive(pid)
    assert ctl.status("stay")["instances"][0]["pid"] == pid  # type: ignore[index]


def test_stop_agents_on_exit_stops_them(ctl: Controller) -> None:
    ctl.apply("go", sleeper())
    ctl.apply("go-too", sleeper(), replicas=2)
    ctl.start("--stop-agents-on-exit")
    pids = [running_pid(ctl, "go"), *[i["pid"] for i in ctl.wait_status(
        "go-too", lambda d: d["replicas"]["ready"] == 2, DEADLINE)["instances"]]]
    cid = ctl.controller_id()
    assert ctl.stop(signal.SIGTERM) == 0, ctl.log()[-3000:]
    assert not any(pid_alive(p) for p in pids)
    assert marked_pids(cid or "?") == []
    # the manifests still stand: the agents read as Stopped, with the reason, not as deleted
    for name in ("go", "go-too"):
        doc = ctl.status(name)
        assert doc is not None and doc["phase"] == "Stopped", doc
        assert {i["lastExit"]["reason"] for i in doc["instances"]} == {"ControllerStopped"}
    # and the next controller starts them again at once, without counting a restart
    ctl.start()
    doc = ctl.wait_status("go-too", lambda d: d["phase"] == "Running" and d["replicas"]["ready"] == 2, DEADLINE)
    assert doc["restarts"] == 0


# `sh` execs `sleep` with SIGTERM still ignored: a tiny process, so that a SIGKILL is over at once
STUBBORN_SLEEP = ["/bin/sh", "-c", "trap '' TERM; echo ready; exec sleep 600"]


def test_stop_agents_on_exit_kills_a_fleet_of_sigterm_ignorers_and_exits_zero(ctl: Controller) -> None:
    # Each SIGKILL that is over before the controller looks again hits the bug; with 100 instances
    # at least one always does (measured: about 1 in 10 per instance on this box).
    ctl.apply("fleet", STUBBORN_SLEEP, replicas=100, stop={"gracePeriodSeconds": 0.2})
    ctl.start("--stop-agents-on-exit")
    ctl.wait_status("fleet", lambda d: d["replicas"]["ready"] == 100, DEADLINE, "100 ready")
    wait_for(lambda: all("ready" in log_text(ctl, f"fleet-{i}") for i in range(100)), DEADLINE,
             message="every instance ignores SIGTERM")
    cid = ctl.controller_id()
    code = ctl.stop(signal.SIGTERM)
    assert code == 0, ctl.log()[-3000:]
    assert marked_pids(cid or "?") == []


def test_run_once_starts_agents_and_a_second_run_once_adopts_them(ctl: Controller) -> None:
    ctl.apply("one", sleeper())
    ctl.apply("two", sleeper(), replicas=2)
    args = ("run", "--once", "--manifests", str(ctl.manifests), "--base-dir", str(ctl.base),
            "--metrics-addr", "127.0.0.1:0")
    first = ctl.cli(*args)
    assert first.returncode == 0, first.stderr
    doc = ctl.status("one")
    assert doc is not None and doc["phase"] == "Running", doc
    two = ctl.status("two")
    assert two is not None and two["replicas"]["ready"] == 2, two
    pids = sorted([inst(doc)["pid"], *[i["pid"] for i in two["instances"]]])
    assert all(pid_alive(p) for p in pids), "agents keep running after run --once"
    cid = ctl.controller_id()
    assert cid and sorted(marked_pids(cid)) == pids
    second = ctl.cli(*args)
    assert second.returncode == 0, second.stderr
    assert "adopted" in second.stderr
    assert "-> Running" not in second.stderr, "the second pass started something:\n" + second.stderr
    assert sorted(marked_pids(cid)) == pids
    assert ctl.pids("one") + ctl.pids("two") == [inst(doc)["pid"], *[i["pid"] for i in two["instances"]]]
    assert ctl.status("one")["restarts"] == 0  # type: ignore[index]
