"""The read-only HTTP listener: /metrics, /healthz, /readyz, /api/v1/agents[/NAME].

Runs in its own thread and reads only the controller's immutable snapshot; nothing served
here can change state (GET and HEAD only, anything else is 405).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from controller.metrics import Metrics

log = logging.getLogger("agentctl.http")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def make_handler(snapshot: Callable[[], Any], metrics: Metrics) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "agentctl"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            log.debug("%s " + format, self.address_string(), *args)

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, code: int, data: Any) -> None:
            self._send(code, json.dumps(data, indent=None).encode(), "application/json")

        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            path = self.path.split("?", 1)[0].rstrip("/") or "/"
            snap = snapshot()
            if path == "/metrics":
                self._send(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._send(200, b"ok\n", "text/plain")
            elif path == "/readyz":
                ok = snap.ready
                self._send(200 if ok else 503, b"ready\n" if ok else b"first reconcile pass not done\n", "text/plain")
            elif path == "/api/v1/agents":
                self._json(200, {"items": [snap.statuses[n] for n in sorted(snap.statuses)]})
            elif path.startswith("/api/v1/agents/"):
                name = path.removeprefix("/api/v1/agents/")
                if name in snap.statuses:
                    self._json(200, snap.statuses[name])
                else:
                    self._json(404, {"error": f"agent {name!r} not found"})
            else:
                self._json(404, {"error": f"no such path {path!r}"})

        do_HEAD = do_GET

        def _refuse(self) -> None:
            self.send_response(405)
            self.send_header("Allow", "GET, HEAD")
            body = json.dumps({"error": "read-only: only GET and HEAD"}).encode()
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse

    return Handler


def serve(host: str, port: int, snapshot: Callable[[], Any], metrics: Metrics) -> Server:
    """Bind now (errors surface to the caller) and serve in a daemon thread."""
    server_cls = Server
    if ":" in host:
        import socket

        class Server6(Server):
            address_family = socket.AF_INET6

        server_cls = Server6
    server = server_cls((host, port), make_handler(snapshot, metrics))
    thread = threading.Thread(target=server.serve_forever, name="agentctl-http", daemon=True)
    thread.start()
    return server
