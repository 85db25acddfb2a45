"""The SQLite state store, on a real database file under tmp_path."""

from __future__ import annotations

import sqlite3
import stat
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from controller import store as store_module
from controller.model import ExitInfo, ExitReason, Handle, InstanceRecord, RunState
from controller.store import AgentRow, Event, Store, open_readonly


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


# -- session ids (session.resume): a column added by migration ------------------------------
def test_a_store_from_before_session_ids_is_migrated_in_place_and_keeps_its_records(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    old = sqlite3.connect(path)
    old.executescript("CREATE TABLE instances (id TEXT PRIMARY KEY, agent TEXT NOT NULL, data TEXT NOT NULL);")
    old.execute("INSERT INTO instances VALUES (?, ?, ?)", (FULL.id, FULL.agent, store_module.record_to_json(FULL)))
    old.commit()
    old.close()
    ro = open_readonly(tmp_path)
    assert ro is not None and [r.id for r in ro.instances()] == [FULL.id], "read-only, before the migration"
    ro.close()
    s = Store(path)
    assert [r.id for r in s.instances()] == [FULL.id] and s.instances()[0].session_id == ""
    s.put_instance(replace(FULL, session_id="3f0f1e1c-1111-4222-8333-444455556666", session_started=True,
                           argv=("claude", "--resume", "3f0f1e1c-1111-4222-8333-444455556666")))
    s.close()
    again = Store(path)
    rec = again.instances()[0]
    assert (rec.session_id, rec.session_started) == ("3f0f1e1c-1111-4222-8333-444455556666", True)
    assert rec.argv == ("claude", "--resume", "3f0f1e1c-1111-4222-8333-444455556666")
    column = again.db.execute("SELECT session_id FROM instances WHERE id = ?", (FULL.id,)).fetchone()
    assert column == ("3f0f1e1c-1111-4222-8333-444455556666",)
    again.close()
