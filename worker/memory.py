"""Memory limits: parsing ``--memory-limit`` and finding what the machine (or its cgroup) allows."""

from __future__ import annotations

import os
import re

import psutil

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
CGROUP_ROOT = "/sys/fs/cgroup"


def _cgroup_limit_files(proc_cgroup: str = "/proc/self/cgroup", root: str = CGROUP_ROOT) -> list[str]:
    """The memory limit files of this process's cgroup and all its parents (v2 and v1)."""
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    files = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2: 0::/system.slice/jobsched-worker@1.service
            base, name = root, "memory.max"
        elif "memory" in controllers.split(","):  # cgroup v1
            base, name = os.path.join(root, "memory"), "memory.limit_in_bytes"
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):  # a parent's limit binds too
            files.append(os.path.join(base, *parts[:depth], name))
    return files


def available_memory(proc_cgroup: str = "/proc/self/cgroup", root: str = CGROUP_ROOT) -> int:
    """Total RAM, or the tightest limit of our cgroup and its parents if lower (systemd's
    ``MemoryMax=``, a SLURM job, a container)."""
    total = psutil.virtual_memory().total
    for path in _cgroup_limit_files(proc_cgroup, root):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def parse_memory_limit(text: str | int | float | None, nprocesses: int = 1) -> int:
    """Bytes per process for ``--memory-limit``; 0 means no limit.

    Accepts a byte count, a size with a unit (``4GiB``, ``500MB``), a fraction of the
    available memory (``0.5``), ``auto`` (the available memory shared among
    ``nprocesses``), or ``0``/``none`` for no limit.  Raises ValueError naming the value.
    """
    if text is None:
        return 0
    raw = str(text).strip().lower()
    if raw in ("", "0", "none", "off"):
        return 0
    if raw == "auto":
        return available_memory() // max(nprocesses, 1)
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]*)", raw)
    if not match or match.group(2) not in _UNITS:
        raise ValueError(f"invalid memory limit {text!r}: use bytes, a size like 4GiB or 500MB, a fraction like 0.5, or auto")
    number, unit = float(match.group(1)), match.group(2)
    if unit == "" and number <= 1:
        if number <= 0:
            raise ValueError(f"invalid memory limit {text!r}: must be positive")
        return int(available_memory() * number)
    value = int(number * _UNITS[unit])
    if value < 2**20:
        raise ValueError(f"invalid memory limit {text!r}: under 1 MiB, no worker could run")
    return value


def private_memory(process: psutil.Process) -> int:
    """Resident memory that is this process's own: RSS less shared pages.

    Shared pages are mapped files and shared memory segments, above all scattered
    data mapped by every worker of a machine (``payload.shm``): counting them
    in each process would charge one array to all of them, and a limit per
    process would then restart workers for memory the machine holds once.
    """
    info = process.memory_info()
    return max(info.rss - getattr(info, "shared", 0), 0)
