"""CONTRACT §8 operator commands as a user drives them, against real `agentctl run` subprocesses:
get -l/-o wide/-w with REASON, wait, suspend/resume, reconcile, diff, describe's spec, logs of
several instances, DuplicateName, and what every reading command says when no controller runs.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

from tests.helpers import PY, Controller, manifest, pid_alive, py, sleeper, wait_for, wait_log

DEADLINE = 40.0  # a noisy shared 2-core box: generous, never relied on for speed
WARNING = "warning: no controller is running on"


def table(out: str) -> dict[str, list[str]]:
    """`get` output by NAME; REASON (last) is '' when the row has one cell fewer."""
    lines = out.splitlines()
    header = lines[0].split()
    rows = {}
    for line in lines[1:]:
        cells = line.split()
        rows[cells[0]] = cells + [""] * (len(header) - len(cells))
    return rows


def running(ctl: Controller, name: str, replicas: int = 1) -> dict[str, object]:
    return ctl.wait_status(name, lambda d: d.get("phase") == "Running" and d["replicas"]["ready"] == replicas,
                           DEADLINE, f"{name} Running {replicas}/{replicas}")


# -- get ----------------------------------------------------------------------------
def test_get_selects_by_label_with_kubectl_syntax_and_ends_with_reason(ctl: Controller) -> None:
    ctl.apply("infra-a", sleeper(), labels={"team": "infra", "tier": "gpu"})
    ctl.apply("ml-b", sleeper(), labels={"team": "ml"})
    ctl.apply("plain", sleeper())
    ctl.start()
    for name in ("infra-a", "ml-b", "plain"):
        running(ctl, name)

    def names(selector: str) -> list[str]:
        done = ctl.cli("get", "-l", selector)
        assert done.returncode == 0, done.stderr
        return sorted(table(done.stdout))

    assert names("team=infra") == ["infra-a"]
    assert names("team!=infra") == ["ml-b", "plain"]
    assert names("team") == ["infra-a", "ml-b"]
    assert names("!team") == ["plain"]
    assert names("team,!tier") == ["ml-b"]
    everything = ctl.cli("get")
    assert everything.stdout.splitlines()[0].split()[-1] == "REASON"
    assert all(row[-1] == "" for row in table(everything.stdout).values()), everything.stdout
    wide = ctl.cli("get", "-o", "wide", "-l", "tier=gpu")
    header = wide.stdout.splitlines()[0].split()
    row = table(wide.stdout)["infra-a"]
    assert header[-1] == "REASON" and "PIDS" in header and "LABELS" in header
    assert row[header.index("PIDS")] == str(ctl.pids("infra-a")[0])
    assert row[header.index("LABELS")] == "team=infra,tier=gpu"
    bad = ctl.cli("get", "-l", "team in (a,b)")
    assert bad.returncode == 2 and "selector" in bad.stderr


def test_reason_names_a_crash_loop_and_a_broken_manifest_while_the_agent_keeps_running(ctl: Controller) -> None:
    ctl.apply("steady", sleeper())
    ctl.apply("crasher", py("import sys; sys.exit(3)"), backoff={"initialSeconds": 0.1, "maxSeconds": 0.1},
              maxRestarts={"count": 2, "windowSeconds": 600})
    ctl.start()
    running(ctl, "steady")
    ctl.wait_phase("crasher", "Failed", DEADLINE)
    (ctl.manifests / "steady.yaml").write_text("apiVersion: agentctl/v1\nkind: Agent\nmetadata: {name: steady}\n"
                                               "spec: {command: [x], replicas: lots}\n")
    ctl.wait_status("steady", lambda d: d["conditions"][0]["status"] == "False", DEADLINE, "steady Valid=False")
    rows = table(ctl.cli("get").stdout)
    assert rows["crasher"][1:3] == ["Failed", "0/1"] and rows["crasher"][-1] == "CrashLoop"
    assert rows["steady"][1:3] == ["Running", "1/1"] and rows["steady"][-1] == "InvalidManifest"


def test_reason_names_an_unavailable_supervisor_and_host_capacity(ctl: Controller) -> None:
    ctl.apply("first", sleeper())
    ctl.start("--max-agents", "1")
    running(ctl, "first")
    ctl.apply("second", sleeper())
    ctl.apply("unit", sleeper(), supervisor="systemd")
    ctl.wait_status("second", lambda d: d["phase"] == "Pending", DEADLINE, "second Pending")
    unit = ctl.wait_status("unit", lambda d: d["phase"] == "Pending", DEADLINE, "unit Pending")
    rows = table(ctl.cli("get").stdout)
    assert rows["second"][-1] == "HostCapacity", rows
    if unit["conditions"][1]["reason"] == "SupervisorUnavailable":  # no systemd user manager here
        assert rows["unit"][-1] == "SupervisorUnavailable", rows
    else:
        assert rows["unit"][-1] == "HostCapacity", rows


def test_without_a_controller_get_warns_and_counts_only_live_instances(ctl: Controller) -> None:
    ctl.apply("victim", sleeper())
    ctl.start()
    running(ctl, "victim")
    pid = ctl.pids("victim")[0]
    ctl.kill()  # the controller dies; then its agent does too
    os.killpg(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid), DEADLINE, message="the agent gone")
    done = ctl.cli("get")
    assert done.returncode == 0
    assert done.stderr.startswith(f"{WARNING} {ctl.state}; status as of 20"), done.stderr
    row = table(done.stdout)["victim"]
    assert row[2] == "0/1" and row[-1] == "ControllerDown", done.stdout
    for args in (("describe", "victim"), ("logs", "victim"), ("wait", "victim", "--for=phase=Running")):
        other = ctl.cli(*args)
        assert WARNING in other.stderr, (args, other.stderr)


def test_a_missing_state_dir_is_an_error_naming_it_never_an_empty_table(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    for args in (["get"], ["describe", "x"], ["logs", "x"], ["wait", "x", "--for=delete"]):
        done = subprocess.run([PY, "-m", "controller", *args, "--state-dir", str(missing)], capture_output=True,
                              text=True, timeout=60, cwd=tmp_path)
        assert done.returncode == 1, (args, done)
        assert str(missing) in done.stderr and done.stdout == "", (args, done)
    here = subprocess.run([PY, "-m", "controller", "get"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert here.returncode == 1 and ".agentctl" in here.stderr


def test_get_watch_prints_the_table_then_a_row_per_change_until_sigint(ctl: Controller) -> None:
    ctl.apply("watched", sleeper())
    ctl.start()
    running(ctl, "watched")
    proc = subprocess.Popen([PY, "-m", "controller", "get", "-w", "--state-dir", str(ctl.state)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    ctl.pgids.add(proc.pid)
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    out = proc.stdout
    reader = threading.Thread(target=lambda: [lines.put(line.rstrip("\n")) for line in out], daemon=True)
    reader.start()

    def next_line(pred: object, what: str) -> str:
        while True:
            try:
                line = lines.get(timeout=DEADLINE)
            except queue.Empty:
                raise AssertionError(f"get -w printed no row for {what}") from None
            if pred(line):  # type: ignore[operator]
                return line

    next_line(lambda ln: ln.startswith("NAME"), "the header")
    next_line(lambda ln: ln.split()[:2] == ["watched", "Running"], "the first table")
    ctl.apply("newcomer", sleeper())
    next_line(lambda ln: ln.split()[0] == "newcomer", "an added agent")
    ctl.delete("watched.yaml")
    next_line(lambda ln: ln.split()[0] == "watched" and ln.split()[1] in ("Stopping", "Stopped", "Deleted"),
              "a deleted agent")
    proc.send_signal(signal.SIGINT)
    try:
        assert proc.wait(DEADLINE) == 0
    finally:
        reader.join(DEADLINE)
        out.close()


# -- describe -------------------------------------------------------------------------
def test_describe_opens_with_the_running_spec_and_keeps_it_beside_the_error(ctl: Controller) -> None:
    (ctl.root / "secret.env").write_text("API_TOKEN=hunter2\n")
    ctl.apply("spec", sleeper("spec-up"), env={"MODE": "very-secret-value"}, envFiles=["secret.env"],
              restartPolicy="OnFailure", maxRestarts={"count": 4, "windowSeconds": 300},
              liveness={"logIdleSeconds": 600}, resources={"memoryLimitMiB": 512})
    ctl.start()
    running(ctl, "spec")
    text = ctl.cli("describe", "spec").stdout
    head = text.split("Source:")[0]
    argv_line = next(line for line in head.splitlines() if line.strip().startswith("Argv:"))
    assert PY in argv_line and "spec-up" in argv_line
    for expected in ("Cwd:", str(ctl.base), "OnFailure", "count=4", "logIdleSeconds=600", "memoryLimitMiB=512",
                     "API_TOKEN", "MODE", "AGENTCTL_INSTANCE"):
        assert expected in head, (expected, head)
    assert "hunter2" not in text and "very-secret-value" not in text
    ctl.write("spec.yaml", manifest("spec", sleeper("changed"), replicas="lots"))
    ctl.wait_status("spec", lambda d: d["conditions"][0]["status"] == "False", DEADLINE, "spec Valid=False")
    broken = ctl.cli("describe", "spec").stdout.split("Source:")[0]
    assert "last valid" in broken and "spec.yaml" in broken and "replicas" in broken
    assert "spec-up" in broken and "changed" not in broken  # the spec the instances run, not the edit


# -- logs -----------------------------------------------------------------------------
def test_logs_of_several_instances_shows_all_prefixed_and_instance_takes_n_or_name_n(ctl: Controller) -> None:
    ctl.apply("multi", py("import os, time\nprint('hello from', os.environ['AGENTCTL_INSTANCE'], flush=True)\n"
                          "time.sleep(3600)"), replicas=2)
    ctl.start()
    running(ctl, "multi", 2)
    wait_log(ctl, "multi-0", "hello from")
    wait_log(ctl, "multi-1", "hello from")
    both = ctl.cli("logs", "multi")
    assert both.returncode == 0
    assert "[multi-0] hello from multi-0" in both.stdout.splitlines()
    assert "[multi-1] hello from multi-1" in both.stdout.splitlines()
    for spelled in ("1", "multi-1"):
        one = ctl.cli("logs", "multi", "--instance", spelled, "--tail", "5")
        assert one.returncode == 0 and one.stdout == "hello from multi-1\n", (spelled, one)
    assert ctl.cli("logs", "multi", "--tail", "-1").returncode == 2
    assert ctl.cli("logs", "multi", "--instance", "7").returncode == 1


# -- duplicate names --------------------------------------------------------------------
def test_a_duplicate_name_is_valid_false_duplicate_name_until_the_duplicate_is_gone(ctl: Controller) -> None:
    ctl.apply("dup", sleeper())
    ctl.start()
    running(ctl, "dup")
    pid = ctl.pids("dup")[0]
    ctl.write("copy.yaml", manifest("dup", sleeper("the copy")))
    doc = ctl.wait_status("dup", lambda d: d["conditions"][0]["status"] == "False", DEADLINE, "dup Valid=False")
    valid = doc["conditions"][0]
    assert valid["reason"] == "DuplicateName"
    assert "dup.yaml" in valid["message"] and "copy.yaml" in valid["message"]
    assert table(ctl.cli("get").stdout)["dup"][-1] == "DuplicateName"
    assert ctl.pids("dup") == [pid]  # the running one keeps running
    ctl.delete("copy.yaml")
    doc = ctl.wait_status("dup", lambda d: d["conditions"][0]["status"] == "True", DEADLINE, "dup Valid=True")
    assert doc["conditions"][0]["message"] == "" and doc["lastError"] is None
    assert ctl.pids("dup") == [pid]


# -- suspend / resume ---------------------------------------------------------------------
def test_suspend_survives_a_controller_restart_and_a_manifest_edit_until_resume(ctl: Controller) -> None:
    ctl.apply("napper", sleeper())
    ctl.start()
    running(ctl, "napper")
    pid = ctl.pids("napper")[0]
    done = ctl.cli("suspend", "napper")
    assert done.returncode == 0, done.stderr
    doc = ctl.wait_phase("napper", "Suspended", DEADLINE)
    ready = doc["conditions"][1]
    assert (ready["status"], ready["reason"]) == ("False", "SuspendedByOperator")
    wait_for(lambda: not pid_alive(pid), DEADLINE, message="the suspended instance stopped")
    assert table(ctl.cli("get").stdout)["napper"][-1] == "SuspendedByOperator"
    assert ctl.stop() == 0
    ctl.apply("napper", sleeper("edited while suspended"))
    ctl.start()
    ctl.cli("reconcile", "--wait")  # the edit has been seen: it is still suspended
    assert ctl.status("napper")["phase"] == "Suspended"  # type: ignore[index]
    assert ctl.pids("napper") == []
    assert ctl.cli("resume", "napper").returncode == 0
    running(ctl, "napper")
    wait_log(ctl, "napper-0", "edited while suspended")


def test_suspend_and_resume_exit_1_for_an_unknown_agent_or_without_a_controller(ctl: Controller) -> None:
    ctl.apply("lonely", sleeper())
    ctl.start()
    running(ctl, "lonely")
    unknown = ctl.cli("suspend", "nobody")
    assert unknown.returncode == 1 and "nobody" in unknown.stderr
    assert ctl.stop() == 0
    for verb in ("suspend", "resume", "reconcile"):
        args = (verb,) if verb == "reconcile" else (verb, "lonely")
        done = ctl.cli(*args)
        assert done.returncode == 1 and "no controller" in done.stderr, (verb, done)
    assert not (ctl.state / "requests" / "lonely.suspend").exists()


# -- wait ------------------------------------------------------------------------------
def test_wait_for_phase_condition_and_delete_and_a_timeout_naming_who_is_late(ctl: Controller) -> None:
    ctl.start()
    ctl.apply("soon", sleeper())
    ctl.apply("never", py("import sys; sys.exit(1)"), restartPolicy="Never")
    assert ctl.cli("wait", "soon", "--for=phase=Running", "--timeout=40s").returncode == 0
    assert ctl.cli("wait", "soon", "--for=condition=Ready", "--timeout", "40s").returncode == 0
    late = ctl.cli("wait", "soon", "never", "--for=phase=Running", "--timeout=2s")
    assert late.returncode == 1
    assert "never" in late.stderr and "Failed" in late.stderr and "soon" not in late.stderr
    ctl.delete("soon.yaml")
    gone = ctl.cli("wait", "soon", "--for=delete", "--timeout=40s")
    assert gone.returncode == 0, gone.stderr
    assert ctl.cli("wait", "soon", "--for=sleepy").returncode == 2
    assert ctl.cli("wait", "soon", "--for=delete", "--timeout=soon").returncode == 2


# -- reconcile ---------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("git") is None, reason="the git binary is not installed")
def test_reconcile_wait_fetches_git_and_returns_after_the_pass(tmp_path: Path) -> None:
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    bare, work = tmp_path / "repo.git", tmp_path / "work"
    work.mkdir()

    def git(*args: str, cwd: Path = work) -> None:
        subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, timeout=60)

    def push(name: str) -> None:
        (work / f"{name}.yaml").write_text(manifest(name, sleeper()))
        git("add", "--all")
        git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", name)
        git("push", "--quiet", str(bare), "HEAD:refs/heads/main")

    git("init", "--quiet", "--bare", "--initial-branch=main", str(bare), cwd=tmp_path)
    git("init", "--quiet", "--initial-branch=main")
    push("first")

    class GitController(Controller):
        def args(self, *extra: str) -> list[str]:
            # an hour between fetches: only `reconcile` can bring the second commit in
            return [PY, "-m", "controller", "run", "--git-url", str(bare), "--git-interval", "3600",
                    "--state-dir", str(self.state), "--metrics-addr", "127.0.0.1:0", *extra]

    ctl = GitController(tmp_path / "c")
    try:
        ctl.start()
        running(ctl, "first")
        push("second")
        done = ctl.cli("reconcile", "--wait")
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("reconciled: pass 1"), done.stdout
        assert ctl.status("second") is not None  # the fetch and the pass both happened before it returned
    finally:
        ctl.cleanup()


# -- diff ---------------------------------------------------------------------------------
def test_diff_shows_what_the_instances_do_not_run_yet_and_exits_1(ctl: Controller) -> None:
    (ctl.root / "app.env").write_text("PASSWORD=first-secret\n")
    ctl.apply("differ", sleeper(), envFiles=["app.env"], labels={"team": "a"})
    ctl.start()
    running(ctl, "differ")
    flags = ("--manifests", str(ctl.manifests), "--base-dir", str(ctl.base))
    same = ctl.cli("diff", *flags)
    assert (same.returncode, same.stdout) == (0, ""), same
    assert ctl.stop() == 0  # edits made while no controller runs are not applied yet
    ctl.apply("differ", sleeper(), envFiles=["app.env"], labels={"team": "b"})
    (ctl.root / "app.env").write_text("PASSWORD=second-secret\n")
    changed = ctl.cli("diff", *flags)
    assert changed.returncode == 1, changed
    assert "-    team: a" in changed.stdout and "+    team: b" in changed.stdout
    assert "secret" not in changed.stdout.replace("envFiles", "")
    only_env = ctl.cli("diff", "differ", *flags)
    assert only_env.returncode == 1
    ctl.apply("differ", sleeper(), envFiles=["app.env"], labels={"team": "a"})
    env_only = ctl.cli("diff", *flags)
    assert env_only.returncode == 1 and "envFiles contents" in env_only.stdout
    assert "second-secret" not in env_only.stdout and "first-secret" not in env_only.stdout


# -- help, logs as JSON, plan -----------------------------------------------------------------
def test_every_command_has_help_with_an_example(tmp_path: Path) -> None:
    commands = ["run", "validate", "plan", "get", "describe", "logs", "restart", "schema", "attach", "capture",
                "wait", "suspend", "resume", "reconcile", "diff", "completion"]
    for command in commands:
        done = subprocess.run([PY, "-m", "controller", command, "--help"], capture_output=True, text=True,
                              timeout=60, cwd=tmp_path)
        assert done.returncode == 0 and "example:" in done.stdout and "agentctl" in done.stdout.split("example:")[1]
        assert "--state-dir" in done.stdout, command


def test_json_log_lines_carry_agent_instance_action_and_reason(ctl: Controller) -> None:
    ctl.apply("logged", py("import sys; sys.exit(3)"), restartPolicy="Never")
    ctl.start("--log-format", "json")
    ctl.wait_phase("logged", "Failed", DEADLINE)
    lines = [json.loads(line) for line in ctl.log().splitlines() if line.startswith("{")]
    exits = [ln for ln in lines if ln.get("action") == "exit"]
    assert exits and exits[0]["agent"] == "logged" and exits[0]["instance"] == "logged-0"
    assert exits[0]["reason"] == "Error" and "Exited(3)" in exits[0]["msg"]


def test_a_signal_exit_is_one_convention_in_status_metric_and_log(ctl: Controller) -> None:
    ctl.apply("signaled", sleeper(), restartPolicy="Never")
    ctl.start()
    running(ctl, "signaled")
    os.kill(ctl.pids("signaled")[0], signal.SIGTERM)
    doc = ctl.wait_phase("signaled", "Failed", DEADLINE)
    last = doc["instances"][0]["lastExit"]
    assert (last["exitCode"], last["signal"]) == (None, 15)
    metrics = ctl.http("/metrics")[1].decode()
    assert 'agentctl_agent_last_exit_code{agent="signaled"} -15.0' in metrics
    assert "Signaled(SIGTERM)" in ctl.log() and "Exited(None)" not in ctl.log()
    assert "Signaled (signal 15)" in ctl.cli("describe", "signaled").stdout


def test_plan_lists_the_stop_of_a_deleted_agent_whose_process_is_gone(ctl: Controller) -> None:
    ctl.apply("ghost", sleeper())
    ctl.start()
    running(ctl, "ghost")
    pid = ctl.pids("ghost")[0]
    ctl.kill()
    os.killpg(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid), DEADLINE, message="the agent gone")
    ctl.delete("ghost.yaml")
    done = ctl.cli("plan", "--manifests", str(ctl.manifests), "--base-dir", str(ctl.base))
    assert done.returncode == 0, done.stderr
    assert "stop ghost-0 ManifestDeleted" in done.stdout.splitlines(), done.stdout


def test_never_valid_manifest_does_not_claim_a_last_valid_spec(ctl: Controller) -> None:
    ctl.write("broken.yaml", manifest("broken", sleeper(), replicas="lots"))
    ctl.start()
    ctl.wait_phase("broken", "Invalid", DEADLINE)
    assert "broken invalid manifest" in ctl.log() and "keeping the last valid spec" not in ctl.log()
    described = ctl.cli("describe", "broken").stdout
    assert "never been valid" in described
    assert yaml.safe_load(ctl.cli("get", "broken", "-o", "yaml").stdout)["phase"] == "Invalid"


def test_logs_follow_of_several_instances_prefixes_new_lines(ctl: Controller) -> None:
    ctl.apply("chatty", py("import os, sys, time\nname = os.environ['AGENTCTL_INSTANCE']\n"
                           "for i in range(600):\n    print(name, 'line', i, flush=True)\n    time.sleep(0.2)"),
              replicas=2)
    ctl.start()
    running(ctl, "chatty", 2)
    proc = subprocess.Popen([PY, "-m", "controller", "logs", "chatty", "-f", "--tail", "0", "--state-dir",
                             str(ctl.state)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    ctl.pgids.add(proc.pid)
    out = proc.stdout
    assert out is not None
    seen: set[str] = set()
    try:
        def both_followed() -> bool:
            line = out.readline()
            assert line.startswith(("[chatty-0] chatty-0 line ", "[chatty-1] chatty-1 line ")), line
            seen.add(line[1:9])
            return seen == {"chatty-0", "chatty-1"}
        wait_for(both_followed, DEADLINE, interval=0, message="new lines of both instances")
    finally:
        proc.kill()
        proc.wait(DEADLINE)
        out.close()


def test_a_suspend_is_forgotten_with_its_deleted_agent(ctl: Controller) -> None:
    ctl.apply("brief", sleeper())
    ctl.start()
    running(ctl, "brief")
    assert ctl.cli("suspend", "brief").returncode == 0
    ctl.wait_phase("brief", "Suspended", DEADLINE)
    ctl.delete("brief.yaml")
    wait_for(lambda: ctl.status("brief") is None, DEADLINE, message="brief removed")
    wait_for(lambda: "brief" not in (ctl.state / "overrides.json").read_text(), DEADLINE,
             message="the override dropped")
    ctl.apply("brief", sleeper("back as written"))
    running(ctl, "brief")  # declared again: runs as its manifest says, not suspended
