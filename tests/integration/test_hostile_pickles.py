"""Hostile pickles as batches: a real scheduler and worker, and an authenticated client that
submits memo bombs and random bytes as batch payloads.

Each must come back as that batch's error, with a message saying what was wrong, while the
worker's memory stays flat (its peak RSS too: a memo table freed at once would not show in
the current RSS) and the same worker processes then run an ordinary joblib call.
"""

from __future__ import annotations

import functools
import os
import pickle
import random
import struct
import time
from pathlib import Path

import psutil
import pytest
from support import message_bytes, registered_client_socket, squares, wait_for_workers

import jobsched
from jobsched.payload.serialize import dumps, load_exception
from jobsched.protocol import messages as m

SECRET = "hostile-pickles-" + os.urandom(16).hex()
MiB = 2**20
GROWTH_LIMIT = 50 * MiB


def long_binput(index: int) -> bytes:
    """Ten bytes that make CPython's unpickler zero a memo table of ``2 * index`` slots."""
    return b"\x80\x05N" + pickle.LONG_BINPUT + struct.pack("<I", index) + pickle.STOP


def memory(pids: set[int]) -> tuple[int, int]:
    """(RSS, peak RSS) summed over ``pids``, in bytes."""
    rss = peak = 0
    for pid in pids:
        rss += psutil.Process(pid).memory_info().rss
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak += int(line.split()[1]) * 1024
    return rss, peak


@pytest.mark.timeout(120)
def test_hostile_batch_pickles_fail_their_batch_and_the_worker_stays_healthy(daemons):
    rng = random.Random(18)
    refused = "the batch's pickle uses the LONG_BINPUT opcode (at byte 3), which jobsched never emits: refused"
    bomb_in_context = tuple(dumps((functools.partial(int, "1"), long_binput(2**24))))
    hostile = [  # (frames, what the batch's error must say)
        ((long_binput(2**31 - 2),), refused),
        ((long_binput(2**24),), "LONG_BINPUT opcode"),  # a 256 MiB memo: an allocation that would succeed
        ((b"N" + pickle.PUT + b"16777216\n" + pickle.STOP,), "the batch's pickle uses the PUT opcode"),
        (bomb_in_context, "the batch's context pickle uses the LONG_BINPUT opcode"),
        *(((rng.randbytes(size),), "the batch's pickle") for size in (1, 10, 1000, 65536, 4 * MiB)),
    ]
    sched = daemons.scheduler(secret=SECRET)
    worker = daemons.worker(sched.address, name="target", nthreads=1, secret=SECRET)
    with jobsched.Client(sched.address, secret=SECRET, timeout=10) as client:
        wait_for_workers(client, ["target"])
        assert squares(client, 10) == [i * i for i in range(10)]  # imports done: the baseline is warm
        pids = worker.process_tree()
        rss_before, peak_before = memory(pids)
        sock, decoder = registered_client_socket(sched.address, SECRET.encode())
        try:
            for batch_id, (frames, _expected) in enumerate(hostile, 1):
                sock.sendall(message_bytes(m.SubmitBatch(batch_id, 18, "hostile", 0, frames)))
            errors: dict[int, str] = {}
            sock.settimeout(30)
            while len(errors) < len(hostile):
                data = sock.recv(1 << 20)
                assert data, "the scheduler closed the client's connection"
                for frame in decoder.feed(data):
                    done = m.decode(frame)
                    if type(done) is m.Heartbeat:
                        continue
                    assert type(done) is m.BatchDone and done.status == m.ERROR, done
                    errors[done.batch_id] = str(load_exception(done.frames[:1]))
        finally:
            sock.close()
        for batch_id, (frames, expected) in enumerate(hostile, 1):
            assert expected in errors[batch_id], (len(frames[0]) if frames else 0, errors[batch_id])
        start = time.monotonic()
        assert squares(client, 20) == [i * i for i in range(20)]
        recovered = time.monotonic() - start
        assert worker.process_tree() == pids, "a worker process was replaced"
        rss_after, peak_after = memory(pids)
    rss_growth, peak_growth = rss_after - rss_before, peak_after - peak_before
    print(f"\nHOSTILE-PICKLE {len(hostile)} hostile batches (LONG_BINPUT near 2**31 and 2**24, PUT, a bomb in the"
          f" context, random bytes up to 4 MiB): each failed with its error; worker RSS grew {rss_growth / MiB:.1f} MiB,"
          f" peak RSS {peak_growth / MiB:.1f} MiB; the next call succeeded in {recovered:.2f} s on the same {len(pids)}"
          " worker process(es)")
    for batch_id in sorted(errors):
        print(f"HOSTILE-PICKLE batch {batch_id}: {errors[batch_id][:150]}")
    assert rss_growth < GROWTH_LIMIT and peak_growth < GROWTH_LIMIT, (rss_growth, peak_growth)
    assert "Traceback" not in worker.log(), worker.log()
