"""Message types: frozen dataclasses with an ``op`` registry, encoded to msgpack.

A message travels as one frame: the msgpack body is ``[op, field1, field2, ...]``
in declaration order, and a message's ``frames`` (opaque byte payloads such as
pickled batches and their out-of-band buffers) travel as the frame's buffers, so
the scheduler relays them without copying or unpickling.  Decoding validates the
op and every field's type; anything else is a :class:`MalformedMessage`.
"""

from __future__ import annotations

import dataclasses
import operator
import typing
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import msgpack

from .errors import MalformedMessage
from .framing import Buffer, Frame, encode_frame

if TYPE_CHECKING:
    from typing_extensions import dataclass_transform
else:  # only type checkers need it (typing has it from Python 3.11 on)

    def dataclass_transform(**_: Any) -> Callable[[Any], Any]:
        return lambda decorated: decorated


Frames = tuple[Buffer, ...]  # a message's opaque payloads: its frame's buffers
if TYPE_CHECKING:
    Info = dict[str, Any]
else:
    Info = dict  # decoding checks that it is a map, not its keys and values: the wire type is plain dict
M = TypeVar("M", bound="Message")

# 3: a batch carries its call context pickled once per call; scattered data may be shared
# through /dev/shm (share domains, segments)
# 4: batches keep their identity across scheduler restarts (client sessions, batch refs,
# Recovered); the scheduler sends heartbeats too
# 5: users and roles: the handshake names the user; calls have a priority; cancel requests
PROTOCOL_VERSION = 5

# Batch/task outcomes carried by BatchDone and TaskDone.
OK = "ok"  # frames: the pickled result
ERROR = "error"  # frames: the pickled exception raised by user code
LOST = "lost"  # workers died running it too often; text in ``error``
NO_WORKERS = "no-workers"  # no worker was connected for too long; text in ``error``
FAILED = "failed"  # the cluster could not run it for another reason; text in ``error``
# worker -> scheduler: the batch was cancelled, its slot is free; scheduler -> client: someone
# with the right (the admin, or the same user from another client) cancelled the call: text in ``error``
CANCELLED = "cancelled"


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    """Base of all messages.  A message with a payload declares ``frames`` last."""

    op: ClassVar[str] = ""


_REGISTRY: dict[str, type[Message]] = {}
_FIELDS: dict[type[Message], tuple[tuple[str, Callable[[Any], bool]], ...]] = {}
_NAMES: dict[type[Message], tuple[str, ...]] = {}
_EXACT: dict[type[Message], tuple[type | None, ...]] = {}  # per wire field: see _exact_type
_GETTERS: dict[type[Message], Callable[[Message], tuple[Any, ...]]] = {}  # a message's wire fields, in order
_FRAMES_AT: dict[type[Message], int] = {}  # position of ``frames`` among the constructor's arguments
_SHAPES: dict[type[Message], tuple[int, bool, int]] = {}  # see _shape


def _exact_type(tp: Any) -> type | None:
    """The one type a field's values usually have, checked inline by ``decode`` before
    calling the field's checker: most fields are plain ints and strings."""
    return tp if tp in (int, float, str, bytes, bool, dict) else None


def _checker(tp: Any) -> Callable[[Any], bool]:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        options = [_checker(a) for a in typing.get_args(tp)]
        return lambda v: any(check(v) for check in options)
    if tp is type(None):
        return lambda v: v is None
    if tp is int:
        return lambda v: type(v) is int
    if tp is float:
        return lambda v: type(v) in (float, int)
    if tp in (str, bytes, bool, dict):
        return lambda v: type(v) is tp
    if origin is list:
        (item,) = typing.get_args(tp)
        check_item = _checker(item)
        return lambda v: type(v) is list and all(check_item(x) for x in v)
    if origin is dict:
        return lambda v: type(v) is dict
    raise TypeError(f"unsupported message field type {tp!r}")


def _getter(names: tuple[str, ...]) -> Callable[[Message], tuple[Any, ...]]:
    if len(names) > 1:
        return operator.attrgetter(*names)
    if names:
        return lambda msg: (getattr(msg, names[0]),)
    return lambda msg: ()


