"""Payload (de)serialization shared by the client and the workers (never the scheduler).

Objects are cloudpickled with pickle protocol 5; buffers of at least
``OUT_OF_BAND_MIN`` bytes (numpy arrays and the like) are taken out of band and
travel as separate frames, so they are neither copied into the pickle stream
nor into the msgpack body, and are rebuilt from the received buffers without a
further copy.

Exceptions get special care: many cannot be rebuilt by plain pickling (e.g. a
keyword-only constructor), so they are rebuilt field by field when needed, and
when even that fails they arrive as a :class:`RemoteError` carrying the type
name, message and remote traceback.
"""

from __future__ import annotations

import importlib
import pickle
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import cloudpickle

from ..protocol.errors import JobschedError
from ..protocol.framing import Buffer
from .pickle_check import check_pickle

OUT_OF_BAND_MIN = 64 * 1024
OUT_OF_BAND_MAX = 512  # well under FrameLimits.max_buffers, leaving room for a message's own frames


def out_of_band_collector(buffers: list[Buffer], minimum: int = OUT_OF_BAND_MIN) -> Callable[[pickle.PickleBuffer], bool]:
    """A pickle ``buffer_callback`` that moves buffers of ``minimum`` bytes or more to
    ``buffers``, up to ``OUT_OF_BAND_MAX`` of them (a frame's buffer count is capped)."""

    def collect(buf: pickle.PickleBuffer) -> bool:
        raw = buf.raw()
        if raw.nbytes < minimum or len(buffers) >= OUT_OF_BAND_MAX:
            return True  # true: serialize in band
        buffers.append(raw)
        return False

    return collect


def dumps(obj: Any, out_of_band_min: int = OUT_OF_BAND_MIN) -> list[Buffer]:
    """Pickle ``obj``; returns ``[pickle_stream, *out_of_band_buffers]``."""
    buffers: list[Buffer] = []
    stream = cloudpickle.dumps(obj, protocol=5, buffer_callback=out_of_band_collector(buffers, out_of_band_min))
    return [stream, *buffers]


def loads(frames: Sequence[Buffer], what: str = "the payload's pickle") -> Any:
    """Unpickle ``dumps``' frames, once ``check_pickle`` has passed the stream (``what``
    names it in the error)."""
    if not frames:
        raise ValueError(f"empty payload: {what} is missing")
    check_pickle(frames[0], what)
    return _unpickle(frames[0], frames[1:], what)


def _unpickle(stream: Buffer, buffers: Sequence[Buffer], what: str) -> Any:
    try:
        return pickle.loads(stream, buffers=buffers)
    except pickle.UnpicklingError as exc:  # a malformed stream; what user code raises keeps its type
        raise pickle.UnpicklingError(f"{what} could not be unpickled: {exc}") from exc


def call_by_name(module: str, name: str, *args: Any) -> Any:
    """Call ``module.name(*args)``: lets a pickle name a function of a package its
    writer does not import (the client names the workers' resolver of scattered data)."""
    return getattr(importlib.import_module(module), name)(*args)


def loads_readonly(frames: Sequence[Buffer], what: str = "the data's pickle", *, checked: bool = False) -> Any:
    """Unpickle shared data: arrays built on the received buffers are read-only views, no copy.
    ``checked``: the stream passed ``check_pickle`` already (when it was stored)."""
    if not frames:
        raise ValueError(f"empty payload: {what} is missing")
    if not checked:
        check_pickle(frames[0], what)
    return _unpickle(frames[0], [memoryview(b).toreadonly() for b in frames[1:]], what)


class RemoteError(JobschedError):
    """A task raised an exception whose class could not be rebuilt here."""

    def __init__(self, type_name: str, message: str, remote_traceback: str = "") -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> tuple[type[RemoteError], tuple[str, str, str]]:
        return (RemoteError, (self.type_name, self.message, self.remote_traceback))


class RemoteTraceback(Exception):
    """Attached as ``__cause__`` of a re-raised task exception: the worker's traceback."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n\n" + self.text


def _rebuild_exception(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> BaseException:
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    return exc


def _roundtrips(obj: Any) -> bytes | None:
    try:
        blob: bytes = cloudpickle.dumps(obj, protocol=5)
        pickle.loads(blob)
        return blob
    except Exception:  # noqa: BLE001 - user objects may fail to pickle or unpickle any way: then not picklable
        return None


def dump_exception(exc: BaseException) -> list[Buffer]:
    """Serialize a task's exception with its traceback text, as robustly as possible."""
    tb_text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    type_name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    blob = _roundtrips(exc)
    if blob is None:
        state = dict(getattr(exc, "__dict__", {}))
        blob = _roundtrips(_Rebuilt(type(exc), exc.args, state))
    record = {"type": type_name, "message": str(exc), "traceback": tb_text, "exception": blob}
    return [pickle.dumps(record, protocol=5)]


class _Rebuilt:
    """Pickles as a call to ``_rebuild_exception``: bypasses the class's ``__init__``."""

    def __init__(self, cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> None:
        self.parts = (cls, args, state)

    def __reduce__(self) -> tuple[Callable[..., BaseException], tuple[type[BaseException], tuple[Any, ...], dict[str, Any]]]:
        return (_rebuild_exception, self.parts)


def load_exception(frames: Sequence[Buffer]) -> BaseException:
    """Rebuild a task's exception, with the remote traceback attached as its cause."""
    record = loads(frames[:1], "the task error's pickle")
    exc: BaseException | None = None
    if record.get("exception") is not None:
        try:
            exc = loads([record["exception"]], "the task exception's pickle")
        except Exception:  # noqa: BLE001 - a user exception may fail to unpickle any way: rebuilt from text below
            exc = None
    if not isinstance(exc, BaseException):
        exc = RemoteError(record["type"], record["message"], record["traceback"])
    exc.__cause__ = RemoteTraceback(record["traceback"])
    return exc
