"""The embedded state store: instance records, last valid specs, restart counters, events.

SQLite in WAL mode under the state dir. The reconciler is the only writer and its memory is
authoritative: writes are buffered here and committed once per loop pass, and a commit that
fails (locked, disk full) keeps them all for the next one, so nothing is lost and no lock ever
stalls the loop. A store locked by another process is waited for at start-up; only a store that
is really corrupt is moved aside. CLI commands open it read-only.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from controller import specmirror
from controller.model import ExitInfo, Handle, InstanceRecord, RunState
from controller.storefaults import Fault, StoreCorrupt, StoreError, classify, describe_holders, space_hint

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
EVENTS_WAITING_KEPT = 20_000  # events buffered while the store refuses writes; beyond it the oldest go
WAIT_ENV = "AGENTCTL_STORE_WAIT_SECONDS"  # how long start-up waits for a store locked by another process
WAIT_DEFAULT = 120.0
WAIT_LOG_EVERY = 3.0
OPEN_BUSY_TIMEOUT = 1.0  # one start-up attempt; the loop around it logs progress between attempts
LOOP_BUSY_TIMEOUT = 0.05  # the loop never blocks longer than this on a lock held by someone else
RETRY_AFTER = 1.0  # after a failed commit, the next attempt waits this long (writes stay buffered)
READ_BUSY_TIMEOUT = 5.0  # a CLI command reading the store while another process locks it
CLOSE_BUSY_TIMEOUT = 10.0  # at exit a lock is waited for longer: what is not written then is lost


def safe_text(text: str) -> str:
    """Text SQLite can store: a file name that is not UTF-8 (surrogate escapes in Python) is
    kept with backslash escapes (`caf\\xe9.yaml`) rather than failing the write."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate outside the escape range: show its code point
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


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


def _row_to_dict(row: AgentRow) -> dict[str, Any]:
    return {"name": row.name, "source": row.source, "manifest": row.manifest, "specHash": row.spec_hash,
            "firstSeen": row.first_seen, "sourceRevision": row.source_revision}


def _row_from_dict(data: dict[str, Any]) -> AgentRow | None:
    try:
        return AgentRow(str(data["name"]), str(data["source"]), data.get("manifest"), data.get("specHash"),
                        float(data["firstSeen"]), data.get("sourceRevision"))
    except (KeyError, TypeError, ValueError):
        return None


@dataclass
class Pending:
    """Writes made in memory and not yet committed; the newest write of a key wins."""

    meta: dict[str, str] = field(default_factory=dict)
    instances: dict[str, tuple[str, str] | None] = field(default_factory=dict)  # id -> (agent, json); None: delete
    agents: dict[str, AgentRow | None] = field(default_factory=dict)
    counters: dict[tuple[str, str], int] = field(default_factory=dict)  # absolute values, never increments
    dropped_counters: set[str] = field(default_factory=set)  # agents whose stored counters go first
    events: list[Event] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.meta or self.instances or self.agents or self.counters or self.dropped_counters
                    or self.events)

    def size(self) -> int:
        return (len(self.meta) + len(self.instances) + len(self.agents) + len(self.counters)
                + len(self.dropped_counters) + len(self.events))


def wait_seconds_from_env() -> float:
    raw = os.environ.get(WAIT_ENV, "")
    try:
        value = float(raw) if raw else WAIT_DEFAULT
    except ValueError:
        log.warning("%s=%r is not a number of seconds: using %gs", WAIT_ENV, raw, WAIT_DEFAULT)
        return WAIT_DEFAULT
    return max(0.0, value)


