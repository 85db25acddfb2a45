"""The small key-value interface the fleet needs from etcd, and its etcd v3 gateway implementation.

Effects layer, called from worker threads of the fleet coordinator and by `agentctl drain`.
It speaks etcd's JSON gateway (/v3/...) through etcd3gw's HTTP session, imported lazily;
it knows nothing of hosts or instances, and never retries a write on its own.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from controller.fleet.records import Entry


class KVError(Exception):
    """etcd could not be reached or answered with an error: the outcome of a write is unknown."""


@dataclass(frozen=True)
class Compare:
    """One condition of a transaction: `target` of key compared with `value` by `result`."""

    key: str
    target: str  # CREATE | MOD | VALUE | LEASE
    value: int | bytes
    result: str = "EQUAL"


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: str


class KV(Protocol):
    def grant(self, ttl: int) -> int: ...
    def keepalive(self, lease: int) -> int: ...
    def revoke(self, lease: int) -> None: ...
    def range(self, prefix: str) -> tuple[int, list[Entry]]: ...
    def txn(self, compares: Sequence[Compare], success: Sequence[Put | Delete]) -> tuple[bool, int]: ...
    def watch(self, prefix: str, on_event: Callable[[], None], on_closed: Callable[[], None]) -> Callable[[], None]: ...


def _b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode()


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def prefix_end(prefix: str) -> str:
    """The range end that selects every key starting with prefix (etcd's `--prefix`)."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return _b64(bytes(raw))


def _compare_json(c: Compare) -> dict[str, Any]:
    field = {"CREATE": "create_revision", "MOD": "mod_revision", "VALUE": "value", "LEASE": "lease"}[c.target]
    value: Any = _b64(c.value) if isinstance(c.value, bytes) else str(c.value)
    return {"key": _b64(c.key), "target": c.target, "result": c.result, field: value}


def _op_json(op: Put | Delete) -> dict[str, Any]:
    if isinstance(op, Put):
        return {"request_put": {"key": _b64(op.key), "value": _b64(op.value), "lease": str(op.lease)}}
    return {"request_delete_range": {"key": _b64(op.key)}}


class EtcdKV:
    """etcd through its gRPC JSON gateway; endpoints tried in turn when one cannot be reached."""

    def __init__(self, endpoints: Sequence[str], *, timeout: float, ca_file: str | None = None,
                 cert_file: str | None = None, key_file: str | None = None) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoint given")
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self._tls = (ca_file, cert_file, key_file)
        self._clients: dict[str, Any] = {}
        self._current = 0
        self._lock = threading.Lock()

    def _client(self, endpoint: str) -> Any:
        client = self._clients.get(endpoint)
        if client is None:
            from etcd3gw.client import Etcd3Client  # lazy: only a fleet controller loads the etcd client

            url = urlsplit(endpoint)
            if not url.hostname or url.scheme not in ("http", "https"):
                raise KVError(f"etcd endpoint {endpoint!r} is not http(s)://HOST[:PORT]")
            ca, cert, key = self._tls
            # the gateway of etcd >= 3.4 is /v3/; fixed here so no /version round trip is needed
            client = Etcd3Client(host=url.hostname, port=url.port or 2379, protocol=url.scheme, ca_cert=ca, cert_cert=cert, cert_key=key,
                                 timeout=self.timeout, api_path="/v3/")
            self._clients[endpoint] = client
        return client

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        from etcd3gw import exceptions

        errors: list[str] = []
        with self._lock:
            start = self._current
        for step in range(len(self.endpoints)):
            index = (start + step) % len(self.endpoints)
            endpoint = self.endpoints[index]
            client = self._client(endpoint)
            try:
                result: dict[str, Any] = client.post(client.get_url(path), json=body)
            except (exceptions.ConnectionFailedError, exceptions.ConnectionTimeoutError) as exc:
                errors.append(f"{endpoint}: {str(exc)[:200]}")
                continue
            except exceptions.Etcd3Exception as exc:
                raise KVError(f"{endpoint}: {str(exc)[:300]}") from exc
            with self._lock:
                self._current = index
            return result
        raise KVError("etcd unreachable: " + "; ".join(errors))

    def grant(self, ttl: int) -> int:
        return int(self._post("/lease/grant", {"TTL": ttl, "ID": 0})["ID"])

    def keepalive(self, lease: int) -> int:
        """The lease's remaining TTL after the renewal, or 0 if it no longer exists."""
        result = self._post("/lease/keepalive", {"ID": lease}).get("result", {})
        return max(0, int(result.get("TTL", 0)))

    def revoke(self, lease: int) -> None:
        try:
            self._post("/kv/lease/revoke", {"ID": lease})
        except KVError as exc:
            if "not found" not in str(exc):
                raise

    def range(self, prefix: str) -> tuple[int, list[Entry]]:
        """A linearizable read of every key under prefix, with the store revision it saw."""
        reply = self._post("/kv/range", {"key": _b64(prefix), "range_end": prefix_end(prefix)})
        entries = [Entry(_unb64(kv.get("key")).decode(), _unb64(kv.get("value")), int(kv.get("create_revision", 0)),
                         int(kv.get("mod_revision", 0)), int(kv.get("lease", 0)))
                   for kv in reply.get("kvs", [])]
        return int(reply["header"]["revision"]), entries

    def txn(self, compares: Sequence[Compare], success: Sequence[Put | Delete]) -> tuple[bool, int]:
        """Compare-and-swap: (whether the compares held and the ops ran, the store revision after)."""
        reply = self._post("/kv/txn", {"compare": [_compare_json(c) for c in compares],
                                       "success": [_op_json(op) for op in success]})
        return bool(reply.get("succeeded", False)), int(reply["header"]["revision"])

    def watch(self, prefix: str, on_event: Callable[[], None], on_closed: Callable[[], None]) -> Callable[[], None]:
        """Calls on_event (from a thread of its own) for every message of a watch on prefix, and
        on_closed when the stream ends; returns cancel. Only a wake-up: the caller re-reads what
        it needs, so a lost event costs latency, never correctness. Nothing here blocks the
        caller, also when etcd cannot be reached (the connect happens in the thread)."""
        with self._lock:
            endpoint = self.endpoints[self._current]
        client = self._client(endpoint)
        url = client.get_url("/watch")
        body = {"create_request": {"key": _b64(prefix), "range_end": prefix_end(prefix)}}
        state: dict[str, Any] = {"response": None, "cancelled": False}

        def pump() -> None:
            try:
                # connect within the request timeout; then wait for events as long as the stream lives
                response = client.session.post(url, json=body, stream=True, timeout=(self.timeout, None))
                state["response"] = response
                for line in response.iter_lines():
                    if state["cancelled"]:
                        break
                    if line.strip():
                        on_event()
            except Exception:  # noqa: BLE001 - any end of the stream is reported through on_closed
                pass
            if not state["cancelled"]:
                on_closed()

        def cancel() -> None:
            state["cancelled"] = True
            response = state["response"]
            if response is not None:
                response.close()

        threading.Thread(target=pump, name="etcd-watch", daemon=True).start()
        return cancel
