"""An HTTP front that strangers cannot exhaust: heads read by one thread, answers by a few.

Built like nginx rather than like ``ThreadingHTTPServer`` (a thread per connection,
no timeouts):

- one thread reads every connection's request head with ``select``: a client that
  drips its head a byte at a time costs a socket and a few bytes, never a thread.
  The head must be complete ``READ_DEADLINE`` seconds after ``accept`` (a total,
  which dripping cannot extend), be at most ``MAX_HEAD`` bytes, and at most
  ``MAX_PENDING`` connections wait for theirs: a new one closes the oldest, which
  is the likeliest to be a slowloris (a real client sends its head at once);
- complete requests are answered by at most ``MAX_ACTIVE`` threads; one more
  gets a quick 503.  Each answer must be written within ``WRITE_TIMEOUT``
  (``DeadlineWriter``);
- one request per connection (HTTP/1.0), so no idle keep-alive holds anything.

It knows nothing of the scheduler: ``answer(sock, head, peer)`` does the rest.
"""

from __future__ import annotations

import io
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Generic, TypeVar

from ..runtime.rate_limit import RateLimit

log = logging.getLogger("jobsched.scheduler")

READ_DEADLINE = 10.0  # seconds from accept to the end of the request head
WRITE_TIMEOUT = 10.0  # seconds to write one answer
MAX_HEAD = 16 * 1024  # bytes of request line and headers
MAX_PENDING = 256  # connections still sending their head
MAX_ACTIVE = 32  # requests being answered at once
REFUSAL_LOG_INTERVAL = 60.0  # seconds between warnings about refused requests


# ------------------------------------------------------------------ request heads
Key = TypeVar("Key", bound=Hashable)


class HeadTooLarge(Exception):
    """A request head past ``MAX_HEAD`` bytes."""


@dataclass
class _Head:
    opened: float
    data: bytearray = field(default_factory=bytearray)


class PendingHeads(Generic[Key]):
    """The connections still sending their request head, oldest first (pure: the caller does I/O).

    Each has ``deadline`` seconds from ``open`` for its whole head, however it trickles in.
    """

    def __init__(self, capacity: int = MAX_PENDING, deadline: float = READ_DEADLINE, max_head: int = MAX_HEAD) -> None:
        self.capacity, self.deadline, self.max_head = capacity, deadline, max_head
        self._heads: dict[Key, _Head] = {}  # insertion order: the order of opening

    def __len__(self) -> int:
        return len(self._heads)

    def __contains__(self, key: object) -> bool:
        return key in self._heads

    def open(self, key: Key, now: float) -> list[Key]:
        """Start waiting for ``key``'s head; returns the oldest connections dropped to make room."""
        evicted = []
        while len(self._heads) >= self.capacity:
            oldest = next(iter(self._heads))
            del self._heads[oldest]
            evicted.append(oldest)
        self._heads[key] = _Head(now)
        return evicted

    def feed(self, key: Key, chunk: bytes) -> bytes | None:
        """Bytes ``key`` sent: its complete head (and whatever followed) once the blank line is
        in, ending the wait; None while incomplete; HeadTooLarge (ending the wait) past ``max_head``."""
        head = self._heads[key]
        seen = len(head.data)
        head.data += chunk
        start = max(seen - 3, 0)
        end = min(_head_end(head.data, start), self.max_head + 1)
        if end <= self.max_head:
            del self._heads[key]
            return bytes(head.data)
        if len(head.data) > self.max_head:
            del self._heads[key]
            raise HeadTooLarge(f"request head over {self.max_head} bytes")
        return None

    def drop(self, key: Key) -> None:
        self._heads.pop(key, None)

    def expired(self, now: float) -> list[Key]:
        """The connections past their deadline, no longer waited for."""
        late = []
        for key, head in self._heads.items():
            if now < head.opened + self.deadline:
                break  # opened in order: every later one is younger
            late.append(key)
        for key in late:
            del self._heads[key]
        return late

    def next_deadline(self) -> float | None:
        """When the oldest wait ends, if any."""
        for head in self._heads.values():
            return head.opened + self.deadline
        return None


def _head_end(data: bytearray, start: int) -> int:
    """Where the blank line ending a head finishes (http.server also takes bare LFs); a huge value if absent."""
    ends = [i + len(mark) for mark in (b"\r\n\r\n", b"\n\n") if (i := data.find(mark, start)) >= 0]
    return min(ends) if ends else 1 << 62


