"""Runs one pickled joblib batch and packs its outcome: the worker's only contact with user code.

The client pickles ``(batch, context)``; ``context`` is a plain dict:
``capture`` (CaptureOptions fields), ``sklearn_config`` (the caller's
``sklearn.get_config()``), ``inner_max_num_threads``.  The outcome frames are
``dumps((result, events))`` on success, and ``dump_exception(exc) + [pickle of
events]`` on failure, so output printed before an error still reaches the caller.
"""

from __future__ import annotations

import contextlib
import importlib
import pickle
import threading
import time
from typing import Any

from ..protocol import messages as m
from ..protocol.serialize import dump_exception, dumps, loads_batch
from .capture import CaptureOptions, capturing


_unpickling = threading.Lock()


def run_batch(frames: tuple) -> tuple[str, list, float]:
    """Unpickle and call a batch; returns ``(status, frames, duration)``, never raises."""
    start = time.perf_counter()
    events: list = []
    try:
        with _unpickling:  # concurrent first imports of a module from two task threads can fail
            batch, context = loads_batch(frames)
        with capturing(_capture_options(context)) as events, _sklearn_config(context), _thread_limits(context):
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


def _capture_options(context: dict) -> CaptureOptions:
    fields = context.get("capture") or {}
    return CaptureOptions(**{k: v for k, v in fields.items() if k in CaptureOptions.__dataclass_fields__})


def _optional_import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _sklearn_config(context: dict) -> contextlib.AbstractContextManager:
    """Put the caller's scikit-learn configuration in force for this thread, as loky does."""
    config = context.get("sklearn_config")
    sklearn = _optional_import("sklearn") if config else None
    if sklearn is None:
        return contextlib.nullcontext()
    known = sklearn.get_config()
    return sklearn.config_context(**{k: v for k, v in config.items() if k in known})


def _thread_limits(context: dict) -> contextlib.AbstractContextManager:
    """Honour joblib's ``inner_max_num_threads`` for BLAS/OpenMP pools inside the tasks."""
    limit = context.get("inner_max_num_threads")
    threadpoolctl = _optional_import("threadpoolctl") if limit else None
    if threadpoolctl is None:
        return contextlib.nullcontext()
    return threadpoolctl.threadpool_limits(limits=int(limit))
