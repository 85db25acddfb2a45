"""The embedded state store: instance records, last valid specs, restart counters, events.

SQLite in WAL mode under the state dir; one small write per change. The reconciler is the
only writer; CLI commands open it read-only. A store that cannot be opened is moved aside
and a new one is started (the reconciler then rebuilds from live processes).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from controller.model import ExitInfo, Handle, InstanceRecord, RunState

log = logging.getLogger("agentctl.store")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS instances (id TEXT PRIMARY KEY, agent TEXT NOT NULL, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS instances_agent ON instances (agent);
CREATE TABLE IF NOT EXISTS agents (
    name TEXT PRIMARY KEY, source TEXT NOT NULL, manifest TEXT, spec_hash TEXT,
    first_seen REAL NOT NULL, source_revision TEXT
);
CREATE TABLE IF NOT EXISTS counters (
    agent TEXT NOT NULL, reason TEXT NOT NULL, value INTEGER NOT NULL, PRIMARY KEY (agent, reason)
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, agent TEXT NOT NULL,
    instance TEXT, type TEXT NOT NULL, reason TEXT NOT NULL, message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_agent ON events (agent, seq);
"""
EVENTS_KEPT = 20_000
# columns added after a store could already exist: (table, column, type), added by _migrate
ADDED_COLUMNS = (("instances", "session_id", "TEXT"),)  # presets: session.resume


def _migrate(db: sqlite3.Connection) -> None:
    """Bring an older store up to the current schema in place; nothing in it is lost."""
    for table, column, kind in ADDED_COLUMNS:
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")


def record_to_json(rec: InstanceRecord) -> str:
    data = dict(rec.__dict__)
    data["handle"] = dict(rec.handle.__dict__) if rec.handle is not None else None
    data["last_exit"] = dict(rec.last_exit.__dict__) if rec.last_exit is not None else None
    return json.dumps(data, separators=(",", ":"))


def record_from_json(raw: str) -> InstanceRecord:
    data: dict[str, Any] = json.loads(raw)
    data["state"] = RunState(data["state"])
    data["handle"] = Handle(**data["handle"]) if data.get("handle") else None
    if data.get("last_exit"):
        exit_data = data["last_exit"]
        exit_data["log_tail"] = tuple(exit_data.get("log_tail", ()))
        data["last_exit"] = ExitInfo(**exit_data)
    data["restart_times"] = tuple(data.get("restart_times", ()))
    data["argv"] = tuple(data.get("argv", ()))
    return InstanceRecord(**data)


@dataclass(frozen=True)
class AgentRow:
    name: str
    source: str
    manifest: dict[str, Any] | None
    spec_hash: str | None
    first_seen: float
    source_revision: str | None = None


@dataclass(frozen=True)
class Event:
    at: float
    agent: str
    instance: str | None
    type: str
    reason: str
    message: str