# ------------------------------------------------------------------ the server
class DeadlineWriter(io.RawIOBase):
    """A socket's output, all of it written within ``seconds`` of the first write."""

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        self._sock, self._seconds = sock, seconds
        self._deadline: float | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + self._seconds
        remaining = self._deadline - now
        if remaining <= 0:
            raise TimeoutError("write deadline passed")
        self._sock.settimeout(remaining)  # sendall's timeout bounds the whole call
        self._sock.sendall(data)
        return len(data)


def _quick_reply(sock: socket.socket, code: HTTPStatus, text: str) -> None:
    """A short answer from the reading thread: what fits in the socket's buffer now, never waiting."""
    body = text.encode()
    head = (f"HTTP/1.0 {code.value} {code.phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    try:
        sock.send(head + body)
    except OSError:
        pass


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


class HTTPFront:
    """Accepts connections, reads their heads in one thread, and hands each complete request to
    ``answer(sock, head, client_address)`` on one of ``max_active`` threads (see the module's doc)."""

    def __init__(self, host: str, port: int, answer: Callable[[socket.socket, bytes, Any], None], *,
                 max_active: int = MAX_ACTIVE, pending: PendingHeads[socket.socket] | None = None) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.create_server((host, port), family=family, backlog=128)
        self.listener.setblocking(False)
        self.server_address = self.listener.getsockname()
        self._answer = answer
        self._pending: PendingHeads[socket.socket] = pending or PendingHeads()
        self._peers: dict[socket.socket, Any] = {}
        self._max_active = max_active
        self._active = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_active, thread_name_prefix="jobsched-http")
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = False
        self.busy_refusals = 0
        self._busy_log = RateLimit(REFUSAL_LOG_INTERVAL)

    def serve_forever(self) -> None:
        self._selector.register(self.listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        while not self._stopping:
            deadline = self._pending.next_deadline()
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0) + 0.01
            for key, _ in self._selector.select(timeout):
                sock = key.fileobj
                if sock is self.listener:
                    self._accept()
                elif sock is not self._wake_r:
                    assert isinstance(sock, socket.socket)
                    self._read(sock)
            for sock in self._pending.expired(time.monotonic()):
                _quick_reply(sock, HTTPStatus.REQUEST_TIMEOUT, f"request head not complete within {READ_DEADLINE:g} s\n")
                self._forget(sock)
        for sock in list(self._peers):
            self._forget(sock)

    def shutdown(self) -> None:
        self._stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def server_close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for sock in (self.listener, self._wake_r, self._wake_w):
            _close(sock)
        self._selector.close()

    def _accept(self) -> None:
        for _ in range(64):  # then let the reads of those already in have their turn
            try:
                sock, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of file descriptors: a later round may do better
                log.warning("HTTP accept failed: %s", exc)
                return
            sock.setblocking(False)
            for oldest in self._pending.open(sock, time.monotonic()):
                self._forget(oldest)
            self._peers[sock] = peer
            self._selector.register(sock, selectors.EVENT_READ)

    def _read(self, sock: socket.socket) -> None:
        try:
            chunk = sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._pending.drop(sock)
            self._forget(sock)
            return
        try:
            head = self._pending.feed(sock, chunk)
        except HeadTooLarge as exc:
            _quick_reply(sock, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"{exc}\n")
            self._forget(sock)
            return
        if head is not None:
            self._dispatch(sock, head)

    def _dispatch(self, sock: socket.socket, head: bytes) -> None:
        self._selector.unregister(sock)
        peer = self._peers.pop(sock)
        with self._lock:
            busy = self._active >= self._max_active
            if not busy:
                self._active += 1
        if busy:
            self.busy_refusals += 1
            passes, held = self._busy_log.passes(time.monotonic())
            if passes:
                log.warning("HTTP: %d requests at once; refusing more with 503 (%d more refused since the last "
                            "warning)", self._max_active, held)
            _quick_reply(sock, HTTPStatus.SERVICE_UNAVAILABLE, "busy: too many requests at once; try again\n")
            _close(sock)
            return
        self._pool.submit(self._run, sock, head, peer)

    def _run(self, sock: socket.socket, head: bytes, peer: Any) -> None:
        try:
            self._answer(sock, head, peer)
        except Exception as exc:  # noqa: BLE001 - a broken connection must not end the thread
            log.debug("HTTP answer to %s failed: %r", peer, exc)
        finally:
            _close(sock)
            with self._lock:
                self._active -= 1

    def _forget(self, sock: socket.socket) -> None:
        """Stop watching ``sock`` (still waiting for its head) and close it."""
        self._peers.pop(sock, None)
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        _close(sock)

