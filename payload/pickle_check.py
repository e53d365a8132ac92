"""A fast check, before unpickling, that a pickle uses no memo opcode jobsched never emits.

CPython's C unpickler grows its memo table to twice the index a ``PUT``, ``BINPUT``
or ``LONG_BINPUT`` opcode names, before storing anything: ten bytes naming index
2**31 make it zero tens of gigabytes.  jobsched pickles with protocol 5 (see
``serialize.py``), whose picklers (the C one, cloudpickle's subclass of it, and
pure-Python ``pickle._Pickler``) memoize with ``MEMOIZE`` only: it appends to the
memo, which then grows with the pickle's own length.  So a pickle carrying any of
the three explicit-index opcodes was not written by jobsched, and is refused.
``BINPUT`` is refused too although its one-byte index bounds the memo at 512
slots (4 KiB): it is harmless, but only protocols 1 to 3 emit it, and those also
emit ``LONG_BINPUT`` once past 256 objects, so admitting it would admit a protocol
jobsched cannot otherwise accept; one rule ("no explicit memo index") is easier to
trust.  Unknown opcodes and streams that end before ``STOP`` are refused as well
(the unpickler would fail on them anyway, after allocating what came before).

Finding the opcodes means skipping their arguments, so the check parses the whole
stream up to ``STOP``, as the unpickler does, but without building anything.  A
compiled regular expression consumes runs of opcodes whose arguments it can
delimit (no argument, a fixed size, up to a newline, or a one-byte length: the
opcodes of nearly every byte of a pickle); Python takes over only at the opcodes
with a 4- or 8-byte length (large strings, bytes and in-band buffers), whose
argument it skips at once, and at the end.  ``FRAME``'s 8-byte argument is the
length of the frame's opcodes, which are checked like any others; ``NEXT_BUFFER``
and ``READONLY_BUFFER`` refer to out-of-band buffers, which hold no opcodes.
"""

from __future__ import annotations

import pickle
import pickletools
import re
import struct
import sys
from typing import Final

from ..protocol.framing import Buffer

REFUSED: Final = {pickle.PUT[0]: "PUT", pickle.BINPUT[0]: "BINPUT", pickle.LONG_BINPUT[0]: "LONG_BINPUT"}

_NO_ARGUMENT = (
    pickle.MARK, pickle.POP, pickle.POP_MARK, pickle.DUP, pickle.NONE, pickle.NEWTRUE, pickle.NEWFALSE,
    pickle.EMPTY_LIST, pickle.APPEND, pickle.APPENDS, pickle.LIST, pickle.EMPTY_TUPLE, pickle.TUPLE,
    pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3, pickle.EMPTY_DICT, pickle.DICT, pickle.SETITEM,
    pickle.SETITEMS, pickle.EMPTY_SET, pickle.ADDITEMS, pickle.FROZENSET, pickle.REDUCE, pickle.BUILD,
    pickle.OBJ, pickle.NEWOBJ, pickle.NEWOBJ_EX, pickle.STACK_GLOBAL, pickle.MEMOIZE, pickle.NEXT_BUFFER,
    pickle.READONLY_BUFFER, pickle.BINPERSID,
)  # STOP is not among them: the scan must see it, to end there as the unpickler does
_FIXED_SIZE = {
    1: (pickle.BININT1, pickle.BINGET, pickle.PROTO, pickle.EXT1),
    2: (pickle.BININT2, pickle.EXT2),
    4: (pickle.BININT, pickle.LONG_BINGET, pickle.EXT4),
    8: (pickle.BINFLOAT, pickle.FRAME),
}
_ONE_LINE = (pickle.INT, pickle.LONG, pickle.FLOAT, pickle.STRING, pickle.UNICODE, pickle.PERSID, pickle.GET)
_TWO_LINES = (pickle.GLOBAL, pickle.INST)  # module and name
_ONE_BYTE_LENGTH = (pickle.SHORT_BINSTRING, pickle.SHORT_BINBYTES, pickle.SHORT_BINUNICODE, pickle.LONG1)
# opcode -> the length's format: skipped in Python (a regular expression cannot count that far)
LENGTH_PREFIXED: Final = {
    pickle.BINSTRING[0]: struct.Struct("<i"), pickle.LONG4[0]: struct.Struct("<i"),
    pickle.BINBYTES[0]: struct.Struct("<I"), pickle.BINUNICODE[0]: struct.Struct("<I"),
    pickle.BINBYTES8[0]: struct.Struct("<Q"), pickle.BINUNICODE8[0]: struct.Struct("<Q"),
    pickle.BYTEARRAY8[0]: struct.Struct("<Q"),
}
_STOP = pickle.STOP[0]
_NAMES: Final = {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes}


