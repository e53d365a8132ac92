"""The scheduler's HTTP side: ``/health``, Prometheus ``/metrics``, ``/api/status`` and the dashboard ``/``.

Every request takes a snapshot of the scheduler on its event loop, so the pure
state is only ever touched from one thread.

Strangers reach this port too, so it is built like nginx rather than like
``ThreadingHTTPServer`` (a thread per connection, no timeouts):

- one thread reads every connection's request head with ``select``: a client that
  drips its head a byte at a time costs a socket and a few bytes, never a thread.
  The head must be complete ``READ_DEADLINE`` seconds after ``accept`` (a total,
  which dripping cannot extend), be at most ``MAX_HEAD`` bytes, and at most
  ``MAX_PENDING`` connections wait for theirs: a new one closes the oldest, which
  is the likeliest to be a slowloris (a real client sends its head at once);
- complete requests are answered by at most ``MAX_ACTIVE`` threads; one more
  gets a quick 503.  Each answer must be written within ``WRITE_TIMEOUT``;
- one request per connection (HTTP/1.0), so no idle keep-alive holds anything;
- a request whose ``Host`` is not one of this server's names is refused with 403
  (``HostPolicy``): a web page that rebinds its own DNS name to 127.0.0.1 cannot
  read ``/api/status``.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import logging
import re
import selectors
import socket
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from importlib import resources
from typing import Any, Generic, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..runtime.rate_limit import RateLimit
from .server import SchedulerServer

log = logging.getLogger("jobsched.scheduler")

SNAPSHOT_TIMEOUT = 5.0
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0)
READ_DEADLINE = 10.0  # seconds from accept to the end of the request head
WRITE_TIMEOUT = 10.0  # seconds to write one answer
MAX_HEAD = 16 * 1024  # bytes of request line and headers
MAX_PENDING = 256  # connections still sending their head
MAX_ACTIVE = 32  # requests being answered at once
ALLOW_ANY_HOST = "*"
REFUSAL_LOG_INTERVAL = 60.0  # seconds between warnings about refused requests


class StatusCollector:
    """Prometheus collector reading a fresh snapshot at every scrape."""

    def __init__(self, status: StatusServer) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        info = self.status.snapshot()
        workers = info["workers"].values()
        counters = info["counters"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"jobsched_{name}", doc, value=value)

        yield gauge("workers", "Workers connected", len(info["workers"]))
        yield gauge("clients", "Clients connected", info["clients"])
        yield gauge("slots", "Worker slots (threads) in total", info["slots"])
        yield gauge("slots_busy", "Worker slots running a batch", info["running"])
        batches = GaugeMetricFamily("jobsched_batches", "Batches by state", labels=["state"])
        batches.add_metric(["queued"], info["queued"])
        batches.add_metric(["running"], info["running"])
        yield batches
        submitted = CounterMetricFamily("jobsched_batches_submitted", "Batches submitted by clients")
        submitted.add_metric([], counters.get("submitted", 0))
        yield submitted
        done = CounterMetricFamily("jobsched_batches_done", "Batches finished, by outcome", labels=["status"])
        for status in ("ok", "error", "lost", "no-workers", "failed"):
            done.add_metric([status], counters.get(f"done:{status}", 0))
        yield done
        for name, doc, key in (
            ("worker_deaths", "Workers lost without a clean exit", "worker_deaths"),
            ("batches_requeued", "Batches rerun after their worker died", "requeued"),
        ):
            family = CounterMetricFamily(f"jobsched_{name}", doc)
            family.add_metric([], counters.get(key, 0))
            yield family
        yield gauge("data_keys", "Scattered data keys known", info["data_keys"])
        yield gauge("data_bytes", "Scattered data bytes held on workers", sum(w["data_bytes"] for w in workers))
        yield gauge("worker_memory_bytes", "Resident memory of all workers", sum(w["memory"] for w in workers))
        moved = CounterMetricFamily("jobsched_bytes", "Bytes through the scheduler's connections", labels=["direction"])
        moved.add_metric(["received"], info["bytes_received"])
        moved.add_metric(["sent"], info["bytes_sent"])
        yield moved
        yield from _user_families(info.get("users", {}))


# per user, from the admin view: metric name, help, the key in info["users"][name]
USER_SERIES = (
    ("running_batches", "Batches of the user's calls running (prefetched ones included)", "running"),
    ("queued_batches", "Batches of the user's calls waiting for a slot", "queued"),
    ("share", "The user's fraction of the busy slots (0..1)", "share"),
    ("usage_hour_seconds", "Slot-seconds of the user's batches finished in the last hour", "usage_hour"),
    ("usage_seconds", "The user's decayed usage in slot-seconds, which fair share orders users by", "usage"),
)


def _user_families(users: dict[str, dict[str, Any]]) -> Iterator[Metric]:
    for name, doc, key in USER_SERIES:
        family = GaugeMetricFamily(f"jobsched_user_{name}", doc, labels=["user"])
        for user, entry in sorted(users.items()):
            if user != "(others)":  # a non-admin's aggregate: the admin view has every user instead
                family.add_metric([user], float(entry.get(key, 0)))
        yield family


# ------------------------------------------------------------------ the Host check
def split_host(value: str) -> tuple[str, int | None] | None:
    """``Host`` header -> (name, port or None), names lower case without a trailing dot and IP
    literals in their canonical form; None if it is not a well-formed host[:port]."""
    value = value.strip()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or not _is_ip(name, 6):
            return None
    elif value.count(":") > 1:  # an IPv6 literal must be in brackets
        return None
    else:
        name, _, port_text = value.partition(":")
        rest = ":" + port_text if ":" in value else ""
    port: int | None = None
    if rest:
        digits = rest[1:]
        if not rest.startswith(":") or not (digits.isascii() and digits.isdigit()) or int(digits) > 65535:
            return None
        port = int(digits)
    name = name.lower().rstrip(".")
    if not _HOST_NAME.fullmatch(name):
        return None
    return _canonical(name), port


_HOST_NAME = re.compile(r"[a-z0-9_.:-]+")  # names, dotted IPv4 and (from inside brackets) IPv6


def _is_ip(text: str, version: int | None = None) -> bool:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    return version is None or address.version == version


def _canonical(name: str) -> str:
    return str(ipaddress.ip_address(name)) if _is_ip(name) else name


ALL_INTERFACES = ("", "0.0.0.0", "::")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class HostPolicy:
    """Which ``Host`` headers the dashboard answers to.

    Its own names (``own``) with no port or the bound ``port``; the names an admin allowed
    (``extra``, ``--dashboard-allow-host``) with any port, since a proxy in front may use
    another one (``*`` allows every Host); with ``any_ip``, every IP literal.  An IP literal
    cannot be the product of DNS rebinding, and a request without a Host header does not
    come from a browser, so neither is an attack this check is for.
    """

    port: int
    own: frozenset[str]
    extra: frozenset[str] = frozenset()
    any_ip: bool = False

    @classmethod
    def for_bound(cls, host: str, port: int, allowed: Iterable[str] = (),
                  machine_names: Iterable[str] = ()) -> HostPolicy:
        """The policy of a server bound to ``host``:``port``: that address; with a loopback
        address, the loopback names; with a non-loopback one, ``machine_names`` (the hostname
        and FQDN) too, and with every interface, any IP literal."""
        bound = _canonical(host.lower().strip("[]").rstrip("."))
        everywhere = bound in ALL_INTERFACES
        loopback = bound == "localhost" or (_is_ip(bound) and ipaddress.ip_address(bound).is_loopback)
        own = set() if everywhere else {bound}
        if loopback or everywhere:
            own.update(LOOPBACK_NAMES)
        if not loopback:
            own.update(name.lower().rstrip(".") for name in machine_names if name)
        extra = {_canonical(name.lower().strip("[]").rstrip(".")) for name in allowed if name}
        return cls(port, frozenset(own), frozenset(extra), everywhere)

    def allows(self, values: list[str]) -> bool:
        """Whether a request with these ``Host`` header values (none, one or more) may be answered."""
        if not values:
            return True
        if len(values) > 1:
            return False
        if ALLOW_ANY_HOST in self.extra:
            return True
        parsed = split_host(values[0])
        if parsed is None:
            return False
        name, port = parsed
        if name in self.extra:
            return True
        if port is not None and port != self.port:
            return False
        return name in self.own or (self.any_ip and _is_ip(name))

    def names(self) -> str:
        """The allowed names, for a refusal's message."""
        shown = sorted(self.own | self.extra) + (["any IP address"] if self.any_ip else [])
        return ", ".join(f"[{n}]" if ":" in n else n for n in shown)


