"""Payload serialization: out-of-band buffers, and exceptions that survive the trip."""

from __future__ import annotations

import pickle
import sys
import threading
import types

import numpy as np
import pytest
from support import frame_bytes

from jobsched.payload.serialize import (
    OUT_OF_BAND_MIN,
    RemoteError,
    RemoteTraceback,
    dump_exception,
    dumps,
    load_exception,
    loads,
)
from jobsched.protocol import FrameDecoder


def over_the_wire(frames: list) -> tuple:
    """Frames as the receiving side gets them: through encode_frame and FrameDecoder."""
    (frame,) = FrameDecoder().feed(frame_bytes(b"", frames))
    return frame.buffers


def raised(exc: BaseException) -> BaseException:
    """The exception with a real traceback, as a worker would catch it."""
    try:
        raise exc
    except BaseException as caught:  # noqa: BLE001
        return caught


# ----------------------------------------------------------------- payloads


def test_plain_objects_round_trip_in_one_frame():
    obj = {"a": [1, 2.5, "x", None], "b": (b"bytes", {3})}
    frames = dumps(obj)
    assert len(frames) == 1
    assert loads(frames) == obj
    assert loads(over_the_wire(frames)) == obj


def test_small_array_stays_in_band():
    arr = np.arange(100, dtype="float64")
    assert arr.nbytes < OUT_OF_BAND_MIN
    frames = dumps(arr)
    assert len(frames) == 1
    np.testing.assert_array_equal(loads(frames), arr)


def test_large_array_goes_out_of_band():
    arr = np.arange(OUT_OF_BAND_MIN, dtype="float64")  # 512 KiB
    frames = dumps(arr)
    assert len(frames) == 2
    assert len(frames[0]) < 1000  # the pickle stream does not contain the data
    assert memoryview(frames[1]).nbytes == arr.nbytes
    np.testing.assert_array_equal(loads(frames), arr)


def test_out_of_band_threshold_is_inclusive():
    at = np.zeros(OUT_OF_BAND_MIN, dtype="uint8")
    below = np.zeros(OUT_OF_BAND_MIN - 1, dtype="uint8")
    assert len(dumps(at)) == 2
    assert len(dumps(below)) == 1


def test_out_of_band_buffer_is_not_copied_on_the_sending_side():
    arr = np.ones(OUT_OF_BAND_MIN, dtype="float64")
    frames = dumps(arr)
    assert np.shares_memory(np.frombuffer(frames[1], dtype="float64"), arr)


def test_several_arrays_mixed_sizes():
    big1 = np.random.default_rng(1).random((300, 300))
    big2 = np.arange(100_000, dtype="int32")
    small = np.arange(5)
    obj = {"X": big1, "y": big2, "w": small, "same": big1}
    frames = dumps(obj)
    assert len(frames) == 3  # two large arrays; the repeated one is memoized, the small one in band
    back = loads(over_the_wire(frames))
    np.testing.assert_array_equal(back["X"], big1)
    np.testing.assert_array_equal(back["y"], big2)
    np.testing.assert_array_equal(back["w"], small)
    assert back["same"] is back["X"]


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.asfortranarray(np.random.default_rng(2).random((400, 300))),
        lambda: np.random.default_rng(3).random((400, 400))[::2, ::3],  # not contiguous
        lambda: np.arange(200_000, dtype=">i8"),  # big-endian
        lambda: np.zeros((0, 100_000)),  # empty
        lambda: np.array([{"o": 1}] * 10_000, dtype=object),
    ],
    ids=["fortran", "strided", "big-endian", "empty", "object"],
)
def test_array_layouts_round_trip(make):
    arr = make()
    back = loads(over_the_wire(dumps(arr)))
    assert back.dtype == arr.dtype and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)


def test_received_array_is_writable_and_built_on_the_received_buffer_without_copy():
    arr = np.arange(OUT_OF_BAND_MIN, dtype="float64")
    buffers = over_the_wire(dumps(arr))
    back = loads(buffers)
    assert back.flags.writeable
    big = buffers[1]
    np.frombuffer(big, dtype="float64")[0] = -1.0  # write through the received bytearray
    assert back[0] == -1.0  # the array is a view of it: no copy was made


def test_loads_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="empty payload"):
        loads([])


def test_functions_and_closures_round_trip():
    k = 10

    def add_k(x):
        return x + k

    assert loads(dumps(add_k))(5) == 15
    assert loads(dumps(lambda x: x * 2))(4) == 8


# ---------------------------------------------------------------- exceptions


class KeywordOnlyError(Exception):
    def __init__(self, *, code: int, detail: str) -> None:
        super().__init__(f"failed with code {code}: {detail}")
        self.code = code
        self.detail = detail


