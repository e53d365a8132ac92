"""Task functions for the integration and end-to-end tests.

Workers unpickle these by reference (``tasks.square``), so this module must be
importable in the worker processes: ``support.daemon_env`` puts this directory on
the daemons' ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from joblib import Parallel, delayed


def square(x: int) -> int:
    return x * x


def getpid(delay: float = 0.0) -> int:
    """The pid of the process running the task (after an optional sleep)."""
    if delay:
        time.sleep(delay)
    return os.getpid()


def sleep_and_return(seconds: float, value):
    time.sleep(seconds)
    return value


def raise_value_error(message: str) -> None:
    raise ValueError(message)


class KeywordOnlyError(Exception):
    """Cannot be rebuilt by plain pickling: ``cls(*args)`` fails without ``code=``."""

    def __init__(self, *, code: int) -> None:
        super().__init__(f"task failed with code {code}")
        self.code = code


def raise_keyword_only(code: int) -> None:
    raise KeywordOnlyError(code=code)


class UnpicklableError(Exception):
    """Holds a lock, so neither the exception nor its state can be pickled."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def raise_unpicklable(message: str) -> None:
    raise UnpicklableError(message)


def nested_sum(n: int) -> tuple[int, int]:
    """A Parallel call inside a task; returns (pid, sum of squares below n)."""
    total = sum(Parallel(n_jobs=2)(delayed(square)(i) for i in range(n)))
    return os.getpid(), total


def slice_sum(X, i: int, n: int) -> float:
    """The sum of the i-th of n slices of X."""
    step = len(X) // n
    return float(X[i * step:(i + 1) * step].sum())


def mark_started(directory: str) -> None:
    """Leave a ``started-<pid>`` mark in ``directory`` (``support.wait_for_mark`` reads it)."""
    d = Path(directory)
    tmp = d / f".tmp-{os.getpid()}-{threading.get_ident()}"
    tmp.write_text(str(os.getpid()))
    tmp.rename(d / f"started-{os.getpid()}")  # atomic: readers never see an empty mark


def slow_first_attempt(directory: str, seconds: float) -> int:
    """Leave a ``started-<pid>`` mark in ``directory``; the first attempt then sleeps.

    A test waits for the first mark and kills that worker: the batch is requeued
    and its second attempt (on another worker) returns at once.
    """
    first = not any(Path(directory).glob("started-*"))
    mark_started(directory)
    if first:
        time.sleep(seconds)
    return os.getpid()


def mark_and_sleep(directory: str, seconds: float) -> int:
    """Leave a ``started-<pid>`` mark in ``directory``, then sleep."""
    mark_started(directory)
    time.sleep(seconds)
    return os.getpid()


def crash_worker(directory: str) -> None:
    """Leaves a ``started-<pid>`` mark, then kills the worker process running it, every time."""
    mark_started(directory)
    os._exit(13)


def interval(seconds: float) -> tuple[int, float, float]:
    """(pid, start, end) of a sleep, to observe concurrency."""
    start = time.time()
    time.sleep(seconds)
    return os.getpid(), start, time.time()
