"""Hostile control messages against a live scheduler (issue 18): bounded decoding, fields in
range, a ticker that survives its own exceptions.

- An authenticated peer sends 16 MiB bodies crafted so that msgpack would build 8 to 72 times
  their size in Python objects: the scheduler's RSS stays bounded, it keeps serving a real
  Client, and only the hostile connections close.
- A fake worker claiming a billion threads is refused with a reason and is sent no batch.
- With a fault injected into every third tick (``JOBSCHED_TEST_TICK_FAULT``, a test hook of
  scheduler/server.py), the fault is logged with its traceback and a frozen worker still expires.

Figures are printed with the prefix ``HOSTILE-DECODE`` (run with ``-s``).
"""

from __future__ import annotations

import signal
import threading
import time

import psutil
import pytest
from support import (
    authenticated_socket,
    by_name,
    closed_by_peer,
    daemon_env,
    frame_bytes,
    message_bytes,
    read_message,
    squares,
    start_cluster,
    wait_for_workers,
    wait_until,
)

import jobsched
from jobsched.protocol import FrameLimits, Role
from jobsched.protocol import messages as m
from jobsched.scheduler.state import MAX_NTHREADS

MAX_BODY = FrameLimits().max_body
RSS_GROWTH_LIMIT = 100 * 2**20
ROUNDS = 3


def raw_message(op: str, *fields: bytes) -> bytes:
    return bytes([0x90 | (len(fields) + 1), 0xA0 | len(op)]) + op.encode() + b"".join(fields)


def array(n: int) -> bytes:
    return b"\xdd" + n.to_bytes(4, "big")


def map_(n: int) -> bytes:
    return b"\xdf" + n.to_bytes(4, "big")


