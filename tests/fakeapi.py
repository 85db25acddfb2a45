"""A model API on loopback for the real CLIs: every request gets the answer "hi" at once.

Serves the two streaming endpoints the locked CLIs call (claude 2.1.332: Anthropic Messages
`POST /v1/messages`; codex-cli 0.171.0: OpenAI Responses `POST /v1/responses`, over plain HTTP
when its provider config says `supports_websockets = false`), so a real turn completes offline
and the CLIs' own turn-end signals (claude's Stop hook, codex's notify, `result`,
`turn.completed`) can be seen. 127.0.0.1 only, a free port, stopped by the test that started it.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def _sse(events: list[tuple[str, dict[str, Any]]]) -> bytes:
    return "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events).encode()


def anthropic_tool_use(model: str, command: str) -> bytes:
    """A turn that runs a shell command: claude asks for permission unless its mode allows it."""
    message = {"id": "msg_2", "type": "message", "role": "assistant", "model": model, "content": [],
               "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 5, "output_tokens": 1}}
    block = {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {}}
    args = json.dumps({"command": command, "description": "Touch a file"})
    return _sse([
        ("message_start", {"type": "message_start", "message": message}),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "input_json_delta", "partial_json": args}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                           "usage": {"output_tokens": 1}}),
        ("message_stop", {"type": "message_stop"}),
    ])


def _wants_a_turn(body: dict[str, Any]) -> bool:
    """The main conversation (it offers tools) before any tool result came back."""
    return bool(body.get("tools")) and "tool_result" not in json.dumps(body.get("messages", []))


def anthropic_stream(model: str) -> bytes:
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": model, "content": [],
               "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 5, "output_tokens": 1}}
    return _sse([
        ("message_start", {"type": "message_start", "message": message}),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                           "usage": {"output_tokens": 1}}),
        ("message_stop", {"type": "message_stop"}),
    ])


def anthropic_message(model: str) -> bytes:
    return json.dumps({"id": "msg_1", "type": "message", "role": "assistant", "model": model,
                       "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn", "stop_sequence": None,
                       "usage": {"input_tokens": 5, "output_tokens": 1}}).encode()


def responses_stream() -> bytes:
    item = {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": "hi", "annotations": []}]}
    done = {"id": "resp_1", "object": "response", "status": "completed", "output": [item],
            "usage": {"input_tokens": 5, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 1,
                      "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 6}}
    return _sse([
        ("response.created", {"type": "response.created", "response": {**done, "status": "in_progress", "output": []}}),
        ("response.output_item.done", {"type": "response.output_item.done", "output_index": 0, "item": item}),
        ("response.completed", {"type": "response.completed", "response": done}),
    ])


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.send_response(404)
        self.end_headers()

    def do_POST(self) -> None:  # noqa: N802
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw)
        except ValueError:
            body = {}
        self.server.requests.append(self.path)  # type: ignore[attr-defined]
        model = str(body.get("model", "model"))
        if "count_tokens" in self.path:
            self._send(b'{"input_tokens": 5}', "application/json")
        elif "/messages" in self.path:
            stream = bool(body.get("stream"))
            command = self.server.tool_command  # type: ignore[attr-defined]
            if stream and command and _wants_a_turn(body):
                self._send(anthropic_tool_use(model, command), "text/event-stream")
                return
            self._send(anthropic_stream(model) if stream else anthropic_message(model),
                       "text/event-stream" if stream else "application/json")
        elif "/responses" in self.path:
            self._send(responses_stream(), "text/event-stream")
        else:
            self.send_response(404)
            self.end_headers()

    def _send(self, data: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class FakeModelApi:
    """`with FakeModelApi() as api:` serves on api.url until the block ends. With `tool_command`,
    claude's turn asks to run that shell command first."""

    def __init__(self, *, tool_command: str = "") -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.tool_command = tool_command  # type: ignore[attr-defined]
        self.server.requests = []  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def requests(self) -> list[str]:
        return list(self.server.requests)  # type: ignore[attr-defined]

    def __enter__(self) -> FakeModelApi:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)
