"""Scattered data on the client side: references, and the pickler that puts them in batches.

A scattered object is pickled into a batch as a call to
``jobsched.worker.store.resolve_scattered(key)``, which on the worker returns its local copy.  The
``BatchPickler`` does that for ``ScatteredRef`` arguments, for objects given to
``scatter=`` (matched by identity), and automatically for large arrays (numpy,
pandas, scipy.sparse) of at least ``auto_threshold`` bytes; it records the keys
a batch needs so the scheduler can place it where its data already is.
"""

from __future__ import annotations

import io
import types
import uuid
from collections.abc import Callable
from typing import Any

import cloudpickle

from ..payload.serialize import call_by_name, out_of_band_collector
from .code_pickle import DISPATCH_TABLE as CODE_KEEPING_FILENAME

# The workers' resolver, named rather than imported: the client imports no worker code.
RESOLVER = ("jobsched.worker.store", "resolve_scattered")

DEFAULT_AUTO_THRESHOLD = 512 * 2**10  # 512 KiB: below that, pickling into each batch is cheaper


class ScatteredRef:
    """A handle on data held by the cluster; pass it as a task argument."""

    __slots__ = ("key", "nbytes", "__weakref__")

    def __init__(self, key: str, nbytes: int) -> None:
        self.key = key
        self.nbytes = nbytes

    def __reduce__(self):
        return (call_by_name, (*RESOLVER, self.key))

    def __repr__(self) -> str:
        return f"<ScatteredRef {self.key} {self.nbytes} bytes>"


def new_key(obj: Any) -> str:
    return f"{type(obj).__name__[:40]}-{uuid.uuid4().hex}"


_array_like: dict[type, bool] = {}  # per type: could an instance be worth scattering?


def _is_array_like(cls: type) -> bool:
    known = _array_like.get(cls)
    if known is None:
        module = getattr(cls, "__module__", "") or ""
        known = _array_like[cls] = module == "numpy" or module.startswith(("pandas.", "scipy.sparse"))
    return known


def large_nbytes(obj: Any, threshold: int) -> int:
    """The size of an array-like worth scattering automatically, else 0."""
    cls = type(obj)
    if not _is_array_like(cls):
        return 0
    module = cls.__module__
    try:
        if module == "numpy" and cls.__name__ in ("ndarray", "memmap"):
            size = obj.nbytes
        elif module.startswith("pandas.") and cls.__name__ in ("DataFrame", "Series"):
            size = int(obj.memory_usage(index=True, deep=False).sum()) if cls.__name__ == "DataFrame" else obj.nbytes
        elif module.startswith("scipy.sparse") and hasattr(obj, "data") and hasattr(obj, "nnz"):
            size = obj.data.nbytes + sum(getattr(obj, a).nbytes for a in ("indices", "indptr", "row", "col") if hasattr(obj, a))
        else:
            return 0
    except Exception:  # noqa: BLE001 - sizing is a heuristic over arbitrary objects: unknown means small
        return 0
    return size if size >= threshold else 0


class ByReference:
    """The functions and classes that cloudpickle pickles by reference (by module and name),
    remembered across the batches of one call: deciding it for every batch (module lookups,
    the ``register_pickle_by_value`` registry) is a good share of pickling a tiny batch.

    Forgotten whenever the registry changes, so a ``register_pickle_by_value`` made
    mid-call applies from the next batch on.  One call is short-lived: a function moved out
    of its module meanwhile keeps pickling by reference (and fails to load on the worker,
    as it would have in a batch pickled just before the move)."""

    def __init__(self) -> None:
        self.objects: dict[int, Any] = {}  # id -> the object, kept alive so its id stays its own
        self.registry = cloudpickle.list_registry_pickle_by_value()

    def current(self) -> dict[int, Any]:
        registry = cloudpickle.list_registry_pickle_by_value()
        if registry != self.registry:
            self.objects.clear()
            self.registry = registry
        return self.objects


class BatchPickler(cloudpickle.CloudPickler):
    """cloudpickle, plus scattered objects replaced by their keys; code keeps its file name."""

    dispatch_table = CODE_KEEPING_FILENAME

    def __init__(self, file, refs: dict[int, tuple[str, Any]], auto_threshold: int,
                 register: Callable[[Any, int], str], buffer_callback, by_reference: dict[int, Any]) -> None:
        super().__init__(file, protocol=5, buffer_callback=buffer_callback)
        self.refs = refs
        self.auto_threshold = auto_threshold
        self.register = register
        self.by_reference = by_reference
        self.keys: list[str] = []

    def reducer_override(self, obj: Any) -> Any:
        # called for nearly every object pickled: keep the common path short
        cls = type(obj)
        if cls is ScatteredRef:
            self._need(obj.key)
            return obj.__reduce__()
        entry = self.refs.get(id(obj)) if self.refs else None
        if entry is not None and entry[1] is obj:
            self._need(entry[0])
            return (call_by_name, (*RESOLVER, entry[0]))
        if self.auto_threshold and _is_array_like(cls):
            nbytes = large_nbytes(obj, self.auto_threshold)
            if nbytes:
                key = self.register(obj, nbytes)
                self._need(key)
                return (call_by_name, (*RESOLVER, key))
        if cls is types.FunctionType or isinstance(obj, type):
            if self.by_reference.get(id(obj)) is obj:
                return NotImplemented  # pickle's save_global, as cloudpickle decided before
            reduced = super().reducer_override(obj)
            if reduced is NotImplemented:
                self.by_reference[id(obj)] = obj
            return reduced
        return super().reducer_override(obj)

    def _need(self, key: str) -> None:
        if key not in self.keys:
            self.keys.append(key)


def dumps_batch(obj: Any, refs: dict[int, tuple[str, Any]], auto_threshold: int,
                register: Callable[[Any, int], str], by_reference: ByReference) -> tuple[list, list[str]]:
    """Pickle a batch; returns ``(frames, keys of the scattered data it needs)``."""
    buffers: list = []
    stream = io.BytesIO()
    pickler = BatchPickler(stream, refs, auto_threshold, register, out_of_band_collector(buffers), by_reference.current())
    pickler.dump(obj)
    return [stream.getvalue(), *buffers], pickler.keys
