"""The status page's answers for the HTTP listener: gathers what web.render shows (the snapshot's
statuses, recent events read-only from state.db, log tails, tmux screens) and serves the page's
stylesheet and script.

Called from controller.http's worker threads. Reads files and the store read-only, runs only
`tmux capture-pane`; it changes nothing. Log lines and screens only when `logs` is True.
"""

from __future__ import annotations

import sqlite3
import urllib.parse
from collections.abc import Callable, Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from controller import logfiles, redact
from controller.model import Handle
from controller.store import open_readonly
from controller.web import render

Response = tuple[int, bytes, str]
HTML = "text/html; charset=utf-8"
STATIC = {"style.css": "text/css; charset=utf-8", "page.js": "text/javascript; charset=utf-8"}
LOG_LINES = 40
EVENTS = 20
MAX_SHOWN = 8  # instances whose log tail and screen one page view reads (the page polls every second)


class View(Protocol):
    @property
    def statuses(self) -> Mapping[str, Mapping[str, Any]]: ...
    @property
    def handles(self) -> Mapping[str, tuple[str, Handle]]: ...


@cache
def static_file(name: str) -> bytes:
    return (resources.files("controller.web") / "static" / name).read_bytes()


def screen_reader(state_dir: Path, controller_id: str) -> Callable[[Handle], str]:
    """The current screen of a live tmux instance, through the adapter's own capture."""
    from controller.supervisors import tmux
    from controller.supervisors.base import Context

    ctx = Context(state_dir, controller_id)
    return lambda handle: tmux.capture(ctx, handle, False)


class Pages:
    def __init__(self, state_dir: Path | None, screen: Callable[[Handle], str] | None,
                 secrets: Callable[[str], tuple[str, ...]] | None = None) -> None:
        self.state_dir = state_dir
        self.screen = screen
        self.secrets = secrets or (lambda agent: ())

    def answer(self, path: str, snap: View, *, logs: bool, part: bool, now: float) -> Response | None:
        """The page at path, or None when path is not one of the page's."""
        if path.startswith("/static/"):
            name = path.removeprefix("/static/")
            return (200, static_file(name), STATIC[name]) if name in STATIC else None
        path = path.rstrip("/") or "/"
        if path == "/":
            docs = [snap.statuses[n] for n in sorted(snap.statuses)]
            main = render.index_main(docs, now)
            return 200, self._doc(f"agentctl: {len(docs)} agents", main, "/?part=main", logs, part), HTML
        if path.startswith("/agents/"):
            name = urllib.parse.unquote(path.removeprefix("/agents/"))
            return self._agent(name, snap, logs=logs, part=part, now=now)
        return None

    def _agent(self, name: str, snap: View, *, logs: bool, part: bool, now: float) -> Response:
        refresh = f"/agents/{urllib.parse.quote(name, safe='')}?part=main"
        doc = snap.statuses.get(name)
        if doc is None:
            return 404, self._doc("agentctl: not found", render.missing_main(name), refresh, logs, part), HTML
        extras = self._extras(name, doc, snap, logs)
        main = render.agent_main(doc, now, extras)
        return 200, self._doc(f"agentctl: {name}", main, refresh, logs, part), HTML

    @staticmethod
    def _doc(title: str, main: str, refresh: str, logs: bool, part: bool) -> bytes:
        return (main if part else render.page(title, main, refresh=refresh, logs_allowed=logs)).encode()

    def token_refused(self) -> bytes:
        return render.token_refused().encode()

    def _extras(self, name: str, doc: Mapping[str, Any], snap: View, logs: bool) -> render.Extras:
        events, error = self._events(name)
        if not logs:
            return render.Extras(events=events, events_error=error)
        every = [str(i.get("id")) for i in doc.get("instances") or []]
        ids = every[:MAX_SHOWN]
        hide = self.secrets(name)  # log lines and screens shown by the controller: env values redacted (§11)
        screens = {iid: "\n".join(redact.redact_lines(text.split("\n"), hide))
                   for iid, text in self._screens(doc, snap, ids).items()}
        return render.Extras(events=events, events_error=error, logs_allowed=True,
                             log_tails={iid: list(redact.redact_lines(self._tail(iid), hide)) for iid in ids},
                             screens=screens, not_shown=len(every) - len(ids))

    def _events(self, name: str) -> tuple[list[render.EventRow], str | None]:
        if self.state_dir is None:
            return [], None
        store = open_readonly(self.state_dir)
        if store is None:
            return [], None
        try:
            rows = store.events(name, EVENTS)
        except sqlite3.Error as exc:  # busy or damaged: the rest of the page still shows
            return [], str(exc)
        finally:
            store.close()
        return [render.EventRow(ev.at, ev.instance, ev.type, ev.reason, ev.message) for ev in rows], None

    def _tail(self, instance_id: str) -> list[str]:
        if self.state_dir is None:
            return []
        return logfiles.tail_lines(self.state_dir / "logs" / f"{instance_id}.log", LOG_LINES)

    def _screens(self, doc: Mapping[str, Any], snap: View, ids: list[str]) -> dict[str, str]:
        if doc.get("supervisor") != "tmux" or self.screen is None:
            return {}
        screens = {}
        for iid in ids:
            found = snap.handles.get(iid)
            if found is None:
                continue
            try:
                screens[iid] = self.screen(found[1])
            except Exception as exc:  # noqa: BLE001 - a screen that cannot be read is said so on the page
                screens[iid] = f"(screen not available: {exc})"
        return screens
