"""What a headless AI session is doing, read from the JSON events it prints (CONTRACT §9 `activity`).

Pure: the bytes at the end of an instance log in, a `Reading` out, by per-provider rules kept as
data below (like activity.PATTERNS). The sampler (activity_sampler) reads the log tail off the
loop and calls `classify_tail`. It must not read files or keep time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from controller.activity import Activity, Reading

# Rules per provider, checked in order on the newest event that any rule matches, first match
# wins: (reason, activity, fields the event must have with these exact values, optional
# (field, regex) on a text field). Event shapes recorded from claude 2.1.332
# (`-p --output-format stream-json --verbose`) and codex-cli 0.171.0 (`exec --json`), see
# tests/fixtures/events. A retry loop without network is Unknown/Reconnecting, as on a screen.
EVENT_RULES: dict[str, list[tuple[Any, ...]]] = {
    "claude": [
        ("ResultError", "Unknown", {"type": "result", "is_error": True}),
        ("Result", "Idle", {"type": "result"}),  # print mode exits right after it
        ("Reconnecting", "Unknown", {"type": "system", "subtype": "api_retry"}),
        ("Started", "Working", {"type": "system", "subtype": "init"}),
        ("Assistant", "Working", {"type": "assistant"}),
        ("ToolResult", "Working", {"type": "user"}),
        ("Streaming", "Working", {"type": "stream_event"}),
        ("System", "Working", {"type": "system"}),
    ],
    "codex": [
        ("TurnCompleted", "Idle", {"type": "turn.completed"}),
        ("TurnFailed", "Unknown", {"type": "turn.failed"}),
        ("Reconnecting", "Unknown", {"type": "error"}, ("message", r"^Reconnecting")),
        ("Error", "Unknown", {"type": "error"}),
        ("ThreadStarted", "Working", {"type": "thread.started"}),
        ("TurnStarted", "Working", {"type": "turn.started"}),
        ("Item", "Working", {"type": "item.started"}),
        ("Item", "Working", {"type": "item.updated"}),
        ("Item", "Working", {"type": "item.completed"}),
    ],
}
TAIL_BYTES = 256 * 1024  # the newest events fit; a single larger line is skipped (no reading)


@dataclass(frozen=True)
class EventRule:
    reason: str
    activity: Activity
    fields: tuple[tuple[str, Any], ...]
    text: tuple[str, re.Pattern[str]] | None = None

    def matches(self, event: Mapping[str, Any]) -> bool:
        if any(event.get(k) != v for k, v in self.fields):
            return False
        if self.text is None:
            return True
        value = event.get(self.text[0])
        return isinstance(value, str) and self.text[1].search(value) is not None


def _rule(raw: tuple[Any, ...]) -> EventRule:
    text = (raw[3][0], re.compile(raw[3][1])) if len(raw) > 3 else None
    return EventRule(raw[0], Activity(raw[1]), tuple(raw[2].items()), text)


RULES: dict[str, tuple[EventRule, ...]] = {p: tuple(_rule(r) for r in rules) for p, rules in EVENT_RULES.items()}


def has_events(provider: str | None) -> bool:
    return provider is not None and provider in RULES


def complete_lines(tail: bytes, *, from_start: bool) -> list[bytes]:
    """The whole lines of a log tail: the unterminated last one is still being written; the first
    is cut unless the tail starts at the run's first byte."""
    lines = tail.split(b"\n")[:-1]
    return lines if from_start else lines[1:]


def events_newest_first(lines: list[bytes]) -> Iterator[Mapping[str, Any]]:
    """JSON objects among the lines, newest first; other output (stderr, a wrapper's) is skipped."""
    for line in reversed(lines):
        line = line.strip()
        if not line.startswith(b"{"):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            yield event


def classify_tail(tail: bytes, provider: str, *, from_start: bool = False) -> Reading | None:
    """The activity the newest recognised event shows; None when the tail holds none."""
    rules = RULES.get(provider, ())
    for event in events_newest_first(complete_lines(tail, from_start=from_start)):
        rule = next((r for r in rules if r.matches(event)), None)
        if rule is not None:
            return Reading(rule.activity, rule.reason, fingerprint=_fingerprint(event, rule))
    return None


def _fingerprint(event: Mapping[str, Any], rule: EventRule) -> str:
    # a new event is progress (for logIdle), but another retry of a request is not
    if rule.activity == Activity.UNKNOWN:
        return rule.reason
    for key in ("uuid", "id"):
        if isinstance(event.get(key), str):
            return f"{event.get('type')}:{event[key]}"
    return json.dumps(event, sort_keys=True)[:512]
