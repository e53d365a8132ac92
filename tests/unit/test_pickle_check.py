"""The pickle check: jobsched's own payloads pass, memo bombs and garbage are refused, fast and safely."""

from __future__ import annotations

import functools
import pickle
import pickletools
import struct

import cloudpickle
import numpy as np
import pytest
import tasks
from hypothesis import given, settings
from hypothesis import strategies as st
from joblib import delayed
from joblib.parallel import BatchedCalls

from jobsched.client.scatter import ByReference, dumps_batch
from jobsched.payload.context import CallContext
from jobsched.payload.pickle_check import REFUSED, PickleRefused, check_pickle
from jobsched.payload.serialize import dump_exception, dumps, load_exception, loads, loads_readonly
from jobsched.protocol import messages as m
from jobsched.worker.executor import run_batch

LONG_BINPUT_BOMB = b"\x80\x05N" + pickle.LONG_BINPUT + struct.pack("<I", 2**31 - 2) + pickle.STOP  # memo of 2**32 slots
PUT_BOMB = b"N" + pickle.PUT + b"2147483646\n" + pickle.STOP
MEMO_OPCODES = {"PUT", "BINPUT", "LONG_BINPUT"}


def memo_opcodes(stream: bytes) -> set[str]:
    """The explicit memo opcodes pickletools finds in ``stream`` (up to its STOP)."""
    return {op.name for op, _arg, _pos in pickletools.genops(stream)} & MEMO_OPCODES


def refusal(stream: bytes) -> str:
    with pytest.raises(PickleRefused) as info:
        check_pickle(stream)
    return str(info.value)


def closure_over(k: int):
    def add(x):
        return x + k

    return add


def real_payloads() -> dict[str, bytes]:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    X = np.random.default_rng(0).random((100, 4))
    y = (X[:, 0] > 0.5).astype(int)
    calls = [delayed(closure_over(3))(i) for i in range(5)] + [delayed(np.sum)(X), delayed(tasks.square)(2)]
    batch = (BatchedCalls(calls, ("threading", 1), None, None), pickle.dumps(CallContext(), protocol=5))
    batch_frames, _keys = dumps_batch(batch, {}, 0, lambda obj, n: "key", ByReference())
    payloads = {
        "joblib batch": batch_frames[0],
        "array out of band": dumps(np.arange(10**5))[0],
        "array in band": dumps(np.arange(10**5), out_of_band_min=2**40)[0],
        "object array": dumps(np.array([None, "a", 1.5], dtype=object))[0],
        "random forest": dumps(RandomForestClassifier(n_estimators=3).fit(X, y))[0],
        "pipeline": dumps(make_pipeline(StandardScaler(), SVC()).fit(X, y))[0],
        "lambda": dumps(lambda v: v * 2)[0],
        "partial": dumps(functools.partial(int, base=2))[0],
        "exception record": dump_exception(ValueError("boom"))[0],
        "call context": pickle.dumps(CallContext(), protocol=5),
        "big int and long text": dumps([10**5000, "é" * 100_000, b"r" * 300_000])[0],
    }
    return payloads


def test_real_payloads_pass_and_hold_no_explicit_memo_opcode():
    for name, stream in real_payloads().items():
        assert memo_opcodes(stream) == set(), name  # the claim the check rests on
        check_pickle(stream, name)


