#!/usr/bin/env python
"""Load generator: the real ``jobsched-scheduler`` process under many workers and clients.

One asyncio process speaks the wire protocol (``jobsched.protocol.aio``: the same framing,
handshake and messages as the daemons) as

- W fake workers of 8 slots each, one connection per worker, answering every ``Execute``
  at once with a valid ``TaskDone`` (a small result payload), and
- C fake clients, each keeping ``--inflight`` no-op batches submitted at all times (a
  ``BatchDone`` is answered with the next ``SubmitBatch``),

against a scheduler started as a subprocess with a fresh secret (``JOBSCHED_SECRET``).
For each (W, C) it prints batches/s, the scheduler's CPU per batch (``psutil`` cpu_times of
its pid over the measured window), p50/p99 from submit to result, and its RSS afterwards.
Every batch must come back exactly once with status ok: a lost or duplicated result fails
the run.  ``--rate R`` paces the clients at R batches/s in all (open loop: latency at a
given load, not at saturation).  ``--profile DIR`` records the scheduler with py-spy
during each measured window (flame graph input: collapsed stacks).

    python bench/bench_load.py --quick
    python bench/bench_load.py --workers 1000 --clients 10 --seconds 10

The generator needs a core of its own: on a 2-core machine batches/s is bounded by it as
much as by the scheduler; the scheduler's CPU per batch is not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from jobsched.protocol import messages as m
from jobsched.protocol.aio import Connection, open_connection
from jobsched.protocol.handshake import Role
from jobsched.runtime.daemon import new_event_loop

SLOTS = 8
BATCH = (b"\x80\x05N." + bytes(96),)  # opaque to the scheduler: it relays the frames untouched
RESULT = (b"\x80\x05]\x94N." + bytes(32),)
CONNECT_WAVE = 32  # below the scheduler's 64 pending handshakes per source
REGISTER_TIMEOUT = 30.0
DRAIN_TIMEOUT = 30.0
HEARTBEAT_EVERY = 1.0


class Peer:
    """A registered connection: waits for its Welcome, then hands messages to ``on_message``."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.welcome: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = ""
        conn.set_handlers(self._receive, self._closed)

    def _receive(self, conn: Connection, msg: m.Message) -> None:
        if type(msg) is m.Welcome:
            if not self.welcome.done():
                self.welcome.set_result(None)
            return
        self.on_message(msg)

    def on_message(self, msg: m.Message) -> None:
        raise NotImplementedError

    def _closed(self, conn: Connection, reason: str) -> None:
        self.closed = reason
        if not self.welcome.done():
            self.welcome.set_exception(ConnectionError(reason))


class FakeWorker(Peer):
    def on_message(self, msg: m.Message) -> None:
        if type(msg) is m.Execute:
            self.conn.send(m.TaskDone(msg.task_id, msg.attempt, m.OK, 0.0, RESULT))


@dataclass
class Window:
    """What the clients count while measuring."""

    measuring: bool = False
    done: int = 0
    latencies: list[float] = field(default_factory=list)


class FakeClient(Peer):
    def __init__(self, conn: Connection, window: Window, inflight: int) -> None:
        super().__init__(conn)
        self.window = window
        self.inflight = inflight
        self.sent_at: dict[int, float] = {}
        self.next_batch = 0
        self.submitting = False
        self.results = 0
        self.problems: list[str] = []
        self.drained = asyncio.Event()
        self.interval = 0.0  # > 0: paced, one batch per interval, at most ``inflight`` pending
        self.due = 0.0

    def submit(self) -> None:
        batch = self.next_batch
        self.next_batch += 1
        self.sent_at[batch] = time.perf_counter()
        self.conn.send(m.SubmitBatch(batch, 1, "noop", 0, BATCH))

    def start(self) -> None:
        self.submitting = True
        if not self.interval:
            for _ in range(self.inflight):
                self.submit()

    async def pace(self) -> None:
        """Open loop: submit on a schedule, whatever comes back (up to ``inflight`` pending)."""
        self.due = time.perf_counter()
        while self.submitting:
            now = time.perf_counter()
            while self.due <= now and self.submitting:
                if len(self.sent_at) < self.inflight:
                    self.submit()
                self.due += self.interval
            await asyncio.sleep(max(0.0, self.due - time.perf_counter()))

    def on_message(self, msg: m.Message) -> None:
        if type(msg) is not m.BatchDone:
            return
        sent = self.sent_at.pop(msg.batch_id, None)
        if sent is None:
            self.problems.append(f"batch {msg.batch_id}: a result for no pending batch (duplicated?)")
            return
        if msg.status != m.OK or tuple(bytes(f) for f in msg.frames) != RESULT:
            self.problems.append(f"batch {msg.batch_id}: status {msg.status} {msg.error}")
        self.results += 1
        window = self.window
        if window.measuring:
            window.done += 1
            window.latencies.append(time.perf_counter() - sent)
        if self.submitting:
            if not self.interval:
                self.submit()
        elif not self.sent_at:
            self.drained.set()


