"""The scheduler file: where a scheduler started with ``--port 0`` tells clients and
workers its address (``--scheduler-file``), as dask's scheduler file does."""

from __future__ import annotations

import json
import os
import tempfile


def write_scheduler_file(path: str, address: str, dashboard: str = "") -> None:
    """Write ``{"address": ..., "dashboard": ...}`` atomically: readers never see a partial file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".jobsched-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"address": address, "dashboard": dashboard, "pid": os.getpid()}, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_scheduler_file(path: str) -> str:
    with open(path) as f:
        address: str = json.load(f)["address"]
    return address
