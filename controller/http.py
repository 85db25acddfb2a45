"""The read-only HTTP listener: /metrics, /healthz, /readyz, /api/v1/agents[/NAME].

Runtime layer; the runner starts it on --metrics-addr. It runs in its own threads and only
reads the controller's immutable snapshot: nothing served here can change state (GET and
HEAD only, every other method is 405). Binding beyond loopback is the caller's explicit choice.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from controller.metrics import Metrics, SnapshotView

log = logging.getLogger("agentctl.http")
ALLOW = "GET, HEAD"
PATHS = ("/metrics", "/healthz", "/readyz", "/api/v1/agents", "/api/v1/agents/<name>")
MAX_DRAIN = 1 << 20  # bytes of a refused request's body read before answering


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class Server6(Server):
    address_family = socket.AF_INET6


Response = tuple[int, bytes, str]


def _json(code: int, data: Any) -> Response:
    return code, json.dumps(data, default=str).encode() + b"\n", "application/json"


def route(path: str, snap: SnapshotView, metrics: Metrics) -> Response:
    """The answer to a GET of path (query string already removed); pure apart from /metrics."""
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
    if path == "/api/v1/agents":
        return _json(200, {"items": [snap.statuses[n] for n in sorted(snap.statuses)]})
    if path.startswith("/api/v1/agents/"):
        name = urllib.parse.unquote(path.removeprefix("/api/v1/agents/"))
        if name in snap.statuses:
            return _json(200, snap.statuses[name])
        return _json(404, {"error": f"agent {name!r} not found", "code": 404})
    return _json(404, {"error": f"no such path {path!r}", "code": 404, "paths": list(PATHS)})


def make_handler(snapshot: Callable[[], SnapshotView], metrics: Metrics) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "agentctl"
        timeout = 30  # a client that stalls mid-request does not hold a thread for ever

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

        def _send(self, response: Response, headers: dict[str, str] | None = None) -> None:
            code, body, ctype = response
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:
            path = urllib.parse.urlsplit(self.path).path
            try:
                response = route(path, snapshot(), metrics)
            except Exception as exc:  # one bad request must not take the listener down
                log.exception("HTTP %s %s failed", self.command, path)
                response = _json(500, {"error": f"internal error: {exc}", "code": 500})
            self._send(response)

        do_HEAD = do_GET

        def _refuse(self) -> None:
            self._drain()
            self.close_connection = True
            self._send(_json(405, {"error": f"method {self.command} not allowed: read-only, only {ALLOW}",
                                   "code": 405}), {"Allow": ALLOW})

        def _drain(self) -> None:
            # Read what the client sent, so that closing does not reset the connection
            # before it has read our answer.
            try:
                length = min(int(self.headers.get("Content-Length") or 0), MAX_DRAIN)
            except ValueError:
                length = 0
            if length > 0:
                self.rfile.read(length)

        def __getattr__(self, name: str) -> Any:
            # BaseHTTPRequestHandler answers 501 for a method without a do_X; every method
            # but GET and HEAD is 405 here, including ones it has never heard of.
            if name.startswith("do_"):
                return self._refuse
            raise AttributeError(name)

    return Handler


def serve(host: str, port: int, snapshot: Callable[[], SnapshotView], metrics: Metrics) -> Server:
    """Bind now (errors surface to the caller) and serve in a daemon thread."""
    server_cls = Server6 if ":" in host else Server
    server = server_cls((host, port), make_handler(snapshot, metrics))
    thread = threading.Thread(target=server.serve_forever, name="agentctl-http", daemon=True)
    thread.start()
    return server
