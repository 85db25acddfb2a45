"""The SQLite state store, on a real database file under tmp_path."""

from __future__ import annotations

import json
import sqlite3
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from controller import store as store_module
from controller.model import ExitInfo, ExitReason, Handle, InstanceRecord, RunState
from controller.store import AgentRow, Event, Store, open_readonly
from controller.storefaults import StoreError


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state.db")
    yield s
    s.close()


FULL = InstanceRecord(
    id="reviewer-1", agent="reviewer", index=1, supervisor="tmux", spec_hash="sha256:abc", state=RunState.STOPPING,
    handle=Handle(pid=4242, pgid=4242, start_ticks=987654, unit="reviewer-1"),
    started_at=1_790_000_000.5, started_mono=123.25, restarts=3, failures_in_row=2,
    restart_times=(100.0, 110.5, 120.25),
    last_exit=ExitInfo(exit_code=None, signal=9, at=1_790_000_100.0, runtime_seconds=12.5,
                       reason=ExitReason.SIGNALED, log_tail=("line one", "ünïcode ✓"), message="killed"),
    next_start=130.0, stop_reason="SpecChanged", stop_deadline=140.0, killed=True, terminal=None,
    terminal_reason="", terminal_message="", health="LivenessFailed", health_message="no output for 60s",
)


def test_instance_record_round_trips_with_handle_and_last_exit(tmp_path: Path, store: Store) -> None:
    store.put_instance(FULL)
    store.close()
    reopened = Store(tmp_path / "state.db")
    try:
        (back,) = reopened.instances()
        assert back == FULL
        assert isinstance(back.state, RunState) and isinstance(back.restart_times, tuple)
        assert back.last_exit is not None and isinstance(back.last_exit.log_tail, tuple)
    finally:
        reopened.close()


def test_minimal_record_round_trips(store: Store) -> None:
    rec = InstanceRecord(id="a-0", agent="a", index=0, supervisor="process", spec_hash="h", state=RunState.EXITED)
    store.put_instance(rec)
    assert store.instances() == [rec]


def test_put_replaces_and_delete_removes(store: Store) -> None:
    rec = InstanceRecord(id="a-0", agent="a", index=0, supervisor="process", spec_hash="h", state=RunState.RUNNING)
    store.put_instance(rec)
    store.put_instance(InstanceRecord(id="b-0", agent="b", index=0, supervisor="process", spec_hash="h",
                                      state=RunState.RUNNING))
    store.put_instance(replace(rec, restarts=5))
    assert [(r.id, r.restarts) for r in store.instances()] == [("a-0", 5), ("b-0", 0)]
    store.delete_instance("a-0")
    assert [r.id for r in store.instances()] == ["b-0"]


def test_unreadable_record_is_skipped_not_fatal(store: Store) -> None:
    store.put_instance(FULL)
    store.db.execute("INSERT INTO instances (id, agent, data) VALUES ('x-0', 'x', '{\"id\": \"x-0\"}')")
    assert [r.id for r in store.instances()] == ["reviewer-1"]


def test_agents_round_trip_with_their_manifest(store: Store) -> None:
    row = AgentRow("reviewer", "manifests/r.yaml", {"spec": {"command": ["x"]}}, "sha256:abc", 1000.0, "f" * 40)
    store.put_agent(row)
    store.put_agent(AgentRow("writer", "manifests/w.yaml", None, None, 2000.0))
    assert store.agents() == {"reviewer": row, "writer": AgentRow("writer", "manifests/w.yaml", None, None, 2000.0)}
    store.delete_agent("reviewer")
    assert list(store.agents()) == ["writer"]


def test_counters_count_per_agent_and_reason_and_can_be_dropped(store: Store) -> None:
    for agent, reason in [("a", "Error"), ("a", "Error"), ("a", "LivenessFailed"), ("b", "Error")]:
        store.bump_counter(agent, reason)
    assert store.counters() == {("a", "Error"): 2, ("a", "LivenessFailed"): 1, ("b", "Error"): 1}
    store.drop_counters("a")
    assert store.counters() == {("b", "Error"): 1}


def test_events_are_returned_oldest_first_limited_to_the_newest(store: Store) -> None:
    for i in range(30):
        store.add_event(Event(float(i), "a" if i % 2 == 0 else "b", f"a-{i}", "Exited", "Error", f"event {i}"))
    events = store.events("a", limit=3)
    assert [e.message for e in events] == ["event 24", "event 26", "event 28"]
    assert events[0] == Event(24.0, "a", "a-24", "Exited", "Error", "event 24")
    assert store.events("nobody") == []


