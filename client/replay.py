"""Replay in the caller what a task printed, warned and logged on its worker.

Events come from ``worker/capture.py``.  Warnings go through the caller's own
``warnings`` machinery (its filters, ``catch_warnings``, ``pytest.warns``), with a
registry per source file so a warning shows once per location as in a local
run; log records go to the caller's logger of the same name if it is enabled
for their level.

``CallReplay`` decides where and when: in the context of the cell or thread that made the
call, in task order (or as results arrive for an unordered call).
"""

from __future__ import annotations

import contextvars
import importlib
import logging
import sys
import threading
import warnings
from collections import deque
from collections.abc import Hashable, Iterable

_registries: dict[str, dict] = {}


def _warning_category(module: str, qualname: str) -> type[Warning]:
    try:
        obj = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except Exception:  # noqa: BLE001 - importing a worker's module may fail any way: fall back to UserWarning
        return UserWarning
    return obj if isinstance(obj, type) and issubclass(obj, Warning) else UserWarning


def replay(events: Iterable[tuple]) -> None:
    """Re-issue events in order.  A warning turned into an error by the caller's filters raises."""
    for event in events:
        kind = event[0]
        if kind == "stdout":
            sys.stdout.write(event[1])
        elif kind == "stderr":
            sys.stderr.write(event[1])
        elif kind == "warning":
            _, module, qualname, message, filename, lineno = event
            category = _warning_category(module, qualname)
            if category is UserWarning and (module, qualname) != ("builtins", "UserWarning"):
                message = f"{module}.{qualname}: {message}"
            registry = _registries.setdefault(filename, {})
            warnings.warn_explicit(message, category, filename, lineno, module=_module_name(filename), registry=registry)
        elif kind == "log":
            _, name, levelno, message, pathname, lineno, func_name = event
            logger = logging.getLogger(name)
            if logger.isEnabledFor(levelno):
                record = logger.makeRecord(name, levelno, pathname, lineno, message, (), None, func_name)
                logger.handle(record)


def _module_name(filename: str) -> str:
    name = filename.rsplit("/", 1)[-1]
    return name[:-3] if name.endswith(".py") else name


class ReplayOrder:
    """Which batches' events to replay when, for one call: in submission (task) order for an
    ordered call, as they arrive for ``return_as="generator_unordered"``.  Pure: tokens stand
    for batches (any hashable), events are opaque."""

    def __init__(self, ordered: bool) -> None:
        self.ordered = ordered
        self._waiting: deque[Hashable] = deque()  # ordered calls: submitted, not replayed yet, in order
        self._outstanding: set[Hashable] = set()  # the same, for lookups
        self._arrived: dict[Hashable, list] = {}  # events held back for an earlier batch

    def submitted(self, token: Hashable) -> None:
        if self.ordered:
            self._waiting.append(token)
            self._outstanding.add(token)

    def arrived(self, token: Hashable, events: list) -> list[list]:
        """``token``'s events came: the event lists to replay now, in order."""
        if not self.ordered:
            return [events] if events else []
        if token in self._outstanding:
            self._arrived.setdefault(token, events)
        return self._ready()

    def settled(self, token: Hashable) -> list[list]:
        """``token`` is done, with or without events (a lost or cancelled batch has none)."""
        if token in self._outstanding:
            self._arrived.setdefault(token, [])
        return self._ready()

    def flush(self) -> list[list]:
        """Everything held back, in order (the call ends: later batches will not come)."""
        ready = [self._arrived[token] for token in self._waiting if self._arrived.get(token)]
        self._waiting.clear()
        self._outstanding.clear()
        self._arrived.clear()
        return ready

    def _ready(self) -> list[list]:
        ready = []
        while self._waiting and self._waiting[0] in self._arrived:
            token = self._waiting.popleft()
            self._outstanding.discard(token)
            events = self._arrived.pop(token)
            if events:
                ready.append(events)
        return ready


class CallReplay:
    """Replays one call's events in the caller's context and order, from whichever thread
    they arrive on.

    Jupyter (ipykernel) sends what a thread writes to the cell whose code was running when
    that thread, or the asyncio handle it runs, was made: the Client's I/O thread belongs to
    the cell that created the Client.  Replaying inside a copy of the context the call began
    in puts the output in the cell (or thread) that made the call, as a local run does."""

    def __init__(self, ordered: bool) -> None:
        self._context = contextvars.copy_context()  # the caller's, taken on the caller's thread
        self._order = ReplayOrder(ordered)
        self._lock = threading.Lock()  # one thread at a time in the context, events in order

    def submitted(self, token: Hashable) -> None:
        with self._lock:
            self._order.submitted(token)

    def arrived(self, token: Hashable, events: list) -> None:
        """May raise: a warning the caller's filters turn into an error (the batch's error)."""
        with self._lock:
            self._replay(self._order.arrived(token, events))

    def settled(self, token: Hashable) -> None:
        with self._lock:
            self._replay(self._order.settled(token))

    def flush(self) -> None:
        with self._lock:
            self._replay(self._order.flush())

    def _replay(self, ready: list[list]) -> None:
        for events in ready:
            self._context.run(replay, events)
