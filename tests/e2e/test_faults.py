"""Fault injection, end to end: the real `agentctl run` under crashes, damaged state and hostile agents.

Every test runs real processes against temp dirs. Each agent a test causes carries a
FAULT_TAG env of that test, so it is found again (and killed, by pid) even when the store
that knew it was destroyed on purpose. Conditions are awaited with deadlines; where a test
proves that something does NOT happen it holds a short bounded window (see `holds`).
Random fault points come from a seeded RNG, so a failing schedule can be replayed.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Controller, log_text, pid_alive, py, reap, wait_for

DEADLINE = 30.0  # a noisy shared 2-core box: generous, never relied on for speed
FAST_BACKOFF = {"initialSeconds": 0.2, "maxSeconds": 0.5}


# -- finding our processes by tag ------------------------------------------------------
def environ_of(pid: int) -> dict[str, str] | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    return {k.decode(errors="replace"): v.decode(errors="replace")
            for k, _, v in (item.partition(b"=") for item in raw.split(b"\0")) if k}


def tagged(tag: str) -> dict[int, dict[str, str]]:
    """Live (non-zombie) processes whose environment carries FAULT_TAG=tag: pid -> environ."""
    needle = f"FAULT_TAG={tag}".encode()
    found: dict[int, dict[str, str]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as fh:
                if needle not in fh.read().split(b"\0"):
                    continue
        except OSError:
            continue
        env = environ_of(int(name))
        if env is not None and pid_alive(int(name)):
            found[int(name)] = env
    return found


def by_instance(tag: str) -> dict[str, list[int]]:
    """AGENTCTL_INSTANCE -> live pids carrying it (children inherit it, so a duplicate shows as 2)."""
    out: dict[str, list[int]] = {}
    for pid, env in tagged(tag).items():
        out.setdefault(env.get("AGENTCTL_INSTANCE", "?"), []).append(pid)
    return {k: sorted(v) for k, v in out.items()}


def kill_tagged(tag: str) -> None:
    for _ in range(5):
        pids = list(tagged(tag))
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            reap(pid)
        time.sleep(0.05)


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return [p.decode(errors="replace") for p in fh.read().split(b"\0")[:-1]]
    except OSError:
        return []


def gone(pid: int) -> bool:
    """Dead and, if it was ours to reap (we are a subreaper), reaped."""
    reap(pid)
    return not pid_alive(pid)


def pgid_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


@pytest.fixture
def tag() -> Iterator[str]:
    value = f"fault-{uuid.uuid4().hex[:12]}"
    yield value
    kill_tagged(value)  # after the controller fixture's own cleanup (set up first, torn down last)


@pytest.fixture
def fctl(tag: str, controller_factory: Callable[..., Controller]) -> Controller:
    return controller_factory()


# -- small helpers -------------------------------------------------------------------------
def holds(pred: Callable[[], bool], seconds: float, message: str) -> None:
    """Assert pred stays true for a bounded window (only to prove that something does NOT happen)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert pred(), message
        time.sleep(0.05)


def sleep_cmd(arg: int | str) -> list[str]:
    """A cheap agent; the argument tells versions apart in /proc/<pid>/cmdline."""
    return ["sleep", str(arg)]


def inst(doc: dict[str, Any], index: int = 0) -> dict[str, Any]:
    instance: dict[str, Any] = doc["instances"][index]
    return instance


def running(ctl: Controller, name: str, replicas: int = 1, timeout: float = DEADLINE) -> dict[str, Any]:
    return ctl.wait_status(name, lambda d: d.get("phase") == "Running" and d["replicas"]["ready"] == replicas
                           and all(i.get("pid") for i in d["instances"]), timeout, f"{name} Running x{replicas}")


def metric_values(ctl: Controller, name: str) -> dict[str, float]:
    """{labels text: value} of one metric family from /metrics ('' for no labels)."""
    code, body = ctl.http("/metrics")
    assert code == 200, (code, body[:200])
    out: dict[str, float] = {}
    for line in body.decode().splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if m:
            out[m.group(1) or ""] = float(m.group(2))
    return out


def sqlite_ok(path: Path) -> str:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        db.close()


# =========================================================================================
# 1. The controller SIGKILLed at random points of a burst of creates, edits and deletes
# =========================================================================================
ROUNDS = 20
OPS_PER_ROUND = 10
SEED = 20261124


