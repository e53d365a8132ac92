"""The scattered data a worker process holds, and the resolver its batches call.

A client pickles a scattered object as a call to ``resolve_scattered(key)``
(named, not imported: see ``client/scatter.py``), so the worker's copy takes its
place when a batch is unpickled.  These are process globals on purpose: the
task threads unpickle, and the resolver must find the store without an argument.
Scattered objects are pickled with every buffer out of band
(``dumps(obj, out_of_band_min=0)``): each batch unpickles its own copy, whose
arrays are read-only views of the one received buffer.  Tasks share the
memory, never each other's mutations.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from ..payload.serialize import loads, loads_readonly
from ..protocol.framing import Buffer

DATA_STORE: dict[str, tuple[Buffer, ...]] = {}
# Unpickling imports the modules a payload names, and two threads importing at once can
# make importlib's deadlock detection fail one of them (seen: ``_DeadlockError`` on
# ``numpy._core.numeric`` when a task thread unpickled its first batch while the worker's
# event loop checked newly arrived scattered data).  A worker unpickles under this lock.
UNPICKLING = threading.Lock()
_batch = threading.local()  # objects already resolved while unpickling the current batch


def resolve_scattered(key: str) -> Any:
    cache = getattr(_batch, "objects", None)
    if cache is not None and key in cache:
        return cache[key]  # the same object everywhere in one batch, as pickling by value gives
    try:
        frames = DATA_STORE[key]
    except KeyError:
        raise LookupError(f"scattered data {key!r} is not held by this worker") from None
    obj = loads_readonly(frames, checked=True)  # by DataService.store, the only way into DATA_STORE
    if cache is not None:
        cache[key] = obj
    return obj


def loads_batch(frames: Sequence[Buffer]) -> Any:
    """``loads`` for a batch, resolving each scattered key it refers to once."""
    _batch.objects = {}
    try:
        return loads(frames, "the batch's pickle")
    finally:
        _batch.objects = None
