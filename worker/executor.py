"""Runs one pickled joblib batch and packs its outcome: the worker's only contact with user code.

The client pickles ``(batch, context)``; ``context`` is the per-call context, a
``payload.context.CallContext`` pickled once per call by the client (bytes).  Successive
batches of a call carry the same bytes, so the worker parses them once.  The outcome frames are
``dumps((result, events))`` on success, and ``dump_exception(exc) + [pickle of
events]`` on failure, so output printed before an error still reaches the caller.
"""

from __future__ import annotations

import contextlib
import importlib
import pickle
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..payload.context import CallContext
from ..payload.serialize import dump_exception, dumps, loads
from ..protocol import messages as m
from .capture import CaptureOptions, capturing
from .store import UNPICKLING, loads_batch


def run_batch(frames: tuple) -> tuple[str, list, float]:
    """Unpickle and call a batch; returns ``(status, frames, duration)``, never raises."""
    start = time.perf_counter()
    events: list = []
    try:
        # parsing the context imports scikit-learn (for its config) the first time
        with UNPICKLING:
            batch, context_blob = loads_batch(frames)
            context = _context(context_blob)
        with capturing(context.capture) as events, _sklearn_config(context.sklearn_config), _thread_limits(context):
            result = batch()
        payload = dumps((result, events))
        status = m.OK
    except BaseException as exc:  # noqa: BLE001 - user code may raise anything, even SystemExit
        status = m.ERROR
        try:
            payload = dump_exception(exc)
        except BaseException as inner:  # noqa: BLE001 - e.g. a __str__ that raises
            payload = dump_exception(RuntimeError(f"{type(exc).__qualname__} (unprintable: {inner!r})"))
        payload.append(pickle.dumps(events, protocol=5))
    return status, payload, time.perf_counter() - start


@dataclass(frozen=True)
class _Context:
    """A call's context, parsed."""

    capture: CaptureOptions
    sklearn_config: dict | None  # the caller's, restricted to the options known here
    inner_max_num_threads: int | None


_parsed: tuple[bytes, _Context] | None = None  # the last context seen: a call's batches share it


def _context(blob: bytes) -> _Context:
    global _parsed
    last = _parsed
    if last is not None and last[0] == blob:
        return last[1]
    call = loads([blob], "the batch's context pickle")
    if not isinstance(call, CallContext):
        raise TypeError(f"a batch's context must be a CallContext, not {type(call).__name__}")
    capture = CaptureOptions(call.capture_output, call.capture_warnings, call.log_level, call.output_cap)
    limit = call.inner_max_num_threads
    context = _Context(capture, _known_sklearn_options(call.sklearn_config), int(limit) if limit else None)
    _parsed = (blob, context)
    return context


def _optional_import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _known_sklearn_options(config: dict | None) -> dict | None:
    sklearn = _optional_import("sklearn") if config else None
    if sklearn is None or not config:
        return None
    known = sklearn.get_config()
    return {k: v for k, v in config.items() if k in known}


def _sklearn_config(config: dict | None) -> contextlib.AbstractContextManager:
    """Put the caller's scikit-learn configuration in force for this thread, as loky does.

    Usually it already is (the previous batch of the call set the same): comparing costs
    less than entering and leaving ``config_context`` for every batch.  So, as in a loky
    worker process, a ``set_config`` made by a task itself outlives its batch, until a
    batch whose caller's configuration differs comes along."""
    if not config:
        return contextlib.nullcontext()
    import sklearn  # imported already: _known_sklearn_options found it

    current = sklearn.get_config()
    if all(current[k] == v for k, v in config.items()):
        return contextlib.nullcontext()
    return sklearn.config_context(**config)


def _thread_limits(context: _Context) -> contextlib.AbstractContextManager:
    """Honour joblib's ``inner_max_num_threads`` for BLAS/OpenMP pools inside the tasks."""
    threadpoolctl = _optional_import("threadpoolctl") if context.inner_max_num_threads else None
    if threadpoolctl is None:
        return contextlib.nullcontext()
    return threadpoolctl.threadpool_limits(limits=context.inner_max_num_threads)


class BatchThreads:
    """``nthreads`` threads running batches in the order given; each outcome goes to
    ``done(key, status, frames, duration)``, called in the task's thread.

    Lighter than a ThreadPoolExecutor (no future, condition or work item per batch): with
    tiny batches the hand-off is a good share of a batch's cost.  A thread that finishes a
    batch takes the next one queued at once, without waiting for the event loop.  A batch
    no thread has started can be withdrawn.  Daemon threads: a worker leaving while user
    code runs must not wait for it (see worker/cli.py).
    """

    def __init__(self, nthreads: int, done: Callable[[Any, str, list, float], None]) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()  # keys, in order
        self._pending: dict = {}  # key -> frames, until a thread starts it or it is withdrawn
        self._done = done
        self._nthreads = nthreads
        self._threads: list[threading.Thread] = []  # started with the first batch

    def submit(self, key: Any, frames: tuple) -> None:
        if not self._threads:
            self._threads = [
                threading.Thread(target=self._serve, name=f"jobsched-task-{i}", daemon=True)
                for i in range(self._nthreads)
            ]
            for thread in self._threads:
                thread.start()
        self._pending[key] = frames
        self._queue.put(key)

    def withdraw(self, key: Any) -> bool:
        """Take back a batch no thread has started; false if one has (or it is unknown)."""
        # dict.pop is atomic: of this and a thread's claim in _serve, exactly one gets the frames
        return self._pending.pop(key, None) is not None

    def shutdown(self) -> None:
        """Start nothing more; threads end once their current batch (if any) is done."""
        self._pending.clear()  # batches not started yet are dropped
        for _ in self._threads:
            self._queue.put(None)

    def _serve(self) -> None:
        while True:
            key = self._queue.get()
            if key is None:
                return
            frames = self._pending.pop(key, None)
            if frames is not None:  # else withdrawn
                self._done(key, *run_batch(frames))
