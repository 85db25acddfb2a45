"""What the read-only HTTP listener answers: /metrics, /healthz, /readyz, /api/v1/agents[/NAME] and
the status page. Runtime layer; the runner calls serve(). Reads only the controller's immutable
snapshot (GET and HEAD; any other method is 405), answers only its own Host names and those of
--http-allowed-hosts, and gives log lines only to a browser holding a dashboard session.
"""

from __future__ import annotations

import http.client
import io
import json
import logging
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.message import Message
from http import HTTPStatus
from pathlib import Path
from typing import Any

from controller.exposition import CONTENT_TYPE as CONTENT_TYPE_PLAIN_0_0_4
from controller.listener import MAX_HEAD, Listener
from controller.metrics import Metrics, SnapshotView
from controller.model import Handle
from controller.web import access
from controller.web.pages import Pages

log = logging.getLogger("agentctl.http")
ALLOW = "GET, HEAD"
PATHS = ("/metrics", "/healthz", "/readyz", "/api/v1/agents", "/api/v1/agents/<name>", "/", "/agents/<name>")
MAX_DRAIN = 1 << 20  # bytes of a refused request's body read before answering
SEND_TIMEOUT = 5.0  # seconds a client may take to read an answer before it is dropped
HTML_HEADERS = {
    # the page loads only its own script and stylesheet, posts nothing, and is never framed
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}

PAGE_PATH = re.compile(r"/(agents/[a-z0-9-]{1,63}/?)?")
Response = tuple[int, bytes, str]


@dataclass(frozen=True)
class Reply:
    code: int
    body: bytes
    ctype: str
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: Mapping[str, str]
    headers: Message
    extra: bytes  # bytes of the body that came in with the head


@dataclass(frozen=True)
class WebOptions:
    """What the listener needs beyond the snapshot; the defaults serve §5 alone (no tokens)."""

    state_dir: Path | None = None  # tokens/ and state.db; None: no token can be redeemed
    allowed_hosts: tuple[str, ...] = ()  # --http-allowed-hosts
    screen: Callable[[Handle], str] | None = None  # the current screen of a live tmux instance
    secrets: Callable[[str], tuple[str, ...]] | None = None  # agent -> its env values, redacted from lines (§11)


def _json(code: int, data: Any) -> Response:
    return code, json.dumps(data, default=str).encode() + b"\n", "application/json"


def _error(code: int, message: str, headers: Mapping[str, str] | None = None) -> Reply:
    status, body, ctype = _json(code, {"error": message, "code": code})
    return Reply(status, body, ctype, headers or {})


