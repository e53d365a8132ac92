"""What the scheduler's state machine takes and gives (events, commands) and what it keeps
about peers, calls and batches (records).  Plain data: ``state.py`` holds the logic."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..protocol import messages as m

ConnId = int
CallKey = tuple[ConnId, int]
SHORT_BATCH = 0.02  # seconds: calls whose batches run shorter than this get prefetching
LogEvent = dict[str, Any]  # {"time": float, "kind": str, "text": str}: a join, death or failure, for people


# ------------------------------------------------------------------- events
CLIENT = "client"  # the roles a connection proved in its handshake
WORKER = "worker"


@dataclass(frozen=True, slots=True)
class PeerConnected:
    """A peer passed the handshake.  ``role`` is what it proved it may be (CLIENT or WORKER),
    ``user`` who it is, ``admin`` whether it holds the cluster secret (or none is configured)."""

    conn: ConnId
    address: str
    role: str
    user: str
    admin: bool


@dataclass(frozen=True, slots=True)
class MessageReceived:
    conn: ConnId
    message: m.Message


@dataclass(frozen=True, slots=True)
class PeerDisconnected:
    conn: ConnId
    reason: str


@dataclass(frozen=True, slots=True)
class Ticked:
    now: float


@dataclass(frozen=True, slots=True)
class UserPolicy:
    """What the users file says of one user."""

    weight: float = 1.0  # their share of the slots against other users with work queued
    max_slots: int = 0  # cap on their running batches; 0: none


@dataclass(frozen=True, slots=True)
class UsersChanged:
    """The users file was (re)loaded: every known user and their policy.  ``revoked``: users
    whose token was removed or rotated, whose open connections must close."""

    users: dict[str, UserPolicy]
    revoked: frozenset[str] = frozenset()


Event = PeerConnected | MessageReceived | PeerDisconnected | Ticked | UsersChanged


# ----------------------------------------------------------------- commands
@dataclass(frozen=True, slots=True)
class Send:
    conn: ConnId
    message: m.Message


@dataclass(frozen=True, slots=True)
class Close:
    conn: ConnId
    reason: str


Command = Send | Close


# ------------------------------------------------------------------ records
@dataclass(slots=True)
class TaskRecord:
    task_id: int
    call: CallKey
    batch_id: int
    func_name: str
    frames: m.Frames
    queued_at: float
    keys: list[str] = field(default_factory=list)  # scattered data it needs
    attempt: int = 0
    worker: ConnId | None = None
    deaths: int = 0
    cancelled: bool = False
    ref: str = ""  # "<client session>/<batch id>": names the batch across scheduler restarts
    user: str = ""  # whose: their share is charged while it runs
    adopted: bool = False  # running on its worker since before this scheduler knew it (see Recovered)


@dataclass(slots=True)
class CallRecord:
    key: CallKey
    max_running: int  # 0: no cap
    user: str = ""
    priority: int = 0  # higher first among one user's calls
    queue: deque[int] = field(default_factory=deque)  # task ids waiting
    running: dict[int, None] = field(default_factory=dict)  # task_id -> None, an ordered set
    mean_duration: float = -1.0  # moving average of its batches' run time; -1: none finished yet
    held: bool = False  # resubmitted just after a restart: waits for the workers that may still hold it

    @property
    def short(self) -> bool:
        return 0.0 <= self.mean_duration < SHORT_BATCH

    @property
    def ready(self) -> bool:
        return bool(self.queue) and not self.held and (self.max_running == 0 or len(self.running) < self.max_running)


@dataclass(slots=True)
class WorkerRecord:
    conn: ConnId
    address: str
    name: str
    nthreads: int
    host: str
    pid: int
    memory_limit: int
    last_seen: float
    memory: int = 0
    running: dict[int, None] = field(default_factory=dict)  # task_id -> None, an ordered set
    completed: int = 0
    status: str = m.RUNNING
    last_words: str = ""  # the reason it gave before closing, if any
    # refs of batches from before its registration that it still runs and no client has
    # claimed yet: they hold a slot until their Recovered arrives
    orphans: dict[str, float] = field(default_factory=dict)  # -> when it came (inf: cancelled)

    @property
    def has_room(self) -> bool:
        return self.status == m.RUNNING and len(self.running) + len(self.orphans) < self.nthreads

    @property
    def can_prefetch(self) -> bool:
        """Every slot busy, but room to hold one more batch per slot, ready to start."""
        return self.status == m.RUNNING and self.nthreads <= len(self.running) + len(self.orphans) < 2 * self.nthreads


@dataclass(slots=True)
class ClientRecord:
    conn: ConnId
    name: str
    pid: int
    host: str
    session: str = ""  # chosen by the client, kept across its reconnections
    last_seen: float = 0.0
    beats: bool = False  # it sends heartbeats, so its silence means it is gone
    resumed: bool = False  # came back with batches from an earlier connection
    user: str = ""  # who the handshake proved it is
    admin: bool = False  # it proved the cluster secret: sees and may cancel everyone's work
    calls: dict[int, CallRecord] = field(default_factory=dict)  # call_id -> CallRecord
