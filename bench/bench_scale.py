"""Scheduler scale benchmark: the real SchedulerState driven by simulated workers.

For W workers x 8 slots and Q queued batches it measures, with the pure state
machine (no sockets, so the figure is the scheduler's own cost):

- dispatch rate: batches completed-and-replaced per second, each step being one
  ``TaskDone`` event that frees a slot and must produce the next ``Execute``;
- scheduling latency: the time of that step, from the event ("slot free") to the
  returned ``Execute`` command ("batch sent"), p50 and p99;
- memory per queued batch beyond its payload (tracemalloc).

Run: ``python bench/bench_scale.py`` (``--quick`` for a smaller grid).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1].parent))  # run from a checkout without install

from jobsched.protocol import messages as m  # noqa: E402
from jobsched.scheduler import records  # noqa: E402
from jobsched.scheduler.server import tune_gc  # noqa: E402
from jobsched.scheduler.state import MessageReceived, PeerConnected, SchedulerState, Send, Ticked  # noqa: E402

SLOTS = 8
PAYLOAD = (b"x" * 64,)  # shared by every batch: only the scheduler's own bookkeeping is measured
CLIENT = 0


def build(workers: int, queued: int) -> SchedulerState:
    state = SchedulerState()
    state.handle(Ticked(1.0))
    state.handle(PeerConnected(CLIENT, "tcp://127.0.0.1:1", records.CLIENT, "ann", True))
    state.handle(MessageReceived(CLIENT, m.RegisterClient("bench", 1, "h")))
    for batch in range(queued):
        state.handle(MessageReceived(CLIENT, m.SubmitBatch(batch, 1, "f", 0, PAYLOAD)))
    for w in range(1, workers + 1):
        state.handle(PeerConnected(w, f"tcp://127.0.0.1:{10000 + w}", records.WORKER, "root", True))
        state.handle(MessageReceived(w, m.RegisterWorker(f"w{w}", SLOTS, w, "h", 0, "")))
    return state


def memory_per_batch(queued: int) -> float:
    gc.collect()
    tracemalloc.start()
    state = SchedulerState()
    state.handle(PeerConnected(CLIENT, "tcp://127.0.0.1:1", records.CLIENT, "ann", True))
    state.handle(MessageReceived(CLIENT, m.RegisterClient("bench", 1, "h")))
    before = tracemalloc.get_traced_memory()[0]
    for batch in range(queued):
        state.handle(MessageReceived(CLIENT, m.SubmitBatch(batch, 1, "f", 0, PAYLOAD)))
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / queued


def drive(state: SchedulerState, steps: int) -> tuple[float, list[float]]:
    """Complete ``steps`` running batches round robin over the workers; returns (rate, latencies)."""
    workers = list(state.workers.values())
    latencies = []
    perf = time.perf_counter
    start = perf()
    for step in range(steps):
        worker = workers[step % len(workers)]
        task_id = next(iter(worker.running))
        event = MessageReceived(worker.conn, m.TaskDone(task_id, 1, m.OK, 0.0, PAYLOAD))
        t0 = perf()
        commands = state.handle(event)
        latencies.append(perf() - t0)
        if not any(type(c) is Send and type(c.message) is m.Execute for c in commands):
            raise AssertionError("a freed slot was not refilled")
    return steps / (perf() - start), latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller grid")
    args = parser.parse_args()
    tune_gc()  # as the scheduler daemon does
    worker_counts = (10, 100, 1000)
    queue_lengths = (10**5,) if args.quick else (10**5, 10**6)
    steps = 20_000 if args.quick else 100_000
    print(f"{'workers':>8} {'slots':>6} {'queued':>9} {'batches/s':>10} {'p50 us':>8} {'p99 us':>8}")
    rows = []
    for queued in queue_lengths:
        for workers in worker_counts:
            state = build(workers, queued)
            rate, latencies = drive(state, min(steps, queued - workers * SLOTS))
            latencies.sort()
            p50 = statistics.median(latencies) * 1e6
            p99 = latencies[int(len(latencies) * 0.99)] * 1e6
            rows.append((workers, queued, rate, p50, p99))
            print(f"{workers:>8} {workers * SLOTS:>6} {queued:>9} {rate:>10,.0f} {p50:>8.1f} {p99:>8.1f}", flush=True)
            del state
            gc.collect()
    per_batch = memory_per_batch(10**5)
    print(f"\nscheduler memory per queued batch (beyond its payload): {per_batch:,.0f} bytes")
    worst_rate = min(r[2] for r in rows)
    worst_p99 = max(r[4] for r in rows if r[0] == 1000)
    print("\ntargets: >= 20,000 batches/s: {}; p99 < 5 ms at 1,000 workers: {}; < 2 KB per queued batch: {}".format(
        "met" if worst_rate >= 20_000 else "NOT met", "met" if worst_p99 < 5000 else "NOT met",
        "met" if per_batch < 2048 else "NOT met"))


if __name__ == "__main__":
    main()
