"""HTML of the status page (CONTRACT §8), rendered from status documents: the agents table,
one agent's page, and the page that refuses a used token.

Pure (logic layer): takes `now` and everything shown as parameters; web.pages gathers them.
Every value from an agent, a manifest or a log is escaped here, in one place: agent output is
hostile. No inline script or style, so the page's Content-Security-Policy can forbid both.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from typing import Any
from urllib.parse import quote

Doc = Mapping[str, Any]
COLUMNS = ("Name", "Phase", "Ready", "Restarts", "Age", "Reason", "Last exit")
CALM_PHASES = ("Running", "Completed")


@dataclass(frozen=True)
class EventRow:
    at: float
    instance: str | None
    kind: str
    reason: str
    message: str


@dataclass(frozen=True)
class Extras:
    """What one agent's page shows beyond its status; logs and screens only for token holders."""

    events: Sequence[EventRow] = ()
    events_error: str | None = None
    logs_allowed: bool = False
    log_tails: Mapping[str, Sequence[str]] | None = None  # instance id -> last lines
    screens: Mapping[str, str] | None = None  # tmux instance id -> screen text
    not_shown: int = 0  # instances whose log is left out to keep a page view cheap


def e(value: object) -> str:
    return escape("" if value is None else str(value), quote=True)


