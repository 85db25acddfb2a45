"""The state store, its locks and its counters under faults, end to end (CONTRACT §2, §11).

Real `agentctl run` processes on temp dirs; the faults are real too: another process holding
an SQLite lock (`BEGIN EXCLUSIVE`, as a backup tool or a `sqlite3` shell can), a garbage or
damaged database, a full tmpfs under the state dir, a second controller on the same
manifests. Agents carry a FAULT_TAG env of the test and are killed by pid at the end.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.test_faults import by_instance, holds, kill_tagged, metric_values, running, sqlite_ok
from tests.helpers import PY, Controller, py, wait_for

DEADLINE = 30.0  # a noisy shared 2-core box: generous, never relied on for speed
LOCK_SECONDS = 8.0  # longer than SQLite's usual 5 s busy timeout


@pytest.fixture
def tag() -> Iterator[str]:
    value = f"store-{uuid.uuid4().hex[:12]}"
    yield value
    kill_tagged(value)  # after the controllers' own cleanup


@pytest.fixture
def sctl(tag: str, controller_factory: Callable[..., Controller]) -> Controller:
    return controller_factory()


# -- a process holding the store's lock -----------------------------------------------------
class LockHolder:
    """A separate process with an exclusive SQLite transaction open on the store, like a
    `sqlite3` shell after `BEGIN EXCLUSIVE;`. `readers_too` adds `PRAGMA locking_mode=EXCLUSIVE`,
    which shuts out readers as well. It ends after `seconds`, or when its stdin is closed."""

    def __init__(self, db: Path, *, seconds: float, readers_too: bool = False) -> None:
        code = f"""
            import select, sqlite3, sys
            db = sqlite3.connect({str(db)!r}, isolation_level=None, timeout=10)
            if {readers_too!r}:
                db.execute("PRAGMA locking_mode = EXCLUSIVE")
            db.execute("BEGIN EXCLUSIVE")
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('lock-holder', 'x')")
            print("locked", flush=True)
            select.select([sys.stdin], [], [], {seconds!r})  # the fault lasts this long, or until released
            db.execute("ROLLBACK")
            db.close()
            print("released", flush=True)
        """
        self.proc = subprocess.Popen([PY, "-c", textwrap.dedent(code)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == "locked", f"the lock holder did not get its lock: {line!r}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def release(self) -> None:
        assert self.proc.stdin is not None
        if not self.proc.stdin.closed:
            self.proc.stdin.close()
        self.proc.wait(30)
        self.kill()  # only closes the pipes now

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None and not pipe.closed:
                pipe.close()


def restarts_total(ctl: Controller, agent: str) -> float:
    values = metric_values(ctl, "agentctl_agent_restarts_total")
    return sum(v for labels, v in values.items() if f'agent="{agent}"' in labels)


def stored(ctl: Controller, sql: str, *args: object) -> list[tuple[object, ...]]:
    """Read the store as another process would (read-only, a reader never waits in WAL mode)."""
    db = sqlite3.connect(f"file:{ctl.state / 'state.db'}?mode=ro", uri=True, timeout=5)
    try:
        return list(db.execute(sql, args))
    finally:
        db.close()


def stored_counter(ctl: Controller, agent: str) -> int:
    rows = stored(ctl, "SELECT SUM(value) FROM counters WHERE agent = ?", agent)
    return int(rows[0][0] or 0)


def flaky(tag: str, runs_file: Path, crashes: int) -> list[str]:
    """An agent that exits 1 on its first `crashes` runs, then stays up: a fixed restart count."""
    return py(f"""
        import time
        path = {str(runs_file)!r}
        with open(path, "a") as fh:
            fh.write("run\\n")
        if open(path).read().count("run") <= {crashes}:
            raise SystemExit(1)
        print("up", flush=True)
        while True:
            time.sleep(1)
    """)


FAST = {"initialSeconds": 0.2, "maxSeconds": 0.5}


# =========================================================================================
# 1. A store locked by another process at start-up is waited for, never declared corrupt
# =========================================================================================
@pytest.mark.parametrize("readers_too", [False, True], ids=["write-lock", "exclusive-mode"])
def test_store_locked_at_startup_is_waited_for_and_kept_whole(sctl: Controller, tag: str, tmp_path: Path,
                                                              readers_too: bool) -> None:
    ctl = sctl
    env = {"FAULT_TAG": tag}
    ctl.apply("keeper", py("import time\nwhile True: time.sleep(1)"), env=env)
    ctl.apply("flaky", flaky(tag, tmp_path / "runs", 3), env=env, backoff=FAST)
    ctl.start()
    keeper = running(ctl, "keeper")
    running(ctl, "flaky")
    wait_for(lambda: restarts_total(ctl, "flaky") == 3, DEADLINE, message="flaky restarted 3 times")
    # keeper's manifest turns invalid: it keeps running on its last valid spec, which only the store knows
    ctl.write("keeper.yaml", "apiVersion: agentctl/v1\nkind: Agent\nmetadata: {name: keeper}\nspec: {command: 5}\n")
    ctl.wait_status("keeper", lambda d: any(c.get("type") == "Valid" and c.get("status") == "False"
                                            for c in d.get("conditions", [])), DEADLINE, "keeper Valid=False")
    keeper_pid = keeper["instances"][0]["pid"]
    events_before = ctl.cli("describe", "keeper").stdout
    assert "InvalidManifest" in events_before, events_before
    assert ctl.stop(signal.SIGTERM) == 0
    agents_before = by_instance(tag)

    holder = LockHolder(ctl.state / "state.db", seconds=LOCK_SECONDS, readers_too=readers_too)
    try:
        ctl.start(wait_ready=False)
        # it says it waits, and for whom
        wait_for(lambda: re.search(rf"state store .* is locked \(held by pid {holder.pid}\b", ctl.log()),
                 DEADLINE, message="a log line naming the lock holder")
        ctl.wait_ready(timeout=LOCK_SECONDS + 60)
        assert holder.proc.poll() is not None, "ready while the store was still locked"
    finally:
        holder.kill()

    log = ctl.log()
    assert not list(ctl.state.glob("state.db.corrupt-*")), "a locked store was moved aside"
    assert not re.search(r"unusable|corrupt|moved aside|Traceback", log), log[-3000:]
    # the agent on its last valid spec was adopted, not killed as an orphan; nothing else changed
    holds(lambda: by_instance(tag) == agents_before, 1.0, "an agent was killed or started again")
    assert ctl.pids("keeper") == [keeper_pid]
    # events and counters survived
    assert restarts_total(ctl, "flaky") == 3
    assert "InvalidManifest" in ctl.cli("describe", "keeper").stdout
    assert stored(ctl, "SELECT COUNT(*) FROM agents WHERE name = 'keeper' AND manifest IS NOT NULL") == [(1,)]
    assert ctl.stop(signal.SIGTERM) == 0
    assert sqlite_ok(ctl.state / "state.db") == "ok"


def test_store_locked_past_the_wait_exits_2_naming_the_holder_and_keeps_the_store(
        sctl: Controller, tag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ctl = sctl
    ctl.apply("keeper", py("import time\nwhile True: time.sleep(1)"), env={"FAULT_TAG": tag})
    ctl.start()
    pid = running(ctl, "keeper")["instances"][0]["pid"]
    assert ctl.stop(signal.SIGTERM) == 0
    size_before = (ctl.state / "state.db").stat().st_size

    holder = LockHolder(ctl.state / "state.db", seconds=120.0, readers_too=True)
    try:
        monkeypatch.setenv("AGENTCTL_STORE_WAIT_SECONDS", "3")
        ctl.start(wait_ready=False)
        assert ctl.proc is not None
        code = ctl.proc.wait(DEADLINE + 30)
    finally:
        holder.kill()
    log = ctl.log()
    assert code == 2, log[-3000:]
    assert re.search(rf"ERROR state store .* is still locked after \d+s \(held by pid {holder.pid}\b", log), log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert not list(ctl.state.glob("state.db.corrupt-*"))
    assert (ctl.state / "state.db").stat().st_size == size_before
    assert by_instance(tag) == {"keeper-0": [pid]}, "the agent was disturbed"
    # once the lock is gone, the next start adopts it
    monkeypatch.delenv("AGENTCTL_STORE_WAIT_SECONDS")
    ctl.start()
    assert ctl.pids("keeper") == [pid]


# =========================================================================================
# 2. A store locked while the controller runs: no crash, supervision goes on, writes land later
# =========================================================================================
def test_store_locked_while_running_is_reported_and_every_write_lands_after_release(sctl: Controller,
                                                                                   tag: str) -> None:
    ctl = sctl
    env = {"FAULT_TAG": tag}
    ctl.apply("first", py("import time\nwhile True: time.sleep(1)"), env=env, backoff=FAST)
    ctl.start()
    first_pid = running(ctl, "first")["instances"][0]["pid"]

    holder = LockHolder(ctl.state / "state.db", seconds=120.0)
    try:
        # changes while the store refuses writes: a new agent, and a crash (a counted restart)
        ctl.apply("second", py("import time\nwhile True: time.sleep(1)"), env=env)
        os.kill(first_pid, signal.SIGKILL)
        second = running(ctl, "second")
        first = ctl.wait_status("first", lambda d: d.get("phase") == "Running" and bool(d["instances"][0].get("pid"))
                                and d["instances"][0]["pid"] != first_pid, DEADLINE, "first restarted")
        wait_for(lambda: ctl.http("/readyz")[0] == 503, DEADLINE, message="/readyz 503 while the store is locked")
        assert b"state store" in ctl.http("/readyz")[1]
        assert ctl.http("/healthz")[0] == 200
        assert restarts_total(ctl, "first") == 1
        assert stored(ctl, "SELECT name FROM agents WHERE name = 'second'") == [], "the lock did not hold"
        holds(lambda: ctl.proc is not None and ctl.proc.poll() is None, 1.5, "the controller died")
    finally:
        holder.release()

    # the lock is gone: every buffered write lands with no other event
    wait_for(lambda: ctl.http("/readyz")[0] == 200, DEADLINE, message="/readyz 200 after the release")
    assert stored(ctl, "SELECT name FROM agents WHERE name = 'second'") == [("second",)]
    records = {str(r[0]): json.loads(str(r[1])) for r in stored(ctl, "SELECT id, data FROM instances")}
    assert records["second-0"]["handle"]["pid"] == second["instances"][0]["pid"]
    assert records["first-0"]["handle"]["pid"] == first["instances"][0]["pid"]
    assert stored_counter(ctl, "first") == 1
    assert stored(ctl, "SELECT COUNT(*) FROM events WHERE agent = 'second'")[0][0] >= 1
    log = ctl.log()
    assert "Traceback" not in log and "reconcile of" not in log, log[-3000:]
    # and a restarted controller finds all of it
    assert ctl.stop(signal.SIGTERM) == 0
    ctl.start()
    assert ctl.pids("second") == [second["instances"][0]["pid"]]
    assert restarts_total(ctl, "first") == 1


# =========================================================================================
# 3. A store that is really corrupt is set aside and reported; agents keep running
# =========================================================================================
def _damage(db: Path, how: str) -> bytes:
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    if how == "garbage":
        db.write_bytes(b"this is no database at all " * 2000)
    else:  # a valid header, its b-tree pages overwritten: `PRAGMA quick_check` finds it
        data = bytearray(db.read_bytes())
        assert len(data) >= 3 * 4096, len(data)
        data[4096:len(data)] = bytes([0x5A]) * (len(data) - 4096)
        db.write_bytes(bytes(data))
    return db.read_bytes()


@pytest.mark.parametrize("how", ["garbage", "malformed"])
def test_corrupt_store_is_set_aside_reported_and_agents_are_recovered_by_marker(sctl: Controller, tag: str,
                                                                               how: str) -> None:
    ctl = sctl
    env = {"FAULT_TAG": tag}
    for name in ("alpha", "beta", "keeper"):
        ctl.apply(name, py("import time\nwhile True: time.sleep(1)"), env=env)
    ctl.start()
    for name in ("alpha", "beta", "keeper"):
        running(ctl, name)
    # keeper's manifest is invalid when the store is lost: only its last valid spec says what it runs
    ctl.write("keeper.yaml", "apiVersion: agentctl/v1\nkind: Agent\nmetadata: {name: keeper}\nspec: {command: 5}\n")
    ctl.wait_status("keeper", lambda d: any(c.get("type") == "Valid" and c.get("status") == "False"
                                            for c in d.get("conditions", [])), DEADLINE, "keeper Valid=False")
    before = by_instance(tag)
    assert ctl.stop(signal.SIGTERM) == 0
    damaged = _damage(ctl.state / "state.db", how)

    ctl.start()
    log = ctl.log()
    aside = list(ctl.state.glob("state.db.corrupt-*"))
    assert [p.read_bytes() for p in aside if not p.name.endswith(("-wal", "-shm"))] == [damaged]
    assert re.search(r"ERROR state store .* is corrupt .* moved aside to .*state\.db\.corrupt-", log), log[-3000:]
    assert re.search(r"restored the last valid specs of 3 agents", log), log[-3000:]
    for instance, (pid,) in before.items():
        assert re.search(rf"{instance} recovered unrecorded process pid {pid} by its marker", log), log[-3000:]
    holds(lambda: by_instance(tag) == before, 1.0, "an agent was started again or killed")
    assert "orphan" not in ctl.log()
    assert stored(ctl, "SELECT value FROM meta WHERE key = 'recovered_from'") == [(str(aside[0]),)]
    # the new store is whole: the next start sets nothing aside
    assert ctl.stop(signal.SIGTERM) == 0
    ctl.start()
    assert len(list(ctl.state.glob("state.db.corrupt-*"))) == len(aside)
    assert by_instance(tag) == before


# =========================================================================================
# 4. Restart counters never go backwards, also across a full disk and a restart
# =========================================================================================
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m,mode=0700", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(path: Path) -> None:
    """Write until the file system says ENOSPC."""
    chunk = b"\0" * 65536
    with open(path, "wb", buffering=0) as fh:
        while True:
            try:
                fh.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
    # the last partial chunk may leave a few blocks: take those too
    with open(path, "ab", buffering=0) as fh:
        for size in (4096, 512, 1):
            while True:
                try:
                    fh.write(b"\0" * size)
                except OSError:
                    break


def test_restart_counter_never_goes_backwards_across_a_full_disk_and_a_restart(
        small_disk: Path, tag: str, controller_factory: Callable[..., Controller]) -> None:
    ctl = controller_factory(state=small_disk / "state")
    ctl.apply("crashy", py("raise SystemExit(1)"), env={"FAULT_TAG": tag}, backoff=FAST)
    ctl.start()
    wait_for(lambda: restarts_total(ctl, "crashy") >= 3, DEADLINE, message="a few restarts before the disk fills")
    filler = small_disk / "filler"
    fill(filler)
    full_at = restarts_total(ctl, "crashy")
    # the crash loop goes on while no commit can land: memory counts on
    wait_for(lambda: "state store commit failed" in ctl.log(), DEADLINE, message="a failed store commit")
    failed_at = restarts_total(ctl, "crashy")
    wait_for(lambda: restarts_total(ctl, "crashy") >= failed_at + 3, DEADLINE,
             message="restarts counted while the disk is full")
    exported = restarts_total(ctl, "crashy")
    assert stored_counter(ctl, "crashy") < exported, "the store kept up although the disk was full"
    assert full_at <= exported

    filler.unlink()  # space again: the store catches up with memory, with no other event needed
    wait_for(lambda: stored_counter(ctl, "crashy") >= exported, DEADLINE, message="the store caught up")
    before_stop = restarts_total(ctl, "crashy")
    assert ctl.stop(signal.SIGTERM) == 0
    at_stop = stored_counter(ctl, "crashy")
    assert at_stop >= before_stop
    ctl.start()
    after = restarts_total(ctl, "crashy")
    assert after >= at_stop >= before_stop >= exported, (exported, before_stop, at_stop, after)
    assert "Traceback" not in ctl.log()


# =========================================================================================
# 5. One controller per manifests directory on this host
# =========================================================================================
def test_second_controller_on_the_same_manifests_refuses_with_exit_2_naming_the_first(
        controller_factory: Callable[..., Controller], tag: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)  # as started by a unit or cron
    first = controller_factory("first")
    first.apply("solo", py("import time\nwhile True: time.sleep(1)"), env={"FAULT_TAG": tag})
    first.start("--stop-agents-on-exit")
    running(first, "solo")
    listing = sorted(p.name for p in first.manifests.iterdir())
    link = tmp_path / "manifests-link"
    link.symlink_to(first.manifests)

    session = tmp_path / "run-user"
    session.mkdir(mode=0o700)
    for name, manifests, runtime in (("second", first.manifests, None), ("third", link, None),
                                     ("fourth", first.manifests, session)):  # from a login shell
        other = controller_factory(name, manifests=manifests)
        if runtime is not None:
            monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
        other.start(wait_ready=False)
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
        assert other.proc is not None
        assert other.proc.wait(DEADLINE) == 2, other.log()[-3000:]
        log = other.log()
        assert f"pid {first.proc.pid if first.proc else '?'}" in log, log
        assert str(first.state.resolve()) in log, log
        assert "Traceback" not in log
    assert list(by_instance(tag)) == ["solo-0"] and len(by_instance(tag)["solo-0"]) == 1, by_instance(tag)
    assert sorted(p.name for p in first.manifests.iterdir()) == listing, "something was written into the manifests"

    # the lock goes with the first controller: now the second one may serve the directory
    assert first.stop(signal.SIGTERM) == 0
    wait_for(lambda: not by_instance(tag), DEADLINE, message="the first controller's agent stopped")
    second = controller_factory("second", manifests=first.manifests)
    second.start()
    running(second, "solo")


# =========================================================================================
# 6. Every command takes --state-dir
# =========================================================================================
def test_schema_and_validate_accept_state_dir(sctl: Controller, tmp_path: Path) -> None:
    ctl = sctl
    path = ctl.apply("ok", ["sleep", "100"])
    unused = tmp_path / "unused-state"
    schema = subprocess.run([sys.executable, "-m", "controller", "schema", "--state-dir", str(unused)],
                            capture_output=True, text=True, timeout=60)
    assert schema.returncode == 0, schema.stderr
    assert "properties" in json.loads(schema.stdout)
    valid = subprocess.run([sys.executable, "-m", "controller", "validate", str(path), "--state-dir", str(unused)],
                           capture_output=True, text=True, timeout=60)
    assert valid.returncode == 0, valid.stderr
    assert not unused.exists(), "a command that reads no state created the state dir"


def test_a_full_disk_at_startup_is_exit_2_saying_so_and_nothing_is_set_aside(
        small_disk: Path, tag: str, controller_factory: Callable[..., Controller]) -> None:
    ctl = controller_factory(state=small_disk / "state")
    ctl.apply("solo", py("import time\nwhile True: time.sleep(1)"), env={"FAULT_TAG": tag})
    ctl.start()
    pid = running(ctl, "solo")["instances"][0]["pid"]
    assert ctl.stop(signal.SIGTERM) == 0
    filler = small_disk / "filler"
    fill(filler)
    ctl.start(wait_ready=False)
    assert ctl.proc is not None
    assert ctl.proc.wait(DEADLINE) == 2, ctl.log()[-3000:]
    log = ctl.log()
    assert re.search(r"ERROR state store .* cannot be opened: .*\(its file system has \d+ bytes free\)", log), log[-2000:]
    assert "Traceback" not in log
    assert not list(ctl.state.glob("state.db.corrupt-*"))
    assert by_instance(tag) == {"solo-0": [pid]}
    filler.unlink()
    ctl.start()
    assert ctl.pids("solo") == [pid]
