"""Unit tests of message encoding and validation: every registered op, every field type."""

from __future__ import annotations

import dataclasses
import typing

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import message_bytes

from jobsched.protocol import Frame, FrameDecoder, MalformedMessage, ProtocolError
from jobsched.protocol import messages as m

REGISTRY = m.registry()
OPS = sorted(REGISTRY)


def fields_of(cls) -> list[tuple[str, typing.Any]]:
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(cls) if f.name != "frames"]


def has_frames(cls) -> bool:
    return "frames" in {f.name for f in dataclasses.fields(cls)}


def sample(tp: typing.Any) -> typing.Any:
    """A valid, non-default value of a field type."""
    if typing.get_origin(tp) is typing.Union:
        return sample(next(a for a in typing.get_args(tp) if a is not type(None)))
    if typing.get_origin(tp) is list:
        return [sample(typing.get_args(tp)[0])]
    return {int: 7, float: 2.5, str: "sample", bytes: b"\x00\xff", bool: True, dict: {"k": [1, "v"]}}[tp]


def wrong_values(tp: typing.Any) -> list[typing.Any]:
    """Values of the wrong type for a field type (msgpack-encodable)."""
    candidates = [True, 1, 1.5, "1", b"1", None, [1], {"a": 1}]
    if tp is int:
        return [v for v in candidates if type(v) is not int]
    if tp is float:
        return [v for v in candidates if type(v) not in (int, float)]
    if typing.get_origin(tp) is typing.Union:
        ok = typing.get_args(tp)
        return [v for v in candidates if type(v) not in ok and not (type(v) is int and float in ok)]
    if typing.get_origin(tp) is list:  # not a list, or a list holding one wrong item
        (item,) = typing.get_args(tp)
        return [v for v in candidates if type(v) is not list] + [[bad] for bad in wrong_values(item)]
    return [v for v in candidates if type(v) is not tp]


DEFAULT_FRAMES = (b"payload", b"", bytearray(b"x" * 100))


def build(cls, frames=DEFAULT_FRAMES):
    kwargs = {name: sample(tp) for name, tp in fields_of(cls)}
    if has_frames(cls):
        kwargs["frames"] = tuple(frames)
    return cls(**kwargs)


def roundtrip(msg: m.Message) -> m.Message:
    (frame,) = FrameDecoder().feed(message_bytes(msg))
    return m.decode(frame)


def body(*items) -> Frame:
    return Frame(msgpack.packb(list(items), use_bin_type=True))


# --------------------------------------------------------------- registry


def test_registry_has_the_protocol_ops():
    assert {
        "register-client", "register-worker", "welcome", "closing", "heartbeat", "submit", "cancel-call",
        "batch-done", "info-request", "info-reply", "execute", "cancel", "task-done",
    } <= set(REGISTRY)
    for op, cls in REGISTRY.items():
        assert cls.op == op
        assert issubclass(cls, m.Message)


def test_registry_returns_a_copy():
    reg = m.registry()
    reg.pop("submit")
    assert "submit" in m.registry()