def _wall(iso_time: str | None) -> float | None:
    if not iso_time:
        return None
    try:
        return datetime.fromisoformat(iso_time.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def age(iso_time: str | None, now: float) -> str:
    wall = _wall(iso_time)
    return "-" if wall is None else duration(now - wall)


def _condition(doc: Doc, kind: str) -> Doc | None:
    return next((c for c in doc.get("conditions") or [] if c.get("type") == kind), None)


def reason(doc: Doc) -> str:
    """Empty when all is well, else the one thing an operator must know (as `get`'s REASON)."""
    if doc.get("reason") is not None:  # a status that carries it already
        return str(doc["reason"])
    valid = _condition(doc, "Valid")
    if valid is not None and valid.get("status") == "False":
        return str(valid.get("reason") or "InvalidManifest")
    ready = _condition(doc, "Ready")
    if doc.get("phase") in CALM_PHASES or ready is None or ready.get("status") == "True":
        return ""
    return str(ready.get("reason") or "")


def _last_exit(doc: Doc) -> Doc | None:
    exits = [i["lastExit"] for i in doc.get("instances") or [] if isinstance(i.get("lastExit"), dict)]
    return max(exits, key=lambda x: _wall(x.get("at")) or 0.0, default=None)


def exit_text(last: Doc | None, now: float) -> str:
    if last is None:
        return ""
    if last.get("exitCode") is not None:
        how = f"exit {last['exitCode']}"
    elif last.get("signal"):
        how = f"signal {last['signal']}"
    else:
        how = "exit code unknown"
    when = age(last.get("at"), now)
    return f"{last.get('reason') or '?'} ({how}), {when} ago"


def _badge(phase: object) -> str:
    name = e(phase or "Unknown")
    return f'<span class="badge phase-{name.lower()}">{name}</span>'


def _ready(doc: Doc) -> str:
    rep = doc.get("replicas") or {}
    return f"{rep.get('ready', 0)}/{rep.get('desired', 0)}"


def _href(name: object) -> str:
    return "/agents/" + quote(str(name), safe="")


# -- the agents table -------------------------------------------------------------
def agent_row(doc: Doc, now: float) -> str:
    cells = (
        f'<a href="{e(_href(doc.get("name")))}">{e(doc.get("name"))}</a>',
        _badge(doc.get("phase")),
        e(_ready(doc)),
        e(doc.get("restarts", 0)),
        e(age(doc.get("createdAt"), now)),
        e(reason(doc)),
        e(exit_text(_last_exit(doc), now)),
    )
    tds = "".join(f'<td data-label="{c}">{v}</td>' for c, v in zip(COLUMNS, cells, strict=True))
    return f'<tr data-agent="{e(doc.get("name"))}" data-phase="{e(doc.get("phase"))}">{tds}</tr>'


def _summary(docs: Sequence[Doc]) -> str:
    counts: dict[str, int] = {}
    for d in docs:
        counts[str(d.get("phase"))] = counts.get(str(d.get("phase")), 0) + 1
    chips = "".join(f'<li>{_badge(p)} {n}</li>' for p, n in sorted(counts.items()))
    return f'<ul class="summary" aria-label="agents by phase">{chips}</ul>'


def index_main(docs: Sequence[Doc], now: float) -> str:
    if not docs:
        return '<p class="empty">No agents. Put agent manifests in the manifests directory.</p>'
    head = "".join(f'<th scope="col">{c}</th>' for c in COLUMNS)
    rows = "".join(agent_row(d, now) for d in docs)
    return (f'{_summary(docs)}<table class="agents"><thead><tr>{head}</tr></thead>'
            f'<tbody>{rows}</tbody></table>')


# -- one agent --------------------------------------------------------------------
def _table(headers: Iterable[str], rows: Iterable[Iterable[str]], cls: str) -> str:
    """headers are ours; row cells are escaped HTML already."""
    heads = list(headers)
    body = "".join("<tr>" + "".join(f'<td data-label="{h}">{c}</td>' for h, c in zip(heads, row, strict=True))
                   + "</tr>" for row in rows)
    ths = "".join(f'<th scope="col">{h}</th>' for h in heads)
    return f'<table class="{cls}"><thead><tr>{ths}</tr></thead><tbody>{body}</tbody></table>'


def _facts(doc: Doc, now: float) -> str:
    labels = ", ".join(f"{k}={v}" for k, v in (doc.get("labels") or {}).items())
    facts = [("Ready", _ready(doc)), ("Restarts", doc.get("restarts", 0)), ("Age", age(doc.get("createdAt"), now)),
             ("Reason", reason(doc) or "-"), ("Supervisor", doc.get("supervisor")), ("Source", doc.get("source")),
             ("Revision", doc.get("sourceRevision")), ("Spec hash", doc.get("specHash")), ("Labels", labels),
             ("Last error", doc.get("lastError"))]
    items = "".join(f"<dt>{k}</dt><dd>{e(v)}</dd>" for k, v in facts if v not in (None, ""))
    return f'<dl class="facts">{items}</dl>'


def _conditions(doc: Doc) -> str:
    rows = [(e(c.get("type")), e(c.get("status")), e(c.get("reason")), e(c.get("message")),
             e(c.get("lastTransitionTime"))) for c in doc.get("conditions") or []]
    return _table(("Type", "Status", "Reason", "Message", "Since"), rows, "conditions")


def _instances(doc: Doc) -> str:
    rows = [(e(i.get("id")), e(i.get("state")), e(i.get("pid") or "-"), e(i.get("startedAt") or "-"),
             e(i.get("restarts", 0)), e(i.get("nextAttemptAt") or i.get("stopReason") or ""))
            for i in doc.get("instances") or []]
    if not rows:
        return '<p class="empty">No instances.</p>'
    return _table(("Instance", "State", "PID", "Started", "Restarts", "Next"), rows, "instances")


def _exits(doc: Doc, now: float, logs_allowed: bool) -> str:
    out = []
    for inst in doc.get("instances") or []:
        last = inst.get("lastExit")
        if not isinstance(last, dict):
            continue
        block = f'<h4>{e(inst.get("id"))}</h4><p>{e(exit_text(last, now))}'
        block += f' at {e(last.get("at"))} after {e(last.get("runtimeSeconds"))}s</p>'
        if last.get("message"):
            block += f'<p class="message">{e(last["message"])}</p>'
        if logs_allowed and last.get("logTail"):
            block += _pre(last["logTail"], "log", "output before the exit")
        out.append(f'<div class="exit">{block}</div>')
    return "".join(out) or '<p class="empty">No exit recorded.</p>'


def _pre(lines: Sequence[str], cls: str, label: str) -> str:
    return f'<pre class="{cls}" aria-label="{e(label)}">{e(chr(10).join(lines))}</pre>'


def _logs(extras: Extras) -> str:
    if not extras.logs_allowed:
        return ('<p class="hidden-logs">Log lines and screens are shown only to a browser that opened the '
                'address printed by <code>agentctl dashboard</code> on the controller&#x27;s host.</p>')
    out = []
    for iid, lines in (extras.log_tails or {}).items():
        out.append(f'<h4>{e(iid)}</h4>' + (_pre(lines, "log", f"log tail of {iid}") if lines
                                           else '<p class="empty">No output yet.</p>'))
    for iid, screen in (extras.screens or {}).items():
        out.append(f'<h4>{e(iid)} screen</h4>{_pre(screen.splitlines(), "screen", f"screen of {iid}")}')
    if extras.not_shown:
        out.append(f'<p class="empty">{extras.not_shown} more instances: see <code>agentctl logs</code>.</p>')
    return "".join(out) or '<p class="empty">No log.</p>'


def _events(extras: Extras) -> str:
    if extras.events_error:
        return f'<p class="empty">Events cannot be read: {e(extras.events_error)}</p>'
    rows = [(e(datetime.fromtimestamp(ev.at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")), e(ev.kind),
             e(ev.instance or "-"), e(ev.reason), e(ev.message)) for ev in reversed(extras.events)]
    if not rows:
        return '<p class="empty">No events.</p>'
    return _table(("Time", "Type", "Instance", "Reason", "Message"), rows, "events")


def agent_main(doc: Doc, now: float, extras: Extras) -> str:
    name = e(doc.get("name"))
    return (f'<nav class="crumbs"><a href="/">All agents</a> / {name}</nav>'
            f'<h2 data-agent="{name}">{name} {_badge(doc.get("phase"))}</h2>{_facts(doc, now)}'
            f'<section><h3>Conditions</h3>{_conditions(doc)}</section>'
            f'<section><h3>Instances</h3>{_instances(doc)}</section>'
            f'<section><h3>Last exit</h3>{_exits(doc, now, extras.logs_allowed)}</section>'
            f'<section id="logs"><h3>Log tail</h3>{_logs(extras)}</section>'
            f'<section><h3>Recent events</h3>{_events(extras)}</section>')


def missing_main(name: str) -> str:
    return (f'<nav class="crumbs"><a href="/">All agents</a></nav>'
            f'<p class="empty">No agent named <strong>{e(name)}</strong> here (deleted, or placed on another '
            'host).</p>')


# -- the document -----------------------------------------------------------------
def page(title: str, main: str, *, refresh: str | None, logs_allowed: bool) -> str:
    """A whole document; `refresh` is the address the script polls for a new <main>."""
    data = f' data-refresh="{e(refresh)}"' if refresh else ""
    access = "log lines shown" if logs_allowed else "log lines hidden"
    return ('<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{e(title)}</title><link rel="stylesheet" href="/static/style.css">'
            '<script src="/static/page.js" defer></script></head><body>'
            '<header class="top"><a class="brand" href="/">agentctl</a>'
            f'<span class="access">{access}</span>'
            '<span id="live" class="live" role="status">live</span></header>'
            f'<main id="main"{data}>{main}</main>'
            '<footer>Read-only. <a href="/api/v1/agents">JSON</a> · <a href="/metrics">metrics</a></footer>'
            '</body></html>')


def token_refused() -> str:
    main = ('<h2>This access token cannot be used</h2><p>It was used already, has expired, or was not made '
            'by this controller. Run <code>agentctl dashboard</code> again for a fresh address.</p>'
            '<p><a href="/">Status page without log lines</a></p>')
    return page("agentctl: token refused", main, refresh=None, logs_allowed=False)
