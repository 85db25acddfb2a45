"""Secrets never on a command line, redacted log tails, and per-instance cgroups (CONTRACT §11).

Real `agentctl run` subprocesses, a real tmux server, real cgroup v2 directories where this
host lets root make them (skipped with the reason otherwise). Every process a test causes is
ended by pid, process group or cgroup it recorded; escapees that left every group are
recorded by pid through a file the agent writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller import cgroups
from controller.supervisors import tmux as tmux_adapter
from controller.supervisors.base import Context
from tests.helpers import Controller, log_text, pid_alive, py, reap, wait_for, wait_log

DEADLINE = 40.0  # a noisy shared 2-core box: generous, never relied on for speed
MANIFEST_SECRET = "manifest-s3cret-7Hq"
FILE_SECRET = "envfile-pa55-Zk9"
CONFIG_SECRET = "config-t0ken-Lm2"
SECRETS = (MANIFEST_SECRET, FILE_SECRET, CONFIG_SECRET)


def cgroup_problem() -> str | None:
    """Why instances cannot get their own cgroup here (None: they can)."""
    probe = cgroups.Cgroups(f"probe-{os.getpid()}")
    problem = probe.unavailable_reason()
    base = cgroups.base_dir(probe.controller_id)
    if base is not None:
        cgroups.remove(base)
    return problem


def needs_cgroups() -> None:
    problem = cgroup_problem()
    if problem is not None:
        pytest.skip(f"no per-instance cgroups on this host: {problem}")


class CmdlineWatch:
    """Reads /proc/*/cmdline of every process, over and over, until stopped; keeps each hit."""

    def __init__(self, needles: tuple[str, ...]) -> None:
        self.needles = tuple(n.encode() for n in needles)
        self.hits: list[tuple[int, bytes]] = []
        self.scans = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CmdlineWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name in os.listdir("/proc"):
                if not name.isdigit():
                    continue
                try:
                    with open(f"/proc/{name}/cmdline", "rb") as fh:
                        raw = fh.read()
                except OSError:
                    continue
                if any(n in raw for n in self.needles):
                    self.hits.append((int(name), raw))
            self.scans += 1
            self._stop.wait(0.002)  # a breath for the other tests on this shared box


def tmux_shim(bin_dir: Path, record: Path) -> None:
    """`tmux` first in PATH: records every argv it is called with, then runs the real tmux."""
    real = shutil.which("tmux")
    assert real is not None
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / "tmux"
    shim.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$*\" >> '{record}'\nexec '{real}' \"$@\"\n")
    shim.chmod(0o700)


def tmux_pids(ctl: Controller) -> list[int]:
    """The private tmux server of ctl (empty if none runs)."""
    ctx = Context(ctl.state, ctl.controller_id() or "")
    found = subprocess.run(["tmux", *tmux_adapter.socket_args(ctx), "display-message", "-p", "#{pid}"],
                           capture_output=True, text=True, timeout=10, check=False)
    return [int(found.stdout)] if found.returncode == 0 and found.stdout.strip().isdigit() else []


def kill_tmux(ctl: Controller) -> None:
    servers = tmux_pids(ctl)
    ctx = Context(ctl.state, ctl.controller_id() or "")
    subprocess.run(["tmux", *tmux_adapter.socket_args(ctx), "kill-server"], capture_output=True, timeout=10,
                   check=False)
    for pid in servers:
        wait_for(lambda pid=pid: reap_dead(pid), 10, message=f"tmux server {pid} gone")  # type: ignore[misc]


def reap_dead(pid: int) -> bool:
    reap(pid)
    return not pid_alive(pid)


@pytest.fixture
def strays() -> Iterator[list[int]]:
    """Pids of processes that left every group and cgroup a test could find them by."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        wait_for(lambda pid=pid: reap_dead(pid), 10, message=f"stray {pid} gone")  # type: ignore[misc]


def digest(*values: str) -> str:
    return hashlib.sha256("\0".join(values).encode()).hexdigest()


def env_printer() -> list[str]:
    """Prints a digest of the three secrets as it sees them: never a secret on its argv."""
    return py("""
        import hashlib, os, time
        names = ("SECRET_IN_MANIFEST", "FILE_PASSWORD", "CONFIG_TOKEN")
        seen = "\\0".join(os.environ.get(n, "") for n in names)
        print("env-digest", hashlib.sha256(seen.encode()).hexdigest(), flush=True)
        while True:
            time.sleep(1)
    """)


def write_secret_inputs(ctl: Controller) -> Path:
    (ctl.base / "secrets").mkdir(exist_ok=True)
    (ctl.base / "secrets" / "agent.env").write_text(f"# dotenv\nexport FILE_PASSWORD='{FILE_SECRET}'\n")
    config = ctl.root / "config.yaml"
    config.write_text(yaml.safe_dump({"env": {"CONFIG_TOKEN": CONFIG_SECRET}}))
    return config


# -- secrets ------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_no_env_value_is_ever_on_a_command_line_and_the_agent_still_sees_them(
        ctl: Controller, monkeypatch: pytest.MonkeyPatch) -> None:
    record = ctl.root / "tmux-calls.txt"
    tmux_shim(ctl.root / "bin", record)
    monkeypatch.setenv("PATH", f"{ctl.root / 'bin'}:{os.environ['PATH']}")
    config = write_secret_inputs(ctl)
    ctl.apply("secretive", env_printer(), supervisor="tmux", env={"SECRET_IN_MANIFEST": MANIFEST_SECRET},
              envFiles=["secrets/agent.env"])
    try:
        with CmdlineWatch(SECRETS) as watch:
            ctl.start("--config", str(config))
            text = wait_log(ctl, "secretive-0", "env-digest", DEADLINE)
            # the restart path too: a second start of the same instance
            assert ctl.cli("restart", "secretive").returncode == 0
            ctl.wait_status("secretive", lambda d: d["restarts"] >= 1 and d["phase"] == "Running", DEADLINE)
            wait_for(lambda: log_text(ctl, "secretive-0").count("env-digest") >= 2, DEADLINE,
                     message="the restarted instance's digest")
            text = log_text(ctl, "secretive-0")
        assert digest(MANIFEST_SECRET, FILE_SECRET, CONFIG_SECRET) in text.replace("\r\n", "\n")
        assert watch.scans > 10
        assert watch.hits == [], watch.hits
        calls = record.read_text()
        assert "respawn-pane" in calls and "new-session" in calls  # the shim saw the tmux calls
        assert not any(s in calls for s in SECRETS), calls
        assert "set-environment" not in calls
        assert list((ctl.state / "run").glob("*.env")) == []  # the wrapper's env files are gone
        doc = ctl.status("secretive")
        assert doc is not None and not any(s in json.dumps(doc) for s in SECRETS)
        status_code, body = ctl.http("/api/v1/agents")
        assert status_code == 200 and not any(s.encode() in body for s in SECRETS)
        metrics = ctl.http("/metrics")[1]
        assert not any(s.encode() in metrics for s in SECRETS)
    finally:
        ctl.cleanup()
        kill_tmux(ctl)


def test_log_tails_in_status_api_and_describe_show_redacted_env_values(ctl: Controller) -> None:
    config = write_secret_inputs(ctl)
    leaky = py(f"""
        import os, sys
        print("password is", os.environ["FILE_PASSWORD"], flush=True)
        print("token:" + os.environ["CONFIG_TOKEN"] + "; manifest " + os.environ["SECRET_IN_MANIFEST"], flush=True)
        print("short values stay: " + os.environ["SHORT"], flush=True)
        sys.exit(3)
    """)
    ctl.apply("leaky", leaky, restartPolicy="Never", env={"SECRET_IN_MANIFEST": MANIFEST_SECRET, "SHORT": "abc"},
              envFiles=["secrets/agent.env"])
    ctl.start("--config", str(config))
    doc = ctl.wait_phase("leaky", "Failed", DEADLINE)
    tail = doc["instances"][0]["lastExit"]["logTail"]
    assert "password is [REDACTED]" in tail
    assert "token:[REDACTED]; manifest [REDACTED]" in tail
    assert "short values stay: abc" in tail
    assert not any(s in json.dumps(doc) for s in SECRETS)
    status_code, body = ctl.http("/api/v1/agents/leaky")
    # without a dashboard session the API serves no log line at all (§11); never a secret either way
    assert status_code == 200 and not any(s.encode() in body for s in SECRETS)
    described = ctl.cli("describe", "leaky")
    assert described.returncode == 0 and "password is [REDACTED]" in described.stdout
    assert not any(s in described.stdout for s in SECRETS)
    # `agentctl logs` shows the user's own log file as written (documented): not redacted
    assert FILE_SECRET in ctl.cli("logs", "leaky").stdout


def test_exec_probe_output_in_last_exit_and_events_is_redacted(ctl: Controller) -> None:
    config = write_secret_inputs(ctl)
    probe = py("""
        import os, sys
        print("probe sees", os.environ["FILE_PASSWORD"], "and", os.environ["CONFIG_TOKEN"])
        sys.exit(1)
    """)
    sleeper = py("import time\nwhile True: time.sleep(1)")
    ctl.apply("probed", sleeper, envFiles=["secrets/agent.env"], restartPolicy="Never",
              liveness={"exec": probe, "periodSeconds": 0.2, "failureThreshold": 1})
    ctl.start("--config", str(config))
    doc = ctl.wait_status("probed", lambda d: bool(instance(d).get("lastExit")), DEADLINE, "probe failure recorded")
    message = instance(doc)["lastExit"]["message"]
    assert "probe sees [REDACTED] and [REDACTED]" in message, message
    described = ctl.cli("describe", "probed").stdout
    assert "LivenessFailed" in described and not any(s in described for s in SECRETS)
    assert not any(s in json.dumps(doc) for s in SECRETS)


# -- cgroups ------------------------------------------------------------------------------
def escaper(pid_file: Path) -> list[str]:
    """An agent whose helper leaves its process group and env behind: `setsid env -i sleep`."""
    return py(f"""
        import subprocess, time
        helper = subprocess.Popen(["setsid", "env", "-i", "sleep", "300"])
        open({str(pid_file)!r}, "w").write(str(helper.pid))
        print("helper", helper.pid, flush=True)
        while True:
            time.sleep(1)
    """)


def helper_pid(pid_file: Path, strays: list[int]) -> int:
    text = wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), DEADLINE, message="helper pid")
    pid = int(str(text))
    strays.append(pid)
    return pid


def instance(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["instances"][0]  # type: ignore[no-any-return]


def test_a_setsid_env_i_helper_is_killed_when_its_agent_is_deleted(ctl: Controller, strays: list[int]) -> None:
    needs_cgroups()
    pid_file = ctl.root / "helper.pid"
    ctl.apply("escaper", escaper(pid_file))
    ctl.start()
    doc = ctl.wait_phase("escaper", "Running", DEADLINE)
    helper = helper_pid(pid_file, strays)
    assert instance(doc)["tracking"] == "cgroup"
    wait_for(lambda: os.getpgid(helper) != instance(doc)["pid"], DEADLINE, message="helper in its own session")
    assert b"AGENTCTL_CONTROLLER_ID" not in Path(f"/proc/{helper}/environ").read_bytes()
    described = ctl.cli("describe", "escaper").stdout
    assert "Tracking:   cgroup" in described
    ctl.delete("escaper.yaml")
    wait_for(lambda: ctl.status("escaper") is None, DEADLINE, message="escaper removed")
    wait_for(lambda: reap_dead(helper), DEADLINE, message="the setsid env -i helper killed")
    cid = ctl.controller_id()
    assert cid is not None
    base = cgroups.base_dir(cid)
    assert base is not None
    wait_for(lambda: not [p for p in base.iterdir() if p.is_dir()], DEADLINE, message="its cgroup removed")


def test_an_adopted_instance_keeps_its_cgroup_and_its_escapee_still_dies_with_it(
        ctl: Controller, strays: list[int]) -> None:
    needs_cgroups()
    pid_file = ctl.root / "helper.pid"
    ctl.apply("escaper", escaper(pid_file))
    ctl.start()
    first = instance(ctl.wait_phase("escaper", "Running", DEADLINE))
    helper = helper_pid(pid_file, strays)
    ctl.kill()  # the store keeps the handle, cgroup included
    ctl.start()
    doc = ctl.wait_status("escaper", lambda d: instance(d)["pid"] == first["pid"] and d["phase"] == "Running",
                          DEADLINE, "escaper adopted")
    assert instance(doc)["tracking"] == "cgroup" and doc["restarts"] == 0
    ctl.delete("escaper.yaml")
    wait_for(lambda: ctl.status("escaper") is None, DEADLINE, message="escaper removed")
    wait_for(lambda: reap_dead(helper), DEADLINE, message="the adopted instance's escapee killed")


def test_a_helper_left_behind_by_an_exited_leader_is_killed_with_its_run(ctl: Controller, strays: list[int]) -> None:
    needs_cgroups()
    pid_file = ctl.root / "helper.pid"
    quitter = py(f"""
        import subprocess
        helper = subprocess.Popen(["setsid", "env", "-i", "sleep", "300"])
        open({str(pid_file)!r}, "w").write(str(helper.pid))
    """)
    ctl.apply("quitter", quitter, restartPolicy="Never")
    ctl.start()
    helper = helper_pid(pid_file, strays)
    ctl.wait_phase("quitter", "Completed", DEADLINE)
    wait_for(lambda: reap_dead(helper), DEADLINE, message="the helper of the finished run killed")


class DelegatedController(Controller):
    """`agentctl run` as root without any capability, started inside a cgroup handed to it (as
    systemd's Delegate=yes does): like a controller that is not root, it may create cgroups only
    in that subtree, and cannot read /proc/PID/environ of a non-dumpable process."""

    def __init__(self, root: Path, delegated: Path) -> None:
        super().__init__(root)
        self.delegated = delegated

    def args(self, *extra: str) -> list[str]:
        setpriv = shutil.which("setpriv")
        assert setpriv is not None
        join = ['/bin/sh', '-c', 'echo 0 > "$1/cgroup.procs" && shift && exec "$@"', "join", str(self.delegated)]
        return [*join, setpriv, "--inh-caps=-all", "--bounding-set=-all", "--", *super().args(*extra)]

    def members(self, instance: str) -> list[int]:
        base = self.delegated / f"{cgroups.PREFIX}{self.controller_id()}"
        leaves = [p for p in base.iterdir() if p.is_dir() and p.name.startswith(instance + ".")]
        return [pid for leaf in leaves for pid in cgroups.live_pids(leaf)]

    def cleanup(self) -> None:
        """Everything that ever ran in the delegated subtree (the controller too) dies by cgroup.kill."""
        super().cleanup()
        leaves = sorted((p for p in self.delegated.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for cg in [*leaves, self.delegated]:
            pids = cgroups.procs(cg)
            cgroups.signal(cg, signal.SIGKILL)
            for pid in pids:
                wait_for(lambda pid=pid: reap_dead(pid), 10, message=f"{pid} in {cg} gone")  # type: ignore[misc]
            cgroups.remove(cg)


def environ_readable_without_caps(pid: int) -> bool:
    probe = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--", "cat", f"/proc/{pid}/environ"]
    return subprocess.run(probe, capture_output=True, timeout=30, check=False).returncode == 0


def delegated_subtree() -> Path:
    """A fresh cgroup beside ours that only a process inside it (uid 0, no capability) may extend."""
    base = cgroups.base_dir(f"probe-{os.getpid()}")
    assert base is not None
    path = base.parent / f"agentctl-test-delegated-{os.urandom(3).hex()}"
    path.mkdir()
    return path


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is not installed")
def test_a_non_dumpable_agent_is_stopped_and_never_duplicated_after_a_store_loss(
        controller_factory: Any) -> None:
    needs_cgroups()
    ctl = DelegatedController(controller_factory("delegated").root, delegated_subtree())
    try:
        non_dumpable_agent_survives_a_store_loss(ctl)
    finally:
        ctl.cleanup()


def non_dumpable_agent_survives_a_store_loss(ctl: DelegatedController) -> None:
    hidden = py("""
        import ctypes, os, time
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: /proc/PID/environ closed to others
        print("hidden", os.getpid(), flush=True)
        while True:
            time.sleep(1)
    """)
    ctl.apply("hidden", hidden)
    ctl.start()
    first = instance(ctl.wait_phase("hidden", "Running", DEADLINE))
    wait_log(ctl, "hidden-0", "hidden ", DEADLINE)
    assert first["tracking"] == "cgroup"
    assert ctl.members("hidden-0") == [first["pid"]]
    assert not environ_readable_without_caps(first["pid"]), "the marker env is out of the controller's reach"
    ctl.kill()
    for suffix in ("", "-wal", "-shm"):
        (ctl.state / f"state.db{suffix}").unlink(missing_ok=True)
    ctl.start()
    doc = ctl.wait_status("hidden", lambda d: d["phase"] == "Running" and instance(d)["pid"] is not None, DEADLINE)
    assert instance(doc)["pid"] == first["pid"], "recovered, not started again"
    assert instance(doc)["tracking"] == "cgroup"
    assert ctl.members("hidden-0") == [first["pid"]], "exactly one process of the instance"
    ctl.delete("hidden.yaml")
    wait_for(lambda: ctl.status("hidden") is None, DEADLINE, message="hidden removed")
    wait_for(lambda: reap_dead(first["pid"]), DEADLINE, message="the non-dumpable agent stopped")


def test_without_cgroups_tracking_falls_back_to_the_process_group(
        ctl: Controller, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cgroups.SWITCH, "off")
    child_file = ctl.root / "child.pid"
    parent = py(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        open({str(child_file)!r}, "w").write(str(child.pid))
        while True:
            time.sleep(1)
    """)
    ctl.apply("plain", parent)
    ctl.start()
    doc = ctl.wait_phase("plain", "Running", DEADLINE)
    assert instance(doc)["tracking"] == "process-group"
    child = int(str(wait_for(lambda: child_file.exists() and child_file.read_text().strip(), DEADLINE)))
    assert "Tracking:   process-group" in ctl.cli("describe", "plain").stdout
    ctl.delete("plain.yaml")
    wait_for(lambda: ctl.status("plain") is None, DEADLINE, message="plain removed")
    wait_for(lambda: reap_dead(child), DEADLINE, message="its group member killed")
    cid = ctl.controller_id()
    assert cid is not None
    base = cgroups.base_dir(cid)  # the switch is off in this process too: nothing to find
    assert base is None


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_a_tmux_instance_gets_its_own_cgroup_and_its_escapee_dies_with_it(
        ctl: Controller, strays: list[int]) -> None:
    needs_cgroups()
    pid_file = ctl.root / "helper.pid"
    ctl.apply("paned", escaper(pid_file), supervisor="tmux")
    try:
        ctl.start()
        doc = ctl.wait_phase("paned", "Running", DEADLINE)
        helper = helper_pid(pid_file, strays)
        assert instance(doc)["tracking"] == "cgroup"
        cid = ctl.controller_id()
        assert cid is not None
        pids = {m.pid for m in cgroups.members(cid)}
        assert {instance(doc)["pid"], helper} <= pids
        ctl.delete("paned.yaml")
        wait_for(lambda: ctl.status("paned") is None, DEADLINE, message="paned removed")
        wait_for(lambda: reap_dead(helper), DEADLINE, message="the tmux instance's escapee killed")
    finally:
        ctl.cleanup()
        kill_tmux(ctl)

