"""Status documents of CONTRACT §4: rendering (pure) and atomic writing (only when changed).

The reconciler calls `render` after each reconcile of an agent and `StatusWriter.write`
with the result; `get`/`describe` and the HTTP API read what was written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from controller.activity import Observation, status_fields
from controller.model import InstanceRecord, RunState

if TYPE_CHECKING:
    from controller.planner import PhaseView

log = logging.getLogger("agentctl.status")


class _Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # type: ignore[misc]  # libyaml when there
    """Phases and reasons are StrEnums: written as the plain strings users see."""


_Dumper.add_multi_representer(str, lambda dumper, value: dumper.represent_str(str(value)))
_Dumper.add_multi_representer(int, lambda dumper, value: dumper.represent_int(int(value)))


_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def iso(wall: float | None) -> str | None:
    if wall is None:
        return None
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Clock:
    wall: float
    mono: float

    def to_wall(self, mono: float) -> float:
        return self.wall + (mono - self.mono)


def _exit(rec: InstanceRecord) -> dict[str, Any] | None:
    e = rec.last_exit
    if e is None:
        return None
    out: dict[str, Any] = {
        "exitCode": e.exit_code,
        "signal": e.signal,
        "at": iso(e.at),
        "runtimeSeconds": round(e.runtime_seconds, 3),
        "reason": e.reason,
        "logTail": list(e.log_tail),
    }
    if e.message:
        out["message"] = e.message
    return out


def tracking(rec: InstanceRecord) -> str:
    """`cgroup` when the instance has its own cgroup, else `process-group` (group + marker env)."""
    return "cgroup" if rec.handle is not None and rec.handle.cgroup else "process-group"


def _instance(rec: InstanceRecord, clock: Clock, obs: Observation | None = None) -> dict[str, Any]:

    alive = rec.state != RunState.EXITED and rec.handle is not None
    out: dict[str, Any] = {
        "id": rec.id,
        "pid": rec.handle.pid if alive and rec.handle else None,
        "state": rec.state.value,
        "startedAt": iso(rec.started_at) if alive else None,
        "restarts": rec.restarts,
        "lastExit": _exit(rec),
        # adapters: how the instance's processes are found and stopped (CONTRACT §11)
        "tracking": tracking(rec) if alive else None,
    }
    if rec.state == RunState.EXITED and rec.next_start is not None and rec.terminal is None:
        out["nextAttemptAt"] = iso(clock.to_wall(rec.next_start))
    if rec.state == RunState.STOPPING:
        out["stopReason"] = rec.stop_reason
    if alive and obs is not None and obs.run == rec.started_mono:  # activity: CONTRACT §9
        out.update(status_fields(obs, iso))
    if rec.session_id:  # presets: session.resume (CONTRACT §9)
        out["sessionId"] = rec.session_id
    return out


@dataclass
class StatusInput:
    name: str
    source: str
    phase: PhaseView
    spec_hash: str | None
    instances: list[InstanceRecord]
    restarts: int
    valid: bool
    errors: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    supervisor: str = "process"
    source_revision: str | None = None
    source_ready: tuple[bool, str] | None = None  # (ok, message); None: no SourceReady condition
    source_reason: str | None = None  # why it is not ready; default: a Git fetch failed
    created_at: float | None = None
    activity: Mapping[str, Observation] = field(default_factory=dict)  # activity: instance id -> observation
    invalid_reason: str = "InvalidManifest"  # opscli: or DuplicateName (another file declares the name)
    running_spec: dict[str, Any] | None = None  # opscli: opsview.spec_summary of the spec the instances run


def _condition(kind: str, ok: bool, reason: str, message: str, now: str,
               previous: dict[str, dict[str, Any]]) -> dict[str, Any]:
    status = "True" if ok else "False"
    before = previous.get(kind)
    since = before["lastTransitionTime"] if before and before.get("status") == status else now
    return {"type": kind, "status": status, "reason": reason, "message": message, "lastTransitionTime": since}


def render(inp: StatusInput, clock: Clock, previous: dict[str, Any] | None) -> dict[str, Any]:
    now = iso(clock.wall) or ""
    prev_conditions = {c["type"]: c for c in (previous or {}).get("conditions", [])}
    pv = inp.phase
    conditions = [
        _condition("Valid", inp.valid, "Parsed" if inp.valid else inp.invalid_reason,
                   "; ".join(inp.errors), now, prev_conditions),
        _condition("Ready", pv.ready >= pv.desired and pv.desired > 0 and pv.phase == "Running",
                   pv.reason, pv.message, now, prev_conditions),
    ]
    if inp.source_ready is not None:
        ok, message = inp.source_ready
        reason = "Synced" if ok else inp.source_reason or "FetchFailed"
        conditions.append(_condition("SourceReady", ok, reason, message, now, prev_conditions))
    doc: dict[str, Any] = {
        "name": inp.name,
        "source": inp.source,
        "phase": pv.phase.value,
        "specHash": inp.spec_hash,
        "supervisor": inp.supervisor,
        "labels": inp.labels,
        "replicas": {"desired": pv.desired, "ready": pv.ready},
        "restarts": inp.restarts,
        "instances": [_instance(r, clock, inp.activity.get(r.id)) for r in sorted(inp.instances, key=lambda r: r.index)],
        "conditions": conditions,
        "lastError": "; ".join(inp.errors) if inp.errors else (pv.message or None) if pv.phase in ("Failed", "Pending") else None,
        "createdAt": iso(inp.created_at),
        "updatedAt": now,
    }
    if inp.source_revision is not None:
        doc["sourceRevision"] = inp.source_revision
    if inp.running_spec is not None:
        doc["runningSpec"] = inp.running_spec  # opscli: what `describe` opens with
    return doc


def _escaped(value: Any) -> Any:
    """Every string with what UTF-8 cannot hold (a non-UTF-8 file name) as backslash escapes."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_escaped(k): _escaped(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escaped(v) for v in value]
    return value


