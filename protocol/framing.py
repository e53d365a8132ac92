"""Length-prefixed frames carrying one msgpack body plus out-of-band byte buffers.

Wire layout of one frame::

    u32 body_length | u16 buffer_count | buffer_count x u64 buffer_length | body | buffers...

Large payloads (pickle protocol 5 buffers, e.g. numpy arrays) travel as separate
buffers so they are never copied into the msgpack body.  The decoder is
incremental (bytes in, frames out) and checks every announced size against its
caps before it allocates anything.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import FrameTooLarge

# what a frame carries: received buffers are bytearrays or, when large, anonymous memory maps
Buffer = bytes | bytearray | memoryview | mmap.mmap
ReceivedBuffer = bytearray | mmap.mmap

_HEADER = struct.Struct("!IH")
_LENGTH = struct.Struct("!Q")


@dataclass(frozen=True)
class FrameLimits:
    """Caps enforced before allocation; defaults suit authenticated peers."""

    max_body: int = 16 * 2**20
    max_buffers: int = 1024
    max_buffer: int = 8 * 2**30
    max_total: int = 16 * 2**30


DEFAULT_LIMITS = FrameLimits()
PREAUTH_LIMITS = FrameLimits(max_body=4096, max_buffers=0, max_buffer=0, max_total=4096)


LAZY_BUFFER_MIN = 1 << 20


def _new_buffer(size: int) -> bytearray | mmap.mmap:
    """A writable buffer of ``size`` bytes.  Large ones are anonymous memory maps: their pages
    are only committed as bytes arrive, so a header announcing a huge buffer costs nothing."""
    if size < LAZY_BUFFER_MIN:
        return bytearray(size)
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


@dataclass(frozen=True, slots=True)
class Frame:
    body: bytes
    buffers: tuple[ReceivedBuffer, ...] = ()


def encode_frame(body: bytes, buffers: Sequence[Buffer] = ()) -> list[Buffer]:
    """Return the pieces of one frame, ready for ``transport.writelines``.

    Buffers are passed through, not copied; every piece's ``len()`` is its size in bytes.
    """
    views = [memoryview(b).cast("B") if not isinstance(b, bytes) else b for b in buffers]
    header = bytearray(_HEADER.pack(len(body), len(views)))
    for view in views:
        header += _LENGTH.pack(len(view))
    return [bytes(header), body, *views]


class FrameDecoder:
    """Incremental frame parser: ``feed(data)`` returns the frames completed by it."""

    def __init__(self, limits: FrameLimits = FrameLimits()) -> None:
        self.limits = limits
        self._pending = bytearray()  # bytes not yet consumed by the header/body stages
        self._body_length: int | None = None
        self._buffer_lengths: list[int] | None = None
        self._body: bytes | None = None
        self._buffers: list[ReceivedBuffer] = []
        self._fill: memoryview | None = None  # the buffer being filled in place
        self._filled = 0

    @property
    def idle(self) -> bool:
        """True when no partial frame is buffered."""
        return self._body_length is None and not self._pending

    def feed(self, data: Buffer) -> list[Frame]:
        frames: list[Frame] = []
        view = memoryview(data).cast("B")
        if self.idle:
            view = self._whole_frames(view, frames)
        while True:
            if self._fill is not None:
                take = min(len(view), len(self._fill) - self._filled)
                self._fill[self._filled : self._filled + take] = view[:take]
                self._filled += take
                view = view[take:]
                if self._filled < len(self._fill):
                    return frames
                self._fill = None
                self._next_buffer_or_finish(frames)
                continue
            if len(view):
                self._pending += view
                view = view[:0]
            if not self._advance(frames):
                return frames

    def fill_target(self) -> memoryview | None:
        """While a large buffer is being received, the part of it still to fill.

        A transport can read straight into it (``asyncio.BufferedProtocol``) and then
        call ``filled(n)``: the payload is written once, where it will stay.
        """
        if self._fill is None:
            return None
        return self._fill[self._filled :]

    def filled(self, nbytes: int) -> list[Frame]:
        """Account for ``nbytes`` written into ``fill_target()``; returns completed frames."""
        assert self._fill is not None and self._filled + nbytes <= len(self._fill)
        self._filled += nbytes
        frames: list[Frame] = []
        if self._filled == len(self._fill):
            self._fill = None
            self._next_buffer_or_finish(frames)
        return frames

    def _whole_frames(self, view: memoryview, frames: list[Frame]) -> memoryview:
        """The short path, when no frame is partly received: take the frames lying whole in
        ``view`` straight from it (most control messages arrive whole, several per read),
        with the same checks as the stages below; returns the rest of ``view``."""
        while len(view) >= _HEADER.size:
            body_length, count = _HEADER.unpack_from(view)
            self._check_header(body_length, count)
            start = _HEADER.size + count * _LENGTH.size
            if len(view) < start:
                break
            lengths = struct.unpack_from(f"!{count}Q", view, _HEADER.size)
            self._check_lengths(lengths, body_length)
            end = start + body_length + sum(lengths)
            if len(view) < end:
                break
            body = bytes(view[start : start + body_length])
            position = start + body_length
            buffers = []
            for length in lengths:
                buffer = _new_buffer(length)
                buffer[:] = view[position : position + length]
                buffers.append(buffer)
                position += length
            frames.append(Frame(body, tuple(buffers)))
            view = view[end:]
        return view

    def _check_header(self, body_length: int, count: int) -> None:
        if body_length > self.limits.max_body:
            raise FrameTooLarge(f"message body of {body_length} bytes exceeds cap {self.limits.max_body}")
        if count > self.limits.max_buffers:
            raise FrameTooLarge(f"{count} buffers exceed cap {self.limits.max_buffers}")

    def _check_lengths(self, lengths: Sequence[int], body_length: int) -> None:
        for length in lengths:
            if length > self.limits.max_buffer:
                raise FrameTooLarge(f"buffer of {length} bytes exceeds cap {self.limits.max_buffer}")
        if sum(lengths) + body_length > self.limits.max_total:
            raise FrameTooLarge(f"frame of {sum(lengths)} bytes exceeds cap {self.limits.max_total}")

    # each stage consumes from _pending; returns False when it needs more bytes
    def _advance(self, frames: list[Frame]) -> bool:
        if self._body_length is None:
            if len(self._pending) < _HEADER.size:
                return False
            body_length, count = _HEADER.unpack_from(self._pending)
            self._check_header(body_length, count)
            self._body_length = body_length
            self._count = count
            del self._pending[: _HEADER.size]
            return True
        if self._buffer_lengths is None:
            need = self._count * _LENGTH.size
            if len(self._pending) < need:
                return False
            lengths = [_LENGTH.unpack_from(self._pending, i * _LENGTH.size)[0] for i in range(self._count)]
            self._check_lengths(lengths, self._body_length)
            self._buffer_lengths = lengths
            del self._pending[:need]
            return True
        if self._body is None:
            if len(self._pending) < self._body_length:
                return False
            self._body = bytes(self._pending[: self._body_length])
            del self._pending[: self._body_length]
            self._next_buffer_or_finish(frames)
            return True
        return False  # pragma: no cover - buffers are filled in feed()

    def _next_buffer_or_finish(self, frames: list[Frame]) -> None:
        assert self._buffer_lengths is not None and self._body is not None
        while len(self._buffers) < len(self._buffer_lengths):
            target = _new_buffer(self._buffer_lengths[len(self._buffers)])
            self._buffers.append(target)
            # move already-received bytes into the new buffer, then fill the rest in place
            take = min(len(target), len(self._pending))
            target[:take] = self._pending[:take]
            del self._pending[:take]
            if take < len(target):
                self._fill = memoryview(target)
                self._filled = take
                return
        frames.append(Frame(self._body, tuple(self._buffers)))
        self._body_length = None
        self._buffer_lengths = None
        self._body = None
        self._buffers = []