@dataclass_transform(frozen_default=True)
def message(op: str) -> Callable[[type[M]], type[M]]:
    """Class decorator: make a frozen message dataclass and register it under ``op``."""

    def register(cls: type[M]) -> type[M]:
        cls = dataclasses.dataclass(frozen=True, slots=True)(cls)
        if op in _REGISTRY:
            raise ValueError(f"duplicate op {op!r}")
        cls.op = op
        hints = typing.get_type_hints(cls)
        _FIELDS[cls] = tuple(
            (f.name, _checker(hints[f.name])) for f in dataclasses.fields(cls) if f.name != "frames"
        )
        _NAMES[cls] = tuple(name for name, _ in _FIELDS[cls])
        _GETTERS[cls] = _getter(_NAMES[cls])
        _EXACT[cls] = tuple(_exact_type(hints[name]) for name in _NAMES[cls])
        names = [f.name for f in dataclasses.fields(cls)]
        if "frames" in names:
            _FRAMES_AT[cls] = names.index("frames")
        _REGISTRY[op] = cls
        _SHAPES[cls] = _shape(cls)
        return cls

    return register


def encode(msg: Message) -> list[Buffer]:
    """Encode a message into the pieces of one frame."""
    body = msgpack.packb([msg.op, *_GETTERS[type(msg)](msg)], use_bin_type=True)
    return encode_frame(body, getattr(msg, "frames", ()))


def decode(frame: Frame) -> Message:
    """Decode and validate one frame; raises MalformedMessage on anything unexpected."""
    body = frame.body
    cls = _message_class(body)
    shape = _SHAPES[cls]
    if len(body) > WALK_MIN or shape[1]:  # an Info field nests as deep as it likes
        _check_structure(body, *shape)
    try:
        items = msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated types
        raise MalformedMessage(f"undecodable msgpack body: {exc}") from None
    del items[0]  # the op: _message_class read it
    for (name, check), exact, value in zip(_FIELDS[cls], _EXACT[cls], items, strict=True):
        if type(value) is not exact and not check(value):
            raise MalformedMessage(f"{cls.op}: field {name!r} has invalid type {type(value).__name__}")
    frames_at = _FRAMES_AT.get(cls)
    if frames_at is not None:
        items.insert(frames_at, frame.buffers)
    elif frame.buffers:
        raise MalformedMessage(f"{cls.op}: carries no buffers")
    return cls(*items)  # positional: the fields in declaration order


def _message_class(body: bytes) -> type[Message]:
    """The class of the message a body holds, read from its first bytes before anything is
    decoded, so that its limits are known.  ``encode`` always writes ``[op, field...]`` as a
    fixarray (at most 15 items) whose first item is a fixstr (ops are short)."""
    if len(body) < 2 or not 0x91 <= body[0] <= 0x9F or not 0xA0 <= body[1] <= 0xBF:
        raise MalformedMessage("message body is not [op, ...]")
    op = _op_of(body)
    cls = _REGISTRY.get(op)
    if cls is None:
        raise MalformedMessage(f"unknown op {op!r}")
    fields = len(_FIELDS[cls])
    if (body[0] & 0x0F) != fields + 1:
        raise MalformedMessage(f"{cls.op}: expected {fields} fields, got {(body[0] & 0x0F) - 1}")
    return cls


# ------------------------------------------------------------- bounded decoding
# msgpack builds a Python object for each element it reads, and an element of one byte on the
# wire (an empty array or map, a small negative int) becomes 28 to 72 bytes of Python: a body
# of 16 MiB (FrameLimits.max_body) of empty arrays would cost over 1 GiB.  So before a body
# longer than WALK_MIN is decoded, its raw structure is walked without building anything: its
# nesting must fit its message's fields (no map but in an Info field), and what decoding would
# allocate, estimated per element from CPython's object sizes, must stay within
# DECODE_AMPLIFICATION times its size (INFO_AMPLIFICATION for an Info field's free-form
# status) plus DECODE_SLACK, and within MAX_DECODE_COST.  A shorter body costs at most 72
# times WALK_MIN (1.2 MiB), whatever it holds.
WALK_MIN = 16 * 2**10
DECODE_AMPLIFICATION = 3  # lists of keys cost 2.6 times their size, of batch refs (~20 characters) 3.7
INFO_AMPLIFICATION = 16  # a 1000-worker InfoReply: CPython takes 4.3 times its size, estimated 8.6
DECODE_SLACK = 2**20  # for the few thousand short strings a worker's refs or a batch's keys may be
MAX_DECODE_COST = 32 * 2**20  # twice the largest body: 330,000 keys released at once
INFO_MAX_DEPTH = 16  # nesting inside an Info field (the scheduler's own is at most 4 deep)

_INT, _SCALAR, _STR, _BIN, _ARRAY, _MAP, _INVALID = range(7)  # _SCALAR: nil, bool, float
SLOT = 8  # the pointer to each element in its list or dict


