"""The operator's view of status documents: REASON, table rows, `wait` conditions, durations,
and the summary of the spec an agent's instances run (CONTRACT §8).
Pure: called by `get`/`wait`/`describe` and by the reconciler's status and log hooks;
takes `now` as a parameter and imports no os/time/subprocess."""

from __future__ import annotations

import re
import signal as signals
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # `get` renders rows without importing pydantic
    from controller.desired import DesiredAgent

# Ready-condition reasons that are the one thing an operator must know, as they are
OPERATOR_REASONS = ("SuspendedByOperator", "CrashLoop", "Failed", "SupervisorUnavailable", "HostCapacity", "BackOff")
GONE_REASONS = ("ManifestDeleted", "NotPlaced", "ControllerStopped")
SUSPENDED_BY_OPERATOR = "SuspendedByOperator"


def condition(doc: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    return next((c for c in doc.get("conditions") or [] if c.get("type") == kind), None)


def _waiting_for_input(doc: Mapping[str, Any]) -> bool:
    """`instances[].activity` (AI sessions): a string, or a mapping with a state/phase."""
    for inst in doc.get("instances") or []:
        activity = inst.get("activity")
        if isinstance(activity, Mapping):
            activity = activity.get("state") or activity.get("phase") or activity.get("kind")
        if isinstance(activity, str) and re.sub(r"[-_ ]", "", activity).lower() == "waitingforinput":
            return True
    return False


def reason(doc: Mapping[str, Any], *, controller_up: bool = True) -> str:
    """The REASON column: empty when all is well, else the most pressing thing, first match wins."""
    if not controller_up:
        return "ControllerDown"
    valid, ready = condition(doc, "Valid"), condition(doc, "Ready")
    if valid is not None and valid.get("status") == "False":
        return str(valid.get("reason") or "InvalidManifest")
    ready_reason = str(ready.get("reason") or "") if ready is not None else ""
    if ready_reason in OPERATOR_REASONS and (ready is None or ready.get("status") != "True"):
        return ready_reason
    if doc.get("phase") == "BackOff":
        return "BackOff"
    if _waiting_for_input(doc):
        return "WaitingForInput"
    source = condition(doc, "SourceReady")
    if source is not None and source.get("status") == "False":
        return str(source.get("reason") or "FetchFailed")
    if doc.get("phase") in ("Stopping", "Stopped") and ready_reason in GONE_REASONS:
        return ready_reason
    return ""


def age(iso_time: str | None, now: float) -> str:
    if not iso_time:
        return "-"
    seconds = int(now - datetime.fromisoformat(iso_time.replace("Z", "+00:00")).timestamp())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(0, seconds)}s"


def logfields(agent: str, instance: str | None, action: str, reason: object) -> dict[str, str]:
    """`extra=` of the reconciler's action log lines: the fields `--log-format json` adds to `msg`."""
    fields = {"agent": agent, "action": action, "reason": str(reason)}
    if instance:
        fields["instance"] = instance
    return fields


def exit_word(code: int | None, signal: int | None) -> str:
    """How logs name an exit (one convention everywhere): Exited(3), Signaled(SIGTERM), Exited(unknown)."""
    if code is not None:
        return f"Exited({code})"
    if signal:
        try:
            return f"Signaled({signals.Signals(signal).name})"
        except ValueError:
            return f"Signaled({signal})"
    return "Exited(unknown)"


def exit_how(code: int | None, signal: int | None) -> str:
    """The same convention in words for people: `exit code 3`, `signal 15`, `exit code unknown`."""
    if code is not None:
        return f"exit code {code}"
    if signal:
        return f"signal {signal}"
    return "exit code unknown"


HEADER = ("NAME", "PHASE", "READY", "RESTARTS", "AGE", "SUPERVISOR", "REASON")
WIDE_HEADER = ("NAME", "PHASE", "READY", "RESTARTS", "AGE", "SUPERVISOR", "HOST", "PIDS", "LAST-EXIT", "LABELS",
               "REASON")


def _last_exit(doc: Mapping[str, Any]) -> str:
    exits = [i["lastExit"] for i in doc.get("instances") or [] if i.get("lastExit")]
    if not exits:
        return "-"
    e = max(exits, key=lambda x: str(x.get("at") or ""))
    word = exit_word(e.get("exitCode"), e.get("signal"))  # one column, no blanks: Error(3), Suspended(SIGTERM)
    return f"{e.get('reason')}{word[word.index('('):]}"


