"""What an AI session is doing, read from its rendered screen (CONTRACT §9 `activity`).

Pure: screen text in, an `Reading` out, by provider patterns kept as data below. The
sampler (activity_sampler) feeds it tmux captures; `get` may use `waiting_for_input`.
It must not capture screens, read files or keep time: callers pass what they saw.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Activity(StrEnum):
    WORKING = "Working"
    IDLE = "Idle"  # done, waiting for a new task
    WAITING_FOR_INPUT = "WaitingForInput"  # a question, a permission or trust prompt, a login
    UNKNOWN = "Unknown"


# Most urgent first: an agent's one metric series shows the most urgent of its instances.
URGENCY = (Activity.WAITING_FOR_INPUT, Activity.UNKNOWN, Activity.WORKING, Activity.IDLE)
# Activities in which silence is expected: logIdleSeconds never fires in them.
QUIET = frozenset({Activity.IDLE, Activity.WAITING_FOR_INPUT})
TAIL_LINES = 20  # dialogs and prompts sit at the bottom; older conversation text above must not match

# Provider patterns, checked in order, first match wins: (reason, activity, regex over the
# last TAIL_LINES non-blank lines, MULTILINE). Recorded from claude 2.1.332 and codex 0.171.0
# (tests/fixtures/screens). A retry loop (no network) is "Unknown", reason Reconnecting: it
# is neither progress nor a person's turn, and its ticking counter is not output for logIdle.
PATTERNS: dict[str, dict[str, Any]] = {
    "claude": {
        "rules": [
            ("TrustPrompt", "WaitingForInput",
             r"Is this a project you created or one you trust|Yes, I trust this folder|Do you trust the files"),
            ("LoginPrompt", "WaitingForInput",
             r"Not logged in|Please run /login|Select login method|Invalid API key|Paste code here"),
            ("ApiKeyPrompt", "WaitingForInput", r"Do you want to use this API key\?"),
            ("Onboarding", "WaitingForInput", r"Choose the text style that looks best"),
            ("PermissionPrompt", "WaitingForInput",
             r"Do you want to (?:proceed|make this edit|create|allow|run)\b|No, and tell Claude what to do differently"),
            ("Question", "WaitingForInput", r"Enter to select · .*to navigate"),
            ("Reconnecting", "Unknown", r"retrying in \d+s · attempt \d+/\d+"),
            ("Working", "Working", r"esc to interrupt"),
            ("Prompt", "Idle", r"\? for shortcuts|^❯\s*$"),
        ],
        # what changes on a screen without progress: counters, and the spinner's verb and glyph
        "volatile": [r"^\s*[✻✶✳✢✽·*]\s+\S+…", r"\d+"],
    },
    "codex": {
        "rules": [
            ("TrustPrompt", "WaitingForInput",
             r"Trust this folder\?|Trust and continue|Do you trust the contents of this directory"),
            ("LoginPrompt", "WaitingForInput",
             r"Sign in with ChatGPT|Sign in with Device Code|Finish signing in|Provide your own API key"),
            ("ApprovalPrompt", "WaitingForInput",
             r"Would you like to (?:run|make|apply|allow)\b|tell Codex what to do differently|Allow command\?"),
            ("Reconnecting", "Unknown", r"Reconnecting\.\.\.|waiting for network"),
            ("Working", "Working", r"esc to interrupt"),
            ("Prompt", "Idle", r"\? for shortcuts|^› "),
        ],
        "volatile": [r"^\s*[◦•]\s+", r"\d+"],
    },
}


@dataclass(frozen=True)
class Rule:
    reason: str
    activity: Activity
    pattern: re.Pattern[str]


@dataclass(frozen=True)
class Profile:
    rules: tuple[Rule, ...]
    volatile: tuple[re.Pattern[str], ...]


@dataclass(frozen=True)
class Reading:
    """One look at a screen: what it shows, why we think so, and its content minus noise."""

    activity: Activity
    reason: str  # the rule that matched (TrustPrompt, Working, ...) or NoMatch / NoScreen
    fingerprint: str = ""  # the screen with counters and spinners blanked: changes only on progress


def _profile(raw: Mapping[str, Any]) -> Profile:
    rules = tuple(Rule(r, Activity(a), re.compile(p, re.MULTILINE)) for r, a, p in raw["rules"])
    return Profile(rules, tuple(re.compile(p, re.MULTILINE) for p in raw["volatile"]))


PROFILES: dict[str, Profile] = {name: _profile(raw) for name, raw in PATTERNS.items()}
_VALUES = frozenset(a.value for a in Activity)


def has_profile(provider: str | None) -> bool:
    return provider is not None and provider in PROFILES


def tail(screen: str, lines: int = TAIL_LINES) -> str:
    return "\n".join([line.rstrip() for line in screen.splitlines() if line.strip()][-lines:])


def classify(screen: str, provider: str) -> Reading:
    """The activity a screen shows; Unknown (NoMatch) when no pattern of the provider matches."""
    profile = PROFILES.get(provider)
    if profile is None:
        return Reading(Activity.UNKNOWN, "NoPatterns")
    text = tail(screen)
    fingerprint = _fingerprint(text, profile.volatile)
    for rule in profile.rules:
        if rule.pattern.search(text):
            return Reading(rule.activity, rule.reason, fingerprint)
    return Reading(Activity.UNKNOWN, "NoMatch", fingerprint)


def _fingerprint(text: str, volatile: Iterable[re.Pattern[str]]) -> str:
    for pattern in volatile:
        text = pattern.sub("~", text)
    return text


def most_urgent(activities: Iterable[str]) -> Activity | None:
    """The activity an agent shows for all its instances (None when none reports one)."""
    seen = {Activity(a) for a in activities if a in _VALUES}
    return next((a for a in URGENCY if a in seen), None)


def agent_activity(doc: Mapping[str, Any]) -> Activity | None:
    """From a status document (§4): the most urgent activity of its instances."""
    return most_urgent(i.get("activity") or "" for i in doc.get("instances") or [])


def waiting_for_input(doc: Mapping[str, Any]) -> bool:
    """For `get`'s REASON column: some instance waits for a person (trust, login, permission)."""
    return agent_activity(doc) == Activity.WAITING_FOR_INPUT


@dataclass(frozen=True)
class Observation:
    """An instance's activity as status shows it (`activity`, `activityReason`, `activitySince`)."""

    run: float  # started_mono of the run it was seen in: a later run starts with no observation
    activity: Activity
    reason: str
    since: float  # wall clock of the last change, for people


def status_fields(obs: Observation, iso: Any) -> dict[str, Any]:
    """The instance fields of a status document; `iso` formats a wall-clock time."""
    return {"activity": obs.activity.value, "activityReason": obs.reason, "activitySince": iso(obs.since)}