def test_messages_are_frozen():
    msg = m.Cancel(1, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        msg.task_id = 3  # type: ignore[misc]


def test_duplicate_op_is_refused():
    with pytest.raises(ValueError, match="duplicate op"):

        @m.message("submit")
        class Again(m.Message):
            x: int = 0


# ------------------------------------------------------------ round trips


@pytest.mark.parametrize("op", OPS)
def test_every_message_round_trips(op):
    msg = build(REGISTRY[op])
    back = roundtrip(msg)
    assert type(back) is type(msg)
    assert back == msg


@pytest.mark.parametrize("op", OPS)
def test_every_message_with_defaults_round_trips(op):
    msg = REGISTRY[op]()
    assert roundtrip(msg) == msg


@pytest.mark.parametrize("op", [op for op in OPS if has_frames(REGISTRY[op])])
def test_frames_travel_as_buffers_not_in_the_body(op):
    payload = b"P" * 100_000
    pieces = m.encode(build(REGISTRY[op], frames=(payload,)))
    assert len(pieces[1]) < 1000  # the msgpack body stays small
    assert pieces[2] is payload  # passed through, not copied
    back = roundtrip(build(REGISTRY[op], frames=(payload, b"")))
    assert [bytes(f) for f in back.frames] == [payload, b""]


def test_body_is_op_then_fields_in_declaration_order():
    pieces = m.encode(m.SubmitBatch(5, 6, "fit", 2, (b"x",), ["k1", "k2"]))
    assert msgpack.unpackb(pieces[1]) == ["submit", 5, 6, "fit", 2, ["k1", "k2"], 0]  # frames are not in the body
    assert [bytes(p) for p in pieces[2:]] == [b"x"]


def test_float_field_accepts_an_integer():
    assert m.decode(body("welcome", "w", 2)) == m.Welcome("w", 2.0)


def test_info_reply_carries_nested_data():
    info = {"workers": {"tcp://1.2.3.4:5": {"nthreads": 4, "memory": 2**40}}, "ratio": 0.5, "none": None}
    assert roundtrip(m.InfoReply(3, info)).info == info


# ------------------------------------------------------------- validation


def test_unknown_op():
    with pytest.raises(MalformedMessage, match="unknown op"):
        m.decode(body("launch-missiles", 1))


def test_unknown_op_is_truncated_in_the_error():
    with pytest.raises(MalformedMessage) as info:
        m.decode(body("x" * 10_000))
    assert len(str(info.value)) < 200


@pytest.mark.parametrize("op", OPS)
def test_too_few_and_too_many_fields(op):
    values = [sample(tp) for _, tp in fields_of(REGISTRY[op])]
    with pytest.raises(MalformedMessage, match="expected"):
        m.decode(body(op, *values, 0))
    if values:
        with pytest.raises(MalformedMessage, match="expected"):
            m.decode(body(op, *values[:-1]))


WRONG_TYPE_CASES = [
    pytest.param(op, i, bad, id=f"{op}-{name}-{type(bad).__name__}")
    for op in OPS
    for i, (name, tp) in enumerate(fields_of(REGISTRY[op]))
    for bad in wrong_values(tp)
]


@pytest.mark.parametrize("op, index, bad", WRONG_TYPE_CASES)
def test_wrong_field_type_is_refused(op, index, bad):
    values = [sample(tp) for _, tp in fields_of(REGISTRY[op])]
    values[index] = bad
    with pytest.raises(MalformedMessage, match="invalid type"):
        m.decode(body(op, *values))


def test_bool_is_not_an_int():
    with pytest.raises(MalformedMessage):
        m.decode(body("cancel", True, 1, ""))
    with pytest.raises(MalformedMessage):
        m.decode(body("heartbeat", False))


def test_bool_is_not_a_float():
    with pytest.raises(MalformedMessage):
        m.decode(body("welcome", "w", True))


def test_bytes_where_str_is_refused():
    with pytest.raises(MalformedMessage, match="func_name"):
        m.decode(body("execute", 1, 1, b"func", [], ""))
    with pytest.raises(MalformedMessage, match="reason"):
        m.decode(body("closing", b"reason"))


def test_field_checkers_are_exact():
    # no registered message has a bytes or Optional field today; the checkers must still be exact
    check_bytes = m._checker(bytes)
    assert check_bytes(b"x") and not check_bytes("x") and not check_bytes(bytearray(b"x"))
    check_opt = m._checker(typing.Optional[int])  # noqa: UP045 - the checker must understand typing.Optional itself
    assert check_opt(None) and check_opt(3) and not check_opt(True) and not check_opt("3")
    check_list = m._checker(list[int])
    assert check_list([1, 2]) and check_list([]) and not check_list([1, True]) and not check_list((1,))
    with pytest.raises(TypeError, match="unsupported"):
        m._checker(set)


def test_list_fields_check_every_item():
    assert m.decode(body("data-release", ["a", "b"])) == m.ReleaseData(["a", "b"])
    assert m.decode(body("data-release", [])) == m.ReleaseData([])
    for bad in (["a", 1], ["a", b"b"], [None], "ab", [["a"]], {"a": 1}):
        with pytest.raises(MalformedMessage, match="keys"):
            m.decode(body("data-release", bad))


def test_keys_travel_with_submit_and_execute():
    msg = m.Execute(3, 1, "fit", (b"p",), ["X-123", "y-456"])
    assert roundtrip(msg) == msg
    assert roundtrip(msg).keys == ["X-123", "y-456"]
    submit = m.SubmitBatch(1, 2, "fit", 0, (b"p",), ["X-123"])
    assert roundtrip(submit) == submit


@pytest.mark.parametrize(
    "obj",
    [None, 0, 1.5, "submit", b"submit", {"op": "submit"}, [], [1, 2], [None], [b"submit", 1, 1, "f", 0], [["submit"]]],
)
def test_bodies_that_are_not_an_op_list(obj):
    with pytest.raises(MalformedMessage, match="not \\[op"):
        m.decode(Frame(msgpack.packb(obj, use_bin_type=True)))


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xc1",  # the one byte msgpack never uses
        b"\x92\xa6submit",  # truncated array
        msgpack.packb(["cancel", 1, 2]) + b"\x00",  # trailing data
        b"\x92\xa6cancel\xa2\xff\xfe",  # invalid utf-8 in a str
        msgpack.packb(["info-reply", 1, {1: 2}]),  # non-str map key
        msgpack.packb(["info-reply", 1, {(1, 2): 2}]),  # array map key
        b"\x91" * 100_000,  # absurd nesting
        b"\xdd\xff\xff\xff\xff",  # array announcing 2**32-1 items
    ],
)
def test_garbage_msgpack(raw):
    with pytest.raises(MalformedMessage):
        m.decode(Frame(raw))