def row(doc: Mapping[str, Any], now: float, *, wide: bool = False, controller_up: bool = True) -> tuple[str, ...]:
    rep = doc.get("replicas") or {}
    base = (str(doc.get("name")), str(doc.get("phase", "?")), f"{rep.get('ready', 0)}/{rep.get('desired', 0)}",
            str(doc.get("restarts", 0)), age(doc.get("createdAt"), now), str(doc.get("supervisor", "process")))
    why = reason(doc, controller_up=controller_up)
    if not wide:
        return (*base, why)
    pids = ",".join(str(i["pid"]) for i in doc.get("instances") or [] if i.get("pid")) or "-"
    labels = ",".join(f"{k}={v}" for k, v in sorted((doc.get("labels") or {}).items())) or "-"
    # a fleet on etcd: the hosts its instances run on (CONTRACT §10); "-" on one host
    hosts = ",".join(sorted({str(i["host"]) for i in doc.get("instances") or [] if i.get("host")})) or "-"
    return (*base, hosts, pids, _last_exit(doc), labels, why)


def widths_for(rows: list[tuple[str, ...]], minimum: tuple[int, ...] | None = None) -> tuple[int, ...]:
    widths = tuple(max(len(r[i]) for r in rows) for i in range(len(rows[0])))
    return widths if minimum is None else tuple(max(a, b) for a, b in zip(widths, minimum, strict=True))


def format_row(r: tuple[str, ...], widths: tuple[int, ...]) -> str:
    """Cells padded to their column, three spaces apart, trailing blanks dropped."""
    return "   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()


# -- durations ------------------------------------------------------------------
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """`90s`, `5m`, `1h`, `1m30s`, `500ms`, or bare seconds (`30`) -> seconds."""
    s = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    parts = _DURATION.findall(s)
    if not parts or "".join(n + u for n, u in parts) != s:
        raise ValueError(f"invalid duration {text!r} (examples: 90s, 5m, 1h, 1m30s)")
    return sum(float(n) * _UNITS[u] for n, u in parts)


# -- wait conditions ---------------------------------------------------------------
@dataclass(frozen=True)
class WaitFor:
    kind: str  # "phase" | "condition" | "delete"
    name: str = ""  # the phase, or the condition type
    status: str = "True"

    def met(self, doc: Mapping[str, Any] | None) -> bool:
        if self.kind == "delete":
            return doc is None
        if doc is None:
            return False
        if self.kind == "phase":
            return str(doc.get("phase", "")).lower() == self.name.lower()
        cond = next((c for c in doc.get("conditions") or [] if str(c.get("type", "")).lower() == self.name.lower()),
                    None)
        return cond is not None and str(cond.get("status", "")).lower() == self.status.lower()

    def describe(self) -> str:
        if self.kind == "delete":
            return "deletion"
        if self.kind == "phase":
            return f"phase {self.name}"
        return f"condition {self.name}={self.status}"


def parse_wait_for(text: str) -> WaitFor:
    """`phase=Running`, `condition=Ready`, `condition=Ready=False`, `delete` (kubectl wait --for)."""
    if text == "delete":
        return WaitFor("delete")
    kind, _, rest = text.partition("=")
    if kind == "phase" and rest:
        return WaitFor("phase", rest)
    if kind == "condition" and rest:
        name, _, status = rest.partition("=")
        if status and status.lower() not in ("true", "false", "unknown"):
            raise ValueError(f"--for={text}: a condition's status is True, False or Unknown")
        return WaitFor("condition", name, status.capitalize() if status else "True")
    raise ValueError(f"--for={text}: expected phase=PHASE, condition=TYPE[=STATUS] or delete")


# -- the spec an agent's instances run -----------------------------------------------
def _dump(value: Any) -> Any:
    return value.model_dump(by_alias=True, exclude_none=True) if hasattr(value, "model_dump") else value


def spec_summary(desired: DesiredAgent) -> dict[str, Any]:
    """What `describe` opens with: argv as executed (after presets), policies, env KEYS only."""
    spec = desired.spec
    first = desired.instances[0] if desired.instances else None
    env_keys = sorted({k for k, _ in first.env}) if first is not None else sorted(spec.env)
    return {
        "argv": list(first.argv) if first is not None else list(spec.command or []),
        "cwd": first.cwd if first is not None else spec.cwd,
        "supervisor": spec.supervisor,
        "replicas": spec.replicas,
        "restartPolicy": spec.restart_policy,
        "backoff": _dump(spec.backoff),
        "maxRestarts": _dump(spec.max_restarts),
        "liveness": _dump(spec.liveness),
        "resources": _dump(spec.resources),
        "envKeys": env_keys,
    }
