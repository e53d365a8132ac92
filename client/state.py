"""The client's pure state machine: which batches await a result, which data it owns,
whether the scheduler is there, and what to replay when it comes back.

Events in, commands out; no sockets, no clock reads (time arrives in the events),
so ``tests/unit/test_client_state.py`` drives it without a scheduler.  The
``Client`` feeds it from its I/O thread and carries out the commands.

A batch stays here, with the frames it was submitted with, until its result
arrives or its call is cancelled.  When the connection drops the calls wait:
the client reconnects with backoff and, once welcomed again, registers its data
and resubmits every batch still here, in the order they were first submitted.
The scheduler knows a batch by this client's session and the batch id, so a
result a worker produced while the scheduler was away is delivered, not rerun;
a result for a batch no longer here (cancelled, or already delivered) is
dropped, so none is ever delivered twice.  Waiting is bounded: after
``reconnect_timeout`` seconds without a scheduler, every waiting batch fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..protocol import messages as m

FIRST_RETRY = 0.1  # seconds before the second attempt to reconnect; doubles up to MAX_RETRY
MAX_RETRY = 2.0  # a restarted scheduler is found within this of its coming back


@dataclass(frozen=True, slots=True)
class ClientConfig:
    reconnect_timeout: float = 60.0  # how long calls wait for a lost scheduler (the workers' --death-timeout)
    heartbeat_timeout: float = 10.0  # silence after which the scheduler is taken for gone (frozen, or cut off)


@dataclass(frozen=True, slots=True)
class BatchRecord:
    batch_id: int
    call_id: int
    func_name: str
    max_running: int
    frames: m.Frames
    keys: tuple[str, ...] = ()
    priority: int = 0  # orders this user's own calls on the scheduler: higher first

    def submission(self) -> m.SubmitBatch:
        return m.SubmitBatch(self.batch_id, self.call_id, self.func_name, self.max_running, self.frames,
                             list(self.keys), self.priority)


# ------------------------------------------------------------------- events
@dataclass(frozen=True, slots=True)
class BatchSubmitted:
    batch: BatchRecord


@dataclass(frozen=True, slots=True)
class CallCancelled:
    call_id: int


@dataclass(frozen=True, slots=True)
class DataRegistered:
    key: str
    nbytes: int
    broadcast: bool = False


@dataclass(frozen=True, slots=True)
class DataReleased:
    keys: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Connected:
    """The handshake is done and the scheduler welcomed us."""

    now: float
    heartbeat_interval: float


@dataclass(frozen=True, slots=True)
class ConnectFailed:
    reason: str
    now: float


@dataclass(frozen=True, slots=True)
class ConnectionLost:
    reason: str
    now: float


@dataclass(frozen=True, slots=True)
class BatchDoneReceived:
    message: m.BatchDone
    now: float


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """Any other message: it shows the scheduler is alive."""

    now: float


@dataclass(frozen=True, slots=True)
class Ticked:
    now: float


Event = (BatchSubmitted | CallCancelled | DataRegistered | DataReleased | Connected | ConnectFailed
         | ConnectionLost | BatchDoneReceived | MessageReceived | Ticked)


# ----------------------------------------------------------------- commands
@dataclass(frozen=True, slots=True)
class Send:
    message: m.Message


@dataclass(frozen=True, slots=True)
class Deliver:
    """Complete the batch's future with this result."""

    message: m.BatchDone


@dataclass(frozen=True, slots=True)
class Fail:
    """Fail these batches: the scheduler could not be reached (``SchedulerUnreachableError``)."""

    batch_ids: tuple[int, ...]
    reason: str