def _dump(doc: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The YAML text, and the document it holds (escaped, in the rare case that was needed)."""
    try:
        return str(yaml.dump(doc, Dumper=_Dumper, sort_keys=False, allow_unicode=True)), doc
    except UnicodeEncodeError:  # rare: escape only then, not on every write
        escaped = _escaped(doc)
        return str(yaml.dump(escaped, Dumper=_Dumper, sort_keys=False, allow_unicode=True)), escaped


def mirror_dir(directory: Path) -> Path:
    """<state>/cache/status: each status file also as the JSON `get -o json` prints, so that `get`
    need not parse a thousand YAML files (most of its time at 1000 agents). Derived and disposable:
    a mirror counts only while it names the exact bytes of its YAML file."""
    return directory.parent / "cache" / "status"


def _digest(raw: bytes) -> str:
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def _mirror_text(doc: dict[str, Any], yaml_text: str) -> str | None:
    """The digest of the YAML file's bytes, a newline, then json.dumps(doc, indent=2); None when
    JSON would not read back as the same document (then readers parse the YAML)."""
    try:
        text = json.dumps(doc, indent=2)
        if json.loads(text) != doc:
            return None
    except (TypeError, ValueError):
        return None
    return f"{_digest(yaml_text.encode('utf-8', 'backslashreplace'))}\n{text}"


def _same(a: dict[str, Any] | None, b: dict[str, Any]) -> bool:
    if a is None:
        return False
    return {k: v for k, v in a.items() if k != "updatedAt"} == {k: v for k, v in b.items() if k != "updatedAt"}


def atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # a name that slipped through unescaped is written escaped rather than failing the write
        with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class StatusWriter:
    """One YAML file per agent under <state-dir>/status, rewritten only when it changed.

    The rendered documents are kept in memory at once (the HTTP API serves them); the files
    are written by a background thread that coalesces bursts, so file creation and renames
    never sit on the reconcile loop. `flush()` waits until disk has caught up.
    """

    COALESCE_SECONDS = 0.1  # also keeps YAML dumping out of the loop thread's way during a burst

    def __init__(self, directory: Path, *, mirror: bool = False) -> None:
        self.dir = directory
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.mirror: Path | None = None  # the controller's writer also keeps the JSON mirror (mirror_dir)
        if mirror:
            self.mirror = mirror_dir(directory)
            for private in (self.mirror.parent, self.mirror):  # each one 0700, not only the last
                private.mkdir(mode=0o700, exist_ok=True)
        self.docs: dict[str, dict[str, Any]] = {}
        self.failures = 0  # writes that failed since start (disk full, read-only...)
        self.last_error: str | None = None
        self._pending: dict[str, dict[str, Any] | None] = {}  # None: remove the file
        self._cond = threading.Condition()
        self._busy = False
        self._failed_batches = 0
        self._thread: threading.Thread | None = None

    def previous(self, name: str) -> dict[str, Any] | None:
        if name not in self.docs:
            loaded = read_status(self.dir, name)
            if loaded is not None:
                self.docs[name] = loaded
        return self.docs.get(name)

    def write(self, name: str, doc: dict[str, Any]) -> bool:
        from controller.manifests import NAME_RE  # here: `get` reads statuses without importing pydantic

        if not re.match(NAME_RE, name):
            raise ValueError(f"refusing to write a status for the invalid agent name {name!r}")
        if _same(self.docs.get(name), doc):
            return False
        self.docs[name] = doc
        self._queue(name, doc)
        return True

    def remove(self, name: str) -> None:
        self.docs.pop(name, None)
        self._queue(name, None)

    def _queue(self, name: str, doc: dict[str, Any] | None) -> None:
        with self._cond:
            self._pending[name] = doc
            if self._thread is None or not self._thread.is_alive():
                if self._thread is not None:  # it cannot die of a write (see _run); say so if it did anyway
                    log.error("status writer thread was gone: started again")
                self._busy = False
                self._thread = threading.Thread(target=self._run, name="agentctl-status", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until what was queued is on disk, or its write has failed (and is queued again)."""
        with self._cond:
            start = self._failed_batches
            self._cond.wait_for(lambda: (not self._pending and not self._busy) or self._failed_batches > start, timeout)

    def _run(self) -> None:
        """Never returns: a batch that raises is logged, counted and retried, so status files
        (and /readyz, which reports last_error) never go stale in silence (CONTRACT §11)."""
        while True:
            try:
                self._one_batch()
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any one failure
                with self._cond:
                    self._busy = False
                    self.failures += 1
                    self.last_error = f"status writer failed: {exc!r}"
                    self._cond.notify_all()
                log.error("%s; retrying in 1s", self.last_error)
                time.sleep(1.0)

    def _one_batch(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: bool(self._pending))
        time.sleep(self.COALESCE_SECONDS)  # let a burst of changes collapse into one write each
        with self._cond:
            batch, self._pending, self._busy = self._pending, {}, True
        failed = [name for name, doc in batch.items() if not self._write_now(name, doc)]
        with self._cond:
            for name in failed:
                self._pending.setdefault(name, batch[name])  # retried with the next batch
            self._busy = False
            self._failed_batches += bool(failed)
            self._cond.notify_all()
        if failed:
            time.sleep(1.0)  # disk full or read-only: retry once a second, not in a spin

    def _write_now(self, name: str, doc: dict[str, Any] | None) -> bool:
        path = self.dir / f"{name}.yaml"
        try:
            if doc is None:
                path.unlink(missing_ok=True)
                self._mirror(name, None)
            else:
                text, dumped = _dump(doc)
                atomic_write(path, text)
                self._mirror(name, _mirror_text(dumped, text))  # after the YAML: readers check its digest
        except (OSError, ValueError, yaml.YAMLError) as exc:  # ValueError: UnicodeEncodeError too
            self.failures += 1
            message = f"cannot write status of {name}: {exc}"
            if message != self.last_error:
                log.error("%s", message)
            self.last_error = message
            return False
        self.last_error = None
        return True

    def _mirror(self, name: str, text: str | None) -> None:
        if self.mirror is None:
            return
        path = self.mirror / f"{name}.json"
        if text is None:
            path.unlink(missing_ok=True)
        else:
            atomic_write(path, text)

    def names_on_disk(self) -> list[str]:
        return sorted(p.stem for p in self.dir.glob("*.yaml"))


def read_status(directory: Path, name: str) -> dict[str, Any] | None:
    try:
        data = yaml.load((directory / f"{name}.yaml").read_text(encoding="utf-8"), Loader=_Loader)
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def _parse(raw: bytes) -> dict[str, Any] | None:
    """read_status of bytes already read."""
    try:
        data = yaml.load(raw.decode("utf-8"), Loader=_Loader)
    except (UnicodeDecodeError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def _mirrored(path: Path, raw: bytes) -> str | None:
    """The mirror's JSON if it mirrors exactly these YAML bytes."""
    try:
        digest, _, text = path.read_text(encoding="utf-8").partition("\n")
    except (OSError, UnicodeDecodeError):
        return None
    return text if text and digest == _digest(raw) else None


def read_all_json(directory: Path) -> list[tuple[dict[str, Any], str | None]]:
    """read_all, each document with its json.dumps(doc, indent=2) when the writer's mirror holds it
    for the file's current bytes (else None: the YAML was parsed, as read_all does)."""
    mirror = mirror_dir(directory)
    out: list[tuple[dict[str, Any], str | None]] = []
    for path in sorted(directory.glob("*.yaml")):
        try:
            raw = path.read_bytes()
        except OSError:
            continue
        text = _mirrored(mirror / f"{path.stem}.json", raw)
        if text is not None:
            try:
                out.append((json.loads(text), text))
                continue
            except ValueError:
                pass
        doc = _parse(raw)
        if doc is not None:
            out.append((doc, None))
    return out


def items_json(texts: list[str]) -> str:
    """json.dumps({"items": docs}, indent=2) from each document's json.dumps(doc, indent=2): nesting
    indents every line after a document's first by four more spaces, and no JSON string holds a
    raw newline."""
    if not texts:
        return '{\n  "items": []\n}'
    return '{\n  "items": [\n    ' + ",\n    ".join(t.replace("\n", "\n    ") for t in texts) + "\n  ]\n}"


def read_all(directory: Path) -> list[dict[str, Any]]:
    docs = []
    for path in sorted(directory.glob("*.yaml")):
        doc = read_status(directory, path.stem)
        if doc is not None:
            docs.append(doc)
    return docs
