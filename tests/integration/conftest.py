"""Fixtures of the integration tests (the daemon fixtures are in ``tests/conftest.py``)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import psutil
import pytest
from support import DaemonPool, process_status, wait_until


@pytest.fixture
def marks(tmp_path) -> Path:
    """An empty directory where tasks leave ``started-<pid>`` marks (``support.wait_for_mark``)."""
    path = tmp_path / "marks"
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def big() -> np.ndarray:
    """200 MB of float64; arange: every slice sum is an integer below 2**53, so sums are exact in any order."""
    return np.arange(25_000_000, dtype=np.float64)


def _process_groups_alive(groups: set[int]) -> list[psutil.Process]:
    alive = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.pid) in groups and proc.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return alive


@pytest.fixture
def pool(daemons: DaemonPool):
    """conftest's daemon pool, plus a check at teardown that nothing it started survives:
    no process in any daemon's process group (a daemon is its group's leader), and no
    child of this test process beyond those it had before."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield daemons
    for daemon in daemons.daemons:
        daemon.signal(signal.SIGCONT)  # a stopped process would not act on SIGTERM
    daemons.close()  # SIGTERM each group, SIGKILL it after 5 s (idempotent: conftest calls it again)
    groups = {d.pid for d in daemons.daemons}

    def leftovers() -> list:
        children = [p for p in me.children(recursive=True) if p.pid not in before]
        children = [p for p in children if process_status(p) not in (psutil.STATUS_ZOMBIE, None)]
        return [*_process_groups_alive(groups), *children]

    try:
        wait_until(lambda: not leftovers(), 15, lambda: f"processes left behind: {leftovers()}")
    finally:
        for proc in leftovers():  # never leave them running, even when failing
            try:
                os.killpg(os.getpgid(proc.pid), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