@dataclass(frozen=True, slots=True)
class Connect:
    """Open a new connection to the scheduler now (then feed ``Connected`` or ``ConnectFailed``)."""


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Close the current connection (then feed ``ConnectionLost``)."""

    reason: str


Command = Send | Deliver | Fail | Connect | Disconnect


@dataclass
class ClientState:
    config: ClientConfig = field(default_factory=ClientConfig)
    pending: dict[int, BatchRecord] = field(default_factory=dict)  # by batch id, in submission order
    data: dict[str, DataRegistered] = field(default_factory=dict)  # owned scattered data, by key
    connected: bool = False
    connecting: bool = False
    heartbeat_interval: float = 1.0
    last_heard: float = 0.0  # when the scheduler last sent anything
    next_heartbeat: float = 0.0
    lost_since: float | None = None  # set while disconnected
    lost_reason: str = ""
    retry_at: float = 0.0
    retry_delay: float = FIRST_RETRY
    gave_up: str = ""  # while disconnected past reconnect_timeout: why new batches fail at once
    # calls the scheduler cancelled (someone else's cancel request): call id -> its reason, until
    # the caller ends the call; their later batches end at once instead of reaching the scheduler
    cancelled_calls: dict[int, str] = field(default_factory=dict)

    def handle(self, event: Event) -> list[Command]:
        match event:
            case BatchSubmitted(batch):
                return self._submitted(batch)
            case BatchDoneReceived(message, now):
                self.last_heard = now
                record = self.pending.pop(message.batch_id, None)
                if record is None:
                    return []
                if message.status == m.CANCELLED:
                    return self._call_cancelled(record.call_id, message)
                return [Deliver(message)]
            case MessageReceived(now):
                self.last_heard = now
                return []
            case CallCancelled(call_id):
                self.cancelled_calls.pop(call_id, None)  # the caller has seen the end of it
                for batch_id in [b.batch_id for b in self.pending.values() if b.call_id == call_id]:
                    del self.pending[batch_id]
                return [Send(m.CancelCall(call_id))] if self.connected else []
            case DataRegistered(key, nbytes, broadcast):
                self.data[key] = event
                return [Send(m.DataRegister(key, nbytes, broadcast))] if self.connected else []
            case DataReleased(keys):
                released = [key for key in keys if self.data.pop(key, None) is not None]
                return [Send(m.ReleaseData(released))] if released and self.connected else []
            case Connected(now, interval):
                return self._connected(now, interval)
            case ConnectFailed(reason, now):
                self.connecting = False
                self.retry_at = now + self.retry_delay
                self.retry_delay = min(2 * self.retry_delay, MAX_RETRY)
                return self._give_up_if_late(now, reason)
            case ConnectionLost(reason, now):
                return self._lost(reason, now)
            case Ticked(now):
                return self._ticked(now)
        raise TypeError(f"unknown event {event!r}")

    def _submitted(self, batch: BatchRecord) -> list[Command]:
        reason = self.cancelled_calls.get(batch.call_id)
        if reason is not None:  # joblib dispatches on until it sees the error: end these here
            return [Deliver(m.BatchDone(batch.batch_id, m.CANCELLED, "", reason))]
        if self.gave_up and not self.connected:
            return [Fail((batch.batch_id,), self.gave_up)]
        self.pending[batch.batch_id] = batch
        return [Send(batch.submission())] if self.connected else []

    def _call_cancelled(self, call_id: int, first: m.BatchDone) -> list[Command]:
        """The scheduler cancelled the call (someone else's cancel request): it has forgotten
        it, so every batch of it ends now, as do those joblib dispatches until it sees the error."""
        self.cancelled_calls[call_id] = first.error
        out: list[Command] = [Deliver(first)]
        for batch_id in [b.batch_id for b in self.pending.values() if b.call_id == call_id]:
            del self.pending[batch_id]
            out.append(Deliver(m.BatchDone(batch_id, m.CANCELLED, "", first.error)))
        return out

    def _connected(self, now: float, interval: float) -> list[Command]:
        self.connected, self.connecting = True, False
        self.heartbeat_interval = interval
        self.last_heard, self.next_heartbeat = now, now + interval
        self.lost_since, self.lost_reason, self.gave_up = None, "", ""
        self.retry_delay = FIRST_RETRY
        # a beat at once: from now on the scheduler takes our silence for our end.  Then what a
        # restarted scheduler does not know: the data first, so the batches find it
        out: list[Command] = [Send(m.Heartbeat())]
        out.extend(Send(m.DataRegister(d.key, d.nbytes, d.broadcast)) for d in self.data.values())
        out.extend(Send(batch.submission()) for batch in self.pending.values())
        return out

    def _lost(self, reason: str, now: float) -> list[Command]:
        if not self.connected:
            return []
        self.connected = False
        self.lost_since, self.lost_reason = now, reason
        self.retry_delay = FIRST_RETRY
        self.connecting = True
        return [Connect()]  # at once: a dropped link is often back already

    def _ticked(self, now: float) -> list[Command]:
        if self.connected:
            if now - self.last_heard > self.config.heartbeat_timeout:
                return [Disconnect(f"the scheduler sent nothing for {self.config.heartbeat_timeout:g} s")]
            if now >= self.next_heartbeat:
                self.next_heartbeat = now + self.heartbeat_interval
                return [Send(m.Heartbeat())]
            return []
        out = self._give_up_if_late(now, self.lost_reason)
        if not self.connecting and self.lost_since is not None and now >= self.retry_at:
            self.connecting = True
            out.append(Connect())
        return out

    def _give_up_if_late(self, now: float, reason: str) -> list[Command]:
        if self.lost_since is None or now - self.lost_since < self.config.reconnect_timeout:
            return []
        if not self.gave_up:
            self.gave_up = (f"lost the scheduler ({self.lost_reason}) and could not reconnect for "
                            f"{now - self.lost_since:.0f} s (reconnect_timeout={self.config.reconnect_timeout:g}): {reason}")
        if not self.pending:
            return []
        failed, self.pending = tuple(self.pending), {}
        return [Fail(failed, self.gave_up)]

    def validate(self) -> None:
        assert not (self.connected and self.connecting)
        assert not (self.connected and self.lost_since is not None)
        assert not (self.gave_up and (self.connected or self.pending))
        assert all(batch_id == batch.batch_id for batch_id, batch in self.pending.items())
        assert not any(batch.call_id in self.cancelled_calls for batch in self.pending.values())
        assert all(key == d.key for key, d in self.data.items())