class LockHoldingError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def test_plain_exception_round_trips_with_remote_traceback():
    exc = raised(ValueError("bad value 42"))
    back = load_exception(dump_exception(exc))
    assert type(back) is ValueError
    assert back.args == ("bad value 42",)
    assert isinstance(back.__cause__, RemoteTraceback)
    assert "ValueError: bad value 42" in back.__cause__.text
    assert "raised" in back.__cause__.text  # the remote frame that raised it
    assert back.__cause__.text in str(back.__cause__)


def test_exception_record_travels_over_the_wire():
    exc = raised(KeyError("missing"))
    back = load_exception(over_the_wire(dump_exception(exc)))
    assert type(back) is KeyError and back.args == ("missing",)


def test_keyword_only_exception_keeps_type_message_and_attributes():
    exc = raised(KeywordOnlyError(code=7, detail="disk full"))
    with pytest.raises(TypeError):
        pickle.loads(pickle.dumps(exc))  # plain pickling cannot rebuild it
    back = load_exception(dump_exception(exc))
    assert type(back) is KeywordOnlyError
    assert str(back) == "failed with code 7: disk full"
    assert back.code == 7
    assert back.detail == "disk full"
    assert isinstance(back.__cause__, RemoteTraceback)
    assert "KeywordOnlyError" in back.__cause__.text


def test_exception_holding_a_lock_becomes_remote_error_with_the_message():
    exc = raised(LockHoldingError("cannot pickle me"))
    back = load_exception(dump_exception(exc))
    assert isinstance(back, BaseException)
    assert isinstance(back, RemoteError)
    assert back.type_name.endswith("LockHoldingError")
    assert back.message == "cannot pickle me"
    assert "LockHoldingError" in str(back) and "cannot pickle me" in str(back)
    assert isinstance(back.__cause__, RemoteTraceback)
    assert "cannot pickle me" in back.__cause__.text
    assert back.remote_traceback == back.__cause__.text


def test_exception_of_a_locally_defined_class_keeps_its_message():
    class LocalError(Exception):
        pass

    exc = raised(LocalError("from a closure"))
    back = load_exception(dump_exception(exc))
    assert isinstance(back, BaseException)
    assert "from a closure" in str(back)
    assert type(back).__name__ in ("LocalError", "RemoteError")
    assert "LocalError" in back.__cause__.text


def test_local_class_with_unpicklable_state_becomes_remote_error():
    class LocalLockError(Exception):
        def __init__(self, message):
            super().__init__(message)
            self.lock = threading.RLock()

    back = load_exception(dump_exception(raised(LocalLockError("locked"))))
    assert isinstance(back, RemoteError)
    assert "LocalLockError" in back.type_name and back.message == "locked"


def test_remote_error_when_the_class_cannot_be_loaded(monkeypatch):
    module = types.ModuleType("jobsched_vanishing_module")

    class VanishingError(Exception):
        pass

    VanishingError.__module__ = module.__name__
    VanishingError.__qualname__ = "VanishingError"
    module.VanishingError = VanishingError
    monkeypatch.setitem(sys.modules, module.__name__, module)
    frames = dump_exception(raised(VanishingError("gone on the other side")))
    monkeypatch.delitem(sys.modules, module.__name__)  # the receiving side lacks the module

    back = load_exception(frames)
    assert isinstance(back, RemoteError)
    assert back.type_name == "jobsched_vanishing_module.VanishingError"
    assert back.message == "gone on the other side"
    assert str(back) == "jobsched_vanishing_module.VanishingError: gone on the other side"
    assert isinstance(back.__cause__, RemoteTraceback)
    assert "gone on the other side" in back.__cause__.text


def test_remote_error_pickles():
    err = RemoteError("pkg.Err", "msg", "Traceback...")
    back = pickle.loads(pickle.dumps(err))
    assert (back.type_name, back.message, back.remote_traceback) == ("pkg.Err", "msg", "Traceback...")
    assert str(back) == "pkg.Err: msg"


def test_remote_traceback_str_shows_the_text():
    tb = RemoteTraceback("Traceback (most recent call last):\n  boom")
    assert str(tb).endswith("boom")
    assert tb.text.startswith("Traceback")


@pytest.mark.parametrize(
    "exc",
    [SystemExit(3), KeyboardInterrupt(), StopIteration(5), OSError(2, "No such file"), ZeroDivisionError()],
    ids=lambda e: type(e).__name__,
)
def test_builtin_exceptions_round_trip(exc):
    back = load_exception(dump_exception(raised(exc)))
    assert type(back) is type(exc)
    assert back.args == exc.args


def test_original_cause_chain_text_is_kept_in_the_remote_traceback():
    try:
        try:
            raise KeyError("inner")
        except KeyError as inner:
            raise RuntimeError("outer") from inner
    except RuntimeError as exc:
        outer = exc
    back = load_exception(dump_exception(outer))
    assert type(back) is RuntimeError
    assert "KeyError: 'inner'" in back.__cause__.text
    assert "RuntimeError: outer" in back.__cause__.text