@pytest.mark.parametrize("op", [op for op in OPS if not has_frames(REGISTRY[op])])
def test_buffers_on_a_message_without_frames_are_refused(op):
    encoded = msgpack.packb([op, *(sample(tp) for _, tp in fields_of(REGISTRY[op]))], use_bin_type=True)
    assert m.decode(Frame(encoded)) == build(REGISTRY[op])
    with pytest.raises(MalformedMessage, match="carries no buffers"):
        m.decode(Frame(encoded, (bytearray(b"smuggled"),)))
    with pytest.raises(MalformedMessage, match="carries no buffers"):
        m.decode(Frame(encoded, (bytearray(),)))


def test_ext_types_are_refused():
    raw = msgpack.packb(["cancel", msgpack.ExtType(5, b"xx"), 1, ""], use_bin_type=True)
    with pytest.raises(MalformedMessage, match="invalid type"):
        m.decode(Frame(raw))


def test_malformed_message_is_a_protocol_error():
    assert issubclass(MalformedMessage, ProtocolError)


def test_frames_nbytes():
    import numpy as np

    arr = np.zeros((10, 10), dtype="float32")
    assert m.frames_nbytes([b"abc", bytearray(5), memoryview(arr)]) == 3 + 5 + 400


# ---------------------------------------------------------------- hypothesis

INT64 = st.integers(-(2**63), 2**64 - 1)
SCALAR = st.none() | st.booleans() | INT64 | st.floats(allow_nan=False) | st.text(max_size=20) | st.binary(max_size=20)
JSONISH = st.recursive(
    SCALAR, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=8,
)


def strategy_for(tp: typing.Any) -> st.SearchStrategy:
    if typing.get_origin(tp) is typing.Union:
        return st.one_of([strategy_for(a) for a in typing.get_args(tp)])
    if typing.get_origin(tp) is list:
        return st.lists(strategy_for(typing.get_args(tp)[0]), max_size=5)
    return {
        type(None): st.none(),
        int: INT64,
        float: st.floats(allow_nan=False),
        str: st.text(max_size=50),
        bytes: st.binary(max_size=50),
        bool: st.booleans(),
        dict: st.dictionaries(st.text(max_size=10), JSONISH, max_size=5),
    }[tp]


@st.composite
def any_message(draw):
    cls = REGISTRY[draw(st.sampled_from(OPS))]
    kwargs = {name: draw(strategy_for(tp)) for name, tp in fields_of(cls)}
    if has_frames(cls):
        kwargs["frames"] = tuple(draw(st.lists(st.binary(max_size=100), max_size=4)))
    return cls(**kwargs)


@settings(max_examples=200, deadline=None)
@given(msg=any_message())
def test_any_valid_message_round_trips(msg):
    back = roundtrip(msg)
    assert type(back) is type(msg)
    assert back == msg


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=200), buffers=st.lists(st.binary(max_size=10), max_size=2))
def test_decoding_random_bytes_only_ever_raises_malformed_message(raw, buffers):
    frame = Frame(raw, tuple(bytearray(b) for b in buffers))
    try:
        msg = m.decode(frame)
    except MalformedMessage:
        return
    assert isinstance(msg, m.Message) and type(msg) in REGISTRY.values()


@settings(max_examples=120, deadline=None)
@given(op=st.sampled_from(OPS) | st.text(max_size=10), items=st.lists(JSONISH, max_size=7), nbuf=st.integers(0, 2))
def test_decoding_random_op_lists_only_ever_raises_malformed_message(op, items, nbuf):
    frame = Frame(msgpack.packb([op, *items], use_bin_type=True), tuple(bytearray(b"b") for _ in range(nbuf)))
    try:
        msg = m.decode(frame)
    except MalformedMessage:
        return
    # it decoded: then every field has exactly its declared type
    assert type(msg) is REGISTRY[op]
    for (name, tp), value in zip(fields_of(type(msg)), items, strict=False):  # a short body: defaults for the rest
        assert getattr(msg, name) == value
        if tp in (int, str, bytes, bool, dict):
            assert type(value) is tp
