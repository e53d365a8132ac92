"""Unit tests of the sans-IO framing layer: bytes in, frames out, caps before allocation."""

from __future__ import annotations

import contextlib
import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import frame_bytes

from jobsched.protocol import PREAUTH_LIMITS, Frame, FrameDecoder, FrameLimits, FrameTooLarge, ProtocolError, encode_frame

HEADER = struct.Struct("!IH")
LENGTH = struct.Struct("!Q")


@contextlib.contextmanager
def allocation_peak():
    """Measure the peak of Python allocations inside the block: ``with allocation_peak() as peak``."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    result: list[int] = []
    try:
        yield result
    finally:
        _, peak = tracemalloc.get_traced_memory()
        if not was_tracing:
            tracemalloc.stop()
        result.append(peak - base)


def feed_bytewise(decoder: FrameDecoder, data: bytes) -> list[Frame]:
    frames: list[Frame] = []
    for i in range(len(data)):
        frames.extend(decoder.feed(data[i : i + 1]))
    return frames


# ------------------------------------------------------------------ layout


def test_encoded_layout_matches_the_documented_wire_format():
    pieces = encode_frame(b"body", [b"ab", bytearray(b"cde")])
    header = pieces[0]
    assert header == HEADER.pack(4, 2) + LENGTH.pack(2) + LENGTH.pack(3)
    assert pieces[1] == b"body"
    assert [bytes(p) for p in pieces[2:]] == [b"ab", b"cde"]


def test_encode_frame_passes_buffers_through_without_copying():
    raw = b"x" * 100
    mutable = bytearray(b"y" * 50)
    pieces = encode_frame(b"", [raw, mutable])
    assert pieces[2] is raw
    assert isinstance(pieces[3], memoryview) and pieces[3].obj is mutable
    mutable[0] = ord("z")
    assert bytes(pieces[3])[:1] == b"z"  # a view, not a copy


def test_encode_frame_flattens_a_multidimensional_numpy_buffer():
    arr = np.arange(24, dtype="float64").reshape(2, 3, 4)
    pieces = encode_frame(b"b", [memoryview(arr)])
    assert LENGTH.unpack_from(pieces[0], HEADER.size)[0] == arr.nbytes
    (frame,) = FrameDecoder().feed(b"".join(bytes(p) for p in pieces))
    assert np.frombuffer(frame.buffers[0], dtype="float64").reshape(2, 3, 4).tolist() == arr.tolist()


# ------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    "body, buffers",
    [
        (b"", ()),
        (b"hello", ()),
        (b"hello", (b"",)),
        (b"", (b"", b"", b"")),
        (b"m", (b"a" * 10, b"", b"b" * 3)),
        (bytes(range(256)), (bytes(range(256)) * 3,)),
    ],
)
def test_round_trip_whole_and_one_byte_at_a_time(body, buffers):
    data = frame_bytes(body, buffers)
    for frames in (FrameDecoder().feed(data), feed_bytewise(FrameDecoder(), data)):
        assert frames == [Frame(body, tuple(bytearray(b) for b in buffers))]
        assert frames[0].body == body
        assert [bytes(b) for b in frames[0].buffers] == [bytes(b) for b in buffers]


def test_one_byte_at_a_time_yields_each_frame_exactly_when_its_last_byte_arrives():
    data = frame_bytes(b"abc", [b"12345"])
    decoder = FrameDecoder()
    for i in range(len(data) - 1):
        assert decoder.feed(data[i : i + 1]) == []
        assert not decoder.idle
    assert decoder.feed(data[-1:]) == [Frame(b"abc", (bytearray(b"12345"),))]
    assert decoder.idle


def test_zero_length_body_and_no_buffers_is_a_frame():
    decoder = FrameDecoder()
    assert decoder.feed(HEADER.pack(0, 0)) == [Frame(b"", ())]
    assert decoder.idle


def test_many_frames_in_one_chunk_come_out_in_order():
    specs = [(b"f%d" % i, tuple(b"x" * j for j in range(i % 4))) for i in range(50)]
    data = b"".join(frame_bytes(body, bufs) for body, bufs in specs)
    frames = FrameDecoder().feed(data)
    assert [(f.body, tuple(bytes(b) for b in f.buffers)) for f in frames] == specs


def test_a_chunk_ending_mid_frame_keeps_the_rest_for_later():
    first, second = frame_bytes(b"one", [b"A" * 10]), frame_bytes(b"two", [b"B" * 10])
    decoder = FrameDecoder()
    cut = len(second) // 2
    assert decoder.feed(first + second[:cut]) == [Frame(b"one", (bytearray(b"A" * 10),))]
    assert not decoder.idle
    assert decoder.feed(second[cut:]) == [Frame(b"two", (bytearray(b"B" * 10),))]
    assert decoder.idle


def test_empty_feeds_are_harmless():
    decoder = FrameDecoder()
    assert decoder.feed(b"") == []
    assert decoder.idle
    data = frame_bytes(b"abc", [b"x"])
    assert decoder.feed(data[:3]) == []
    assert decoder.feed(b"") == []
    assert decoder.feed(data[3:]) == [Frame(b"abc", (bytearray(b"x"),))]


@pytest.mark.timeout(30)
def test_large_out_of_band_buffer_in_chunks():
    payload = np.random.default_rng(0).integers(0, 256, size=8 * 2**20, dtype=np.uint8).tobytes()
    data = frame_bytes(b"big", [payload, b"", b"tail"])
    decoder = FrameDecoder()
    frames = []
    for start in range(0, len(data), 65536 + 7):
        frames.extend(decoder.feed(data[start : start + 65536 + 7]))
    assert len(frames) == 1
    assert frames[0].body == b"big"
    assert len(frames[0].buffers) == 3
    assert bytes(frames[0].buffers[0]) == payload  # a large buffer is a lazily committed memory map
    assert frames[0].buffers[1] == b""
    assert frames[0].buffers[2] == b"tail"
    assert decoder.idle


def test_buffers_come_out_as_writable_resizable_bytearrays():
    (frame,) = FrameDecoder().feed(frame_bytes(b"", [b"abc" * 1000]))
    buf = frame.buffers[0]
    assert type(buf) is bytearray
    buf[0] = 0  # writable: numpy can rebuild arrays on it without a copy
    buf.extend(b"!")  # no memoryview export left behind by the decoder
    assert len(buf) == 3001


def test_decoder_keeps_no_reference_to_the_callers_input():
    data = bytearray(frame_bytes(b"body", [b"payload"]))
    half = len(data) // 2
    decoder = FrameDecoder()
    chunk1, chunk2 = bytearray(data[:half]), bytearray(data[half:])
    assert decoder.feed(chunk1) == []
    chunk1[:] = b"\xff" * len(chunk1)  # the transport may reuse its buffer
    chunk1.extend(b"more")  # and resize it (would fail if a view were still exported)
    (frame,) = decoder.feed(memoryview(chunk2))
    assert frame == Frame(b"body", (bytearray(b"payload"),))


# ----------------------------------------------- in-place receive (BufferedProtocol)


def fill_in_place(decoder: FrameDecoder, data: bytes, chunk: int) -> list[Frame]:
    """Feed like ``protocol.aio``: read straight into ``fill_target()`` when there is one."""
    frames: list[Frame] = []
    pos = 0
    while pos < len(data):
        target = decoder.fill_target()
        if target is not None and len(target):
            n = min(chunk, len(target), len(data) - pos)
            target[:n] = data[pos : pos + n]
            del target  # like the transport, hold no view past the call
            frames.extend(decoder.filled(n))
        else:
            n = min(chunk, len(data) - pos)
            frames.extend(decoder.feed(data[pos : pos + n]))
        pos += n
    return frames


def test_fill_target_is_none_outside_a_buffer():
    decoder = FrameDecoder()
    assert decoder.fill_target() is None
    data = frame_bytes(b"body", [b"x" * 100])
    decoder.feed(data[:3])  # mid header
    assert decoder.fill_target() is None
    decoder.feed(data[3 : 6 + 8 + 2])  # mid body
    assert decoder.fill_target() is None


def test_large_buffer_is_received_in_place_without_copy():
    payload = bytes(range(256)) * 4096  # 1 MiB
    data = frame_bytes(b"meta", [payload])
    decoder = FrameDecoder()
    head = 6 + 8 + 4 + 10
    assert decoder.feed(data[:head]) == []
    target = decoder.fill_target()
    assert target is not None and len(target) == len(payload) - 10
    owner = target.obj
    target[:1000] = data[head : head + 1000]
    assert decoder.filled(1000) == []
    rest = decoder.fill_target()
    assert len(rest) == len(payload) - 1010 and rest.obj is owner
    rest[:] = data[head + 1000 :]
    (frame,) = decoder.filled(len(rest))
    assert frame.body == b"meta"
    assert frame.buffers[0] is owner  # the bytes were written once, where they stay
    assert bytes(frame.buffers[0]) == payload
    assert decoder.fill_target() is None
    assert decoder.idle
    del target, rest
    owner.close()  # raises BufferError if the decoder still kept a view of it


def test_in_place_receive_moves_on_to_the_next_buffer_and_frame():
    frames_in = [(b"a", [b"1" * 5000, b"", b"2" * 7000]), (b"b", []), (b"c", [b"3" * 3000])]
    data = b"".join(frame_bytes(body, bufs) for body, bufs in frames_in)
    frames = fill_in_place(FrameDecoder(), data, 1024)
    assert [(f.body, [bytes(b) for b in f.buffers]) for f in frames] == [(b, list(bufs)) for b, bufs in frames_in]


@settings(max_examples=100, deadline=None)
@given(
    specs=st.lists(st.tuples(st.binary(max_size=50), st.lists(st.binary(max_size=2000), max_size=3)), min_size=1, max_size=5),
    chunk=st.integers(1, 3000),
)
def test_in_place_and_feed_give_the_same_frames(specs, chunk):
    data = b"".join(frame_bytes(body, bufs) for body, bufs in specs)
    assert fill_in_place(FrameDecoder(), data, chunk) == FrameDecoder().feed(data)


# ------------------------------------------------------------------- caps


def test_body_of_2_32_minus_1_is_refused_on_the_header_alone_without_allocating():
    decoder = FrameDecoder()  # default limits: 16 MiB body
    with allocation_peak() as peak:
        with pytest.raises(FrameTooLarge, match="4294967295"):
            decoder.feed(HEADER.pack(2**32 - 1, 0))
    assert peak[0] < 2**20


def test_body_cap_is_checked_when_the_header_completes_even_bytewise():
    decoder = FrameDecoder(FrameLimits(max_body=10))
    header = HEADER.pack(11, 0)
    for byte in header[:-1]:
        assert decoder.feed(bytes([byte])) == []
    with pytest.raises(FrameTooLarge):
        decoder.feed(header[-1:])


def test_body_exactly_at_the_cap_is_accepted():
    decoder = FrameDecoder(FrameLimits(max_body=10))
    assert decoder.feed(frame_bytes(b"x" * 10)) == [Frame(b"x" * 10, ())]
    with pytest.raises(FrameTooLarge):
        FrameDecoder(FrameLimits(max_body=10)).feed(frame_bytes(b"x" * 11))


def test_buffer_count_cap():
    limits = FrameLimits(max_buffers=2)
    assert len(FrameDecoder(limits).feed(frame_bytes(b"", [b"a", b"b"]))[0].buffers) == 2
    with pytest.raises(FrameTooLarge, match="3 buffers"):
        FrameDecoder(limits).feed(HEADER.pack(0, 3))  # refused before the lengths arrive


def test_huge_buffer_length_is_refused_without_allocating():
    decoder = FrameDecoder(FrameLimits(max_buffer=2**20, max_total=2**30))
    with allocation_peak() as peak:
        with pytest.raises(FrameTooLarge):
            decoder.feed(HEADER.pack(0, 1) + LENGTH.pack(2**64 - 1))
        with pytest.raises(FrameTooLarge):
            FrameDecoder(FrameLimits(max_buffer=2**20, max_total=2**30)).feed(HEADER.pack(0, 1) + LENGTH.pack(2**20 + 1))
    assert peak[0] < 2**20


def test_default_limits_refuse_a_2_64_buffer_without_allocating():
    with allocation_peak() as peak:
        with pytest.raises(FrameTooLarge):
            FrameDecoder().feed(HEADER.pack(0, 1) + LENGTH.pack(2**64 - 1))
    assert peak[0] < 2**20


def test_total_cap_counts_body_and_all_buffers_before_allocating():
    limits = FrameLimits(max_body=100, max_buffer=2**20, max_total=3 * 2**20)
    header = HEADER.pack(1, 3) + b"".join(LENGTH.pack(2**20) for _ in range(3))
    with allocation_peak() as peak:
        with pytest.raises(FrameTooLarge):
            FrameDecoder(limits).feed(header)  # 3 MiB of buffers + 1 byte of body > 3 MiB
    assert peak[0] < 2**20
    ok = FrameDecoder(limits).feed(frame_bytes(b"", [b"\0" * 2**20] * 3))
    assert [len(b) for b in ok[0].buffers] == [2**20] * 3


def test_preauth_limits_allow_small_bodies_only():
    assert FrameDecoder(PREAUTH_LIMITS).feed(frame_bytes(b"h" * 4096)) == [Frame(b"h" * 4096, ())]
    with pytest.raises(FrameTooLarge):
        FrameDecoder(PREAUTH_LIMITS).feed(HEADER.pack(4097, 0))
    with pytest.raises(FrameTooLarge):
        FrameDecoder(PREAUTH_LIMITS).feed(HEADER.pack(10, 1))  # no buffers before authentication
    with pytest.raises(FrameTooLarge):
        FrameDecoder(PREAUTH_LIMITS).feed(HEADER.pack(2**32 - 1, 2**16 - 1))


def test_frame_too_large_is_a_protocol_error():
    assert issubclass(FrameTooLarge, ProtocolError)


def test_limits_can_be_raised_after_construction():
    # the connection switches from PREAUTH_LIMITS to the full limits once authenticated
    decoder = FrameDecoder(PREAUTH_LIMITS)
    assert decoder.feed(frame_bytes(b"hello")) == [Frame(b"hello", ())]
    decoder.limits = FrameLimits()
    assert decoder.feed(frame_bytes(b"m", [b"x" * 5000])) == [Frame(b"m", (bytearray(b"x" * 5000),))]


# ------------------------------------------------------------- properties

frame_specs = st.lists(
    st.tuples(st.binary(max_size=300), st.lists(st.binary(max_size=300), max_size=5)),
    min_size=1,
    max_size=8,
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=frame_specs, data=st.data())
def test_any_split_of_any_frames_decodes_to_the_same_frames(specs, data):
    stream = b"".join(frame_bytes(body, bufs) for body, bufs in specs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=30)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    decoder = FrameDecoder()
    frames: list[Frame] = []
    for chunk in chunks:
        kind = data.draw(st.sampled_from([bytes, bytearray, memoryview]))
        frames.extend(decoder.feed(kind(chunk)))
    assert [(f.body, [bytes(b) for b in f.buffers]) for f in frames] == [(b, list(bufs)) for b, bufs in specs]
    assert decoder.idle


@settings(max_examples=100, deadline=None)
@given(body=st.binary(max_size=64), buffers=st.lists(st.binary(max_size=64), max_size=4))
def test_bytewise_feeding_equals_whole_feeding(body, buffers):
    data = frame_bytes(body, buffers)
    assert feed_bytewise(FrameDecoder(), data) == FrameDecoder().feed(data)


@settings(max_examples=200, deadline=None)
@given(garbage=st.binary(max_size=200))
def test_garbage_yields_frames_or_frame_too_large_never_anything_else(garbage):
    limits = FrameLimits(max_body=1000, max_buffers=4, max_buffer=1000, max_total=2000)
    try:
        frames = FrameDecoder(limits).feed(garbage)
    except FrameTooLarge:
        return
    for frame in frames:
        assert len(frame.body) <= 1000
        assert len(frame.buffers) <= 4
        assert sum(map(len, frame.buffers)) + len(frame.body) <= 2000
