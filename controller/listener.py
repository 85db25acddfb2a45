"""A bounded TCP listener: one selector thread holds each connection until its request head is
in, then a fixed pool of worker threads answers it. Runtime layer; http.serve() builds one.
It bounds what any local user can make the controller hold (sockets, threads, seconds per head)
and knows nothing of HTTP beyond finding the end of a request head.
"""

from __future__ import annotations

import errno
import logging
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("agentctl.http")

MAX_CONNECTIONS = 64  # open client sockets, idle or being answered
WORKERS = 4  # threads that answer complete requests
HEAD_TIMEOUT = 5.0  # seconds from accept to a complete request head (slowloris, idle keep-open)
MAX_HEAD = 16 * 1024  # bytes of request line + headers
ACCEPT_PAUSE = 0.2  # seconds without accepting after the fd table was full
HEAD_END = (b"\r\n\r\n", b"\n\n")

Handler = Callable[[socket.socket, bytes, tuple[str, int]], None]


@dataclass
class _Pending:
    """A connection whose request head is still arriving."""

    sock: socket.socket
    addr: tuple[str, int]
    deadline: float
    buf: bytearray = field(default_factory=bytearray)


def head_complete(buf: bytes | bytearray) -> bool:
    return any(end in buf for end in HEAD_END)


class Listener:
    """serve_forever()/shutdown()/server_close()/server_address, like socketserver's servers."""

    def __init__(self, host: str, port: int, handler: Handler, *, max_connections: int = MAX_CONNECTIONS,
                 workers: int = WORKERS, head_timeout: float = HEAD_TIMEOUT) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind((host, port))
            self.socket.listen(128)
        except OSError:
            self.socket.close()
            raise
        self.socket.setblocking(False)
        self.server_address: tuple[str, int] = self.socket.getsockname()[:2]
        self.handler = handler
        self.max_connections = max_connections
        self.head_timeout = head_timeout
        self._pending: dict[int, _Pending] = {}  # fd -> connection, oldest first
        self._busy = 0  # connections handed to workers and not yet closed
        self._lock = threading.Lock()
        self._jobs: queue.Queue[tuple[socket.socket, bytes, tuple[str, int]] | None] = queue.Queue()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._accept_paused_until = 0.0
        self._workers = [threading.Thread(target=self._work, name=f"agentctl-http-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._workers:
            t.start()

    # -- the selector thread --------------------------------------------------
    def serve_forever(self) -> None:
        self._sel.register(self.socket, selectors.EVENT_READ)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stopping.is_set():
                try:
                    self._once()
                except Exception:  # one bad connection or a transient error must not end the listener
                    log.exception("HTTP listener iteration failed")
                    time.sleep(0.05)
        finally:
            self._stopped.set()

    def _once(self) -> None:
        now = time.monotonic()
        self._resume_accepting(now)
        for key, _ in self._sel.select(self._timeout(now)):
            if key.fileobj is self.socket:
                self._accept()
            elif key.fileobj is self._wake_r:
                self._drain_wake()
            else:
                self._read(key.fd)
        self._expire(time.monotonic())

    def _timeout(self, now: float) -> float | None:
        """Until the next head deadline or accept resumption; None (sleep until a socket or
        shutdown wakes us) when nothing is due, so an idle listener never wakes (idle CPU)."""
        due = [p.deadline for p in self._pending.values()]
        if self._accept_paused_until:
            due.append(self._accept_paused_until)
        if not due:
            return None
        return max(0.0, min(min(due) - now, 1.0))

    def _accept(self) -> None:
        for _ in range(self.max_connections):  # bounded per wake-up: expiry and reads get their turn
            try:
                sock, addr = self.socket.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                self._accept_failed(exc)
                return
            self._admit(sock, addr)

    def _accept_failed(self, exc: OSError) -> None:
        if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            return  # ECONNABORTED and the like: that client is gone, nothing to do
        if exc.errno == errno.EMFILE and self._evict_oldest():
            return  # out of fds while holding idle connections: one of them makes room for this one
        # The listening socket stays readable: stop watching it for a moment instead of spinning.
        log.warning("HTTP accept failed (%s); pausing new connections for %.1fs", exc.strerror, ACCEPT_PAUSE)
        self._sel.unregister(self.socket)
        self._accept_paused_until = time.monotonic() + ACCEPT_PAUSE

    def _resume_accepting(self, now: float) -> None:
        if self._accept_paused_until and now >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            self._sel.register(self.socket, selectors.EVENT_READ)

    def _admit(self, sock: socket.socket, addr: tuple[str, int]) -> None:
        if self._open_count() >= self.max_connections and not self._evict_oldest():
            sock.close()  # every slot is being answered right now: refuse at once
            return
        sock.setblocking(False)
        self._pending[sock.fileno()] = _Pending(sock, addr, time.monotonic() + self.head_timeout)
        self._sel.register(sock, selectors.EVENT_READ)

    def _open_count(self) -> int:
        with self._lock:
            return len(self._pending) + self._busy

    def _evict_oldest(self) -> bool:
        """Close the connection that has waited longest for its head: a flood of idle
        connections then only ever pushes out its own, and a real client still gets in."""
        if not self._pending:
            return False
        self._close(next(iter(self._pending)))
        return True

    def _read(self, fd: int) -> None:
        pending = self._pending.get(fd)
        if pending is None:
            return
        try:
            chunk = pending.sock.recv(MAX_HEAD + 1 - len(pending.buf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._close(fd)
            return
        pending.buf += chunk
        if head_complete(pending.buf) or len(pending.buf) > MAX_HEAD:
            self._dispatch(fd)  # an oversized head goes on too: the handler answers 431

    def _dispatch(self, fd: int) -> None:
        pending = self._pending.pop(fd)
        self._sel.unregister(pending.sock)
        with self._lock:
            self._busy += 1
        self._jobs.put((pending.sock, bytes(pending.buf), pending.addr))

    def _expire(self, now: float) -> None:
        for fd in [fd for fd, p in self._pending.items() if p.deadline <= now]:
            self._close(fd)

    def _close(self, fd: int) -> None:
        pending = self._pending.pop(fd)
        self._sel.unregister(pending.sock)
        pending.sock.close()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(64):
                pass
        except BlockingIOError:
            pass

    # -- workers --------------------------------------------------------------
    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            sock, head, addr = job
            try:
                self.handler(sock, head, addr)
            except Exception:  # noqa: BLE001 - a failed answer is logged; the worker goes on
                log.exception("HTTP request from %s failed", addr[0])
            finally:
                sock.close()
                with self._lock:
                    self._busy -= 1

    # -- lifecycle ------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop serve_forever() and the workers; in-flight answers finish first."""
        self._stopping.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        for _ in self._workers:
            self._jobs.put(None)
        for t in self._workers:
            t.join(10)

    def server_close(self) -> None:
        self._stopped.wait(5)
        for fd in list(self._pending):
            self._close(fd)
        self._sel.close()
        for s in (self.socket, self._wake_r, self._wake_w):
            s.close()