def machine_names() -> list[str]:
    return [socket.gethostname(), socket.getfqdn()]


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
class _DeadlineWriter(io.RawIOBase):
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


class StatusServer:
    def __init__(self, scheduler: SchedulerServer, loop: asyncio.AbstractEventLoop, host: str, port: int,
                 allowed_hosts: Iterable[str] = ()) -> None:
        self.scheduler = scheduler
        self.loop = loop
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "jobsched_scheduling_latency_seconds",
            "Time to handle one event and send the batches it assigns",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(StatusCollector(self))
        scheduler.on_dispatch = self._observe
        self.httpd = HTTPFront(host, port, self._answer)
        bound_port = int(self.httpd.server_address[1])
        self.hosts = HostPolicy.for_bound(host, bound_port, allowed_hosts, machine_names())
        self.host_refusals = RateLimit(REFUSAL_LOG_INTERVAL)
        shown = f"[{host}]" if ":" in host else host
        self.address = f"http://{shown}:{bound_port}"
        self._handler = _handler_for(self)  # called once per request: the handler answers in __init__
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="jobsched-http", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("dashboard at %s", self.address)

    def stop(self) -> None:
        self.httpd.shutdown()
        self._thread.join(5)
        self.httpd.server_close()

    def _answer(self, sock: socket.socket, head: bytes, peer: Any) -> None:
        sock.setblocking(True)
        self._handler(head, sock, peer)

    def _observe(self, seconds: float, sent_batch: bool) -> None:
        if sent_batch:
            self.latency.observe(seconds)

    def snapshot(self) -> dict[str, Any]:
        async def take() -> dict[str, Any]:
            return self.scheduler.snapshot()

        return asyncio.run_coroutine_threadsafe(take(), self.loop).result(SNAPSHOT_TIMEOUT)

