"""Redaction of an instance's env values from log lines the controller shows (CONTRACT §11).

Pure logic: called where a log tail is recorded (the reconciler's exit handling), where a
probe's output is kept (health) and where `describe` prints a tail. It never reads files or
the environment itself; `agentctl logs` shows the user's own log file and is not redacted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from controller.model import InstanceSpec

MASK = "[REDACTED]"
MIN_LENGTH = 4  # shorter values ("1", "yes", "on") would blank out ordinary words
MARKER_PREFIX = "AGENTCTL_"  # ids, hashes and paths the controller itself sets: not secrets


def secret_values(env: Iterable[tuple[str, str]] | Mapping[str, str]) -> tuple[str, ...]:
    """The values to hide, longest first (so a value containing another is hidden whole)."""
    pairs = env.items() if isinstance(env, Mapping) else env
    values = {v for k, v in pairs if not k.startswith(MARKER_PREFIX) and len(v) >= MIN_LENGTH}
    return tuple(sorted(values, key=lambda v: (-len(v), v)))


def _pattern(values: Sequence[str]) -> re.Pattern[str] | None:
    ordered = sorted(set(values), key=lambda v: (-len(v), v))
    return re.compile("|".join(re.escape(v) for v in ordered)) if ordered else None


def redact_lines(lines: Iterable[str], values: Sequence[str]) -> tuple[str, ...]:
    """One pass per line with one alternation: a mask is never itself matched again."""
    pattern = _pattern([v for v in values if len(v) >= MIN_LENGTH])
    if pattern is None:
        return tuple(lines)
    return tuple(pattern.sub(MASK, line) for line in lines)


def redact_text(text: str, values: Sequence[str]) -> str:
    return "\n".join(redact_lines(text.split("\n"), values))


def instance_secrets(instances: Sequence[InstanceSpec], index: int) -> tuple[str, ...]:
    """Values of the env that instance `index` of a desired agent runs with (none if unknown)."""
    if not 0 <= index < len(instances):
        return ()
    return secret_values(instances[index].env)


def manifest_secrets(manifest: Mapping[str, Any] | None) -> tuple[str, ...]:
    """Values of a stored manifest's `spec.env` (envFile values are not stored anywhere)."""
    spec = (manifest or {}).get("spec") or {}
    env = spec.get("env") or {}
    return secret_values({str(k): str(v) for k, v in env.items()}) if isinstance(env, Mapping) else ()
