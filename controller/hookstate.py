"""The command a provider's own hook runs: records an instance's activity in its state file.

Run by claude's hooks (`--settings`) and codex's `notify`, as
`python3 -I -S hookstate.py STATE_FILE ACTIVITY [JSON]`, never by the controller, which reads
the file (controller.hooks). Standard library only and no import of the controller: it runs in
the agent's environment. It must never fail the provider: every error ends in exit status 0.
"""

from __future__ import annotations

import json
import os
import sys
import time

ACTIVITIES = ("Working", "Idle", "WaitingForInput", "Unknown")
MAX_INPUT = 64 * 1024  # the hook's JSON on stdin; only a few fields are read
# claude sends a Notification both for a permission prompt and when its prompt has waited 60 s
# for a new task; the latter is Idle, not a person being asked something
IDLE_NOTIFICATIONS = ("idle_prompt",)


def payload(args: list[str], stdin_text: str) -> dict[str, object]:
    """claude gives its event as JSON on stdin, codex's notify as the last argument."""
    raw = args[2] if len(args) > 2 else stdin_text
    try:
        data = json.loads(raw) if raw.strip() else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def state(activity: str, data: dict[str, object], now: float) -> dict[str, object]:
    event = str(data.get("hook_event_name") or data.get("type") or "")
    if data.get("notification_type") in IDLE_NOTIFICATIONS:
        activity = "Idle"
    return {"activity": activity, "event": event, "at": now}


def write_atomically(path: str, doc: dict[str, object]) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(doc, fh)
    os.replace(tmp, path)  # a reader sees the old state or the new one, never half of one


def main(args: list[str]) -> int:
    if len(args) < 2 or args[1] not in ACTIVITIES:
        print(f"usage: hookstate.py STATE_FILE {{{'|'.join(ACTIVITIES)}}} [JSON]", file=sys.stderr)
        return 0
    stdin_text = "" if len(args) > 2 or sys.stdin is None or sys.stdin.isatty() else sys.stdin.read(MAX_INPUT)
    try:
        write_atomically(args[0], state(args[1], payload(args, stdin_text), time.time()))
    except OSError as exc:
        print(f"hookstate.py: {args[0]}: {exc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