def test_sigkill_at_random_points_of_a_burst_converges_to_exactly_the_manifests(fctl: Controller, tag: str) -> None:
    ctl = fctl
    rng = random.Random(SEED)
    names = [f"burst-{i}" for i in range(6)]
    want: dict[str, tuple[str, int]] = {}  # name -> (the sleep argument of its newest spec, replicas)
    serial = itertools.count(100_000)
    schedule: list[str] = []  # what happened, for the failure message

    def operate() -> None:
        name = rng.choice(names)
        if name in want and rng.random() < 0.35:
            ctl.delete(f"{name}.yaml")
            del want[name]
            schedule.append(f"delete {name}")
            return
        arg, replicas = str(next(serial)), rng.choice((1, 1, 2))
        ctl.apply(name, sleep_cmd(arg), replicas=replicas, env={"FAULT_TAG": tag}, stop={"gracePeriodSeconds": 2})
        want[name] = (arg, replicas)
        schedule.append(f"apply {name} {arg} x{replicas}")

    def kill(rnd: int, at: float) -> None:
        assert ctl.proc is not None and ctl.proc.poll() is None, f"round {rnd}: controller died\n{ctl.log()[-3000:]}"
        ctl.kill()
        schedule.append(f"-- SIGKILL {at:.2f}s into round {rnd}")

    for rnd in range(ROUNDS):
        ready_first = rng.random() < 0.75
        # the kill lands inside the burst or just after it, while its changes are being applied;
        # in a quarter of the rounds the burst starts with the controller and the kill lands in
        # start-up: adoption and the first pass
        kill_at = rng.uniform(0.0, 0.6) if ready_first else rng.uniform(0.2, 1.5)
        ctl.start(wait_ready=ready_first)
        began = time.monotonic()
        killed = False
        for _ in range(OPS_PER_ROUND):
            if not killed and time.monotonic() >= began + kill_at:
                kill(rnd, kill_at)  # the rest of the burst lands while the controller is down
                killed = True
            operate()
            time.sleep(rng.uniform(0.0, 0.05))  # injection pacing: spreads the burst, not a settle wait
        if not killed:
            time.sleep(max(0.0, began + kill_at - time.monotonic()))  # the seeded kill point
            kill(rnd, kill_at)

    ctl.start()
    expected = {f"{n}-{i}": arg for n, (arg, replicas) in want.items() for i in range(replicas)}

    def exact() -> bool:
        live = by_instance(tag)
        return (set(live) == set(expected)
                and all(len(pids) == 1 for pids in live.values())
                and all(cmdline(live[i][0])[-1:] == [arg] for i, arg in expected.items())
                and all(pgid_of(pids[0]) == pids[0] for pids in live.values()))

    try:
        wait_for(exact, DEADLINE, message="live instances == manifests on disk")
    except AssertionError:
        live = {i: [(p, cmdline(p)) for p in pids] for i, pids in by_instance(tag).items()}
        raise AssertionError(f"expected {expected}\nlive {live}\nschedule {schedule}\n{ctl.log()[-4000:]}") from None
    # no duplicate and no orphan turns up later: a bounded window after convergence
    holds(exact, 1.5, "a duplicate or orphan appeared after convergence")
    for name, (_, replicas) in want.items():
        running(ctl, name, replicas)
    wait_for(lambda: {p.stem for p in (ctl.state / "status").glob("*.yaml")} == set(want), DEADLINE,
             message=f"status files == manifests {set(want)}")
    assert ctl.stop(signal.SIGTERM) == 0
    assert sqlite_ok(ctl.state / "state.db") == "ok"
    assert not list(ctl.state.glob("state.db.corrupt-*")), "the store had to be moved aside"
    assert "unusable" not in ctl.log()
    assert "Traceback" not in ctl.log(), ctl.log()[-3000:]