def _lead_bytes() -> list[tuple[int, int, int]]:
    """Per first byte of a msgpack element: (kind, bytes of its header, a fixed value): for an
    int or scalar its Python cost, for a fix-sized str, array or map its length, else -1."""
    table = [(_INVALID, 1, -1)] * 256
    for b in range(0x00, 0x80):
        table[b] = (_INT, 1, SLOT)  # positive fixint: CPython caches -5..256
    for b in range(0xE0, 0x100):
        table[b] = (_INT, 1, SLOT + (0 if b >= 0xFB else 28))  # negative fixint
    for b in range(0x80, 0x90):
        table[b] = (_MAP, 1, b & 0x0F)
    for b in range(0x90, 0xA0):
        table[b] = (_ARRAY, 1, b & 0x0F)
    for b in range(0xA0, 0xC0):
        table[b] = (_STR, 1, b & 0x1F)
    table[0xC0] = table[0xC2] = table[0xC3] = (_SCALAR, 1, SLOT)  # nil, false, true: singletons
    table[0xCA], table[0xCB] = (_SCALAR, 5, SLOT + 24), (_SCALAR, 9, SLOT + 24)  # floats
    table[0xCC] = (_INT, 2, SLOT)  # uint 8: cached
    for b, size in ((0xCD, 3), (0xCE, 5), (0xCF, 9), (0xD0, 2), (0xD1, 3), (0xD2, 5), (0xD3, 9)):
        table[b] = (_INT, size, SLOT + 36)  # other ints
    for b, size in ((0xD9, 2), (0xDA, 3), (0xDB, 5)):
        table[b] = (_STR, size, -1)
    for b, size in ((0xC4, 2), (0xC5, 3), (0xC6, 5)):
        table[b] = (_BIN, size, -1)
    table[0xDC], table[0xDD] = (_ARRAY, 3, -1), (_ARRAY, 5, -1)
    table[0xDE], table[0xDF] = (_MAP, 3, -1), (_MAP, 5, -1)
    return table  # ext types (never ours) and 0xc1 (never used) stay invalid


_LEAD = _lead_bytes()


def _check_structure(body: bytes, max_depth: int, maps: bool, amplification: int) -> int:
    """Walk ``body``'s msgpack elements without building them; MalformedMessage if it nests
    deeper than ``max_depth`` containers, holds a map when ``maps`` is false, announces more
    elements than it has bytes, or would cost more than ``amplification`` times its size (plus
    DECODE_SLACK, and at most MAX_DECODE_COST).  Returns the estimated cost of decoding it."""
    end = len(body)
    budget = min(amplification * end + DECODE_SLACK, MAX_DECODE_COST)
    cost = 0
    pos = 0
    left = [1]  # elements still to read: the body's one, then in each open container
    while left:
        if not left[-1]:
            left.pop()
            continue
        left[-1] -= 1
        if pos >= end:
            raise MalformedMessage("undecodable msgpack body: truncated")
        kind, header, fixed = _LEAD[body[pos]]
        if kind <= _SCALAR:
            if kind == _SCALAR and not maps and len(left) > 2:  # in a list field: list[str] or list[int]
                raise MalformedMessage(f"{_op_of(body)}: a list field holds a 0x{body[pos]:02x}")
            pos += header
            cost += fixed
            if cost > budget:
                _too_costly(body, budget)
            continue
        length = fixed if fixed >= 0 else int.from_bytes(body[pos + 1 : pos + header], "big")
        pos += header
        if kind == _STR or kind == _BIN:
            if length > 1:  # "" and one ASCII character are cached
                ascii_ = kind == _BIN or body[pos : pos + length].isascii()
                cost += 49 + length if ascii_ else 80 + 4 * length  # non-ASCII may take 4 bytes a character
            cost += SLOT
            pos += length
        elif kind == _INVALID:
            raise MalformedMessage(f"undecodable msgpack body: type 0x{body[pos - header]:02x} is not allowed")
        else:
            if kind == _MAP:
                if not maps:
                    raise MalformedMessage(f"{_op_of(body)}: a map where this message has none")
                cost += 64 + 32 * length
                length *= 2
            else:
                cost += 56
            cost += SLOT
            if length > end - pos:  # each element takes a byte at least
                raise MalformedMessage(f"undecodable msgpack body: a container announces {length} elements")
            if len(left) > max_depth:
                raise MalformedMessage(f"{_op_of(body)}: nested deeper than {max_depth} containers")
            left.append(length)
        if cost > budget:
            _too_costly(body, budget)
    if pos != end:
        raise MalformedMessage("undecodable msgpack body: trailing data")
    return cost


