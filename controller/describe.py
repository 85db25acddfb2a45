"""`agentctl describe NAME`: a status document and its events rendered for people.

Entry-layer helper; reads the status file, the store (read-only) and the instance logs.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from controller import redact
from controller.store import Store, open_readonly


def _kv(label: str, value: object) -> str:
    return f"{label + ':':<16}{value}\n"


def _exit(e: dict[str, Any], secrets: tuple[str, ...] = ()) -> str:
    how = f"exit code {e['exitCode']}" if e.get("exitCode") is not None else (
        f"signal {e['signal']}" if e.get("signal") else "exit code unknown")
    out = f"    Last exit:  {e.get('reason')} ({how}) at {e.get('at')} after {e.get('runtimeSeconds')}s\n"
    if e.get("message"):
        out += f"    Message:    {e['message']}\n"
    tail = e.get("logTail") or []
    if tail:
        # adapters: env values never shown, also in a tail recorded before redaction existed
        tail = redact.redact_lines((str(line) for line in tail), secrets)
        out += "    Log tail:\n" + "".join(f"      | {line}\n" for line in tail)
    return out


def _secrets(store: Store, name: str) -> tuple[str, ...]:
    """Env values of the agent's stored spec (envFile values were redacted when the tail was recorded)."""
    row = store.agents().get(name)
    return redact.manifest_secrets(row.manifest if row is not None else None)


def describe(doc: dict[str, Any], state_dir: Path) -> str:
    out = _kv("Name", doc.get("name"))
    out += _kv("Source", doc.get("source"))
    if doc.get("sourceRevision"):
        out += _kv("Revision", doc["sourceRevision"])
    out += _kv("Labels", ", ".join(f"{k}={v}" for k, v in (doc.get("labels") or {}).items()) or "<none>")
    out += _kv("Supervisor", doc.get("supervisor"))
    out += _kv("Phase", doc.get("phase"))
    rep = doc.get("replicas") or {}
    out += _kv("Replicas", f"{rep.get('ready', 0)} ready / {rep.get('desired', 0)} desired")
    out += _kv("Restarts", doc.get("restarts", 0))
    out += _kv("Spec hash", doc.get("specHash"))
    if doc.get("lastError"):
        out += _kv("Last error", doc["lastError"])
    out += "Conditions:\n"
    for c in doc.get("conditions") or []:
        msg = f"  {c.get('message')}" if c.get("message") else ""
        out += f"  {c['type']:<12} {c['status']:<6} {c.get('reason', '')}{msg}  (since {c.get('lastTransitionTime')})\n"
    out += "Instances:\n"
    store = open_readonly(state_dir)
    secrets = _secrets(store, doc["name"]) if store else ()
    for inst in doc.get("instances") or []:
        out += f"  {inst['id']}: {inst.get('state')} pid {inst.get('pid') or '-'}"
        out += f" started {inst.get('startedAt') or '-'} restarts {inst.get('restarts', 0)}\n"
        if inst.get("tracking"):  # adapters: cgroup or process-group
            out += f"    Tracking:   {inst['tracking']}\n"
        if inst.get("nextAttemptAt"):
            out += f"    Next attempt: {inst['nextAttemptAt']}\n"
        if inst.get("lastExit"):
            out += _exit(inst["lastExit"], secrets)
    out += "Events:\n"
    events = store.events(doc["name"], 20) if store else []
    if not events:
        out += "  <none>\n"
    for ev in events:
        when = datetime.fromtimestamp(ev.at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        out += f"  {when}  {ev.type:<16} {ev.instance or '-':<20} {ev.reason:<20} {ev.message}\n"
    if store:
        store.close()
    return out