def test_old_events_are_pruned_so_the_database_stays_bounded(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "EVENTS_KEPT", 10)
    for i in range(1000):
        store.add_event(Event(float(i), "a", None, "Exited", "Error", f"event {i}"))
    store.commit()  # writes are buffered until the reconciler's commit, once per pass
    assert store.db.execute("SELECT COUNT(*) FROM events").fetchone() == (10,)
    assert [e.message for e in store.events("a", limit=100)] == [f"event {i}" for i in range(990, 1000)]


def test_meta_values_persist(store: Store) -> None:
    assert store.meta("controller_id") is None
    store.set_meta("controller_id", "c1")
    store.set_meta("controller_id", "c2")
    assert store.meta("controller_id") == "c2"


def test_database_file_is_private(tmp_path: Path, store: Store) -> None:
    assert stat.S_IMODE((tmp_path / "state.db").stat().st_mode) == 0o600


def test_corrupt_database_is_moved_aside_and_a_new_store_works(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not a database" * 200)
    store = Store(path)
    try:
        assert store.recovered_from is not None
        aside = Path(store.recovered_from)
        assert aside.parent == tmp_path and aside.name.startswith("state.db.corrupt-")
        assert aside.read_bytes() == b"this is not a database" * 200
        store.put_instance(FULL)
        assert store.instances() == [FULL]
    finally:
        store.close()


def test_healthy_database_is_not_moved_aside(tmp_path: Path) -> None:
    Store(tmp_path / "state.db").close()
    store = Store(tmp_path / "state.db")
    store.close()
    assert store.recovered_from is None
    assert sorted(p.name for p in tmp_path.iterdir() if "corrupt" in p.name) == []


def test_read_only_store_reads_but_cannot_write(tmp_path: Path, store: Store) -> None:
    store.put_instance(FULL)
    store.commit()  # the reconciler commits once per loop iteration; readers see committed writes
    ro = open_readonly(tmp_path)
    assert ro is not None
    try:
        assert ro.instances() == [FULL]
        with pytest.raises(sqlite3.Error):
            ro.put_instance(FULL)
    finally:
        ro.close()


def test_read_only_open_of_a_missing_state_dir_is_none(tmp_path: Path) -> None:
    assert open_readonly(tmp_path / "nothing") is None


# -- locks, failed commits and counters (real SQLite, a real second process holding the lock) --
class Holder:
    """Another process with `BEGIN EXCLUSIVE` open on the database until released (or `seconds`)."""

    def __init__(self, path: Path, *, readers_too: bool = False, seconds: float = 60.0) -> None:
        code = textwrap.dedent(f"""
            import select, sqlite3, sys
            db = sqlite3.connect({str(path)!r}, isolation_level=None, timeout=10)
            if {readers_too!r}:
                db.execute("PRAGMA locking_mode = EXCLUSIVE")
            db.execute("BEGIN EXCLUSIVE")
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('holder', 'x')")
            print("locked", flush=True)
            select.select([sys.stdin], [], [], {seconds!r})
            db.execute("ROLLBACK")
        """)
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait(30)
        self.proc.stdout.close()


@pytest.fixture
def holder_factory() -> Iterator[Callable[..., Holder]]:
    made: list[Holder] = []

    def make(path: Path, **kwargs: Any) -> Holder:
        made.append(Holder(path, **kwargs))
        return made[-1]

    yield make
    for h in made:
        if h.proc.poll() is None:
            h.proc.kill()
            h.proc.wait(10)
        for pipe in (h.proc.stdin, h.proc.stdout):
            if pipe is not None and not pipe.closed:
                pipe.close()


def _seeded(path: Path) -> None:
    s = Store(path)
    s.put_instance(FULL)
    s.set_counter("reviewer", "Error", 14)
    s.add_event(Event(1.0, "reviewer", None, "Exited", "Error", "before the lock"))
    s.close()


@pytest.mark.parametrize("readers_too", [False, True], ids=["write-lock", "exclusive-mode"])
def test_a_store_locked_by_another_process_is_waited_for_and_never_set_aside(
        tmp_path: Path, holder_factory: Callable[..., Holder], readers_too: bool) -> None:
    path = tmp_path / "state.db"
    _seeded(path)
    holder_factory(path, readers_too=readers_too, seconds=3.0)  # longer than one busy timeout
    store = Store(path, wait_seconds=60)  # opening needs the write lock: it returns once the holder let go
    try:
        assert store.recovered_from is None
        assert store.instances() == [FULL]
        assert store.counters() == {("reviewer", "Error"): 14}
        assert [e.message for e in store.events("reviewer")] == ["before the lock"]
    finally:
        store.close()
    assert not [p for p in tmp_path.iterdir() if "corrupt" in p.name]


def test_a_store_locked_past_the_wait_is_an_error_naming_the_holder_and_is_kept(
        tmp_path: Path, holder_factory: Callable[..., Holder]) -> None:
    path = tmp_path / "state.db"
    _seeded(path)
    holder = holder_factory(path, readers_too=True)
    with pytest.raises(StoreError, match=rf"still locked after \d+s \(held by pid {holder.proc.pid} "):
        Store(path, wait_seconds=1.5)
    holder.release()
    assert not [p for p in tmp_path.iterdir() if "corrupt" in p.name]
    store = Store(path)
    try:
        assert store.instances() == [FULL]
    finally:
        store.close()


def test_a_store_that_cannot_be_opened_for_another_reason_is_an_error_and_nothing_is_moved(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.mkdir()  # not corrupt, not locked: unusable as it is, and not ours to replace
    with pytest.raises(StoreError, match="cannot be opened"):
        Store(path)
    assert path.is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["state.db"]


def test_a_failed_commit_keeps_every_write_for_the_next_one(
        tmp_path: Path, holder_factory: Callable[..., Holder], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "RETRY_AFTER", 0.0)
    path = tmp_path / "state.db"
    store = Store(path)
    try:
        store.put_instance(InstanceRecord(id="gone-0", agent="gone", index=0, supervisor="process", spec_hash="h",
                                          state=RunState.EXITED))
        store.commit()
        holder = holder_factory(path)
        store.put_instance(FULL)
        store.delete_instance("gone-0")
        store.put_agent(AgentRow("reviewer", "r.yaml", {"spec": {}}, "h", 1.0))
        store.set_counter("reviewer", "Error", 3)
        store.add_event(Event(2.0, "reviewer", "reviewer-1", "Exited", "Error", "during the lock"))
        store.set_meta("boot_id", "b1")
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            store.commit()
        # memory is authoritative: the store's own reads see the buffered writes
        assert store.instances() == [FULL]
        assert list(store.agents()) == ["reviewer"]
        assert store.counters() == {("reviewer", "Error"): 3}
        assert store.meta("boot_id") == "b1"
        assert [e.message for e in store.events("reviewer")] == ["during the lock"]
        store.set_counter("reviewer", "Error", 4)
        holder.release()
        assert store.commit() is True
        assert store.pending.empty()
    finally:
        store.close()
    again = Store(path)
    try:
        assert again.instances() == [FULL]
        assert list(again.agents()) == ["reviewer"]
        assert again.counters() == {("reviewer", "Error"): 4}
        assert again.meta("boot_id") == "b1"
        assert [e.message for e in again.events("reviewer")] == ["during the lock"]
    finally:
        again.close()


def test_counter_bumps_of_a_commit_that_failed_on_a_full_database_are_saved_by_the_next(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "RETRY_AFTER", 0.0)
    path = tmp_path / "state.db"
    store = Store(path)
    try:
        for value in range(1, 10):
            store.set_counter("a", "Error", value)
        store.commit()
        pages = store.db.execute("PRAGMA page_count").fetchone()[0]
        store.db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own "database or disk is full"
        for value in range(10, 15):
            store.set_counter("a", "Error", value)
            store.add_event(Event(float(value), "a", None, "Exited", "Error", "x" * 20_000))
        with pytest.raises(sqlite3.OperationalError, match="full"):
            store.commit()
        store.db.execute("PRAGMA max_page_count = 1073741823")
        assert store.commit() is True
    finally:
        store.close()
    again = Store(path)
    try:
        assert again.counters() == {("a", "Error"): 14}
        assert len(again.events("a", 100)) == 5
    finally:
        again.close()


def test_a_counter_in_the_store_never_goes_down(tmp_path: Path, store: Store) -> None:
    store.set_counter("a", "Error", 14)
    store.commit()
    store.set_counter("a", "Error", 9)  # a memory that lost a commit is behind the store
    store.commit()
    assert store.counters() == {("a", "Error"): 14}
    store.drop_counters("a")  # a deleted agent's counters go, and a new agent of that name starts at 0
    store.set_counter("a", "Error", 1)
    store.commit()
    assert store.counters() == {("a", "Error"): 1}


def test_a_commit_in_the_pause_after_a_failure_is_deferred_without_an_error(
        tmp_path: Path, holder_factory: Callable[..., Holder], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "RETRY_AFTER", 3600.0)
    path = tmp_path / "state.db"
    store = Store(path)
    holder = holder_factory(path)
    store.set_counter("a", "Error", 1)
    with pytest.raises(sqlite3.OperationalError):
        store.commit()
    store.set_counter("a", "Error", 2)
    assert store.commit() is False  # the loop is not held up by a lock it just found taken
    assert store.counters() == {("a", "Error"): 2}
    holder.release()
    store.close()  # the last commit at exit is not deferred
    again = Store(path)
    try:
        assert again.counters() == {("a", "Error"): 2}
    finally:
        again.close()


def test_a_store_set_aside_as_corrupt_gets_back_the_last_valid_specs_from_their_spare_copies(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = Store(path)
    kept = AgentRow("keeper", "manifests/k.yaml", {"spec": {"command": ["sleep", "9"]}}, "sha256:k", 1000.0)
    store.put_agent(kept)
    store.put_agent(AgentRow("gone", "manifests/g.yaml", {"spec": {}}, "sha256:g", 1.0))
    store.commit()
    store.delete_agent("gone")  # a deleted agent's spare copy goes with it
    store.close()
    assert sorted(p.name for p in (tmp_path / "specs").iterdir()) == ["keeper.json"]
    assert stat.S_IMODE((tmp_path / "specs" / "keeper.json").stat().st_mode) == 0o600
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    path.write_bytes(b"garbage" * 1000)
    again = Store(path)
    try:
        assert again.recovered_from is not None
        assert again.agents() == {"keeper": kept}
    finally:
        again.close()
    healthy = Store(path)  # a healthy store is the record: the copies are not read again
    try:
        assert healthy.pending.empty() and healthy.agents() == {"keeper": kept}
    finally:
        healthy.close()


def test_a_store_from_before_the_spare_copies_gets_them_at_its_next_open(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = Store(path)
    row = AgentRow("old", "manifests/o.yaml", {"spec": {"command": ["x"]}}, "sha256:o", 5.0)
    store.put_agent(row)
    store.close()
    for spare in (tmp_path / "specs").iterdir():
        spare.unlink()
    (tmp_path / "specs").rmdir()  # as an older version left it
    Store(path).close()
    assert [p.name for p in (tmp_path / "specs").iterdir()] == ["old.json"]


def test_a_reader_of_a_store_locked_away_gets_none_not_an_error(
        tmp_path: Path, holder_factory: Callable[..., Holder], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "READ_BUSY_TIMEOUT", 0.3)
    _seeded(tmp_path / "state.db")
    holder = holder_factory(tmp_path / "state.db", readers_too=True)  # shuts out readers too
    assert open_readonly(tmp_path) is None  # `agentctl describe` then shows no events instead of a traceback
    holder.release()
    ro = open_readonly(tmp_path)
    assert ro is not None
    try:
        assert [e.message for e in ro.events("reviewer")] == ["before the lock"]
    finally:
        ro.close()


# -- session ids (session.resume): kept in the record ------------------------------------------
def test_records_from_before_session_ids_load_and_a_session_id_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    old = sqlite3.connect(path)
    old.executescript("CREATE TABLE instances (id TEXT PRIMARY KEY, agent TEXT NOT NULL, data TEXT NOT NULL);")
    raw = json.loads(store_module.record_to_json(FULL))
    for key in ("session_id", "provider_session_id", "session_started", "argv"):  # written before they existed
        raw.pop(key)
    old.execute("INSERT INTO instances VALUES (?, ?, ?)", (FULL.id, FULL.agent, json.dumps(raw)))
    old.commit()
    old.close()
    ro = open_readonly(tmp_path)
    assert ro is not None and [r.id for r in ro.instances()] == [FULL.id], "read-only, before the migration"
    ro.close()
    s = Store(path)
    assert [r.id for r in s.instances()] == [FULL.id] and s.instances()[0].session_id == ""
    s.put_instance(replace(FULL, session_id="3f0f1e1c-1111-4222-8333-444455556666", session_started=True,
                           argv=("claude", "--resume", "3f0f1e1c-1111-4222-8333-444455556666")))
    s.commit()
    s.close()
    again = Store(path)
    rec = again.instances()[0]
    assert (rec.session_id, rec.session_started) == ("3f0f1e1c-1111-4222-8333-444455556666", True)
    assert rec.argv == ("claude", "--resume", "3f0f1e1c-1111-4222-8333-444455556666")
    again.close()