class Store:
    def __init__(self, path: Path, *, readonly: bool = False, wait_seconds: float | None = None) -> None:
        self.path = path
        self.readonly = readonly
        self.wait_seconds = wait_seconds_from_env() if wait_seconds is None else wait_seconds
        self.recovered_from: str | None = None
        self.pending = Pending()
        self.events_dropped = 0  # buffered events given up while the store refused writes for long
        self._closed = False
        self._retry_at = 0.0
        self._since_prune = 0
        existed = path.exists()
        self.db = self._open()
        if not readonly and (self.recovered_from or not existed):
            self._restore_specs()  # the store was lost: its spare copies of the last valid specs
        elif not readonly and not self.specs_dir.exists():
            self._save_all_specs()  # a store from before the spare copies: make them once

    @classmethod
    def empty(cls) -> Store:
        """A read-only store with nothing in it, in memory (`agentctl plan` before any `run`)."""
        store = cls.__new__(cls)
        store.path, store.readonly, store.recovered_from, store.wait_seconds = Path(":memory:"), True, None, 0.0
        store.pending, store.events_dropped, store._retry_at = Pending(), 0, 0.0
        store._closed, store._since_prune = False, 0
        store.db = sqlite3.connect(":memory:")
        store.db.executescript(SCHEMA)
        return store

    # -- opening --------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        if self.readonly:
            db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=READ_BUSY_TIMEOUT)
            try:
                db.execute("PRAGMA query_only = ON")
                db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()  # readable now, not locked away
            except sqlite3.Error:
                db.close()
                raise
            return db
        try:
            return self._open_waiting()
        except OSError as exc:
            raise StoreError(f"state store {self.path} cannot be opened: {exc.strerror or exc}") from exc
        except sqlite3.Error as exc:
            if classify(exc) != Fault.CORRUPT:
                raise StoreError(f"state store {self.path} cannot be opened: {exc}{space_hint(self.path)}") from exc
            try:
                self._set_aside(exc)
            except OSError as move_exc:
                raise StoreError(f"corrupt state store {self.path} cannot be moved aside: {move_exc}") from exc
        try:
            return self._open_waiting()
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"new state store {self.path} cannot be opened: {exc}") from exc

    def _set_aside(self, exc: sqlite3.Error) -> None:
        """Real damage only (never a lock): keep the file for a post-mortem and start a new one."""
        aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        log.error("state store %s is corrupt (%s); moved aside to %s and starting a new one", self.path, exc, aside)
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                src.rename(Path(str(aside) + suffix))
        self.recovered_from = str(aside)

    def _open_waiting(self) -> sqlite3.Connection:
        """Open for writing; a lock held by another process is waited for, with progress logged,
        up to wait_seconds, then StoreError (exit 2) naming who holds it."""
        started = time.monotonic()
        next_log = started
        while True:
            try:
                return self._open_rw()
            except sqlite3.Error as exc:
                if classify(exc) != Fault.BUSY:
                    raise
                waited = time.monotonic() - started
                if waited >= self.wait_seconds:
                    raise StoreError(
                        f"state store {self.path} is still locked after {waited:.0f}s ({describe_holders(self.path)});"
                        f" end that process or its transaction, or raise {WAIT_ENV}") from exc
                if time.monotonic() >= next_log:
                    log.warning("state store %s is locked (%s): waiting for it, %.0fs of %gs",
                                self.path, describe_holders(self.path), waited, self.wait_seconds)
                    next_log = time.monotonic() + WAIT_LOG_EVERY
                time.sleep(0.1)  # sqlite's busy handler waited already; this only avoids a spin where it does not

    def _open_rw(self) -> sqlite3.Connection:
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
        os.close(fd)
        db = sqlite3.connect(self.path, timeout=OPEN_BUSY_TIMEOUT, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            # take the write lock once now: a lock held elsewhere is waited for here, not in the loop
            db.executescript("BEGIN IMMEDIATE;" + SCHEMA + "COMMIT;")
            check = db.execute("PRAGMA quick_check").fetchone()
            if not check or check[0] != "ok":
                raise StoreCorrupt(f"quick_check: {check[0] if check else 'no answer'}")
            db.execute(f"PRAGMA busy_timeout = {int(LOOP_BUSY_TIMEOUT * 1000)}")
        except BaseException:
            db.close()
            raise
        return db

    # -- committing -------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.readonly:
            self._final_commit()
        self.db.close()

    def _final_commit(self) -> None:
        self._retry_at = 0.0
        try:
            self.db.execute(f"PRAGMA busy_timeout = {int(CLOSE_BUSY_TIMEOUT * 1000)}")
            self.commit()
        except sqlite3.Error as exc:
            log.error("state store %s: %d buffered writes could not be saved at exit: %s",
                      self.path, self.pending.size(), exc)

    def _check_writable(self) -> None:
        if self.readonly:
            raise sqlite3.OperationalError(f"state store {self.path} is open read-only")

    def commit(self) -> bool:
        """Write every buffered change in one transaction. True when all is on disk; False while a
        failed commit waits to be retried. A failure raises and keeps every change buffered."""
        if self.readonly or self.pending.empty():
            return True
        if time.monotonic() < self._retry_at:
            return False
        try:
            self._write(self.pending)
        except sqlite3.Error:
            self._rollback()
            self._retry_at = time.monotonic() + RETRY_AFTER
            raise
        for name, row in self.pending.agents.items():
            specmirror.save(self.specs_dir, name, _row_to_dict(row) if row is not None else None)
        self.pending = Pending()
        self._retry_at = 0.0
        return True

    @property
    def specs_dir(self) -> Path:
        return self.path.parent / "specs"

    def _save_all_specs(self) -> None:
        for name, row in self.agents().items():
            specmirror.save(self.specs_dir, name, _row_to_dict(row))

    def _restore_specs(self) -> None:
        rows = [_row_from_dict(d) for d in specmirror.load(self.specs_dir)]
        for row in rows:
            if row is not None:
                self.pending.agents[row.name] = row
        if self.pending.agents:
            log.warning("state store %s is new: restored the last valid specs of %d agents from %s",
                        self.path, len(self.pending.agents), self.specs_dir)

    def _rollback(self) -> None:
        if not self.db.in_transaction:
            return  # sqlite rolled back by itself (disk full, I/O error)
        try:
            self.db.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.warning("state store %s: rollback failed: %s", self.path, exc)

    def _write(self, p: Pending) -> None:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", list(p.meta.items()))
        for iid, inst in p.instances.items():
            if inst is None:
                db.execute("DELETE FROM instances WHERE id = ?", (iid,))
            else:
                db.execute("INSERT OR REPLACE INTO instances (id, agent, data) VALUES (?, ?, ?)", (iid, *inst))
        for name, row in p.agents.items():
            if row is None:
                db.execute("DELETE FROM agents WHERE name = ?", (name,))
            else:
                db.execute(
                    "INSERT OR REPLACE INTO agents (name, source, manifest, spec_hash, first_seen, source_revision)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (row.name, row.source, json.dumps(row.manifest) if row.manifest is not None else None,
                     row.spec_hash, row.first_seen, row.source_revision))
        db.executemany("DELETE FROM counters WHERE agent = ?", [(a,) for a in sorted(p.dropped_counters)])
        # a counter never goes down: the stored value may be ahead of a memory that lost a commit
        db.executemany(
            "INSERT INTO counters (agent, reason, value) VALUES (?, ?, ?)"
            " ON CONFLICT (agent, reason) DO UPDATE SET value = MAX(value, excluded.value)",
            [(a, r, v) for (a, r), v in p.counters.items()])
        self._write_events(p.events)
        db.execute("COMMIT")

    def _write_events(self, events: list[Event]) -> None:
        self.db.executemany(
            "INSERT INTO events (at, agent, instance, type, reason, message) VALUES (?, ?, ?, ?, ?, ?)",
            [(e.at, e.agent, e.instance, e.type, e.reason, e.message) for e in events])
        self._since_prune += len(events)
        if self._since_prune >= 1000:
            self._since_prune = 0
            self.db.execute("DELETE FROM events WHERE seq <= (SELECT MAX(seq) FROM events) - ?", (EVENTS_KEPT,))

    # -- meta ---------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        if key in self.pending.meta:
            return self.pending.meta[key]
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self._check_writable()
        self.pending.meta[key] = value

    # -- instances ----------------------------------------------------------
    def instances(self) -> list[InstanceRecord]:
        raw_by_id: dict[str, str] = dict(self.db.execute("SELECT id, data FROM instances"))
        for iid, inst in self.pending.instances.items():
            if inst is None:
                raw_by_id.pop(iid, None)
            else:
                raw_by_id[iid] = inst[1]
        out = []
        for iid in sorted(raw_by_id):
            try:
                out.append(record_from_json(raw_by_id[iid]))
            except (ValueError, TypeError, KeyError) as exc:
                log.error("skipping unreadable instance record: %s", exc)
        return out

    def put_instance(self, rec: InstanceRecord) -> None:
        self._check_writable()
        self.pending.instances[rec.id] = (rec.agent, record_to_json(rec))

    def delete_instance(self, instance_id: str) -> None:
        self._check_writable()
        self.pending.instances[instance_id] = None

    # -- agents -------------------------------------------------------------
    def agents(self) -> dict[str, AgentRow]:
        rows = self.db.execute("SELECT name, source, manifest, spec_hash, first_seen, source_revision FROM agents")
        out = {r[0]: AgentRow(r[0], r[1], json.loads(r[2]) if r[2] else None, r[3], r[4], r[5]) for r in rows}
        for name, row in self.pending.agents.items():
            if row is None:
                out.pop(name, None)
            else:
                out[name] = row
        return out

    def put_agent(self, row: AgentRow) -> None:
        self._check_writable()
        self.pending.agents[row.name] = replace(row, source=safe_text(row.source))  # any file name

    def delete_agent(self, name: str) -> None:
        self._check_writable()
        self.pending.agents[name] = None

    # -- counters -----------------------------------------------------------
    def counters(self) -> dict[tuple[str, str], int]:
        out = {(a, r): v for a, r, v in self.db.execute("SELECT agent, reason, value FROM counters")
               if a not in self.pending.dropped_counters}
        for key, value in self.pending.counters.items():
            out[key] = max(out.get(key, 0), value)
        return out

    def set_counter(self, agent: str, reason: str, value: int) -> None:
        """The caller's count is authoritative; until a commit lands, the newest value waits here."""
        self._check_writable()
        key = (agent, reason)
        self.pending.counters[key] = max(self.pending.counters.get(key, 0), value)

    def bump_counter(self, agent: str, reason: str) -> None:
        self.set_counter(agent, reason, self.counters().get((agent, reason), 0) + 1)

    def drop_counters(self, agent: str) -> None:
        self._check_writable()
        self.pending.dropped_counters.add(agent)
        for key in [k for k in self.pending.counters if k[0] == agent]:
            del self.pending.counters[key]

    # -- events -------------------------------------------------------------
    def add_event(self, ev: Event) -> None:
        self._check_writable()
        self.pending.events.append(replace(ev, reason=safe_text(ev.reason), message=safe_text(ev.message)))
        if len(self.pending.events) > EVENTS_WAITING_KEPT:
            # the store has refused writes for a long time: keep the newest, as pruning would
            if not self.events_dropped:
                log.error("state store %s: over %d events waiting to be written; dropping the oldest",
                          self.path, EVENTS_WAITING_KEPT)
            del self.pending.events[0]
            self.events_dropped += 1

    def events(self, agent: str, limit: int = 20) -> list[Event]:
        rows = self.db.execute(
            "SELECT at, agent, instance, type, reason, message FROM events WHERE agent = ?"
            " ORDER BY seq DESC LIMIT ?",
            (agent, limit),
        ).fetchall()
        stored = [Event(*r) for r in reversed(rows)]
        waiting = [e for e in self.pending.events if e.agent == agent]
        return (stored + waiting)[-limit:] if limit > 0 else []


def open_readonly(state_dir: Path) -> Store | None:
    """For CLI commands: None when there is no store, or it cannot be read now (locked by a
    process in exclusive locking mode, damaged); they then show what the status files say."""
    path = state_dir / "state.db"
    if not path.exists():
        return None
    try:
        return Store(path, readonly=True)
    except sqlite3.Error:
        return None