def _one_of(opcodes: tuple[bytes, ...]) -> bytes:
    return b"[" + b"".join(re.escape(op) for op in opcodes) + b"]"


def _run_pattern() -> re.Pattern[bytes]:
    counted = b"|".join(re.escape(bytes([n])) + b".{%d}" % n for n in range(256))  # shortest first: the common ones
    fixed = {size: _one_of(ops) + b".{%d}" % size for size, ops in _FIXED_SIZE.items()}
    # each alternative that fails to match costs a few nanoseconds: the most frequent first
    # (BINFLOAT before the strings: a list of floats has nothing else)
    alternatives = [
        _one_of(_NO_ARGUMENT),
        fixed[8],
        _one_of(_ONE_BYTE_LENGTH) + b"(?:" + counted + b")",
        fixed[1],
        fixed[2],
        fixed[4],
        _one_of(_ONE_LINE) + b"[^\n]*\n",
        _one_of(_TWO_LINES) + b"[^\n]*\n[^\n]*\n",
    ]
    # possessive: nothing to backtrack into, so the matcher keeps no state per opcode
    repeat = b"*+" if sys.version_info >= (3, 11) else b"{0,4096}"
    return re.compile(b"(?:" + b"|".join(alternatives) + b")" + repeat, re.DOTALL)


_RUN: Final = _run_pattern()
_RUN_OPCODES: Final = frozenset(b"".join(
    (*_NO_ARGUMENT, *_ONE_BYTE_LENGTH, *_ONE_LINE, *_TWO_LINES, *(op for ops in _FIXED_SIZE.values() for op in ops))
))


class PickleRefused(pickle.UnpicklingError):
    """A pickle refused before unpickling; the message says why."""


def check_pickle(data: Buffer, what: str = "the pickle") -> None:
    """Raise :class:`PickleRefused` unless ``data`` is a complete pickle stream (up to
    its ``STOP``) free of explicit memo indexes and unknown opcodes.  ``what`` names the
    pickle in the message (e.g. "the batch's pickle")."""
    view = memoryview(data).cast("B")
    end = len(view)
    match_run = _RUN.match
    pos = 0
    while True:
        pos = match_run(view, pos).end()  # type: ignore[union-attr]  # a repeat of zero or more always matches
        if pos >= end:
            raise PickleRefused(f"{what} ends before its STOP opcode ({end} bytes): truncated or not a pickle")
        op = view[pos]
        if op == _STOP:
            return
        length_format = LENGTH_PREFIXED.get(op)
        if length_format is not None:
            start = pos + 1 + length_format.size
            if start > end:
                raise PickleRefused(f"{what} is truncated in the length of a {_NAMES[op]} opcode at byte {pos}")
            (length,) = length_format.unpack_from(view, pos + 1)
            if length < 0:
                raise PickleRefused(f"{what} has a {_NAMES[op]} opcode of negative length at byte {pos}")
            if start + length > end:
                raise PickleRefused(f"{what} is truncated in the argument of a {_NAMES[op]} opcode at byte {pos}")
            pos = start + length
            continue
        if op in REFUSED:
            raise PickleRefused(f"{what} uses the {REFUSED[op]} opcode (at byte {pos}), which jobsched never emits: refused")
        if op in _RUN_OPCODES:
            resumed = match_run(view, pos).end()  # type: ignore[union-attr]
            if resumed > pos:  # Python 3.10: the end of a bounded run, not of the pickle
                pos = resumed
                continue
            # its argument did not match: cut short, or a text argument without its newline
            raise PickleRefused(f"{what} is truncated in the argument of a {_NAMES[op]} opcode at byte {pos}")
        raise PickleRefused(f"{what} has an unknown opcode {bytes([op])!r} at byte {pos}: not a pickle jobsched wrote")
