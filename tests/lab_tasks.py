"""Task functions for the shared-lab tests (``integration/test_shared_lab.py``).

Workers unpickle these by reference (``lab_tasks.timed_sleep``), so this module must be
importable in the worker processes: ``support.daemon_env`` puts this directory on the
daemons' ``PYTHONPATH``.  It imports nothing heavy at module level.

Every daemon of a test runs on this machine, so the wall-clock times a task records
(``time.time()``) can be compared with each other and with the test process's.
"""

from __future__ import annotations

import os
import time
from typing import NamedTuple


class Span(NamedTuple):
    """When one task ran, and where: what the fair-share and max-slots checks are made of."""

    tag: str
    start: float
    end: float
    pid: int


def timed_sleep(seconds: float, tag: str) -> Span:
    """Sleep ``seconds``; returns the wall-clock interval it ran in."""
    start = time.time()
    time.sleep(seconds)
    return Span(tag, start, time.time(), os.getpid())


def total(values) -> float:
    """The sum of an array (scattered data, resolved on the worker)."""
    return float(values.sum())