def test_every_opcode_is_either_parsed_or_refused():
    """Each opcode of pickletools' table: a pickle of it alone (with a valid argument) is judged
    as pickletools reads it, so no opcode is missing or has the wrong argument size."""
    arguments = {1: b"\x00", 2: b"\x00\x00", 4: b"\x00" * 4, 8: b"\x00" * 8}
    for op in pickletools.opcodes:
        code = op.code.encode("latin-1")
        if op.name == "STOP":
            continue
        n = op.arg.n if op.arg is not None else 0
        if op.arg is None:
            arg = b""
        elif n > 0:
            arg = arguments[n]
        elif op.arg.name == "stringnl_noescape_pair":
            arg = b"m\nn\n"
        elif n == pickletools.UP_TO_NEWLINE:
            arg = b"'1'\n" if op.arg.name == "stringnl" else b"1\n"
        else:  # a length of 1, 4 (signed or not) or 8 bytes, then that many bytes
            width = {pickletools.TAKEN_FROM_ARGUMENT1: 1, pickletools.TAKEN_FROM_ARGUMENT4: 4,
                     pickletools.TAKEN_FROM_ARGUMENT4U: 4, pickletools.TAKEN_FROM_ARGUMENT8U: 8}[n]
            arg = (2).to_bytes(width, "little") + b"ab"
        stream = code + arg + pickle.STOP
        assert [o.name for o, _a, _p in pickletools.genops(stream)] == [op.name, "STOP"]
        if op.name in MEMO_OPCODES:
            assert op.name in refusal(stream)
        else:
            check_pickle(stream, op.name)
        # the same opcode cut short of its argument is refused, never read past the end
        if arg and op.name not in MEMO_OPCODES:
            assert "truncated" in refusal(code + arg[:-1])


def test_memo_bombs_are_refused_with_the_opcode_named():
    assert refusal(LONG_BINPUT_BOMB) == (
        "the pickle uses the LONG_BINPUT opcode (at byte 3), which jobsched never emits: refused"
    )
    assert "the PUT opcode (at byte 1)" in refusal(PUT_BOMB)
    assert "the BINPUT opcode" in refusal(b"N" + pickle.BINPUT + b"\x05" + pickle.STOP)
    assert set(REFUSED.values()) == MEMO_OPCODES


def test_a_bomb_after_real_content_is_found():
    """Past strings holding the bytes 'p', 'q', 'r', big in-band bytes, a frame and floats."""
    body = dumps(["pqr" * 50, b"\x00r" * 100_000, 1.5, 10**100])[0]
    assert body.endswith(pickle.STOP)
    bomb = body[:-1] + pickle.POP + pickle.NONE + pickle.LONG_BINPUT + struct.pack("<I", 2**30) + pickle.STOP
    assert f"LONG_BINPUT opcode (at byte {len(body) + 1})" in refusal(bomb)


def test_the_bytes_of_memo_opcodes_inside_arguments_pass():
    values = ["p", "q" * 255, "r" * 256, b"pqr", 0x72717072, 2.0**-700, bytearray(b"r" * 70_000)]
    for value in values:
        stream = pickle.dumps(value, protocol=5)
        assert memo_opcodes(stream) == set()
        check_pickle(stream)


def test_older_protocols_are_judged_like_pickletools_reads_them():
    value = {"a": [1, 2.5, "x" * 300, b"y", None, True, (1,)], "b": {3}, "c": 10**30, "d": frozenset({4})}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        stream = pickle.dumps(value, protocol=protocol)
        if memo_opcodes(stream):
            refusal(stream)
        optimized = pickletools.optimize(stream)  # drops the PUTs no GET reads: here, all of them
        assert memo_opcodes(optimized) == set()
        check_pickle(optimized, f"protocol {protocol}")


def test_truncated_pickles_are_refused():
    stream = dumps([1.5, "text", b"\x00" * 300, 2**70, {"k": (None, True)}])[0]
    for cut in range(len(stream)):
        message = refusal(stream[:cut])
        assert "truncated" in message or "before its STOP" in message, (cut, message)


def test_what_follows_stop_is_not_read():
    """The unpickler stops at STOP too: bytes after it are never executed."""
    stream = pickle.dumps([1, 2], protocol=5) + LONG_BINPUT_BOMB
    check_pickle(stream)
    assert pickle.loads(stream) == [1, 2]


def test_unknown_opcodes_and_bad_lengths_are_refused():
    assert "unknown opcode b'\\xff' at byte 2" in refusal(b"\x80\x05\xff.")
    assert "negative length" in refusal(pickle.BINSTRING + struct.pack("<i", -1) + pickle.STOP)
    assert "truncated" in refusal(pickle.BINBYTES8 + struct.pack("<Q", 2**62) + pickle.STOP)
    assert "before its STOP" in refusal(b"")


