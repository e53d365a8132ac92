"""The scheduler's HTTP side: ``/health``, Prometheus ``/metrics``, ``/api/status`` and the dashboard ``/``.

Every request takes a snapshot of the scheduler on its event loop, so the pure
state is only ever touched from one thread.

Strangers reach this port too: requests come through ``HTTPFront`` (bounded heads,
threads and write times, see ``http_front``), and one whose ``Host`` is not one of this
server's names is refused with 403 (``HostPolicy``, see ``host_policy``).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from importlib import resources
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..runtime.rate_limit import RateLimit
from .host_policy import HostPolicy, machine_names
from .http_front import REFUSAL_LOG_INTERVAL, WRITE_TIMEOUT, DeadlineWriter, HTTPFront
from .server import SchedulerServer

log = logging.getLogger("jobsched.scheduler")

SNAPSHOT_TIMEOUT = 5.0
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0)


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
            self.wfile = io.BufferedWriter(DeadlineWriter(self.connection, WRITE_TIMEOUT))

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
