"""Runs one pickled joblib batch and packs its outcome: the worker's only contact with user code."""

from __future__ import annotations

import time

from ..protocol import messages as m
from ..protocol.serialize import dump_exception, dumps, loads


def run_batch(frames: tuple) -> tuple[str, list, float]:
    """Unpickle and call a batch; returns ``(status, frames, duration)``, never raises."""
    start = time.perf_counter()
    try:
        batch = loads(frames)
        result = batch()
        payload = dumps(result)
        status = m.OK
    except BaseException as exc:  # noqa: BLE001 - user code may raise anything, even SystemExit
        status = m.ERROR
        try:
            payload = dump_exception(exc)
        except BaseException as inner:  # noqa: BLE001 - e.g. a __str__ that raises
            payload = dump_exception(RuntimeError(f"{type(exc).__qualname__} (unprintable: {inner!r})"))
    return status, payload, time.perf_counter() - start