def test_exception_without_traceback():
    back = load_exception(dump_exception(ValueError("never raised")))
    assert type(back) is ValueError
    assert "ValueError: never raised" in back.__cause__.text


# ------------------------------------------------------------- scattered data


def test_loads_readonly_builds_read_only_views_without_copy():
    from jobsched.payload.serialize import loads_readonly

    arr = np.arange(OUT_OF_BAND_MIN, dtype="float64")
    buffers = over_the_wire(dumps({"X": arr}))
    back = loads_readonly(buffers)["X"]
    assert not back.flags.writeable  # shared by every batch on the worker: nobody may mutate it
    with pytest.raises(ValueError):
        back[0] = 1.0
    np.frombuffer(buffers[1], dtype="float64")[1] = -7.0
    assert back[1] == -7.0  # a view of the received buffer


def test_resolve_scattered(monkeypatch):
    from jobsched.worker import store as serialize

    array = np.arange(1000.0)
    monkeypatch.setitem(serialize.DATA_STORE, "X-1", tuple(dumps([1, array], out_of_band_min=0)))
    first = serialize.resolve_scattered("X-1")
    assert first[0] == 1 and np.array_equal(first[1], array)
    assert not first[1].flags.writeable  # the shared buffer: read-only, whatever its size
    first.append("mutated")
    assert len(serialize.resolve_scattered("X-1")) == 2  # outside a batch, every call is a fresh copy
    with pytest.raises(LookupError, match="'missing-key' is not held by this worker"):
        serialize.resolve_scattered("missing-key")


def test_a_batch_resolves_each_scattered_key_once(monkeypatch):
    from jobsched.client.scatter import ScatteredRef
    from jobsched.worker import store as serialize

    monkeypatch.setitem(serialize.DATA_STORE, "X-2", tuple(dumps({"a": 1}, out_of_band_min=0)))
    ref = ScatteredRef("X-2", 0)
    left, right = serialize.loads_batch(dumps((ref, ref)))
    assert left == {"a": 1} and left is right  # one object per batch, as pickling by value gives
    other, _ = serialize.loads_batch(dumps((ref, ref)))
    assert other is not left  # each batch its own copy: one task's change cannot reach another


# ------------------------------------------------- payloads versus the frame caps


@pytest.mark.timeout(60)
def test_a_payload_with_1024_large_arrays_fits_the_default_frame_caps():
    """Whatever ``dumps`` produces must be receivable by a peer with the default ``FrameLimits``.

    A task returning (or a batch taking) a list of 1024 arrays of 64 KiB is ordinary joblib
    usage; one out-of-band buffer per array plus the pickle stream is 1025 buffers, over
    ``FrameLimits.max_buffers`` (1024), and the receiver would close the connection.
    """
    from jobsched.protocol import FrameLimits
    from jobsched.protocol import messages as m

    n = 1024
    base = np.arange(n * OUT_OF_BAND_MIN // 8, dtype="int64")
    parts = [base[i * OUT_OF_BAND_MIN // 8 : (i + 1) * OUT_OF_BAND_MIN // 8] for i in range(n)]
    msg = m.TaskDone(1, 1, m.OK, 0.1, tuple(dumps(parts)))
    decoder = FrameDecoder(FrameLimits())
    frames = []
    for piece in m.encode(msg):
        frames.extend(decoder.feed(piece))  # raises FrameTooLarge if over the caps
    (frame,) = frames
    back = loads(m.decode(frame).frames)
    assert len(back) == n
    np.testing.assert_array_equal(np.concatenate(back), base)


def test_a_call_remembers_what_pickles_by_reference_until_the_registry_changes(monkeypatch):
    import cloudpickle

    from jobsched.client.scatter import ByReference, dumps_batch

    module = types.ModuleType("jobsched_test_by_reference")
    exec("def triple(x):\n    return 3 * x\n", module.__dict__)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    by_reference = ByReference()

    def pickled() -> bytes:
        frames, keys = dumps_batch([module.triple], {}, 0, lambda *a: "", by_reference)
        assert keys == []
        return frames[0]

    first = pickled()
    assert by_reference.objects == {id(module.triple): module.triple}
    assert pickled() == first  # the second batch skips the lookups, same bytes
    cloudpickle.register_pickle_by_value(module)  # mid-call: applies from the next batch on
    try:
        by_value = pickled()
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    assert id(module.triple) not in by_reference.objects
    monkeypatch.delitem(sys.modules, module.__name__)  # a worker without the module loads it
    assert pickle.loads(by_value)[0](2) == 6
    with pytest.raises(ImportError):
        pickle.loads(first)
