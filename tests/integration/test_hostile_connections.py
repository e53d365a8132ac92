"""Strangers and broken peers at the connection level, against real daemons.

- a ``tls://`` scheduler after 1,000 plain TCP probes and 300 half-open connections still
  lets a worker and a client in, and its count of unauthenticated connections returns to 0;
- 200 unauthenticated connections from one address do not keep a client from another out;
- a peer that floods status requests and never reads: the scheduler stops reading it, its
  memory stays bounded, others are served, and the peer is disconnected once it has read
  nothing for the heartbeat timeout.

Figures are printed with the prefix ``HOSTILE-CONN``.
"""

from __future__ import annotations

import socket
import time

import psutil
import pytest
from support import (
    closed_by_peer,
    message_bytes,
    registered_client_socket,
    squares,
    wait_for_workers,
    wait_until,
)
from test_security import PKI, SECRET

import jobsched
from jobsched.protocol import messages as m
from jobsched.protocol.address import parse_address

pytestmark = pytest.mark.integration
MiB = 2**20


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


def connect_from(address: str, source: str = "127.0.0.1") -> socket.socket:
    parsed = parse_address(address)
    host, port = parsed.host, parsed.port
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(5)
    sock.connect((host, port))
    return sock


@pytest.mark.timeout(120)
def test_tls_scheduler_after_probes_and_half_open_connections_lets_a_worker_and_a_client_in(daemons, pki):
    sched = daemons.scheduler(*pki.scheduler_args(), secret=SECRET)
    for _ in range(1000):  # plain TCP probes: connect and close (nc -z, a blackbox exporter)
        connect_from(sched.address).close()
    half_open = [connect_from(sched.address) for _ in range(300)]  # connect, never speak TLS
    try:
        started = time.monotonic()
        worker = daemons.worker(sched.address, *pki.worker_args(), name="tls-w0", nthreads=2, secret=SECRET)
        with jobsched.Client(sched.address, secret=SECRET, timeout=10, **pki.client_kwargs()) as client:
            connected = time.monotonic() - started
            wait_for_workers(client, [worker.name], timeout=30)
            joined = time.monotonic() - started
            assert squares(client, 20) == [i * i for i in range(20)]
            during = client.scheduler_info()["unauthenticated"]
            for sock in half_open:
                sock.close()
            # each probe either failed TLS (never counted) or was counted and then closed
            wait_until(lambda: client.scheduler_info()["unauthenticated"] == 0, 20,
                       lambda: f"unauthenticated connections stay counted: {client.scheduler_info()['unauthenticated']}")
            assert squares(client, 10) == [i * i for i in range(10)]
    finally:
        for sock in half_open:
            sock.close()
    print(f"\nHOSTILE-CONN tls: after 1000 probes and with 300 half-open connections the client connected in "
          f"{connected:.2f} s and the worker joined in {joined:.2f} s; {during} counted unauthenticated meanwhile, "
          f"0 once they closed", flush=True)
    log = sched.log()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("flood_from", ["127.0.0.2", "127.0.0.1"], ids=["another-address", "the-same-address"])
def test_a_flood_from_one_address_does_not_keep_a_client_out(daemons, flood_from):
    # the Client connects from 127.0.0.1: past a flood from elsewhere, the per-source budget
    # lets it in; past a flood from its own address, the oldest of the flood make room for it
    sched = daemons.scheduler(secret=SECRET)
    flood = [connect_from(sched.address, flood_from) for _ in range(200)]
    try:
        time.sleep(0.5)  # every connection reached the scheduler
        started = time.monotonic()
        with jobsched.Client(sched.address, secret=SECRET, timeout=5) as client:
            got_in = time.monotonic() - started
            status = client.scheduler_info()
        closed = sum(closed_by_peer(s, 0.05) for s in flood)
    finally:
        for s in flood:
            s.close()
    held, evicted = status["unauthenticated"], status["unauthenticated_evicted"]
    print(f"\nHOSTILE-CONN per source: with 200 silent connections from {flood_from} a client from 127.0.0.1 got in "
          f"after {got_in:.2f} s; {held} held, {evicted} of the flood's oldest closed to make room", flush=True)
    assert held <= 64, f"{held} unauthenticated connections held: over the per-source budget"
    assert closed >= 200 - 64, f"only {closed} of the flood's 200 connections were closed"


@pytest.mark.timeout(120)
def test_a_peer_that_floods_status_requests_and_never_reads_is_bounded_and_disconnected(daemons):
    timeout = 4.0
    sched = daemons.scheduler("--heartbeat-timeout", str(timeout), secret=SECRET)
    worker = daemons.worker(sched.address, name="w0", nthreads=1, secret=SECRET)
    proc = psutil.Process(sched.pid)
    with jobsched.Client(sched.address, secret=SECRET, timeout=10) as client:
        wait_for_workers(client, [worker.name], timeout=30)
        before = proc.memory_info().rss
        sock, _ = registered_client_socket(sched.address, SECRET.encode())
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and never read
        burst = b"".join(message_bytes(m.InfoRequest(i)) for i in range(2000))
        sock.setblocking(False)
        sent = 0
        started = time.monotonic()
        peak = before
        disconnected = None
        try:
            while time.monotonic() - started < timeout * 4:
                try:
                    sent += sock.send(burst)
                except BlockingIOError:
                    time.sleep(0.01)  # the scheduler stopped reading us: good
                except OSError:
                    disconnected = time.monotonic() - started
                    break
                peak = max(peak, proc.memory_info().rss)
                if sent and "workers" not in client.scheduler_info():
                    raise AssertionError("another client was not served during the flood")
        finally:
            sock.close()
        assert disconnected is not None, "the peer that never reads was not disconnected"
        assert squares(client, 10) == [i * i for i in range(10)]
    growth = (peak - before) / MiB
    print(f"\nHOSTILE-CONN status flood: {sent / MiB:.1f} MiB of requests accepted before the scheduler stopped "
          f"reading; its RSS grew {growth:.1f} MiB; the peer was disconnected after {disconnected:.1f} s "
          f"(heartbeat timeout {timeout:.0f} s)", flush=True)
    assert growth < 100, f"the scheduler's RSS grew {growth:.1f} MiB"
    assert "has read nothing" in sched.log()
