"""The daemon runtime shared by the scheduler, the worker and the client's I/O thread:
the event loop (uvloop where installed), signal handling, and logging."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

log = logging.getLogger("jobsched.runtime")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed, else asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_daemon(main: Callable[[asyncio.Event], Any]) -> int:
    """Run ``main(stop_event)`` on a fresh loop; SIGINT/SIGTERM set the event.

    Returns main's integer result (the exit status), 0 when it returns None.
    """
    import signal

    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    parent = os.environ.get("JOBSCHED_PARENT_PID")
    watcher = loop.create_task(_stop_when_orphaned(int(parent), stop)) if parent and parent.isdigit() else None
    try:
        result = loop.run_until_complete(main(stop))
    finally:
        if watcher is not None:
            watcher.cancel()
            loop.run_until_complete(asyncio.gather(watcher, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    return int(result or 0)


async def _stop_when_orphaned(parent_pid: int, stop: asyncio.Event) -> None:
    """Daemons started by a LocalCluster end when the process that started them is gone."""
    while not stop.is_set():
        if os.getppid() != parent_pid:
            log.warning("parent process %d is gone; shutting down", parent_pid)
            stop.set()
            return
        await asyncio.sleep(0.5)


def configure_logging(level: str = "INFO") -> None:
    """Send jobsched's own logs to stderr.  The root logger is left alone: on a worker,
    the tasks' log records are captured for their caller, not printed here."""
    handler = logging.StreamHandler()
    # journald stamps each line itself: under systemd, leave the time out
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    handler.setFormatter(logging.Formatter(fmt))
    logger = logging.getLogger("jobsched")
    logger.addHandler(handler)
    logger.setLevel(getattr(logging, level.upper(), logging.INFO))
    logger.propagate = False
