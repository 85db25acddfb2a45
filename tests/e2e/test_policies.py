"""Policy-driven respawn and health, end to end: crash loops, backoff, liveness, memory,
suspend, scaling, manual restart, host capacity and exit diagnostics (CONTRACT §3, §4).

Real `agentctl run` subprocesses with tiny Python agents. Every wait has a deadline; the
only fixed sleep is the window in which a crash-looping agent must NOT be restarted.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Controller, pid_alive, py, sleeper, wait_for

WAIT = 25.0  # generous: a loaded CI machine must not fail these


# -- helpers ------------------------------------------------------------------
def ready_condition(doc: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in doc["conditions"] if c["type"] == "Ready")


def instance(doc: dict[str, Any], index: int = 0) -> dict[str, Any]:
    return next(i for i in doc["instances"] if i["id"] == f"{doc['name']}-{index}")


def last_exit(doc: dict[str, Any], index: int = 0) -> dict[str, Any]:
    return instance(doc, index).get("lastExit") or {}


def lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def running_pid(ctl: Controller, name: str, *, other_than: int | None = None, reason: str | None = None,
                timeout: float = WAIT) -> dict[str, Any]:
    """Wait until NAME-0 runs a live process (not `other_than`) whose previous run ended with `reason`."""
    def check(doc: dict[str, Any]) -> bool:
        inst = instance(doc)
        pid = inst.get("pid")
        if not pid or pid == other_than or not pid_alive(pid):
            return False
        return reason is None or (inst.get("lastExit") or {}).get("reason") == reason
    return ctl.wait_status(name, check, timeout, f"{name}-0 running again after {reason}")


def counter_agent(starts: Path, body: str) -> list[str]:
    """An agent that appends its start time to `starts`, then runs `body` with n = its start number (1-based)."""
    return py(f"""
        import os, sys, time
        with open({str(starts)!r}, "a") as fh:
            fh.write(f"{{time.time()}}\\n")
        with open({str(starts)!r}) as fh:
            n = len(fh.read().splitlines())
        print("start", n, flush=True)
        {body}
    """)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_iso(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")


# -- 1 and 5. crash loops, agentctl restart ----------------------------------------
def crash_looper(starts: Path, broken: Path) -> list[str]:
    """Exits 1 at once while `broken` exists and FIX is not "1" in its env; else runs."""
    return py(f"""
        import os, sys, time
        with open({str(starts)!r}, "a") as fh:
            fh.write(f"{{os.getpid()}}\\n")
        if os.path.exists({str(broken)!r}) and os.environ.get("FIX") != "1":
            print("broken, exiting 1", flush=True)
            sys.exit(1)
        print("healthy", flush=True)
        while True:
            time.sleep(1)
    """)


CRASH_SPEC: dict[str, Any] = {"maxRestarts": {"count": 2, "windowSeconds": 60}, "backoff": {"initialSeconds": 0.1}}


def wait_crash_loop(ctl: Controller, name: str) -> dict[str, Any]:
    doc = ctl.wait_phase(name, "Failed", WAIT)
    cond = ready_condition(doc)
    assert (cond["status"], cond["reason"]) == ("False", "CrashLoop"), doc
    assert doc["restarts"] == 2, doc  # count 2: two restarts happen, the exit needing a third fails
    assert instance(doc)["pid"] is None
    return doc


def test_crash_loop_fails_after_max_restarts_and_agentctl_restart_clears_it(ctl: Controller) -> None:
    starts, broken = ctl.root / "starts", ctl.root / "broken"
    broken.touch()
    ctl.apply("crash", crash_looper(starts, broken), **CRASH_SPEC)
    ctl.start()
    wait_crash_loop(ctl, "crash")
    assert len(lines(starts)) == 3
    # no further restart: the next backoff would have been 0.4 s, watch for well over that
    time.sleep(1.5)
    assert len(lines(starts)) == 3
    assert ctl.status("crash")["phase"] == "Failed"  # type: ignore[index]

    broken.unlink()
    done = ctl.cli("restart", "crash")
    assert done.returncode == 0, done.stderr
    doc = ctl.wait_phase("crash", "Running", WAIT)
    assert pid_alive(instance(doc)["pid"])
    assert doc["restarts"] == 3  # the manual restart counts too
    assert ready_condition(doc)["status"] == "True"
    assert "ManualRestart" in ctl.cli("describe", "crash").stdout

    # the restart request travels through the running controller: without one, say so
    assert ctl.stop() == 0
    done = ctl.cli("restart", "crash")
    assert done.returncode == 1
    assert "no controller is running" in done.stderr
    assert ctl.cli("restart", "no-such-agent").returncode == 1


def test_crash_loop_is_cleared_by_a_spec_change(ctl: Controller) -> None:
    starts, broken = ctl.root / "starts", ctl.root / "broken"
    broken.touch()
    command = crash_looper(starts, broken)
    ctl.apply("crash", command, **CRASH_SPEC)
    ctl.start()
    wait_crash_loop(ctl, "crash")
    ctl.apply("crash", command, env={"FIX": "1"}, **CRASH_SPEC)
    doc = ctl.wait_phase("crash", "Running", WAIT)
    assert pid_alive(instance(doc)["pid"])
    assert doc["restarts"] == 0  # a new spec starts its count afresh
    wait_for(lambda: len(lines(starts)) == 4, WAIT, message="the fixed spec's run")


def test_raising_max_restarts_alone_gives_a_failed_agent_another_try(ctl: Controller) -> None:
    # maxRestarts shapes no process (no SpecChanged restart of a running one), but it is the
    # spec: editing it ends the crash loop, as "until its spec changes" promises
    starts, broken = ctl.root / "starts", ctl.root / "broken"
    broken.touch()
    command = crash_looper(starts, broken)
    ctl.apply("crash", command, **CRASH_SPEC)
    ctl.start()
    failed = wait_crash_loop(ctl, "crash")
    ctl.apply("crash", command, maxRestarts={"count": 4, "windowSeconds": 60}, backoff={"initialSeconds": 0.1})
    wait_for(lambda: len(lines(starts)) > 3, WAIT, message="a new attempt after the edit")
    doc = ctl.wait_phase("crash", "Failed", WAIT)
    assert doc["specHash"] == failed["specHash"]
    assert "Retry" in ctl.cli("describe", "crash").stdout


def test_manual_restart_gives_a_crash_loop_a_fresh_budget(ctl: Controller) -> None:
    starts, broken = ctl.root / "starts", ctl.root / "broken"
    broken.touch()
    ctl.apply("crash", crash_looper(starts, broken), **CRASH_SPEC)
    ctl.start()
    wait_crash_loop(ctl, "crash")
    assert ctl.cli("restart", "crash").returncode == 0
    # still broken: the manual start plus count (2) automatic restarts, then Failed again
    ctl.wait_status("crash", lambda d: d["phase"] == "Failed" and len(lines(starts)) >= 6, WAIT,
                    "failed again after a full budget")
    assert len(lines(starts)) == 6


def test_manual_restart_restarts_every_running_instance(ctl: Controller) -> None:
    ctl.apply("many", sleeper(), replicas=2, stop={"gracePeriodSeconds": 2})
    ctl.start()
    doc = ctl.wait_status("many", lambda d: d["phase"] == "Running" and len([i for i in d["instances"] if i["pid"]]) == 2)
    before = {i["id"]: i["pid"] for i in doc["instances"]}
    assert ctl.cli("restart", "many").returncode == 0

    def all_new(d: dict[str, Any]) -> bool:
        now = {i["id"]: i["pid"] for i in d["instances"]}
        return d["phase"] == "Running" and all(now.get(k) not in (None, v) for k, v in before.items())
    doc = ctl.wait_status("many", all_new, WAIT, "both instances restarted")
    assert [last_exit(doc, i)["reason"] for i in (0, 1)] == ["ManualRestart", "ManualRestart"]
    assert doc["restarts"] == 2
    assert not any(pid_alive(p) for p in before.values())


def test_max_restarts_window_slides(ctl: Controller) -> None:
    # each run lasts 1.2 s: with a 1 s window the previous restart has always left it
    runs = py("import sys, time\nprint('up', flush=True)\ntime.sleep(1.2)\nsys.exit(1)")
    ctl.apply("slide", runs, maxRestarts={"count": 1, "windowSeconds": 1}, backoff={"initialSeconds": 0.1})
    ctl.apply("fixed", runs, maxRestarts={"count": 1, "windowSeconds": 60}, backoff={"initialSeconds": 0.1})
    ctl.start()
    doc = ctl.wait_phase("fixed", "Failed", WAIT)
    assert doc["restarts"] == 1
    doc = ctl.wait_status("slide", lambda d: d["restarts"] >= 2, WAIT, "slide restarted twice")
    assert doc["phase"] != "Failed"


# -- 1. backoff -------------------------------------------------------------------
BACKOFF_EVENT = re.compile(r"restart (\d+) in a row, in ([0-9.]+)s")


def backoff_events(ctl: Controller, name: str) -> list[tuple[int, float]]:
    out = ctl.cli("describe", name).stdout
    return [(int(n), float(d)) for n, d in BACKOFF_EVENT.findall(out)]


def test_backoff_delays_double_up_to_max_and_next_attempt_is_shown(ctl: Controller) -> None:
    starts = ctl.root / "starts"
    ctl.apply("flap", counter_agent(starts, "sys.exit(1) if n <= 4 else time.sleep(3600)"),
              backoff={"initialSeconds": 0.5, "maxSeconds": 1})
    ctl.start()
    doc = ctl.wait_status("flap", lambda d: d["phase"] == "BackOff" and "nextAttemptAt" in instance(d),
                          WAIT, "BackOff with nextAttemptAt")
    at = parse_iso(instance(doc)["nextAttemptAt"])
    assert at >= parse_iso(last_exit(doc)["at"])
    doc = ctl.wait_status("flap", lambda d: d["phase"] == "Running" and len(lines(starts)) == 5, WAIT)
    assert "nextAttemptAt" not in instance(doc)
    times = [float(t) for t in lines(starts)]
    assert len(times) == 5
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # min(0.5 * 2^(n-1), 1): 0.5, 1, 1, 1 (lower bounds only: a busy machine is slower, never faster)
    for gap, want in zip(gaps, [0.5, 1.0, 1.0, 1.0]):
        assert gap >= want - 0.05, gaps
    assert backoff_events(ctl, "flap") == [(1, 0.5), (2, 1.0), (3, 1.0), (4, 1.0)]
    assert doc["restarts"] == 4


def test_backoff_count_resets_after_reset_after_seconds_of_running(ctl: Controller) -> None:
    starts = ctl.root / "starts"
    # runs 1, 2 and 4 crash at once; run 3 is healthy for 2 s (> resetAfterSeconds) before it crashes
    body = "time.sleep(2) if n == 3 else None\n        sys.exit(1) if n <= 4 else time.sleep(3600)"
    ctl.apply("reset", counter_agent(starts, body),
              backoff={"initialSeconds": 0.2, "maxSeconds": 10, "resetAfterSeconds": 1.5})
    ctl.start()
    ctl.wait_status("reset", lambda d: d["phase"] == "Running" and len(lines(starts)) == 5, WAIT)
    assert backoff_events(ctl, "reset") == [(1, 0.2), (2, 0.4), (1, 0.2), (2, 0.4)]


# -- 2. liveness --------------------------------------------------------------------
def test_log_idle_restarts_a_silent_agent_and_spares_a_chatty_one(ctl: Controller) -> None:
    liveness = {"logIdleSeconds": 1, "periodSeconds": 0.2}
    ctl.apply("quiet", sleeper("once"), liveness=liveness, backoff={"initialSeconds": 0.1})
    ctl.apply("chatty", py("import time\nwhile True:\n    print('tick', flush=True)\n    time.sleep(0.1)"),
              liveness=liveness, backoff={"initialSeconds": 0.1})
    ctl.start()
    first = ctl.wait_phase("quiet", "Running")
    chatty = ctl.wait_phase("chatty", "Running")
    doc = running_pid(ctl, "quiet", other_than=instance(first)["pid"], reason="LivenessFailed")
    assert "no output for" in last_exit(doc)["message"]
    assert doc["restarts"] >= 1
    chatty_now = ctl.status("chatty")
    assert chatty_now is not None and chatty_now["restarts"] == 0
    assert instance(chatty_now)["pid"] == instance(chatty)["pid"]


def probe_script(record: Path, *, sleep: float = 0.0) -> list[str]:
    """An exec probe: records where and with what env it ran, succeeds while ./alive exists."""
    return py(f"""
        import json, os, sys, time
        t0 = time.time()
        time.sleep({sleep})
        with open({str(record)!r}, "a") as fh:
            fh.write(json.dumps({{"cwd": os.getcwd(), "mark": os.environ.get("MARK"),
                                 "instance": os.environ.get("AGENTCTL_INSTANCE"),
                                 "start": t0, "end": time.time()}}) + "\\n")
        if not os.path.exists("alive"):
            print("probe says: alive is missing in", os.getcwd())
            sys.exit(3)
        print("ok")
    """)


def test_exec_probe_runs_in_the_instance_cwd_and_env_and_never_overlaps(ctl: Controller) -> None:
    work = ctl.base / "work"
    work.mkdir()
    (work / "alive").touch()
    record = ctl.root / "probes.jsonl"
    # each probe takes 0.3 s, longer than the 0.1 s period: runs must queue, not pile up
    ctl.apply("probed", sleeper(), cwd="work", env={"MARK": "m-1"},
              liveness={"exec": probe_script(record, sleep=0.3), "periodSeconds": 0.1, "timeoutSeconds": 5,
                        "failureThreshold": 2})
    ctl.start()
    doc = ctl.wait_phase("probed", "Running")
    wait_for(lambda: len(lines(record)) >= 4, WAIT, message="4 probe runs")
    runs = [json.loads(line) for line in lines(record)]
    assert {(r["cwd"], r["mark"], r["instance"]) for r in runs} == {(str(work.resolve()), "m-1", "probed-0")}
    started = parse_iso(instance(doc)["startedAt"]).timestamp()
    assert runs[0]["start"] >= started  # startedAt is rounded down to the second
    for a, b in itertools.pairwise(runs):
        assert b["start"] >= a["end"] - 0.01, "two probes of one instance overlapped"
    now = ctl.status("probed")
    assert now is not None and now["restarts"] == 0 and instance(now)["pid"] == instance(doc)["pid"]


def test_exec_probe_failing_threshold_times_restarts_with_its_output(ctl: Controller) -> None:
    work = ctl.base / "work"
    work.mkdir()
    (work / "alive").touch()
    record = ctl.root / "probes.jsonl"
    ctl.apply("probed", sleeper(), cwd="work", backoff={"initialSeconds": 0.1},
              liveness={"exec": probe_script(record), "periodSeconds": 0.2, "failureThreshold": 2})
    # a probe that hangs is killed at its timeout and counts as a failure
    ctl.apply("hung", sleeper(), backoff={"initialSeconds": 0.1},
              liveness={"exec": py("import time\nprint('hanging', flush=True)\ntime.sleep(60)"),
                        "periodSeconds": 0.2, "timeoutSeconds": 0.3, "failureThreshold": 1})
    ctl.start()
    first = ctl.wait_phase("probed", "Running")
    wait_for(lambda: len(lines(record)) >= 2, WAIT, message="two passing probes")
    assert ctl.status("probed")["restarts"] == 0  # type: ignore[index]
    (work / "alive").unlink()
    doc = running_pid(ctl, "probed", other_than=instance(first)["pid"], reason="LivenessFailed")
    message = last_exit(doc)["message"]
    assert "exec probe failed 2 times in a row" in message
    assert "exit 3: probe says: alive is missing in" in message
    described = ctl.cli("describe", "probed").stdout
    assert "LivenessFailed" in described and "alive is missing" in described

    doc = running_pid(ctl, "hung", reason="LivenessFailed")
    assert "timed out after 0.3s" in last_exit(doc)["message"]


def http_agent(port: int, flag: Path) -> list[str]:
    """Serves GET on 127.0.0.1:port: 200 normally, 500 while `flag` exists."""
    return py(f"""
        import http.server, os
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                code = 500 if os.path.exists({str(flag)!r}) else 200
                body = b"sick" if code == 500 else b"fine"
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                print("probe answered", code, flush=True)
            def log_message(self, *args):
                pass
        http.server.HTTPServer(("127.0.0.1", {port}), H).serve_forever()
    """)


def test_http_probe_restarts_an_agent_that_answers_500(ctl: Controller) -> None:
    port, flag = free_port(), ctl.root / "sick"
    ctl.apply("web", http_agent(port, flag), backoff={"initialSeconds": 0.1},
              liveness={"httpGet": {"url": f"http://127.0.0.1:{port}/healthz"}, "periodSeconds": 0.2,
                        "failureThreshold": 2})
    ctl.start()
    first = ctl.wait_phase("web", "Running")
    log = ctl.state / "logs" / "web-0.log"
    wait_for(lambda: "probe answered 200" in log.read_text() if log.exists() else False, WAIT,
             message="a passing http probe")
    assert ctl.status("web")["restarts"] == 0  # type: ignore[index]
    flag.touch()
    doc = running_pid(ctl, "web", other_than=instance(first)["pid"], reason="LivenessFailed")
    assert "httpGet probe failed 2 times in a row: HTTP 500: sick" in last_exit(doc)["message"]
    flag.unlink()

    def answered() -> int:
        return log.read_text().count("probe answered 200")
    base = answered()
    wait_for(lambda: answered() >= base + 3, WAIT, message="healthy again")
    doc = ctl.status("web")
    assert doc is not None
    pid, restarts, base = instance(doc)["pid"], doc["restarts"], answered()
    wait_for(lambda: answered() >= base + 3, WAIT, message="three more passing probes")
    doc = ctl.status("web")
    assert doc is not None and (instance(doc)["pid"], doc["restarts"]) == (pid, restarts)


def test_http_probe_must_target_loopback(ctl: Controller) -> None:
    path = ctl.apply("remote", sleeper(), liveness={"httpGet": {"url": "http://example.com:8080/healthz"}})
    done = ctl.cli("validate", str(path))
    assert done.returncode == 1
    assert "loopback" in done.stdout + done.stderr


# -- 3. memory ------------------------------------------------------------------------
def test_memory_limit_counts_the_whole_tree_and_restarts(ctl: Controller) -> None:
    children = ctl.root / "children"
    # the leader stays small; its child grows by 10 MiB every 0.2 s
    grower = (f"import os, time\nopen({str(children)!r}, 'a').write(f'{{os.getpid()}}\\n')\nheld = []\n"
              "while True:\n    held.append(b'x' * (10 << 20))\n    print('holding', len(held) * 10, 'MiB', flush=True)\n"
              "    time.sleep(0.2)\n")
    leader = py(f"""
        import subprocess, sys
        subprocess.run([sys.executable, "-c", {grower!r}])
    """)
    ctl.apply("hog", leader, resources={"memoryLimitMiB": 50}, backoff={"initialSeconds": 0.1})
    ctl.start()
    first = ctl.wait_phase("hog", "Running")
    doc = running_pid(ctl, "hog", other_than=instance(first)["pid"], reason="MemoryLimitExceeded")
    message = last_exit(doc)["message"]
    size = re.search(r"resident memory ([0-9.]+) MiB over the limit of 50 MiB", message)
    assert size is not None and float(size.group(1)) > 50, message
    assert doc["restarts"] >= 1
    first_child = int(lines(children)[0])
    assert not pid_alive(first_child), "the stop must take the whole group"
    described = ctl.cli("describe", "hog").stdout
    assert "MemoryLimitExceeded" in described and "MiB over the limit of 50 MiB" in described


# -- 4. suspend and replicas ------------------------------------------------------------
def test_suspend_stops_instances_and_resume_starts_them(ctl: Controller) -> None:
    ctl.apply("nap", sleeper())
    ctl.start()
    pid = instance(ctl.wait_phase("nap", "Running"))["pid"]
    ctl.apply("nap", sleeper(), suspend=True)
    doc = ctl.wait_phase("nap", "Suspended", WAIT)
    assert not pid_alive(pid)
    assert all(i["pid"] is None for i in doc["instances"])
    assert ready_condition(doc)["status"] == "False"
    ctl.apply("nap", sleeper(), suspend=False)
    doc = ctl.wait_phase("nap", "Running", WAIT)
    new = instance(doc)["pid"]
    assert new != pid and pid_alive(new)


def test_replicas_scale_down_from_the_top_and_up_without_touching_survivors(ctl: Controller) -> None:
    ctl.apply("pool", sleeper(), replicas=3)
    ctl.start()
    doc = ctl.wait_status("pool", lambda d: d["replicas"] == {"desired": 3, "ready": 3})
    pids = {i["id"]: i["pid"] for i in doc["instances"]}
    ctl.apply("pool", sleeper(), replicas=1)
    doc = ctl.wait_status("pool", lambda d: [i["id"] for i in d["instances"]] == ["pool-0"]
                          and d["phase"] == "Running", WAIT, "scaled down to pool-0")
    assert instance(doc)["pid"] == pids["pool-0"] and pid_alive(pids["pool-0"])
    assert not pid_alive(pids["pool-1"]) and not pid_alive(pids["pool-2"])
    ctl.apply("pool", sleeper(), replicas=2)
    doc = ctl.wait_status("pool", lambda d: d["replicas"] == {"desired": 2, "ready": 2}, WAIT)
    assert instance(doc, 0)["pid"] == pids["pool-0"]
    assert instance(doc, 1)["pid"] not in (None, pids["pool-1"])
    assert doc["restarts"] == 0


# -- 6. host capacity ------------------------------------------------------------------
def test_max_agents_keeps_the_rest_pending_and_starts_the_oldest_when_room_frees(ctl: Controller) -> None:
    ctl.apply("p1", sleeper())
    ctl.apply("p2", sleeper())
    ctl.start("--max-agents", "2")
    ctl.wait_phase("p1", "Running")
    ctl.wait_phase("p2", "Running")

    def capacity_pending(d: dict[str, Any]) -> bool:
        cond = ready_condition(d)
        return d["phase"] == "Pending" and (cond["status"], cond["reason"]) == ("False", "HostCapacity")
    # z-old is declared before a-new: it gets the first free slot although its name sorts last
    ctl.apply("z-old", sleeper())
    ctl.wait_status("z-old", capacity_pending, WAIT, "z-old Pending HostCapacity")
    ctl.apply("a-new", sleeper())
    ctl.wait_status("a-new", capacity_pending, WAIT, "a-new Pending HostCapacity")
    assert ctl.pids("z-old") == [] and ctl.pids("a-new") == []

    ctl.delete("p1.yaml")
    ctl.wait_phase("z-old", "Running", WAIT)
    doc = ctl.status("a-new")
    assert doc is not None and capacity_pending(doc), doc
    ctl.delete("p2.yaml")
    ctl.wait_phase("a-new", "Running", WAIT)


def _kill_tmux_server(ctl: Controller) -> None:
    """kill-server, then reap the server: it is orphaned to us (conftest makes pytest a subreaper)."""
    tmux = ["tmux", "-S", str(ctl.state / "tmux.sock")]
    found = subprocess.run([*tmux, "display-message", "-p", "#{pid}"], capture_output=True, text=True,
                           timeout=10, check=False)
    subprocess.run([*tmux, "kill-server"], capture_output=True, timeout=10, check=False)
    if found.returncode == 0 and found.stdout.strip().isdigit():
        pid = int(found.stdout.strip())
        wait_for(lambda: not pid_alive(pid), 10, message="tmux server gone")
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_max_agents_holds_for_supervisors_that_start_in_a_thread(ctl: Controller) -> None:
    ctl.apply("t1", sleeper(), supervisor="tmux")
    ctl.apply("t2", sleeper(), supervisor="tmux")
    try:
        ctl.start("--max-agents", "1")

        def settled() -> list[str] | None:
            docs = [ctl.status(n) for n in ("t1", "t2")]
            phases = sorted(d["phase"] for d in docs if d is not None)
            return phases if len(phases) == 2 and set(phases) <= {"Running", "Pending"} else None
        assert wait_for(settled, WAIT, message="both agents settled") == ["Pending", "Running"]
    finally:
        ctl.stop()
        _kill_tmux_server(ctl)


# -- 7. exit diagnostics -----------------------------------------------------------------
def test_exit_diagnostics_are_recorded_and_described(ctl: Controller) -> None:
    ctl.apply("diag", py("""
        import sys, time
        for i in range(30):
            print(f"\\x1b[32mline {i:02d}\\x1b[0m")
        sys.stdout.flush()
        time.sleep(0.3)
        sys.exit(3)
    """), restartPolicy="Never")
    ctl.apply("killed", py("import os, signal\nprint('bye', flush=True)\nos.kill(os.getpid(), signal.SIGKILL)"),
              restartPolicy="Never")
    ctl.start()
    doc = ctl.wait_phase("diag", "Failed", WAIT)
    exit_ = last_exit(doc)
    assert (exit_["exitCode"], exit_["signal"], exit_["reason"]) == (3, None, "Error")
    assert exit_["runtimeSeconds"] >= 0.25
    assert exit_["at"]
    assert exit_["logTail"] == [f"line {i:02d}" for i in range(10, 30)]
    described = ctl.cli("describe", "diag").stdout
    assert "Error (exit code 3)" in described
    assert "| line 29" in described and "line 09" not in described and "\x1b" not in described
    assert re.search(r"Exited\s+diag-0\s+Error\s+Exited\(3\)", described), described

    doc = ctl.wait_phase("killed", "Failed", WAIT)
    exit_ = last_exit(doc)
    assert (exit_["exitCode"], exit_["signal"], exit_["reason"]) == (None, 9, "Signaled")
    assert exit_["logTail"] == ["bye"]
    assert "Signaled (signal 9)" in ctl.cli("describe", "killed").stdout


@pytest.mark.parametrize("policy", ["Always", "OnFailure"])
def test_backoff_event_names_the_delay_in_describe(ctl: Controller, policy: str) -> None:
    starts = ctl.root / "starts"
    ctl.apply("once", counter_agent(starts, "sys.exit(2) if n == 1 else time.sleep(3600)"),
              restartPolicy=policy, backoff={"initialSeconds": 0.3})
    ctl.start()
    ctl.wait_status("once", lambda d: d["phase"] == "Running" and len(lines(starts)) == 2, WAIT)
    described = ctl.cli("describe", "once").stdout
    assert re.search(r"BackOff\s+once-0\s+Error\s+restart 1 in a row, in 0.3s", described), described
    assert "Error (exit code 2)" in described


def test_exit_log_tail_holds_only_the_lines_of_that_run(ctl: Controller) -> None:
    starts = ctl.root / "starts"
    body = "print(f'run {n} says bye', flush=True)\n        sys.exit(1) if n <= 2 else time.sleep(3600)"
    ctl.apply("tail", counter_agent(starts, body), backoff={"initialSeconds": 0.1})
    ctl.start()
    doc = ctl.wait_status("tail", lambda d: d["phase"] == "Running" and d["restarts"] == 2, WAIT)
    assert last_exit(doc)["logTail"] == ["start 2", "run 2 says bye"]


def test_an_instance_whose_backoff_ends_with_no_room_left_is_pending_host_capacity(ctl: Controller) -> None:
    ctl.apply("crashy", py("import sys, time\ntime.sleep(0.5)\nsys.exit(1)"), backoff={"initialSeconds": 1})
    ctl.start("--max-agents", "1")
    ctl.wait_phase("crashy", "Running")
    ctl.apply("steady", sleeper())
    ctl.wait_phase("steady", "Running", WAIT)  # took the room crashy left when it exited
    ctl.wait_status("crashy", lambda d: d["phase"] == "Pending" and ready_condition(d)["reason"] == "HostCapacity",
                    6, "crashy Pending HostCapacity once its backoff is over")
    ctl.delete("steady.yaml")
    ctl.wait_phase("crashy", "Running", WAIT)