def test_any_buffer_type_is_read():
    stream = dumps({"x": list(range(300))})[0]
    for buffer in (stream, bytearray(stream), memoryview(stream), memoryview(np.frombuffer(stream, dtype=np.uint8))):
        check_pickle(buffer)
    refusal_of_view = pytest.raises(PickleRefused)
    with refusal_of_view:
        check_pickle(memoryview(LONG_BINPUT_BOMB))


json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text() | st.binary(),
    lambda children: (st.lists(children) | st.tuples(children, children) | st.dictionaries(st.text(), children)
                      | st.frozensets(st.integers() | st.text()) | st.builds(bytearray, st.binary())),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(json_like, st.sampled_from([0, 64, 2**40]))
def test_generated_values_pass_through_dumps_and_loads(value, out_of_band_min):
    frames = dumps(value, out_of_band_min=out_of_band_min)
    check_pickle(frames[0])
    assert loads(frames) == value


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_crash_the_check(data):
    try:
        check_pickle(data)
    except PickleRefused:
        return
    try:
        found = memo_opcodes(data)
    except ValueError:  # a text argument pickletools cannot read (e.g. INT of letters): the unpickler fails too
        return
    assert found == set()  # what passes has no memo opcode, as pickletools reads it


@settings(max_examples=100, deadline=None)
@given(json_like, st.data())
def test_a_memo_opcode_at_any_opcode_boundary_is_refused(value, data):
    stream = dumps(value)[0]
    boundaries = [pos for _op, _arg, pos in pickletools.genops(stream) if pos > 0]
    at = boundaries[data.draw(st.integers(0, len(boundaries) - 1))]  # sampled_from is slow on long lists
    memo_puts = [pickle.BINPUT + b"\x01", pickle.LONG_BINPUT + b"\x00\x00\x00\x40", pickle.PUT + b"9\n"]
    injected = data.draw(st.sampled_from(memo_puts))
    assert "which jobsched never emits" in refusal(stream[:at] + injected + stream[at:])


# ---------------------------------------------------- where the worker and client unpickle
def test_loads_refuses_before_unpickling_and_names_the_pickle():
    with pytest.raises(PickleRefused, match="the batch's pickle uses the LONG_BINPUT opcode"):
        loads([LONG_BINPUT_BOMB], "the batch's pickle")
    with pytest.raises(PickleRefused, match="the data's pickle uses the PUT opcode"):
        loads_readonly([PUT_BOMB])
    with pytest.raises(pickle.UnpicklingError, match="the payload's pickle could not be unpickled: "):
        loads([pickle.MARK + pickle.STOP])  # passes the check (no memo opcode), fails in the unpickler


def test_a_hostile_batch_fails_with_a_clear_error_and_the_next_runs():
    context = pickle.dumps(CallContext(), protocol=5)
    bomb_context = tuple(dumps((functools.partial(int, "7"), LONG_BINPUT_BOMB)))
    for frames, expected in [
        ((LONG_BINPUT_BOMB,), "the batch's pickle uses the LONG_BINPUT opcode (at byte 3), which jobsched never emits"),
        ((b"\x93\x17random bytes",), "the batch's pickle"),
        (bomb_context, "the batch's context pickle uses the LONG_BINPUT opcode"),
        ((), "empty payload"),
    ]:
        status, out, _ = run_batch(frames)
        assert status == m.ERROR
        error = load_exception(out[:1])
        assert expected in str(error), str(error)
    status, out, _ = run_batch(tuple(dumps((functools.partial(int, "7"), context))))
    assert status == m.OK and loads(out)[0] == 7


def test_cloudpickled_closures_pass():
    stream = cloudpickle.dumps(closure_over(5), protocol=5)
    check_pickle(stream)
    assert pickle.loads(stream)(1) == 6
