"""Task functions (and a client program) for the fault-injection suite, ``test_faults.py``.

Workers unpickle these by reference (``fault_tasks.tagged``), so this module must be
importable in the worker processes: ``support.daemon_env`` puts this directory on the
daemons' ``PYTHONPATH``.  It imports nothing heavy at module level, so
the memory a worker process holds before a task runs stays small.

``python -m fault_tasks client ADDRESS DIRECTORY`` is the client process that
scenario 7 kills mid-call (see ``client_main``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def mark(directory: str, label: str = "started") -> None:
    """Leave ``<label>-<pid>-<n>`` in ``directory`` atomically (readers never see a partial file)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    n = 0
    while True:
        final = d / f"{label}-{os.getpid()}-{n}"
        if not final.exists():
            break
        n += 1
    tmp = d / f".tmp-{label}-{os.getpid()}-{n}"
    tmp.write_text(f"{time.time()!r}")
    tmp.rename(final)


def marks(directory: str | Path, label: str = "started") -> list[Path]:
    d = Path(directory)
    return sorted(d.glob(f"{label}-*")) if d.exists() else []


def mark_pids(directory: str | Path, label: str = "started") -> list[int]:
    return [int(p.name.split("-")[1]) for p in marks(directory, label)]


# ------------------------------------------------------------- plain tasks
def tagged(i: int, seconds: float = 0.0) -> tuple[int, int, int]:
    """``(i, i*i, pid)`` after an optional sleep: an exact, attributable result."""
    if seconds:
        time.sleep(seconds)
    return i, i * i, os.getpid()


def mark_then_sleep(directory: str, i: int, seconds: float) -> tuple[int, int]:
    """Leave a ``task-<i>-<pid>-<n>`` mark, sleep, return ``(i, pid)``."""
    mark(directory, f"task-{i}")
    time.sleep(seconds)
    return i, os.getpid()


def mark_then_raise(directory: str, delay: float, message: str) -> None:
    """Leave a ``raised`` mark after ``delay`` seconds, then raise ValueError(message)."""
    time.sleep(delay)
    mark(directory, "raised")
    raise ValueError(message)


def exit_now(directory: str) -> None:
    """Leave a mark, then end the process running it with ``os._exit(1)``, every time."""
    mark(directory)
    os._exit(1)


def hog_memory(directory: str, total_mib: int = 2048, chunk_mib: int = 8, pause: float = 0.01) -> str:
    """Leave a mark, then allocate (and touch) memory in chunks until ``total_mib``.

    A worker with a lower ``--memory-limit`` must be ended long before this returns.
    """
    mark(directory)
    held = []
    for _ in range(total_mib // chunk_mib):
        held.append(b"x" * (chunk_mib << 20))  # bytes are written, so every page is resident
        time.sleep(pause)
    time.sleep(5.0)
    return f"allocated {total_mib} MiB and was not stopped"


def hold_memory(directory: str, target_mib: int, seconds: float = 60.0, chunk_mib: int = 4) -> str:
    """Leave a mark, allocate (and touch) memory until this process's own memory, as the worker
    measures it against its limit, passes ``target_mib``, then hold it for ``seconds``: a task
    that loads too much, then computes."""
    import psutil

    from jobsched.worker.memory import private_memory

    mark(directory)
    me = psutil.Process()
    held = []
    while private_memory(me) < target_mib << 20:
        held.append(b"x" * (chunk_mib << 20))
        time.sleep(0.01)
    time.sleep(seconds)
    return f"held {private_memory(me) >> 20} MiB for {seconds} s and was not stopped"


def rendezvous(directory: str, parties: int, i: int, timeout: float = 90.0) -> tuple[int, int, float]:
    """Leave a mark and wait until ``parties`` tasks have left one: they ran at the same time.

    Returns ``(i, pid, start)``; raises TimeoutError if the others never came.
    """
    start = time.time()
    mark(directory)
    deadline = time.monotonic() + timeout
    while len(marks(directory)) < parties:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(marks(directory))} of {parties} tasks ran at once")
        time.sleep(0.02)
    return i, os.getpid(), start


def sum_with_data(data, i: int, seconds: float) -> tuple[int, int]:
    """Use scattered ``data`` (a sequence of ints) and sleep: ``(i, sum(data) + i)``."""
    time.sleep(seconds)
    return i, int(sum(data[:10])) + i


# ----------------------------------------------------- scenario 7's client
def client_main(address: str, directory: str) -> int:
    """Scatter data, then run a call of long tasks on the cluster until killed.

    Writes ``ready`` in ``directory`` once the Parallel call is about to start.
    """
    import numpy as np
    from joblib import Parallel, delayed, parallel_config

    import jobsched

    client = jobsched.Client(address, timeout=10)
    data = np.arange(1 << 20, dtype=np.int64)  # 8 MiB: scattered, held by the workers
    ref = client.scatter(np.arange(1 << 18, dtype=np.int64), broadcast=True)  # 2 MiB more
    Path(directory, "ready").write_text(str(os.getpid()))
    with parallel_config(backend="cluster", scheduler=client, scatter=[data]):
        Parallel(n_jobs=-1, batch_size=1)(delayed(sum_with_data)(data, i, 60.0) for i in range(40))
    print("the call finished, which it should not have: the test kills this process", ref, flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "client":
        sys.exit(client_main(sys.argv[2], sys.argv[3]))
    print("usage: python -m fault_tasks client ADDRESS DIRECTORY", file=sys.stderr)
    sys.exit(2)