class Scheduler:
    """A ``jobsched-scheduler`` subprocess on a free port, with a fresh secret."""

    def __init__(self, workdir: str) -> None:
        self.secret = secrets.token_urlsafe(32)
        address_file = os.path.join(workdir, "scheduler.json")
        exe = shutil.which("jobsched-scheduler", path=os.path.dirname(sys.executable)) or "jobsched-scheduler"
        env = dict(os.environ, JOBSCHED_SECRET=self.secret)
        self.proc = subprocess.Popen(
            [exe, "--port", "0", "--scheduler-file", address_file, "--dashboard-address", "none",
             "--heartbeat-timeout", "120", "--log-level", "WARNING"],
            env=env, start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while not os.path.exists(address_file):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the scheduler did not start within 30 s")
            time.sleep(0.05)
        time.sleep(0.05)  # the file is written whole, but let its writer finish
        address = json.loads(Path(address_file).read_text())["address"]
        host, port = address.removeprefix("tcp://").rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.ps = psutil.Process(self.proc.pid)

    def cpu(self) -> float:
        times = self.ps.cpu_times()
        return float(times.user + times.system)

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(10)


async def connect(scheduler: Scheduler, role: Role, count: int, make: type[Peer], *args: object) -> list[Peer]:
    secret = scheduler.secret.encode()
    peers: list[Peer] = []
    for start in range(0, count, CONNECT_WAVE):
        wave = range(start, min(count, start + CONNECT_WAVE))
        conns = await asyncio.gather(*(open_connection(scheduler.host, scheduler.port, role, secret) for _ in wave))
        for index, conn in zip(wave, conns, strict=True):
            peer = make(conn, *args)
            if role == Role.WORKER:
                conn.send(m.RegisterWorker(f"fake-{index}", SLOTS, os.getpid(), "bench", 0, ""))
            else:
                conn.send(m.RegisterClient(f"load-{index}", os.getpid(), "bench", secrets.token_hex(8)))
            peers.append(peer)
        await asyncio.wait_for(asyncio.gather(*(p.welcome for p in peers[start:])), REGISTER_TIMEOUT)
    return peers


async def heartbeats(peers: list[Peer]) -> None:
    while True:
        await asyncio.sleep(HEARTBEAT_EVERY)
        for peer in peers:
            peer.conn.send(m.Heartbeat(0))


@dataclass
class Row:
    workers: int
    clients: int
    rate: float
    cpu_us: float
    p50_ms: float
    p99_ms: float
    rss_mib: float
    cpu_share: float  # scheduler CPU seconds per wall second


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))] if sorted_values else float("nan")


