"""`agentctl describe NAME`: a status document and its events rendered for people.

Entry-layer helper; reads the status file, the store (read-only) and the instance logs.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from controller import opsview, redact
from controller.providers import display_argv
from controller.store import Store, open_readonly


def _kv(label: str, value: object) -> str:
    return f"{label + ':':<16}{value}\n"


def _exit(e: dict[str, Any], secrets: tuple[str, ...] = ()) -> str:
    how = opsview.exit_how(e.get("exitCode"), e.get("signal"))
    out = f"    Last exit:  {e.get('reason')} ({how}) at {e.get('at')} after {e.get('runtimeSeconds')}s\n"
    if e.get("message"):
        out += f"    Message:    {e['message']}\n"
    tail = e.get("logTail") or []
    if tail:
        # adapters: env values never shown, also in a tail recorded before redaction existed
        tail = redact.redact_lines((str(line) for line in tail), secrets)
        out += "    Log tail:\n" + "".join(f"      | {line}\n" for line in tail)
    return out


def _spec(doc: dict[str, Any]) -> str:
    """The spec the instances run; while the manifest on disk is invalid, that is the last valid one."""
    spec = doc.get("runningSpec")
    valid: dict[str, Any] = next((c for c in doc.get("conditions") or [] if c.get("type") == "Valid"), {})
    broken = valid.get("status") == "False"
    if spec is None and doc.get("phase") != "Invalid":
        return "Spec:           <not recorded: this status was written by an older controller>\n"
    if spec is None:
        out = "Spec:           <none: the manifest has never been valid>\n"
        return out + (_kv("  Error", valid.get("message")) if broken else "")
    out = "Spec (last valid; the manifest on disk is not applied):\n" if broken else "Spec:\n"
    if broken:
        out += _kv("  Error", f"{valid.get('reason')}: {valid.get('message')}")
    out += _kv("  Argv", json.dumps(spec.get("argv") or []))  # exact, one line (a -c script keeps its \\n)
    out += _kv("  Cwd", spec.get("cwd") or "<base dir>")
    out += _kv("  Supervisor", spec.get("supervisor"))
    out += _kv("  Replicas", spec.get("replicas"))
    out += _kv("  Restart", spec.get("restartPolicy"))
    for label, key in (("Backoff", "backoff"), ("MaxRestarts", "maxRestarts"), ("Liveness", "liveness"),
                       ("Resources", "resources")):
        out += _kv(f"  {label}", _inline(spec.get(key)))
    out += _kv("  Env keys", ", ".join(spec.get("envKeys") or []) or "<none>")
    return out


def _inline(value: object) -> str:
    if value is None or value == {}:
        return "<none>"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_inline(v)}" for k, v in value.items())
    return str(value)


def _commands(state_dir: Path, name: str) -> dict[str, tuple[str, ...]]:
    """instance id -> the argv its current (or last) run executed, as recorded at start."""
    store = open_readonly(state_dir)
    if store is None:
        return {}
    try:
        return {r.id: r.argv for r in store.instances() if r.agent == name and r.argv}
    finally:
        store.close()


def _secrets(store: Store, name: str) -> tuple[str, ...]:
    """Env values of the agent's stored spec (envFile values were redacted when the tail was recorded)."""
    row = store.agents().get(name)
    return redact.manifest_secrets(row.manifest if row is not None else None)


def describe(doc: dict[str, Any], state_dir: Path) -> str:
    commands = _commands(state_dir, doc["name"])
    out = _kv("Name", doc.get("name"))
    out += _spec(doc)
    out += _kv("Source", doc.get("source"))
    if doc.get("sourceRevision"):
        out += _kv("Revision", doc["sourceRevision"])
    out += _kv("Labels", ", ".join(f"{k}={v}" for k, v in (doc.get("labels") or {}).items()) or "<none>")
    out += _kv("Supervisor", doc.get("supervisor"))
    first = next((commands[i["id"]] for i in doc.get("instances") or [] if i["id"] in commands), None)
    out += _kv("Command", display_argv(first) if first else "<not started yet>")  # after provider presets
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
        where = f" on {inst['host']}" if inst.get("host") else ""  # fleet: the host it runs on (§10)
        out += f"  {inst['id']}{where}: {inst.get('state')} pid {inst.get('pid') or '-'}"
        out += f" started {inst.get('startedAt') or '-'} restarts {inst.get('restarts', 0)}\n"
        if inst.get("activity"):  # activity: CONTRACT §9
            out += f"    Activity: {inst['activity']} ({inst.get('activityReason')}) since {inst.get('activitySince')}\n"
        if inst.get("sessionId"):
            out += f"    Session:    {inst['sessionId']}\n"
        if inst["id"] in commands and commands[inst["id"]] != first:  # e.g. another session id
            out += f"    Command:    {display_argv(commands[inst['id']])}\n"
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
