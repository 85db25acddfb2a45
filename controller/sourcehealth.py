"""Read failures of the manifest source: what they protect from deletion, and how they are reported.

Called after each load from the reconciler's `sync_manifests` (hooks marked `# intake:`;
`Intake.sync` in the split runtime). Pure bookkeeping over a LoadResult: it reads no files
and never starts or stops anything. A read that fails is never a deletion (CONTRACT §11).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from controller.loader import LoadResult

log = logging.getLogger("agentctl")
MAX_SHOWN = 3  # failed parts named in the SourceReady message; the log line names them all


def kept_by_failure(result: LoadResult, source: str) -> str | None:
    """Why an agent from source, absent from this load, must be kept rather than deleted."""
    return result.unread_reason(source) if source else None


def merge_validity(before: dict[str, bool], after: dict[str, bool], result: LoadResult) -> dict[str, bool]:
    """agentctl_manifest_valid for files under a part that could not be read keeps its last value."""
    kept = {f: v for f, v in before.items() if f not in after and result.unread_reason(f) is not None}
    return {**kept, **after}


@dataclass
class SourceHealth:
    """Whether the last load read every part of the manifest source; logs each change once."""

    failures: dict[str, str] = field(default_factory=dict)  # display path -> why
    # called when a failure begins: watch.py's resync ticker retries reads only while one exists
    on_failing: list[Callable[[], None]] = field(default_factory=list)

    def update(self, result: LoadResult) -> bool:
        """Take the failures of a fresh load; True when they changed (every status must show it)."""
        now = dict(result.unreadable)
        if now == self.failures:
            return False
        if now:
            parts = "; ".join(f"{p}: {why}" for p, why in sorted(now.items()))
            log.error("cannot read the manifest source (%s); keeping every agent it declared on its last "
                      "valid spec", parts)
        else:
            log.info("manifest source readable again")
        began = bool(now) and not self.failures
        self.failures = now
        if began:
            for notify in self.on_failing:
                notify()
        return True

    def problem(self) -> str | None:
        """The SourceReady=False message, or None while every part reads."""
        if not self.failures:
            return None
        items = sorted(self.failures.items())
        text = "; ".join(f"cannot read {p}: {why}" for p, why in items[:MAX_SHOWN])
        more = len(items) - MAX_SHOWN
        return text + (f" (and {more} more)" if more > 0 else "")