async def run_point(scheduler: Scheduler, workers: list[Peer], nclients: int, args: argparse.Namespace,
                    profile: str | None) -> Row:
    window = Window()
    clients = [c for c in await connect(scheduler, Role.CLIENT, nclients, FakeClient, window, args.inflight)
               if isinstance(c, FakeClient)]
    beat = asyncio.get_running_loop().create_task(heartbeats([*workers, *clients]))
    pacers = []
    for client in clients:
        if args.rate:
            client.interval = nclients / args.rate
        client.start()
        if client.interval:
            pacers.append(asyncio.get_running_loop().create_task(client.pace()))
    await asyncio.sleep(args.warmup)
    spy = None
    if profile:
        spy = subprocess.Popen(["py-spy", "record", "--pid", str(scheduler.proc.pid), "--format", "raw", "--rate",
                                "200", "--duration", str(int(args.seconds)), "--output", profile, "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cpu0, t0 = scheduler.cpu(), time.perf_counter()
    window.measuring = True
    await asyncio.sleep(args.seconds)
    window.measuring = False
    cpu1, t1 = scheduler.cpu(), time.perf_counter()
    for client in clients:
        client.submitting = False
        if not client.sent_at:
            client.drained.set()
    await asyncio.wait_for(asyncio.gather(*(c.drained.wait() for c in clients)), DRAIN_TIMEOUT)
    for task in (beat, *pacers):
        task.cancel()
    if spy is not None:
        spy.wait(args.seconds + 30)
    problems = [p for c in clients for p in c.problems]
    lost = sum(c.next_batch - c.results for c in clients)
    if problems or lost:
        raise AssertionError(f"{lost} results missing; {len(problems)} problems: {problems[:5]}")
    for client in clients:
        client.conn.close("done")
    rss = scheduler.rss()
    latencies = sorted(window.latencies)
    elapsed = t1 - t0
    return Row(len(workers), nclients, window.done / elapsed, (cpu1 - cpu0) / max(window.done, 1) * 1e6,
               statistics.median(latencies) * 1e3 if latencies else float("nan"), percentile(latencies, 0.99) * 1e3,
               rss / 2**20, (cpu1 - cpu0) / elapsed)


HEADER = (f"{'workers':>7} {'clients':>7} {'batches/s':>10} {'sched us/batch':>14} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'sched cpu':>9} {'RSS MiB':>8}")


def show(row: Row) -> None:
    print(f"LOAD {row.workers:>7} {row.clients:>7} {row.rate:>10,.0f} {row.cpu_us:>14.1f} {row.p50_ms:>7.2f} "
          f"{row.p99_ms:>7.2f} {row.cpu_share:>8.0%} {row.rss_mib:>8.0f}", flush=True)


async def run(args: argparse.Namespace) -> list[Row]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="jobsched-load-") as workdir:
        for nworkers in args.workers:
            scheduler = Scheduler(workdir)
            try:
                workers = await connect(scheduler, Role.WORKER, nworkers, FakeWorker)
                for nclients in args.clients:
                    profile = os.path.join(args.profile, f"sched-w{nworkers}-c{nclients}.txt") if args.profile else None
                    rows.append(await run_point(scheduler, workers, nclients, args, profile))
                    show(rows[-1])
            finally:
                scheduler.stop()  # first: workers leaving a live scheduler would be logged as deaths
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[10, 100, 1000], help="fake workers (8 slots each)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--inflight", type=int, default=64, help="batches each client keeps submitted")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured window per point")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rate", type=float, default=0.0, help="pace all clients at this many batches/s in all")
    parser.add_argument("--profile", metavar="DIR", help="record the scheduler with py-spy into DIR")
    parser.add_argument("--quick", action="store_true", help="short windows (2 s, 0.5 s warm-up)")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.warmup = min(args.seconds, 2.0), 0.5
    if min(args.workers + args.clients) < 1 or args.inflight < 1 or args.seconds <= 0:
        parser.error("workers, clients, inflight and seconds must be positive")
    if args.profile and not shutil.which("py-spy"):
        parser.error("--profile needs py-spy on PATH")
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    load = os.getloadavg()
    print(f"LOAD fake workers x {SLOTS} slots, {args.inflight} batches in flight per client"
          f"{f', paced at {args.rate:,.0f}/s' if args.rate else ''}; {args.seconds:g} s per point; "
          f"load average before {load[0]:.2f} on {os.cpu_count()} cores")
    print("LOAD " + HEADER, flush=True)
    loop = new_event_loop()
    try:
        loop.run_until_complete(run(args))
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