def _dashboard_page() -> bytes:
    return resources.files(__package__).joinpath("dashboard.html").read_bytes()


def _handler_for(status: StatusServer) -> Callable[[bytes, socket.socket, Any], object]:
    """Answers one request whose head the reading thread has read, on a blocking socket."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "jobsched"
        protocol_version = "HTTP/1.0"  # one request per connection: nothing idles in keep-alive

        def __init__(self, head: bytes, sock: socket.socket, peer: Any) -> None:
            self._head = head
            super().__init__(sock, peer, None)  # type: ignore[arg-type]  # no socketserver behind it

        def setup(self) -> None:
            self.connection = self.request
            self.rfile = io.BytesIO(self._head)
            self.wfile = io.BufferedWriter(_DeadlineWriter(self.connection, WRITE_TIMEOUT))

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            if not self._host_allowed():
                return
            try:
                if path == "/health":
                    status.snapshot()  # the loop answers: the scheduler is alive
                    self._reply(HTTPStatus.OK, b"ok\n", "text/plain; charset=utf-8")
                elif path == "/metrics":
                    self._reply(HTTPStatus.OK, generate_latest(status.registry), CONTENT_TYPE_LATEST)
                elif path == "/api/status":
                    body = json.dumps(status.snapshot(), default=str).encode()
                    self._reply(HTTPStatus.OK, body, "application/json")
                elif path in ("/", "/index.html"):
                    self._reply(HTTPStatus.OK, _dashboard_page(), "text/html; charset=utf-8")
                else:
                    self._reply(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")
            except Exception as exc:  # noqa: BLE001 - a broken request must not kill the thread
                log.warning("HTTP %s failed: %r", path, exc)
                self._reply(HTTPStatus.SERVICE_UNAVAILABLE, f"unavailable: {exc!r}\n".encode(), "text/plain; charset=utf-8")

        def _host_allowed(self) -> bool:
            hosts = self.headers.get_all("Host") or []
            if status.hosts.allows(hosts):
                return True
            shown = ", ".join(repr(h) for h in hosts)
            passes, held = status.host_refusals.passes(time.monotonic())
            log.log(logging.WARNING if passes else logging.DEBUG,
                    "HTTP: refused a request from %s for Host %s (not one of this dashboard's names; "
                    "--dashboard-allow-host adds one)%s", self.client_address[0], shown,
                    f"; {held} more refused since the last warning" if held else "")
            self._reply(HTTPStatus.FORBIDDEN,
                        f"Host {shown} is not allowed: this dashboard answers to {status.hosts.names()}. "
                        "Its admin can allow another name with --dashboard-allow-host NAME.\n".encode(),
                        "text/plain; charset=utf-8")
            return False

        def _reply(self, code: HTTPStatus, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet access log
            log.debug("http: " + format, *args)

    return Handler