def crafted_bodies() -> dict[str, bytes]:
    """16 MiB bodies, each built for amplification in its own way (see tests/unit/test_bounded_decode.py)."""
    n = MAX_BODY - 64
    key = b"\xd9\x28" + b"k" * 40
    strs = 12 * 2**20 // 42
    return {
        "empty arrays": raw_message("info-reply", b"\x01", map_(1) + b"\xa1k" + array(n) + b"\x90" * n),
        "nils": raw_message("data-release", array(n) + b"\xc0" * n),
        "negative ints": raw_message("info-reply", b"\x01", map_(1) + b"\xa1k" + array(n) + b"\xec" * n),
        "empty maps": raw_message("data-release", array(n) + b"\x80" * n),
        "short strs": raw_message("data-release", array(n // 3) + b"\xa2ab" * (n // 3)),
        "deep nesting": raw_message("info-reply", b"\x01", map_(1) + b"\xa1k" + b"\x91" * 1000 + b"\xa0" * (n - 1000)),
        # just within MAX_DECODE_COST, so decoded (then refused: no peer may send an InfoReply):
        # the most a body may cost the scheduler
        "40-char strs (decoded)": raw_message("info-reply", b"\x01", map_(1) + b"\xa1k" + array(strs) + key * strs),
        "40-char strs (refused)": raw_message("info-reply", b"\x01", map_(1) + b"\xa1k" + array(n // 42) + key * (n // 42)),
    }


class RssSampler:
    """The highest RSS of a process, sampled every 10 ms from a thread."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def reset(self) -> int:
        self.peak = self.process.memory_info().rss
        return self.peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.mark.timeout(300)
def test_amplification_bodies_cost_the_scheduler_little(daemons):
    cluster = start_cluster(daemons, n_workers=1)
    with cluster.client:
        assert squares(cluster.client) == [i * i for i in range(20)]  # warm: the baseline includes a call's memory
        sampler = RssSampler(cluster.scheduler.pid)
        try:
            baseline = sampler.reset()
            growth: dict[str, tuple[int, int]] = {}  # kind -> (body size, RSS peak growth)
            highest = baseline
            for kind, body in crafted_bodies().items():
                data = frame_bytes(body)
                start = sampler.reset()
                for _ in range(ROUNDS):
                    sock, _decoder = authenticated_socket(cluster.address)
                    with sock:
                        sock.sendall(data)
                        assert closed_by_peer(sock, 60), f"{kind}: the scheduler kept the connection open"
                    # only that connection closed: the Client goes on, and the scheduler answers it
                    assert cluster.client.scheduler_info()["workers"]
                time.sleep(0.05)
                growth[kind] = len(body), sampler.peak - start
                highest = max(highest, sampler.peak)
            assert squares(cluster.client, 50) == [i * i for i in range(50)]
            overall = highest - baseline
        finally:
            sampler.stop()
        assert cluster.scheduler.proc.poll() is None
        log = cluster.scheduler.log()
    for kind, (size, grew) in growth.items():
        print(f"\nHOSTILE-DECODE scheduler RSS peak grew {grew / 2**20:6.1f} MiB on {ROUNDS} x {size / 2**20:.0f} MiB "
              f"of {kind}", end="")
    print(f"\nHOSTILE-DECODE scheduler RSS peak over all kinds: +{overall / 2**20:.1f} MiB "
          f"(limit {RSS_GROWTH_LIMIT / 2**20:.0f})")
    assert overall < RSS_GROWTH_LIMIT, growth
    assert "would take over" in log or "MalformedMessage" in log or "nested deeper" in log, log[-3000:]


@pytest.mark.timeout(120)
def test_a_worker_claiming_a_billion_threads_is_refused_and_sent_nothing(daemons):
    cluster = start_cluster(daemons, n_workers=1)
    with cluster.client:
        sock, decoder = authenticated_socket(cluster.address, role=Role.WORKER)
        with sock:
            sock.sendall(message_bytes(m.RegisterWorker("greedy", 10**9, 1, "h", 0, "tcp://127.0.0.1:1")))
            received = []
            try:
                while True:
                    received.append(read_message(sock, decoder, timeout=10))
            except ConnectionError:
                pass
        assert [type(msg) for msg in received] == [m.Closing], received
        assert received[0].reason == f"nthreads must be between 1 and {MAX_NTHREADS}"
        assert not any(isinstance(msg, m.Execute) for msg in received)
        assert "greedy" not in by_name(cluster.client.scheduler_info())
        assert squares(cluster.client) == [i * i for i in range(20)]  # the real worker ran them all
        # a real worker asked for too many threads is told why and exits
        greedy = daemons.worker(cluster.address, name="greedy-real", nthreads=MAX_NTHREADS + 1)
        status = greedy.wait_exit(60)
        print(f"\nHOSTILE-DECODE a fake worker claiming 10^9 threads: refused ({received[0].reason!r}); "
              f"a real one with {MAX_NTHREADS + 1}: exit status {status}")
        assert status != 0 and "nthreads must be between" in greedy.log()


@pytest.mark.timeout(120)
def test_a_failing_tick_is_logged_and_heartbeats_still_expire_a_frozen_worker(pool):
    timeout = 2.0
    env = {**daemon_env(), "JOBSCHED_TEST_TICK_FAULT": "3"}  # every third tick raises
    sched = pool.scheduler("--heartbeat-timeout", str(timeout), env=env)
    workers = [pool.worker(sched.address, name=f"w{i}") for i in range(2)]
    with jobsched.Client(sched.address, timeout=10) as client:
        wait_for_workers(client, ["w0", "w1"])
        wait_until(lambda: "tick fault injected" in sched.log(), 10, "no tick fault logged")
        frozen = workers[1]
        frozen.signal(signal.SIGSTOP)  # the pool fixture sends SIGCONT at teardown
        stopped = time.monotonic()
        wait_until(lambda: "w1" not in by_name(client.scheduler_info()), 30,
                   lambda: f"the frozen worker never expired:\n{sched.log()[-3000:]}")
        expired_after = time.monotonic() - stopped
        assert squares(client) == [i * i for i in range(20)]  # w0 runs them
        log = sched.log()
    assert "Traceback" in log and "the scheduler's periodic tick failed" in log
    logged = log.count("RuntimeError: tick fault injected")
    assert logged == 1, log  # at most once a minute, however often it fails
    assert "no heartbeat for" in log
    print(f"\nHOSTILE-DECODE with every third tick failing, a frozen worker expired {expired_after:.1f} s after "
          f"SIGSTOP (heartbeat timeout {timeout:.0f} s); the fault was logged {logged} time(s) "
          f"in {log.count(chr(10))} log lines")