# =========================================================================================
# 2. The state store damaged or deleted while the controller was stopped
# =========================================================================================
def _damage(state: Path, how: str) -> None:
    db = state / "state.db"
    if how == "deleted":
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
    elif how == "garbage":
        for suffix in ("-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        db.write_bytes(random.Random(7).randbytes(64 * 1024))
    elif how == "truncated":
        size = db.stat().st_size
        with open(db, "r+b") as fh:
            fh.truncate(max(512, size // 3))
        with open(db, "r+b") as fh:  # and a torn page in what is left
            fh.seek(100)
            fh.write(b"\xff" * 300)
    elif how == "bad-records":
        con = sqlite3.connect(db, timeout=5)
        con.execute("UPDATE instances SET data = '{not json'")
        con.commit()
        con.close()
    else:
        raise ValueError(how)


@pytest.mark.parametrize("how", ["deleted", "garbage", "truncated", "bad-records"])
def test_damaged_store_is_reported_and_rebuilt_by_adopting_marked_processes(fctl: Controller, tag: str,
                                                                            how: str) -> None:
    ctl = fctl
    env = {"FAULT_TAG": tag}
    ctl.apply("pair", sleep_cmd(200_001), replicas=2, env=env)
    ctl.apply("solo", sleep_cmd(200_002), env=env)
    ctl.start()
    running(ctl, "pair", 2)
    running(ctl, "solo")
    before = by_instance(tag)
    assert sorted(before) == ["pair-0", "pair-1", "solo-0"] and all(len(p) == 1 for p in before.values())
    assert ctl.stop(signal.SIGTERM) == 0  # stopped; its agents keep running
    _damage(ctl.state, how)

    ctl.start()
    # says what it found: the damage (when there is damage to see) and each process it took back
    log = ctl.log()
    if how in ("garbage", "truncated"):
        assert re.search(r"state store .*(unusable|moved aside)", log), log[-3000:]
    if how == "bad-records":
        assert re.search(r"unreadable instance record", log), log[-3000:]
    for instance, (pid,) in before.items():
        assert re.search(rf"{instance} .*(adopted|recovered).* {pid}\b", log), f"{instance}:\n{log[-3000:]}"
    # rebuilt: the same processes, none started again, none killed
    holds(lambda: by_instance(tag) == before, 1.0, "a duplicate was started or an adopted process was killed")
    pair = running(ctl, "pair", 2)
    solo = running(ctl, "solo")
    assert [i["pid"] for i in pair["instances"]] == [before["pair-0"][0], before["pair-1"][0]]
    assert inst(solo)["pid"] == before["solo-0"][0]
    # and it does not crash in a loop: it is still up, stops cleanly, and a next start is clean
    assert ctl.proc is not None and ctl.proc.poll() is None
    assert ctl.stop(signal.SIGTERM) == 0
    assert sqlite_ok(ctl.state / "state.db") == "ok"
    ctl.start()
    holds(lambda: by_instance(tag) == before, 0.5, "the second start after recovery changed the processes")
    assert ctl.proc.poll() is None


# =========================================================================================
# 3. Status writes failing (a full or read-only disk) while agents run
# =========================================================================================
# As root, chmod does not stop writes, and no small tmpfs can be mounted here. The fault is
# made at the exact step that fails on a full disk: the atomic write of status/<name>.yaml.
# Putting a *directory* at that path makes the final rename fail (EISDIR) for that one agent
# only, so the test also sees that every other agent keeps being served; removing the
# directory removes the fault. ENOSPC and EROFS surface as the same OSError from that step.
def _break_status(ctl: Controller, name: str) -> Path:
    """The fault: a directory where status/<name>.yaml goes, so its atomic rename fails."""
    status_file = ctl.state / "status" / f"{name}.yaml"
    status_file.unlink()
    status_file.mkdir()
    return status_file


def _crash_and_wait_restart(ctl: Controller, tag: str, instance: str, old: int) -> int:
    """Kill the instance by hand: a change the controller must handle while the fault lasts."""
    os.kill(old, signal.SIGKILL)
    reap(old)

    def restarted() -> int | None:
        pids = by_instance(tag).get(instance, [])
        return pids[0] if len(pids) == 1 and pids[0] != old else None

    pid = wait_for(restarted, DEADLINE, message=f"{instance} restarted while its status cannot be written")
    assert pid is not None
    return pid


def test_failing_status_writes_are_reported_while_supervision_goes_on_and_recover(fctl: Controller,
                                                                                 tag: str) -> None:
    ctl = fctl
    env = {"FAULT_TAG": tag}
    ctl.apply("victim", sleep_cmd(300_001), env=env, backoff=FAST_BACKOFF)
    ctl.apply("bystander", sleep_cmd(300_002), env=env)
    ctl.start()
    old = inst(running(ctl, "victim"))["pid"]
    running(ctl, "bystander")
    errors_before = sum(metric_values(ctl, "agentctl_state_write_errors_total").values())
    status_file = _break_status(ctl, "victim")
    new = _crash_and_wait_restart(ctl, tag, "victim-0", old)
    # the rest of the controller is unaffected: an edit of another agent is applied and written
    ctl.apply("bystander", sleep_cmd(300_003), env=env)
    ctl.wait_status("bystander", lambda d: d["phase"] == "Running" and bool(inst(d)["pid"])
                    and cmdline(inst(d)["pid"])[-1:] == ["300003"], DEADLINE, "bystander edited")
    # reported: an error line and the write-error metric; the process stays up and healthy
    wait_for(lambda: re.search(r"ERROR .*status of victim.*(Is a directory|EISDIR)", ctl.log()), DEADLINE,
             message="an error line about the status write")
    assert sum(metric_values(ctl, "agentctl_state_write_errors_total").values()) > errors_before
    assert ctl.http("/healthz")[0] == 200
    assert ctl.proc is not None and ctl.proc.poll() is None
    status_file.rmdir()  # the fault is gone: the status catches up without any other event
    # a retry within a few seconds is what a user expects; the resync (30 s) is not a retry
    doc = ctl.wait_status("victim", lambda d: d["phase"] == "Running" and inst(d)["pid"] == new, 10.0,
                          "victim status rewritten after the fault")
    assert inst(doc)["lastExit"]["signal"] == signal.SIGKILL


def test_readyz_reports_a_failing_status_write_until_it_succeeds(fctl: Controller, tag: str) -> None:
    ctl = fctl
    env = {"FAULT_TAG": tag}
    ctl.apply("victim", sleep_cmd(320_001), env=env, backoff=FAST_BACKOFF)
    ctl.apply("bystander", sleep_cmd(320_002), env=env)
    ctl.start()
    old = inst(running(ctl, "victim"))["pid"]
    running(ctl, "bystander")
    status_file = _break_status(ctl, "victim")
    _crash_and_wait_restart(ctl, tag, "victim-0", old)
    wait_for(lambda: ctl.http("/readyz")[0] == 503, DEADLINE, message="/readyz 503 while the write fails")
    code, body = ctl.http("/readyz")
    assert b"victim" in body, body
    # another agent's status written fine does not make the failing one true again
    ctl.apply("bystander", sleep_cmd(320_003), env=env)
    ctl.wait_status("bystander", lambda d: bool(inst(d)["pid"]) and cmdline(inst(d)["pid"])[-1:] == ["320003"],
                    DEADLINE, "bystander edited")
    code, body = ctl.http("/readyz")
    assert code == 503 and b"victim" in body, (code, body)
    status_file.rmdir()
    ctl.apply("victim", sleep_cmd(320_004), env=env, backoff=FAST_BACKOFF)  # an event, so no retry is needed
    ctl.wait_status("victim", lambda d: bool(inst(d)["pid"]) and cmdline(inst(d)["pid"])[-1:] == ["320004"],
                    DEADLINE, "victim status written again")
    wait_for(lambda: ctl.http("/readyz")[0] == 200, DEADLINE, message="/readyz 200 once writes succeed")


def test_http_api_tells_the_live_state_while_the_status_file_cannot_be_written(fctl: Controller,
                                                                               tag: str) -> None:
    ctl = fctl
    ctl.apply("stale", sleep_cmd(310_001), env={"FAULT_TAG": tag}, backoff=FAST_BACKOFF)
    ctl.start()
    old = inst(running(ctl, "stale"))["pid"]
    _break_status(ctl, "stale")
    new = _crash_and_wait_restart(ctl, tag, "stale-0", old)

    def api_pid() -> Any:
        code, body = ctl.http("/api/v1/agents/stale")
        return code == 200 and json.loads(body)["instances"][0]["pid"]

    wait_for(lambda: api_pid() == new, 5.0, message=f"/api/v1/agents/stale showing the live pid {new}")


# =========================================================================================
# 4. A storm: 1000 file events in about a second on 200 manifests
# =========================================================================================
STORM_AGENTS = 200
WRITES_PER_FILE = 5


def _storm_manifest(name: str, rev: int, arg: int, tag: str) -> str:
    return (f"apiVersion: agentctl/v1\nkind: Agent\nmetadata:\n  name: {name}\n  labels: {{rev: '{rev}'}}\n"
            f"spec:\n  command: [sleep, '{arg}']\n  env: {{FAULT_TAG: {tag}}}\n")


def _write_fast(path: Path, text: str) -> None:
    """Atomic replace, as an editor or git does, with as little overhead as possible."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


def test_a_storm_of_1000_file_events_coalesces_with_bounded_memory_and_queue(fctl: Controller, tag: str) -> None:
    ctl = fctl
    names = [f"storm-{i:03d}" for i in range(STORM_AGENTS)]
    changed = set(names[: STORM_AGENTS // 2])  # their last write changes the command; the others' only labels
    for i, name in enumerate(names):
        _write_fast(ctl.manifests / f"{name}.yaml", _storm_manifest(name, 0, 400_000 + i, tag))
    ctl.start()
    wait_for(lambda: len(by_instance(tag)) == STORM_AGENTS and all(len(p) == 1 for p in by_instance(tag).values()),
             60.0, message=f"{STORM_AGENTS} agents running")
    wait_for(lambda: sum(1 for d in json.loads(ctl.http("/api/v1/agents")[1])["items"]
                         if d["phase"] == "Running") == STORM_AGENTS, DEADLINE, message="all statuses Running")
    first_pids = {i: p[0] for i, p in by_instance(tag).items()}
    assert ctl.proc is not None
    controller_pid = ctl.proc.pid
    rss_before = _rss_kib(controller_pid)
    reconciles_before = metric_values(ctl, "agentctl_reconcile_total").get('{result="success"}', 0.0)
    log_before = len(ctl.log())

    rss_samples: list[int] = []
    depth_samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        # RSS is cheap to read and read often; the queue depth costs a scrape of /metrics
        next_scrape = 0.0
        while not done.is_set():
            rss_samples.append(_rss_kib(controller_pid))
            if time.monotonic() >= next_scrape:
                depth_samples.append(metric_values(ctl, "agentctl_workqueue_depth").get("", 0.0))
                next_scrape = time.monotonic() + 0.1
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    texts = [[(ctl.manifests / f"{name}.yaml",
               _storm_manifest(name, rev, 500_000 + i if rev == WRITES_PER_FILE and name in changed else 400_000 + i,
                               tag)) for rev in range(1, WRITES_PER_FILE + 1)] for i, name in enumerate(names)]
    began = time.monotonic()
    events = 0
    try:
        for i, writes in enumerate(texts):
            # each file gets its writes in a quick burst, the files one after another over ~1 s
            for path, text in writes:
                _write_fast(path, text)
                events += 1
            time.sleep(max(0.0, began + (i + 1) / STORM_AGENTS - time.monotonic()))  # pacing of the storm
        storm_seconds = time.monotonic() - began

        def final_state() -> bool:
            live = by_instance(tag)
            if set(live) != {f"{n}-0" for n in names} or any(len(p) != 1 for p in live.values()):
                return False
            for i, name in enumerate(names):
                want = str(500_000 + i if name in changed else 400_000 + i)
                if cmdline(live[f"{name}-0"][0])[-1:] != [want]:
                    return False
            items = json.loads(ctl.http("/api/v1/agents")[1])["items"]
            return len(items) == STORM_AGENTS and all(
                d["phase"] == "Running" and d["labels"] == {"rev": str(WRITES_PER_FILE)} for d in items)

        wait_for(final_state, 60.0, interval=0.2, message="final state after the storm")
    finally:
        done.set()
        sampler.join(10)
    assert events == STORM_AGENTS * WRITES_PER_FILE and storm_seconds < 3.0, storm_seconds
    after = {i: p[0] for i, p in by_instance(tag).items()}
    # labels-only changes restart nothing; the command change restarts each changed agent exactly once
    for name in names:
        if name in changed:
            assert after[f"{name}-0"] != first_pids[f"{name}-0"]
        else:
            assert after[f"{name}-0"] == first_pids[f"{name}-0"], f"{name} restarted by a labels-only change"
    starts = len(re.findall(r"-> Running pid", ctl.log()[log_before:]))
    assert starts == len(changed), f"{starts} starts for {len(changed)} changed agents"
    # coalesced: fewer reconciles than file events, though every event changed a file
    reconciles = metric_values(ctl, "agentctl_reconcile_total").get('{result="success"}', 0.0) - reconciles_before
    assert reconciles < events, f"{reconciles} reconciles for {events} events"
    # bounded: the queue never holds more than two entries per agent (one running, one queued)
    assert rss_samples and depth_samples, "no sample taken"
    assert max(depth_samples) <= 2 * STORM_AGENTS, f"workqueue depth reached {max(depth_samples)}"
    peak = max(rss_samples)
    assert peak - rss_before < 64 * 1024, f"controller RSS grew from {rss_before} KiB to {peak} KiB"
    assert ctl.proc.poll() is None


# =========================================================================================
# 5. Hostile agents
# =========================================================================================
IGNORE_TERM_FAMILY = py("""
    import signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c",
        "import signal, time\\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\\nwhile True: time.sleep(1)"])
    print("ready", sys.argv[1:], child.pid, flush=True)
    while True: time.sleep(1)
""")


def test_sigterm_ignoring_agent_and_its_child_are_killed_after_the_grace_period(fctl: Controller, tag: str) -> None:
    ctl = fctl
    env = {"FAULT_TAG": tag}
    stop = {"gracePeriodSeconds": 1}
    ctl.apply("stubborn", [*IGNORE_TERM_FAMILY, "v1"], env=env, stop=stop)
    ctl.start()
    old = inst(running(ctl, "stubborn"))["pid"]
    wait_for(lambda: "ready" in log_text(ctl, "stubborn-0"), DEADLINE, message="handlers in place")
    family = by_instance(tag)["stubborn-0"]
    assert len(family) == 2
    began = time.monotonic()
    ctl.apply("stubborn", [*IGNORE_TERM_FAMILY, "v2"], env=env, stop=stop)  # restart: stop, then start
    doc = ctl.wait_status("stubborn", lambda d: d["phase"] == "Running" and inst(d)["pid"] not in (None, old),
                          15.0, "restarted after the grace period")
    assert time.monotonic() - began >= 0.9, "SIGKILL came before the grace period was over"
    assert inst(doc)["lastExit"]["signal"] == signal.SIGKILL
    for pid in family:
        reap(pid)
        assert not pid_alive(pid)
    wait_for(lambda: "ready" in log_text(ctl, "stubborn-0").split("v1")[-1], DEADLINE, message="v2 ready")
    family = by_instance(tag)["stubborn-0"]
    began = time.monotonic()
    ctl.delete("stubborn.yaml")
    wait_for(lambda: ctl.status("stubborn") is None, 15.0, message="status removed after the stop")
    assert time.monotonic() - began >= 0.9
    for pid in family:
        reap(pid)
    assert by_instance(tag) == {}
    assert "reconcile of stubborn failed" not in ctl.log(), ctl.log()[-2000:]


def test_sigterm_ignoring_agent_is_killed_after_the_grace_period_when_deleted(fctl: Controller, tag: str) -> None:
    ctl = fctl
    ctl.apply("deaf", [*IGNORE_TERM_FAMILY, "v1"], env={"FAULT_TAG": tag}, stop={"gracePeriodSeconds": 1})
    ctl.start()
    running(ctl, "deaf")
    wait_for(lambda: "ready" in log_text(ctl, "deaf-0"), DEADLINE, message="handlers in place")
    family = by_instance(tag)["deaf-0"]
    assert len(family) == 2
    began = time.monotonic()
    ctl.delete("deaf.yaml")
    # grace 1 s, then SIGKILL to the group: well inside the deadline, far from the 30 s resync
    wait_for(lambda: ctl.status("deaf") is None, 15.0, message="status removed")
    assert time.monotonic() - began >= 0.9
    for pid in family:
        reap(pid)
        assert not pid_alive(pid)
    assert by_instance(tag) == {}


ORPHANER = py("""
    import os, sys, time
    # double fork: the grandchild's parent exits at once, so it is orphaned (reparented), but
    # stays in the instance's process group
    if os.fork() == 0:
        if os.fork() == 0:
            open("orphan.pid", "w").write(str(os.getpid()))
            while True: time.sleep(1)
        os._exit(0)
    os.wait()
    print("orphaned one", flush=True)
    while True: time.sleep(1)
""")


def test_orphaned_grandchild_in_the_group_dies_with_its_instance(fctl: Controller, tag: str) -> None:
    ctl = fctl
    ctl.apply("orphaner", ORPHANER, env={"FAULT_TAG": tag})
    ctl.start()
    leader = inst(running(ctl, "orphaner"))["pid"]
    path = ctl.base / "orphan.pid"
    orphan = int(wait_for(lambda: path.exists() and path.read_text().strip(), DEADLINE, message="orphan pid"))
    assert pid_alive(orphan) and pgid_of(orphan) == leader
    with open(f"/proc/{orphan}/stat") as fh:
        assert int(fh.read().rsplit(")", 1)[1].split()[1]) != leader, "the orphan must not be a child of the leader"
    ctl.delete("orphaner.yaml")
    wait_for(lambda: ctl.status("orphaner") is None, DEADLINE, message="status removed")
    reap(orphan)
    assert not pid_alive(orphan)
    assert by_instance(tag) == {}


def test_instantly_exiting_agent_loops_boundedly_and_does_not_starve_others(fctl: Controller, tag: str) -> None:
    ctl = fctl
    env = {"FAULT_TAG": tag}
    # no backoff at all: the tightest crash loop a manifest can ask for
    ctl.apply("hot", ["sh", "-c", "echo run; exit 3"], env=env, backoff={"initialSeconds": 0, "maxSeconds": 0},
              maxRestarts={"count": 25, "windowSeconds": 300})
    ctl.start()
    ctl.apply("calm", sleep_cmd(600_001), env=env)  # created while the loop spins
    running(ctl, "calm")
    assert ctl.http("/healthz")[0] == 200
    doc = ctl.wait_phase("hot", "Failed", DEADLINE)
    assert next(c for c in doc["conditions"] if c["type"] == "Ready")["reason"] == "CrashLoop"
    assert doc["restarts"] == 25
    assert log_text(ctl, "hot-0").count("run") == 26, "one first run and exactly 25 restarts"
    holds(lambda: log_text(ctl, "hot-0").count("run") == 26, 1.0, "a Failed agent was started again")
    assert ctl.proc is not None and ctl.proc.poll() is None


LOG_MAX_BYTES = 256 * 1024
LOG_BACKUPS = 2
WRITE_RATE = 2 * 1024 * 1024  # bytes per second
ROTATION_PERIOD = 2.0  # controller.health.ROTATE_EVERY: how often the sampler looks at log sizes
FLOODER = py(f"""
    import os, time
    chunk = (b"x" * 1023 + b"\\n") * 64
    while True:
        began = time.monotonic()
        for _ in range({WRITE_RATE} // len(chunk)):
            os.write(1, chunk)
        time.sleep(max(0.0, 1.0 - (time.monotonic() - began)))
""")


def test_log_of_a_megabytes_per_second_writer_stays_bounded_with_its_backups(fctl: Controller, tag: str) -> None:
    ctl = fctl
    ctl.apply("flood", FLOODER, env={"FAULT_TAG": tag}, logs={"maxBytes": LOG_MAX_BYTES, "backups": LOG_BACKUPS})
    ctl.start()
    running(ctl, "flood")
    log = ctl.state / "logs" / "flood-0.log"
    # "about maxBytes plus one rotation period of output", with half a period of slack for a busy box
    bound = LOG_MAX_BYTES + int(WRITE_RATE * ROTATION_PERIOD * 1.5)
    biggest = {"log": 0, "backup": 0}
    names_seen: set[str] = set()

    def observe() -> bool:
        for path in log.parent.glob("flood-0.log*"):
            names_seen.add(path.name)
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            key = "log" if path == log else "backup"
            biggest[key] = max(biggest[key], size)
        return f"{log.name}.{LOG_BACKUPS}" in names_seen

    wait_for(observe, DEADLINE, interval=0.02, message=f"{LOG_BACKUPS} rotations")
    holds(lambda: observe() or True, ROTATION_PERIOD * 1.5, "")  # keep sampling over one more rotation
    assert biggest["log"] <= bound, f"log reached {biggest['log']} bytes, bound {bound}"
    assert biggest["backup"] <= bound, f"a backup reached {biggest['backup']} bytes, bound {bound}"
    allowed = {log.name} | {f"{log.name}.{n}" for n in range(1, LOG_BACKUPS + 1)}
    assert names_seen <= allowed, f"unexpected files {names_seen - allowed}"
    for path in log.parent.glob("flood-0.log*"):
        assert path.stat().st_mode & 0o777 == 0o600, f"{path.name} mode {oct(path.stat().st_mode)}"
    assert inst(ctl.status("flood") or {"instances": [{}]}).get("restarts") == 0


def test_agent_that_closes_stdout_and_stderr_keeps_running_and_stops_normally(fctl: Controller, tag: str) -> None:
    ctl = fctl
    closer = py("""
        import os, time
        print("closing my output", flush=True)
        os.close(1)
        os.close(2)
        while True: time.sleep(1)
    """)
    ctl.apply("mute", closer, env={"FAULT_TAG": tag})
    ctl.start()
    pid = inst(running(ctl, "mute"))["pid"]
    wait_for(lambda: "closing my output" in log_text(ctl, "mute-0"), DEADLINE, message="its last words")
    # nothing reacts to the closed output: bounded window, same pid, no restart
    holds(lambda: by_instance(tag) == {"mute-0": [pid]} and (ctl.status("mute") or {}).get("restarts") == 0,
          1.5, "closing stdout disturbed the instance")
    ctl.delete("mute.yaml")
    wait_for(lambda: ctl.status("mute") is None, DEADLINE, message="stopped and removed")
    assert by_instance(tag) == {}


ESCAPEE = "import os, time\nos.setsid()\nopen('escapee.pid', 'w').write(str(os.getpid()))\nwhile True: time.sleep(1)"
ESCAPER = py(f"""
    import subprocess, sys, time
    subprocess.Popen([sys.executable, "-c", {ESCAPEE!r}])
    print("spawned an escapee", sys.argv[1:], flush=True)
    while True: time.sleep(1)
""")


@pytest.mark.parametrize("how", [
    "deleted",
    pytest.param("restarted"),
])
def test_grandchild_that_left_the_process_group_with_setsid_dies_with_its_instance(fctl: Controller, tag: str,
                                                                                   how: str) -> None:
    ctl = fctl
    env = {"FAULT_TAG": tag}
    ctl.apply("escaper", [*ESCAPER, "v1"], env=env)
    ctl.start()
    leader = inst(running(ctl, "escaper"))["pid"]
    path = ctl.base / "escapee.pid"
    escapee = int(wait_for(lambda: path.exists() and path.read_text().strip(), DEADLINE, message="escapee pid"))
    assert pgid_of(escapee) == escapee != leader, "the grandchild must have left the instance's group"
    path.unlink()
    if how == "deleted":
        ctl.delete("escaper.yaml")
        wait_for(lambda: ctl.status("escaper") is None, DEADLINE, message="status removed")
    else:
        ctl.apply("escaper", [*ESCAPER, "v2"], env=env)  # the old run is stopped, a new one started
        ctl.wait_status("escaper", lambda d: d["phase"] == "Running" and inst(d)["pid"] not in (None, leader),
                        DEADLINE, "restarted")
    wait_for(lambda: gone(escapee), 10.0,
             message=f"escapee {escapee} of the stopped run killed")
    assert not pid_alive(leader)


# =========================================================================================
# 6. PID reuse: a recorded pid now taken by an unrelated process
# =========================================================================================
def _forge_handle(state: Path, instance: str, pid: int, start_ticks: int) -> None:
    con = sqlite3.connect(state / "state.db", timeout=5)
    (raw,) = con.execute("SELECT data FROM instances WHERE id = ?", (instance,)).fetchone()
    data = json.loads(raw)
    data["handle"] = {**data["handle"], "pid": pid, "pgid": pid, "start_ticks": start_ticks}
    con.execute("UPDATE instances SET data = ? WHERE id = ?", (json.dumps(data), instance))
    con.commit()
    con.close()


def _start_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[19])


@pytest.mark.parametrize("stranger_kind", [
    # the new owner of the pid is in someone else's process group: only its pid matches
    "plain",
    # the new owner leads its own process group (a daemon, a shell, any supervisor's child)
    pytest.param("group-leader"),
    # a record naming a stranger exactly, start time included (forged or corrupted); the stranger
    # carries no marker
    pytest.param("same-start-time"),
])
def test_recorded_pid_taken_by_an_unrelated_process_is_neither_adopted_nor_signalled(
        fctl: Controller, tag: str, stranger_kind: str) -> None:
    ctl = fctl
    ctl.apply("reused", sleep_cmd(700_001), env={"FAULT_TAG": tag}, backoff=FAST_BACKOFF)
    ctl.start()
    old = inst(running(ctl, "reused"))["pid"]
    old_ticks = _start_ticks(old)
    ctl.kill()
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: gone(old), DEADLINE, message="agent gone")
    stranger = subprocess.Popen(["sleep", "300"], start_new_session=stranger_kind != "plain")
    try:
        ticks = _start_ticks(stranger.pid) if stranger_kind == "same-start-time" else old_ticks
        _forge_handle(ctl.state, "reused-0", stranger.pid, ticks)
        ctl.start()  # ready: the first pass, adoption included, is done
        doc = ctl.wait_status("reused", lambda d: d["phase"] == "Running"
                              and inst(d)["pid"] not in (None, old, stranger.pid), 5.0,
                              "a fresh instance instead of the stranger")
        assert inst(doc)["lastExit"]["reason"] == "Lost"
        assert stranger.poll() is None, f"the unrelated process was signalled ({stranger.returncode})"
        holds(lambda: stranger.poll() is None, 1.0, "the unrelated process was signalled")
        ctl.delete("reused.yaml")  # stopping the agent must not touch it either
        wait_for(lambda: ctl.status("reused") is None, DEADLINE, message="removed")
        assert stranger.poll() is None, "stopping the agent signalled the unrelated process"
    finally:
        stranger.kill()
        stranger.wait(10)