def without_logs(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The status with every lastExit.logTail emptied: log lines go only to token holders."""
    out = dict(doc)
    instances = []
    for inst in doc.get("instances") or []:
        inst = dict(inst)
        if isinstance(inst.get("lastExit"), dict):
            inst["lastExit"] = {**inst["lastExit"], "logTail": []}
        instances.append(inst)
    out["instances"] = instances
    return out


def route(path: str, snap: SnapshotView, metrics: Metrics, *, logs: bool = False) -> Response:
    """The answer to a GET of a §5 path (query string already removed); pure apart from /metrics."""
    path = path.rstrip("/") or "/"
    if path == "/metrics":
        # 0.0.4 rather than the newest text format: every Prometheus (and promtool) reads it.
        return 200, metrics.render(), CONTENT_TYPE_PLAIN_0_0_4
    if path == "/healthz":
        return 200, b"ok\n", "text/plain; charset=utf-8"
    if path == "/readyz":
        failing = getattr(snap, "state_error", None)
        fleet_error = getattr(snap, "fleet_error", None)  # fleet: etcd unreachable or lease in doubt
        if snap.ready and fleet_error:
            return 503, f"fleet not ready: {fleet_error}\n".encode(), "text/plain; charset=utf-8"
        if snap.ready and failing:
            # still supervising, but status and state on disk are going stale: say so
            return 503, f"state writes failing: {failing}\n".encode(), "text/plain; charset=utf-8"
        if snap.ready:
            return 200, b"ready\n", "text/plain; charset=utf-8"
        return 503, b"first reconcile pass not done\n", "text/plain; charset=utf-8"
    shown: Callable[[Mapping[str, Any]], Any] = (lambda d: d) if logs else without_logs
    if path == "/api/v1/agents":
        return _json(200, {"items": [shown(snap.statuses[n]) for n in sorted(snap.statuses)]})
    if path.startswith("/api/v1/agents/"):
        name = urllib.parse.unquote(path.removeprefix("/api/v1/agents/"))
        if name in snap.statuses:
            return _json(200, shown(snap.statuses[name]))
        return _json(404, {"error": f"agent {name!r} not found", "code": 404})
    return _json(404, {"error": f"no such path {path!r}", "code": 404, "paths": list(PATHS)})


def parse_head(head: bytes) -> Request | Reply:
    """Request line and headers of one request; a Reply when they are not a request we take."""
    if len(head) > MAX_HEAD:
        return _error(431, f"request head over {MAX_HEAD} bytes")
    raw_line, _, rest = head.partition(b"\n")
    parts = raw_line.decode("latin-1").strip().split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[0].isalpha():
        return _error(400, "not an HTTP/1.x request")
    method, target, _version = parts
    end = rest.find(b"\r\n\r\n")
    end, sep = (end, 4) if end >= 0 else (rest.find(b"\n\n"), 2)
    try:
        headers = http.client.parse_headers(io.BytesIO(rest[:end + sep]))
    except http.client.HTTPException:
        return _error(400, "malformed request headers")
    split = urllib.parse.urlsplit(target)
    query = dict(urllib.parse.parse_qsl(split.query, keep_blank_values=True))
    return Request(method.upper(), split.path or "/", query, headers, rest[end + sep:])


class App:
    """Answers one request on a connection the listener hands over."""

    def __init__(self, snapshot: Callable[[], SnapshotView], metrics: Metrics, web: WebOptions,
                 own_hosts: frozenset[str], port: int) -> None:
        self.snapshot = snapshot
        self.metrics = metrics
        self.web = web
        self.own_hosts = own_hosts
        self.cookie = access.cookie_name(port)
        self.sessions = access.Sessions()
        self.pages = Pages(web.state_dir, web.screen, web.secrets)

    def __call__(self, sock: socket.socket, head: bytes, addr: tuple[str, int]) -> None:
        sock.setblocking(True)
        sock.settimeout(SEND_TIMEOUT)
        request = parse_head(head)
        if isinstance(request, Reply):
            _send(sock, request, head_only=False)
            return
        try:
            reply = self.respond(request, sock)
        except Exception as exc:  # one bad request must not take the listener down
            log.exception("HTTP %s %s failed", request.method, request.path)
            reply = _error(500, f"internal error: {exc}")
        log.debug("%s %s %s %d", addr[0], request.method, request.path, reply.code)
        _send(sock, reply, head_only=request.method == "HEAD")

    def respond(self, request: Request, sock: socket.socket) -> Reply:
        if not access.host_allowed(request.headers.get("Host"), self.own_hosts, self.web.allowed_hosts):
            # a page of another site whose name was rebound to this address: it gets nothing
            return _error(403, f"Host {request.headers.get('Host')!r} is not this listener's address "
                               "nor one given with --http-allowed-hosts")
        if request.method not in ("GET", "HEAD"):
            _drain(sock, request)
            return _error(405, f"method {request.method} not allowed: read-only, only {ALLOW}", {"Allow": ALLOW})
        token = request.query.get("token")
        if token is not None and not _is_api(request.path):
            return self._redeem(request, token)
        authorized = self.sessions.valid(access.cookie_value(request.headers.get("Cookie"), self.cookie))
        return self._route(request, authorized)

    def _route(self, request: Request, authorized: bool) -> Reply:
        path, snap = request.path, self.snapshot()
        part = request.query.get("part") == "main"
        page = self.pages.answer(path, snap, logs=authorized, part=part, now=time.time())
        if page is not None:
            code, body, ctype = page
            return Reply(code, body, ctype, HTML_HEADERS if ctype.startswith("text/html") else {})
        return Reply(*route(path, snap, self.metrics, logs=authorized))

    def _redeem(self, request: Request, token: str) -> Reply:
        clean = {k: v for k, v in request.query.items() if k != "token"}
        # back to the page asked for, and only to one of ours: never "//host" or "/\\host"
        path = request.path if PAGE_PATH.fullmatch(request.path) else "/"
        location = path + (f"?{urllib.parse.urlencode(clean)}" if clean else "")
        if self.web.state_dir is None or not access.redeem_token(self.web.state_dir, token, time.time()):
            body = self.pages.token_refused()
            return Reply(403, body, "text/html; charset=utf-8", HTML_HEADERS)
        secret = self.sessions.new()
        # 303 to the address without the token: it leaves the address bar and the history
        return Reply(303, b"", "text/plain; charset=utf-8",
                     {"Location": location, "Set-Cookie": access.set_cookie(self.cookie, secret)})


def _is_api(path: str) -> bool:
    return path.startswith("/api/") or path in ("/metrics", "/healthz", "/readyz")


def _drain(sock: socket.socket, request: Request) -> None:
    """Read what the client sent, so that closing does not reset the connection before it has
    read our answer."""
    try:
        length = min(int(request.headers.get("Content-Length") or 0), MAX_DRAIN)
    except ValueError:
        length = 0
    length -= len(request.extra)
    while length > 0:
        chunk = sock.recv(min(length, 65536))
        if not chunk:
            return
        length -= len(chunk)


def _send(sock: socket.socket, reply: Reply, *, head_only: bool) -> None:
    lines = [f"HTTP/1.1 {reply.code} {_phrase(reply.code)}", f"Content-Type: {reply.ctype}",
             f"Content-Length: {len(reply.body)}", "Cache-Control: no-store", "X-Content-Type-Options: nosniff",
             "Connection: close", "Server: agentctl"]
    lines += [f"{k}: {v}" for k, v in reply.headers.items()]
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else reply.body)
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the client left or stopped reading: its loss


def _phrase(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return "Unknown"


def _interface_addresses() -> tuple[str, ...]:
    """The host's IP addresses (as of start), which a wildcard bind answers on."""
    import psutil  # only for a wildcard bind: 2 MiB of RSS a loopback listener does not need

    found = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                found.append(a.address.split("%", 1)[0].lower())  # fe80::1%eth0: no zone in a Host
    return tuple(found)


def _not_yet(sock: socket.socket, head: bytes, addr: tuple[str, int]) -> None:
    raise RuntimeError("listener not started")  # never reached: serving starts after the App is set


def serve(host: str, port: int, snapshot: Callable[[], SnapshotView], metrics: Metrics,
          web: WebOptions | None = None) -> Listener:
    """Bind now (errors surface to the caller) and serve in a daemon thread."""
    web = web or WebOptions()
    listener = Listener(host, port, _not_yet)
    bound_host, bound_port = listener.server_address[0], int(listener.server_address[1])
    # the App needs the bound port (port 0 picks one) to know its own Host names
    interfaces = _interface_addresses() if bound_host in access.WILDCARDS else ()
    own = access.own_hosts(bound_host, bound_port, interfaces)
    listener.handler = App(snapshot, metrics, web, own, bound_port)
    thread = threading.Thread(target=listener.serve_forever, name="agentctl-http", daemon=True)
    thread.start()
    return listener