def _too_costly(body: bytes, budget: int) -> None:
    raise MalformedMessage(f"{_op_of(body)}: decoding its {len(body)} bytes would take over {budget} bytes of memory")


def _op_of(body: bytes) -> str:
    """The op a body starts with (``_message_class`` checked the fixarray and fixstr headers)."""
    return body[2 : 2 + (body[1] & 0x1F)].decode("utf-8", "replace")


def _shape(cls: type[Message]) -> tuple[int, bool, int]:
    """The limits of ``_check_structure`` for a body of ``cls``, from its fields: how many
    containers it may nest, whether it may hold maps, its amplification."""
    hints = typing.get_type_hints(cls)
    kinds = [typing.get_origin(hints[name]) or hints[name] for name in _NAMES[cls]]
    if dict in kinds:
        return 1 + INFO_MAX_DEPTH, True, INFO_AMPLIFICATION
    return (2 if list in kinds else 1), False, DECODE_AMPLIFICATION


def registry() -> dict[str, type[Message]]:
    return dict(_REGISTRY)


# ---------------------------------------------------------------- registration


@message("register-client")
class RegisterClient(Message):
    name: str = ""
    pid: int = 0
    host: str = ""
    # chosen by the client once and kept across reconnections: with a batch id it names a
    # batch whatever the scheduler's incarnation (see Execute.ref)
    session: str = ""
    resumed: bool = False  # it comes back with batches submitted to an earlier connection


@message("register-worker")
class RegisterWorker(Message):
    name: str = ""
    nthreads: int = 1
    pid: int = 0
    host: str = ""
    memory_limit: int = 0
    data_address: str = ""  # where peers fetch the data this worker holds
    share_domain: str = ""  # processes of one domain map each other's shared segments (payload.shm)
    running: list[str] = dataclasses.field(default_factory=list)  # refs of batches still running from before


@message("welcome")
class Welcome(Message):
    """Scheduler's reply to a registration: the id it gave the peer, and its timing."""

    peer_id: str = ""
    heartbeat_interval: float = 1.0


@message("closing")
class Closing(Message):
    """Sent just before a connection is closed on purpose: the reason, for the peer's error."""

    reason: str = ""


@message("heartbeat")
class Heartbeat(Message):
    """Every peer sends one each heartbeat interval; a worker's carries its memory."""

    memory: int = 0


# Worker statuses carried by WorkerStatus.
RUNNING = "running"  # takes batches up to its slots
PAUSED = "paused"  # over its memory high-water mark: takes no new batches
RETIRING = "retiring"  # draining before a clean exit: takes no new batches, its loss is no death
WORKER_STATUSES = (RUNNING, PAUSED, RETIRING)


@message("worker-status")
class WorkerStatus(Message):
    status: str = RUNNING


# ------------------------------------------------------------ client <-> scheduler


@message("submit")
class SubmitBatch(Message):
    """A pickled joblib batch; ``max_running`` caps the call's concurrency (0: no cap)."""

    batch_id: int = 0
    call_id: int = 0
    func_name: str = ""
    max_running: int = 0
    frames: Frames = dataclasses.field(default=(), repr=False)
    keys: list[str] = dataclasses.field(default_factory=list)  # scattered data the batch needs
    priority: int = 0  # orders one user's own calls: higher first (taken from the call's first batch)


@message("cancel-call")
class CancelCall(Message):
    call_id: int = 0


@message("batch-done")
class BatchDone(Message):
    batch_id: int = 0
    status: str = OK
    worker: str = ""
    error: str = ""
    frames: Frames = dataclasses.field(default=(), repr=False)


@message("cancel-request")
class CancelRequest(Message):
    """Cancel the work of ``user`` (every call of theirs) or one ``call`` (its id as
    ``scheduler_info()`` shows it).  Only the admin may name another user's work."""

    request_id: int = 0
    user: str = ""
    call: str = ""


@message("cancel-reply")
class CancelReply(Message):
    request_id: int = 0
    cancelled: int = 0  # calls cancelled
    error: str = ""  # why nothing was cancelled (no right, no such call or user)


@message("info-request")
class InfoRequest(Message):
    request_id: int = 0


@message("info-reply")
class InfoReply(Message):
    request_id: int = 0
    info: Info = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------ scheduler <-> worker


