"""Hostile clients against a live scheduler's HTTP side (dashboard, ``/health``, ``/metrics``).

A real ``jobsched-scheduler`` with its dashboard on a free loopback port takes a slowloris
barrage: 200 connections that send part of a request head and then drip one more byte a
second, and 100 that connect and send nothing.  Meanwhile a normal client still gets
``/metrics`` and ``/health``; the server closes every hostile connection once its head
deadline has passed (the oldest ones earlier, to make room); its thread count stays bounded.
Then the Host check: ``evil.example`` (a DNS-rebinding page) is refused, the bound address
and a name the admin allowed are answered.  The figures are printed with ``HOSTILE-HTTP``
(run with ``-s`` to see them).
"""

from __future__ import annotations

import selectors
import socket
import statistics
import threading
import time
from urllib.parse import urlsplit

import psutil
import pytest
from support import Daemon, dashboard_of, http_get, wait_until

from jobsched.scheduler.http_front import MAX_ACTIVE, MAX_HEAD, MAX_PENDING, READ_DEADLINE

DRIPPERS = 200
SILENT = 100
DRIP_INTERVAL = 1.0
ALLOWED = "dash.lab.example"


def dashboard_port(sched: Daemon) -> int:
    port = urlsplit(dashboard_of(sched).url).port
    assert port is not None
    return port


def raw_get(port: int, path: str, host: str | None, extra: bytes = b"") -> tuple[int, str]:
    """(status, body) of a GET sent byte for byte as given (urllib would set its own Host)."""
    head = f"GET {path} HTTP/1.1\r\n".encode() + (f"Host: {host}\r\n".encode() if host is not None else b"")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + extra + b"Connection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2].decode()


class Barrage:
    """Slowloris and silent connections, and when the server closed each (one thread watches and drips)."""

    def __init__(self, port: int) -> None:
        self.drippers = [self._connect(port) for _ in range(DRIPPERS)]
        for sock in self.drippers:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        self.silent = [self._connect(port) for _ in range(SILENT)]
        self.opened = time.monotonic()
        self.closed_at: dict[socket.socket, float] = {}
        self.bytes_dripped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slowloris", daemon=True)
        self._thread.start()

    @staticmethod
    def _connect(port: int) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.setblocking(False)
        return sock

    def open_count(self) -> int:
        return DRIPPERS + SILENT - len(self.closed_at)

    def _run(self) -> None:
        watch = selectors.DefaultSelector()
        for sock in self.drippers + self.silent:
            watch.register(sock, selectors.EVENT_READ)
        next_drip = time.monotonic()
        while not self._stop.is_set() and len(self.closed_at) < DRIPPERS + SILENT:
            for key, _ in watch.select(0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    if sock.recv(65536):
                        continue  # the server's 408, before it closes
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                self.closed_at[sock] = time.monotonic()
                watch.unregister(sock)
            if time.monotonic() >= next_drip:
                next_drip += DRIP_INTERVAL
                for sock in self.drippers:
                    if sock not in self.closed_at:
                        try:
                            self.bytes_dripped += sock.send(b"x")
                        except OSError:
                            pass  # closed: the watch above notes it
        watch.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for sock in self.drippers + self.silent:
            sock.close()


def threads(sched: Daemon) -> int:
    return psutil.Process(sched.pid).num_threads()


@pytest.mark.timeout(120)
def test_slowloris_does_not_stop_metrics(pool):
    sched = pool.scheduler("--dashboard-address", "127.0.0.1:0")
    port = dashboard_port(sched)
    base = dashboard_of(sched).url
    assert http_get(base + "/metrics")[0] == 200
    threads_before = threads(sched)

    barrage = Barrage(port)
    try:
        wait_until(lambda: len(barrage.closed_at) >= DRIPPERS + SILENT - MAX_PENDING, 10,
                   lambda: f"only {len(barrage.closed_at)} of the oldest connections closed")
        evicted_at_once = len(barrage.closed_at)
        latencies, threads_during = [], []
        for i in range(30):
            started = time.monotonic()
            code, _, body = http_get(base + ("/metrics" if i % 3 else "/health"))
            latencies.append(time.monotonic() - started)
            assert code == 200, body
            threads_during.append(threads(sched))
            time.sleep(0.05)
        metrics_done = time.monotonic() - barrage.opened
        open_after_metrics = barrage.open_count()

        wait_until(lambda: barrage.open_count() == 0, READ_DEADLINE + 20,
                   lambda: f"{barrage.open_count()} hostile connections still open")
        last_closed = max(barrage.closed_at.values()) - barrage.opened
        dripped = barrage.bytes_dripped
    finally:
        barrage.close()
    code, _, _ = http_get(base + "/metrics")
    assert code == 200
    threads_after = threads(sched)

    print(f"\nHOSTILE-HTTP slowloris {DRIPPERS} dripping + {SILENT} silent connections "
          f"(cap {MAX_PENDING} waiting for a head, {MAX_ACTIVE} answering, head deadline {READ_DEADLINE:g} s): "
          f"{evicted_at_once} oldest closed at once for newer ones; /metrics+/health x{len(latencies)} all 200, "
          f"latency median {statistics.median(latencies) * 1000:.1f} ms max {max(latencies) * 1000:.1f} ms "
          f"(done {metrics_done:.1f} s into the barrage, {open_after_metrics} hostile still open then); "
          f"{dripped} bytes dripped; every hostile connection closed by the server {last_closed:.1f} s after opening")
    print(f"HOSTILE-HTTP scheduler threads before {threads_before}, during max {max(threads_during)}, "
          f"after {threads_after}")
    assert max(threads_during) <= threads_before + MAX_ACTIVE
    assert threads_after <= threads_before + MAX_ACTIVE
    assert sched.proc.poll() is None


@pytest.mark.timeout(60)
def test_only_the_dashboards_own_and_allowed_hosts_are_answered(pool):
    sched = pool.scheduler("--dashboard-address", "127.0.0.1:0", "--dashboard-allow-host", ALLOWED)
    port = dashboard_port(sched)
    for path in ("/api/status", "/metrics", "/health", "/"):
        code, body = raw_get(port, path, "evil.example")
        assert code == 403, (path, body)
        assert "not allowed" in body and "--dashboard-allow-host" in body and '"workers"' not in body
    assert raw_get(port, "/api/status", f"evil.example:{port}")[0] == 403
    assert raw_get(port, "/api/status", "127.0.0.1:1")[0] == 403  # our name, another port: not us
    code, body = raw_get(port, "/api/status", "127.0.0.1", extra=b"Host: evil.example\r\n")
    assert code == 403  # two Hosts: refused rather than guessed
    answered = {}
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", ALLOWED, f"{ALLOWED}:443", None):
        code, body = raw_get(port, "/api/status", host)
        answered[host] = code
        assert code == 200 and '"workers"' in body, (host, code, body)
    print(f"\nHOSTILE-HTTP Host check: evil.example -> 403; answered {answered}")
    assert "refused a request from 127.0.0.1 for Host 'evil.example'" in sched.log()


@pytest.mark.timeout(60)
def test_an_oversized_head_is_refused(pool):
    sched = pool.scheduler("--dashboard-address", "127.0.0.1:0")
    port = dashboard_port(sched)
    code, body = raw_get(port, "/metrics", f"127.0.0.1:{port}", extra=b"X-Pad: " + b"a" * MAX_HEAD + b"\r\n")
    assert code == 431, body
    assert raw_get(port, "/health", f"127.0.0.1:{port}")[0] == 200
