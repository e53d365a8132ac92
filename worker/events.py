"""The worker state machine's vocabulary: events (facts, past tense) and commands (imperatives).

The daemon turns what happens (messages, finished batches, time, memory samples,
outcomes of its own asynchronous work) into events for ``WorkerState``, and carries
out the commands it returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..protocol import messages as m

if TYPE_CHECKING:
    from ..payload.shm import SharedSegment

Frames = tuple[Any, ...]  # buffers: bytes, or memoryviews of a mapped segment

# ------------------------------------------------------------------ events


@dataclass(frozen=True, slots=True)
class ExecuteReceived:
    message: m.Execute


@dataclass(frozen=True, slots=True)
class CancelReceived:
    task_id: int
    attempt: int
    ref: str = ""  # an orphan named by its ref instead


@dataclass(frozen=True, slots=True)
class TaskCompleted:
    task_id: int
    attempt: int
    status: str
    frames: Frames
    duration: float


@dataclass(frozen=True, slots=True)
class TaskWithdrawn:
    """Taken back from the threads' queue before any thread started it."""

    task_id: int
    attempt: int


@dataclass(frozen=True, slots=True)
class RetireRequested:
    """Stop starting batches (the scheduler requeues what waited here when we leave)."""


@dataclass(frozen=True, slots=True)
class SessionStarted:
    """Connected to a scheduler (first time or again); it knows nothing of ours."""


@dataclass(frozen=True, slots=True)
class Welcomed:
    """The scheduler accepted our registration."""

    now: float


@dataclass(frozen=True, slots=True)
class SchedulerHeard:
    """A heartbeat from the scheduler: it is not frozen."""

    now: float


@dataclass(frozen=True, slots=True)
class SessionEnded:
    """The connection to the scheduler closed."""


@dataclass(frozen=True, slots=True)
class DrainRequested:
    """Stop asked (SIGTERM): retire, finish the running batches, then leave."""


@dataclass(frozen=True, slots=True)
class Ticked:
    now: float


@dataclass(frozen=True, slots=True)
class MemorySampled:
    rss: int


@dataclass(frozen=True, slots=True)
class DataArrived:
    key: str
    nbytes: int


@dataclass(frozen=True, slots=True)
class DataUnavailable:
    key: str
    reason: str


@dataclass(frozen=True, slots=True)
class DataDeleted:
    keys: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class StoreDataReceived:
    message: m.StoreData


@dataclass(frozen=True, slots=True)
class DataSourcesReceived:
    message: m.DataSources


@dataclass(frozen=True, slots=True)
class SegmentMapped:
    key: str
    frames: Frames


@dataclass(frozen=True, slots=True)
class SegmentUnmappable:
    key: str
    name: str
    error: str


@dataclass(frozen=True, slots=True)
class SharedCopyMade:
    """A ``ShareCopy`` is done: ``frames`` mapped from ``segment``, or the bytes as they
    came if the copy failed (``segment`` None)."""

    key: str
    frames: Frames
    segment: SharedSegment | None
    session: int


@dataclass(frozen=True, slots=True)
class PeersFetched:
    """A ``FetchFromPeers`` is done: the frames, or None if no peer had them."""

    key: str
    frames: Frames | None
    share: bool
    session: int


@dataclass(frozen=True, slots=True)
class FramesStored:
    key: str
    nbytes: int
    segment: str = ""  # the shared segment we created for it, if any
    sizes: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class StoreFailed:
    key: str
    error: str  # repr of the exception (unpickling user data can raise anything)


Event = (
    ExecuteReceived | CancelReceived | TaskCompleted | TaskWithdrawn | RetireRequested | SessionStarted | SessionEnded
    | Welcomed | SchedulerHeard | DrainRequested | Ticked | MemorySampled | DataArrived | DataUnavailable | DataDeleted
    | StoreDataReceived | DataSourcesReceived | SegmentMapped | SegmentUnmappable | SharedCopyMade | PeersFetched
    | FramesStored | StoreFailed
)

# ---------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class StartTask:
    task_id: int
    attempt: int
    func_name: str
    frames: Frames


@dataclass(frozen=True, slots=True)
class WithdrawTask:
    """Take the batch back from the threads' queue if no thread has started it (then
    feed back ``TaskWithdrawn``); once started it runs to the end."""

    task_id: int
    attempt: int


@dataclass(frozen=True, slots=True)
class SendMessage:
    message: m.Message


@dataclass(frozen=True, slots=True)
class RequestData:
    key: str


@dataclass(frozen=True, slots=True)
class FailTask:
    """Report the batch as failed with ``reason`` (its data could not be had)."""

    task_id: int
    attempt: int
    reason: str


@dataclass(frozen=True, slots=True)
class Log:
    level: int
    text: str


@dataclass(frozen=True, slots=True)
class Leave:
    """Say goodbye to the scheduler and close the connection."""

    reason: str


@dataclass(frozen=True, slots=True)
class Reconnect:
    """Close the connection (the scheduler is silent): the daemon then connects again."""

    reason: str


@dataclass(frozen=True, slots=True)
class Restart:
    """Leave so the supervisor starts a fresh process; ``clean``: running batches are no deaths."""

    reason: str
    clean: bool


@dataclass(frozen=True, slots=True)
class MapSegment:
    """Map shared segment ``name``; feed back ``SegmentMapped`` or ``SegmentUnmappable``."""

    key: str
    name: str
    sizes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ShareCopy:
    """Copy the frames into a new shared segment (off the loop); feed back ``SharedCopyMade``."""

    key: str
    frames: Frames
    session: int


@dataclass(frozen=True, slots=True)
class FetchFromPeers:
    """Fetch from the first peer that has it; feed back ``PeersFetched``."""

    key: str
    addresses: tuple[str, ...]
    share: bool
    session: int


@dataclass(frozen=True, slots=True)
class StoreFrames:
    """Keep the frames (we own ``segment`` then); feed back ``FramesStored`` or ``StoreFailed``."""

    key: str
    frames: Frames
    segment: SharedSegment | None = None


@dataclass(frozen=True, slots=True)
class UnlinkSegment:
    segment: SharedSegment


@dataclass(frozen=True, slots=True)
class ForgetData:
    keys: tuple[str, ...]


Command = (
    StartTask | WithdrawTask | SendMessage | RequestData | FailTask | Log | Leave | Reconnect | Restart | MapSegment
    | ShareCopy
    | FetchFromPeers | StoreFrames | UnlinkSegment | ForgetData
)