@message("execute")
class Execute(Message):
    task_id: int = 0
    attempt: int = 0
    func_name: str = ""
    frames: Frames = dataclasses.field(default=(), repr=False)
    keys: list[str] = dataclasses.field(default_factory=list)
    ref: str = ""  # "<client session>/<batch id>": the batch's name across scheduler restarts


@message("recovered")
class Recovered(Message):
    """Worker -> scheduler: the outcome of a batch it was given by an earlier session (the
    scheduler restarted, or the link dropped), named by its ref rather than its task id."""

    ref: str = ""
    status: str = OK
    duration: float = 0.0
    frames: Frames = dataclasses.field(default=(), repr=False)


@message("cancel")
class Cancel(Message):
    task_id: int = 0
    attempt: int = 0
    ref: str = ""  # instead of the ids: a batch from an earlier session that no client claimed


@message("task-done")
class TaskDone(Message):
    task_id: int = 0
    attempt: int = 0
    status: str = OK
    duration: float = 0.0
    frames: Frames = dataclasses.field(default=(), repr=False)


# ------------------------------------------------------------ scattered data
# Flow: the client registers a key (no bytes).  A worker that needs it asks the
# scheduler (NeedData); the scheduler names workers that hold it (DataSources)
# and the worker fetches it peer to peer from their data servers (FetchData /
# DataReply).  If no worker holds it, the scheduler asks the owning client for
# its copy (UploadRequest / DataUpload) and relays it to one worker (StoreData);
# every other worker then fetches it from that one.
#
# Within one share domain (payload.shm: a machine, a /dev/shm, a user) the bytes
# go into a shared memory segment once, and workers of that domain are sent its
# name (StoreData with ``segment``) and map it read-only instead of copying.  The
# segment's creator, the client or the first worker there to receive the bytes,
# reports it (DataUpload / DataStored with ``segment``) and unlinks it when done.


@message("data-register")
class DataRegister(Message):
    """Client -> scheduler: a key it owns; ``broadcast`` copies it to every worker now."""

    key: str = ""
    nbytes: int = 0
    broadcast: bool = False


@message("data-release")
class ReleaseData(Message):
    keys: list[str] = dataclasses.field(default_factory=list)


@message("upload-request")
class UploadRequest(Message):
    """Scheduler -> client: send ``key``; as a shared segment if ``share_domain`` is the client's."""

    key: str = ""
    share_domain: str = ""


@message("data-upload")
class DataUpload(Message):
    """Client -> scheduler: ``frames``, or the name and frame sizes of a shared segment
    that the workers of ``share_domain`` (the client's) can map."""

    key: str = ""
    segment: str = ""
    sizes: list[int] = dataclasses.field(default_factory=list)
    share_domain: str = ""
    frames: Frames = dataclasses.field(default=(), repr=False)


@message("store-data")
class StoreData(Message):
    """Scheduler -> worker: keep ``frames`` or map ``segment``; ``share``: other workers of
    your domain exist, so put bytes you receive in a shared segment for them."""

    key: str = ""
    segment: str = ""
    sizes: list[int] = dataclasses.field(default_factory=list)
    share: bool = False
    frames: Frames = dataclasses.field(default=(), repr=False)


@message("need-data")
class NeedData(Message):
    """Worker -> scheduler: it needs ``key``; ``from_owner``: peers failed, send the client's copy;
    ``shared``: a shared segment may be offered (false after mapping one failed)."""

    key: str = ""
    from_owner: bool = False
    shared: bool = True


@message("data-sources")
class DataSources(Message):
    key: str = ""
    addresses: list[str] = dataclasses.field(default_factory=list)
    share: bool = False  # as in StoreData


@message("data-missing")
class DataMissing(Message):
    key: str = ""
    reason: str = ""


@message("data-stored")
class DataStored(Message):
    """Worker -> scheduler: it holds ``key``; ``segment``: in a shared segment it created."""

    key: str = ""
    nbytes: int = 0
    segment: str = ""
    sizes: list[int] = dataclasses.field(default_factory=list)


@message("data-delete")
class DeleteData(Message):
    keys: list[str] = dataclasses.field(default_factory=list)


@message("fetch-data")
class FetchData(Message):
    key: str = ""


@message("data-reply")
class DataReply(Message):
    key: str = ""
    found: bool = False
    frames: Frames = dataclasses.field(default=(), repr=False)


def frames_nbytes(frames: Sequence[Buffer]) -> int:
    return sum(memoryview(f).nbytes for f in frames)