class Store:
    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self.recovered_from: str | None = None
        self._closed = False
        self.db = self._open()
        self._since_prune = 0

    def _open(self) -> sqlite3.Connection:
        if self.readonly:
            db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)
            db.execute("PRAGMA query_only = ON")
            return db
        try:
            return self._open_rw()
        except sqlite3.DatabaseError as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.error("state store %s is unusable (%s); moved aside to %s and starting a new one", self.path, exc, aside)
            for suffix in ("", "-wal", "-shm"):
                src = Path(str(self.path) + suffix)
                if src.exists():
                    src.rename(Path(str(aside) + suffix))
            self.recovered_from = str(aside)
            return self._open_rw()

    def _open_rw(self) -> sqlite3.Connection:
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
        os.close(fd)
        db = sqlite3.connect(self.path, timeout=5, isolation_level=None)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.executescript(SCHEMA)
        _migrate(db)
        check = db.execute("PRAGMA quick_check").fetchone()
        if not check or check[0] != "ok":
            db.close()
            raise sqlite3.DatabaseError(f"quick_check: {check[0] if check else 'no answer'}")
        return db

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.readonly:
            self.commit()
        self.db.close()

    def _begin(self) -> None:
        if not self.db.in_transaction:
            self.db.execute("BEGIN")

    def commit(self) -> None:
        """Writes are grouped: the reconciler commits once per loop iteration, not per statement."""
        if self.db.in_transaction:
            self.db.execute("COMMIT")

    # -- meta ---------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self._begin()
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # -- instances ----------------------------------------------------------
    def instances(self) -> list[InstanceRecord]:
        out = []
        # a read-only open of a store not yet migrated has no session_id column
        have = {row[1] for row in self.db.execute("PRAGMA table_info(instances)")}
        column = "session_id" if "session_id" in have else "NULL"
        for raw, session_id in self.db.execute(f"SELECT data, {column} FROM instances ORDER BY id"):
            try:
                rec = record_from_json(raw)
                # the column is the session id of record (a store written before it existed has NULL)
                out.append(replace(rec, session_id=session_id) if session_id is not None else rec)
            except (ValueError, TypeError, KeyError) as exc:
                log.error("skipping unreadable instance record: %s", exc)
        return out

    def put_instance(self, rec: InstanceRecord) -> None:
        self._begin()
        self.db.execute(
            "INSERT OR REPLACE INTO instances (id, agent, data, session_id) VALUES (?, ?, ?, ?)",
            (rec.id, rec.agent, record_to_json(rec), rec.session_id or None),
        )

    def delete_instance(self, instance_id: str) -> None:
        self._begin()
        self.db.execute("DELETE FROM instances WHERE id = ?", (instance_id,))

    # -- agents -------------------------------------------------------------
    def agents(self) -> dict[str, AgentRow]:
        rows = self.db.execute("SELECT name, source, manifest, spec_hash, first_seen, source_revision FROM agents")
        return {r[0]: AgentRow(r[0], r[1], json.loads(r[2]) if r[2] else None, r[3], r[4], r[5]) for r in rows}

    def put_agent(self, row: AgentRow) -> None:
        self._begin()
        self.db.execute(
            "INSERT OR REPLACE INTO agents (name, source, manifest, spec_hash, first_seen, source_revision)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (row.name, row.source, json.dumps(row.manifest) if row.manifest is not None else None,
             row.spec_hash, row.first_seen, row.source_revision),
        )

    def delete_agent(self, name: str) -> None:
        self._begin()
        self.db.execute("DELETE FROM agents WHERE name = ?", (name,))

    # -- counters -----------------------------------------------------------
    def counters(self) -> dict[tuple[str, str], int]:
        return {(a, r): v for a, r, v in self.db.execute("SELECT agent, reason, value FROM counters")}

    def bump_counter(self, agent: str, reason: str) -> None:
        self._begin()
        self.db.execute(
            "INSERT INTO counters (agent, reason, value) VALUES (?, ?, 1)"
            " ON CONFLICT (agent, reason) DO UPDATE SET value = value + 1",
            (agent, reason),
        )

    def drop_counters(self, agent: str) -> None:
        self._begin()
        self.db.execute("DELETE FROM counters WHERE agent = ?", (agent,))

    # -- events -------------------------------------------------------------
    def add_event(self, ev: Event) -> None:
        self._begin()
        self.db.execute(
            "INSERT INTO events (at, agent, instance, type, reason, message) VALUES (?, ?, ?, ?, ?, ?)",
            (ev.at, ev.agent, ev.instance, ev.type, ev.reason, ev.message),
        )
        self._since_prune += 1
        if self._since_prune >= 1000:
            self._since_prune = 0
            self.db.execute(
                "DELETE FROM events WHERE seq <= (SELECT MAX(seq) FROM events) - ?", (EVENTS_KEPT,)
            )

    def events(self, agent: str, limit: int = 20) -> list[Event]:
        rows = self.db.execute(
            "SELECT at, agent, instance, type, reason, message FROM events WHERE agent = ?"
            " ORDER BY seq DESC LIMIT ?",
            (agent, limit),
        ).fetchall()
        return [Event(*r) for r in reversed(rows)]


def open_readonly(state_dir: Path) -> Store | None:
    path = state_dir / "state.db"
    if not path.exists():
        return None
    try:
        return Store(path, readonly=True)
    except sqlite3.Error:
        return None

