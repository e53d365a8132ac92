"""The worker's pure state machine: every decision the worker makes.

Which batches it holds, runs and has cancelled; which scattered data it holds or
waits for, and where that data comes from; sessions with the scheduler and the
batches left running from an earlier one; draining; the cancel grace period; the
memory pause and restart.  Events in, commands out; no threads, no sockets, no
clock: the daemon carries out the commands and feeds back the events, time as
``Ticked(now)`` and memory as ``MemorySampled(rss)``.

A batch goes to the task threads' queue as soon as all the data keys it needs are
held (a missing key is requested once); the threads run the queue in order, each
taking the next batch as it finishes one, so a batch the scheduler sent ahead
(prefetch) starts without a round trip through the event loop.  How many batches
a worker holds is the scheduler's decision: one per thread, plus one more per
thread for short batches.  A batch in the queue can still be taken back (cancel,
retire) until a thread starts it.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from ..payload.shm import worth_sharing
from ..protocol import messages as m
from .events import (
    CancelReceived,
    Command,
    DataArrived,
    DataDeleted,
    DataSourcesReceived,
    DataUnavailable,
    DrainRequested,
    Event,
    ExecuteReceived,
    FailTask,
    FetchFromPeers,
    ForgetData,
    Frames,
    FramesStored,
    Leave,
    Log,
    MapSegment,
    MemorySampled,
    PeersFetched,
    Reconnect,
    RequestData,
    Restart,
    RetireRequested,
    SchedulerHeard,
    SegmentMapped,
    SegmentUnmappable,
    SendMessage,
    SessionEnded,
    SessionStarted,
    ShareCopy,
    SharedCopyMade,
    StartTask,
    StoreDataReceived,
    StoreFailed,
    StoreFrames,
    TaskCompleted,
    TaskWithdrawn,
    Ticked,
    UnlinkSegment,
    Welcomed,
    WithdrawTask,
)

TaskKey = tuple[int, int]  # (task_id, attempt)
PAUSE_FRACTION = 0.8  # of the memory limit: take no new batches above this
RESUME_FRACTION = 0.7
SHUTTING_DOWN = "worker shutting down"


@dataclass(frozen=True)
class WorkerConfig:
    cancel_grace: float = 10.0
    supervised: bool = False  # a supervisor restarts us: a stuck cancelled batch is cured by restarting
    memory_limit: int = 0  # 0: none
    drain_timeout: float = 30.0
    can_share: bool = False  # shared memory works here (``share_domain()`` is not empty)
    scheduler_timeout: float = 30.0  # a scheduler silent this long is taken for frozen or cut off


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


@dataclass
class WorkerState:
    config: WorkerConfig = field(default_factory=WorkerConfig)
    waiting: deque[m.Execute] = field(default_factory=deque)  # Execute messages whose data is not all here
    running: dict[TaskKey, str] = field(default_factory=dict)  # -> func_name: in the threads (queued or running)
    cancelled: set[TaskKey] = field(default_factory=set)  # running, result unwanted
    orphans: set[TaskKey] = field(default_factory=set)  # running since an earlier session
    announced: set[TaskKey] = field(default_factory=set)  # the orphans the registration named
    # the batches' names across sessions (Execute.ref): an orphan with one is still wanted, and
    # its outcome goes to the next scheduler as Recovered, as does one that ends while disconnected
    refs: dict[TaskKey, str] = field(default_factory=dict)
    held: dict[str, m.Recovered] = field(default_factory=dict)  # outcomes waiting for a scheduler
    registered: bool = False  # welcomed in this session
    last_heard: float = 0.0  # the scheduler's last heartbeat
    cancelled_at: dict[TaskKey, float] = field(default_factory=dict)  # cancelled and within their grace period
    data: dict[str, int] = field(default_factory=dict)  # key -> nbytes held here
    requested: set[str] = field(default_factory=set)  # keys asked for, not yet arrived
    completed: int = 0
    retiring: bool = False
    session: int = 0  # sessions started; results of asynchronous commands name theirs
    connected: bool = False
    now: float = 0.0  # of the last tick
    drain_since: float | None = None
    drain_announced: bool = False
    left: bool = False  # said goodbye in this session
    paused: bool = False
    restarting: bool = False

    def handle(self, event: Event) -> list[Command]:
        out: list[Command] = []
        match event:
            case ExecuteReceived(message=msg):
                if not self.retiring:  # when retiring, the scheduler requeues what we never started
                    self._received(msg, out)
            case RetireRequested():
                self._retire(out)
            case TaskWithdrawn(task_id=task_id, attempt=attempt):
                self._withdrawn((task_id, attempt), out)
            case CancelReceived(task_id=task_id, attempt=attempt, ref=""):
                self._cancel((task_id, attempt), out)
            case CancelReceived(ref=ref):
                for key in [k for k in self.orphans if self.refs.get(k) == ref]:
                    self._cancel(key, out)
            case TaskCompleted():
                self._completed(event, out)
            case SessionStarted():
                self._session_started(out)
            case SessionEnded():
                self.connected = self.registered = False
                self._retire(out)
            case Welcomed(now=now):
                self.registered, self.last_heard = True, now
                out.extend(SendMessage(recovered) for recovered in self.held.values())
                self.held.clear()
            case SchedulerHeard(now=now):
                self.last_heard = now
            case DrainRequested():
                self._drain(out)
            case Ticked(now=now):
                self._ticked(now, out)
            case MemorySampled(rss=rss):
                self._memory(rss, out)
            case DataArrived(key=key, nbytes=nbytes):
                self._arrived(key, nbytes, out)
            case DataUnavailable(key=key, reason=reason):
                self._unavailable(key, reason, out)
            case DataDeleted(keys=keys):
                self._deleted(keys, out)
            case _:
                self._data_event(event, out)
        if self.drain_since is not None and self.idle and not self.left:
            self._leave(out)
        return out

    # ------------------------------------------------------------ batches
    def _received(self, msg: m.Execute, out: list[Command]) -> None:
        if msg.ref:
            self.refs[(msg.task_id, msg.attempt)] = msg.ref
        missing = [key for key in msg.keys if key not in self.data]
        if not missing:
            self.running[(msg.task_id, msg.attempt)] = msg.func_name
            out.append(StartTask(msg.task_id, msg.attempt, msg.func_name, msg.frames))
            return
        self.waiting.append(msg)
        for key in missing:
            if key not in self.requested:
                self.requested.add(key)
                out.append(RequestData(key))

    def _retire(self, out: list[Command]) -> None:
        self.retiring = True
        self.waiting.clear()
        # what no thread has started goes back too: the scheduler requeues it when we leave
        out.extend(WithdrawTask(*key) for key in self.running if key not in self.cancelled)

    def _finish(self, key: TaskKey) -> bool:
        """Free the slot of ``key``; true if its result is wanted."""
        del self.running[key]
        self.cancelled_at.pop(key, None)
        self.orphans.discard(key)
        self.announced.discard(key)
        self.refs.pop(key, None)
        if key in self.cancelled:
            self.cancelled.discard(key)
            return False
        return True

    def _completed(self, event: TaskCompleted, out: list[Command]) -> None:
        key = (event.task_id, event.attempt)
        if key not in self.running:
            return
        orphan, ref, key_announced = key in self.orphans, self.refs.get(key, ""), key in self.announced
        self.completed += 1
        if not self._finish(key):
            if not orphan:
                out.append(SendMessage(m.TaskDone(event.task_id, event.attempt, m.CANCELLED, event.duration)))
            elif key_announced and self.registered:  # the scheduler cancelled it by its ref: its slot is free
                out.append(SendMessage(m.Recovered(ref, m.CANCELLED, event.duration)))
        elif ref and (orphan or not self.registered):  # named by its ref for whichever scheduler comes
            recovered = m.Recovered(ref, event.status, event.duration, event.frames)
            if self.registered:
                out.append(SendMessage(recovered))
            else:
                self.held[ref] = recovered
        else:
            out.append(SendMessage(m.TaskDone(event.task_id, event.attempt, event.status, event.duration, event.frames)))

    def _withdrawn(self, key: TaskKey, out: list[Command]) -> None:
        if key in self.running and not self._finish(key):
            out.append(SendMessage(m.TaskDone(key[0], key[1], m.CANCELLED, 0.0)))

    def _start_ready(self, out: list[Command]) -> None:
        for msg in list(self.waiting):
            if all(key in self.data for key in msg.keys):
                self.waiting.remove(msg)
                self.running[(msg.task_id, msg.attempt)] = msg.func_name
                out.append(StartTask(msg.task_id, msg.attempt, msg.func_name, msg.frames))

    def _cancel(self, key: TaskKey, out: list[Command]) -> None:
        for msg in self.waiting:
            if (msg.task_id, msg.attempt) == key:
                self.waiting.remove(msg)
                out.append(SendMessage(m.TaskDone(key[0], key[1], m.CANCELLED, 0.0)))
                return
        if key in self.running and key not in self.cancelled:
            # a started batch cannot be interrupted: its result is dropped when it comes
            self.cancelled.add(key)
            self.cancelled_at[key] = self.now
            out.append(WithdrawTask(*key))

    # ----------------------------------------------------- sessions, time
    def _session_started(self, out: list[Command]) -> None:
        self.session += 1
        self.connected, self.registered = True, False
        self.retiring = self.left = self.drain_announced = False
        self.drain_since = None
        self.waiting.clear()
        self.requested.clear()
        if self.data:  # the new session's scheduler knows none of it
            out.append(ForgetData(tuple(self.data)))
            self.data.clear()
        # still running from the last session: their threads stay busy; one with a ref is still
        # wanted (the registration names it), the others' grace starts again
        for key in self.running:
            self.orphans.add(key)
            if key in self.cancelled or key not in self.refs:
                self.cancelled.add(key)
                self.cancelled_at[key] = self.now
            else:
                self.announced.add(key)

    @property
    def orphan_refs(self) -> list[str]:
        """For the registration: the refs of the batches still running from before, and of those
        whose outcome is held.  The scheduler then runs none of them again, even when their
        resubmission arrives before the Recovered that follows the Welcome."""
        return [*(self.refs[key] for key in self.announced), *self.held]

    def _drain(self, out: list[Command]) -> None:
        if self.drain_since is not None or self.restarting or not self.connected:
            return
        out.append(SendMessage(m.WorkerStatus(m.RETIRING)))
        self._retire(out)
        self.drain_since = self.now  # the next tick announces it, once the withdrawn batches are known

    def _leave(self, out: list[Command]) -> None:
        self.left = True
        out.append(Leave(SHUTTING_DOWN))

    def _ticked(self, now: float, out: list[Command]) -> None:
        self.now = now
        if not self.connected:
            return
        if self.registered and now - self.last_heard > self.config.scheduler_timeout:
            self.registered = False  # one Reconnect: SessionEnded follows
            out.append(Reconnect(f"no heartbeat from the scheduler for {self.config.scheduler_timeout:.0f} s"))
            return
        for key, since in list(self.cancelled_at.items()):
            if now - since >= self.config.cancel_grace:
                del self.cancelled_at[key]
                self._cancel_overran(self.running[key], out)
        if self.drain_since is None or self.left:
            return
        if not self.drain_announced:
            self.drain_announced = True
            out.append(Log(logging.INFO, f"draining {len(self.running)} running batches "
                                         f"(up to {self.config.drain_timeout:.0f} s)"))
        if now - self.drain_since >= self.config.drain_timeout:
            out.append(Log(logging.WARNING, f"drain timed out with {len(self.running)} batches running; "
                                            "they will be rerun elsewhere"))
            self._leave(out)

    def _cancel_overran(self, func: str, out: list[Command]) -> None:
        grace = self.config.cancel_grace
        if self.config.supervised:
            self._restart(f"a cancelled batch of {func} overran its {grace:.0f} s grace period", True, out)
        else:
            out.append(Log(logging.WARNING, f"a cancelled batch of {func} is still running after {grace:.0f} s; its "
                           "slot stays busy until it ends (run under a supervisor, the default, to have the "
                           "process restarted)"))

    def _restart(self, reason: str, clean: bool, out: list[Command]) -> None:
        if not self.restarting:
            self.restarting = True
            out.append(Restart(reason, clean))

    def _memory(self, rss: int, out: list[Command]) -> None:
        limit = self.config.memory_limit
        if not limit or self.restarting:
            return
        if rss > limit:
            running = ", ".join(self.running.values())
            reason = (f"exceeded its memory limit ({_mib(rss)} > {_mib(limit)})"
                      + (f" while running {running}" if running else ""))
            self._restart(reason, False, out)
            return
        want_pause = rss > PAUSE_FRACTION * limit or (self.paused and rss > RESUME_FRACTION * limit)
        if want_pause != self.paused:
            self.paused = want_pause
            out.append(Log(logging.WARNING, f"memory {_mib(rss)} of {_mib(limit)}: "
                                            + ("pausing" if want_pause else "resuming")))
            out.append(SendMessage(m.WorkerStatus(m.PAUSED if want_pause else m.RUNNING)))

    # --------------------------------------------------------------- data
    def _arrived(self, key: str, nbytes: int, out: list[Command]) -> None:
        self.requested.discard(key)
        self.data[key] = nbytes
        self._start_ready(out)

    def _unavailable(self, key: str, reason: str, out: list[Command]) -> None:
        self.requested.discard(key)
        for msg in [w for w in self.waiting if key in w.keys]:
            self.waiting.remove(msg)
            out.append(FailTask(msg.task_id, msg.attempt, reason))

    def _deleted(self, keys: tuple[str, ...], out: list[Command]) -> None:
        for key in keys:
            self.data.pop(key, None)
        for msg in self.waiting:  # rare: deleted while a queued batch needs it
            for key in msg.keys:
                if key not in self.data and key not in self.requested:
                    self.requested.add(key)
                    out.append(RequestData(key))

    def _bytes(self, key: str, frames: Frames, share: bool, out: list[Command]) -> None:
        """Bytes arrived; with ``share``, they go to a shared segment that we keep instead."""
        if share and self.config.can_share and worth_sharing(frames):
            out.append(ShareCopy(key, frames, self.session))  # the copy takes a while: not on the loop
        else:
            out.append(StoreFrames(key, frames))

    def _data_event(self, event: Event, out: list[Command]) -> None:
        match event:
            case StoreDataReceived(message=msg):
                if msg.segment:
                    out.append(MapSegment(msg.key, msg.segment, tuple(msg.sizes)))
                else:
                    self._bytes(msg.key, tuple(msg.frames), msg.share, out)
            case DataSourcesReceived(message=msg):
                if msg.key not in self.data:
                    out.append(FetchFromPeers(msg.key, tuple(msg.addresses), msg.share, self.session))
            case SegmentMapped(key=key, frames=frames):
                if self.connected:
                    out.append(StoreFrames(key, frames))
            case SegmentUnmappable(key=key, name=name, error=error):
                out.append(Log(logging.WARNING, f"cannot map shared segment {name} for {key} ({error}); "
                                                "asking for a copy"))
                if self.connected:
                    out.append(SendMessage(m.NeedData(key, shared=False)))
            case SharedCopyMade(key=key, frames=frames, segment=segment, session=session):
                if session == self.session and self.connected:
                    out.append(StoreFrames(key, frames, segment))
                elif segment is not None:
                    out.append(UnlinkSegment(segment))
            case PeersFetched(key=key, frames=frames, share=share, session=session):
                if session != self.session or not self.connected:
                    return
                if frames is None:  # the owner's copy is the way out
                    out.append(SendMessage(m.NeedData(key, from_owner=True)))
                else:
                    self._bytes(key, frames, share, out)
            case FramesStored(key=key, nbytes=nbytes, segment=segment_name, sizes=sizes):
                # with a segment: the other workers of this machine map it rather than fetch it
                out.append(SendMessage(m.DataStored(key, nbytes, segment_name, list(sizes))))
                self._arrived(key, nbytes, out)
            case StoreFailed(key=key, error=error):
                self._unavailable(key, f"cannot load it here: {error}", out)
            case _:
                raise TypeError(f"unknown event {event!r}")

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting

    def validate(self) -> None:
        assert self.announced <= self.orphans <= set(self.running) and self.cancelled <= set(self.running)
        assert set(self.refs) <= set(self.running) | {(w.task_id, w.attempt) for w in self.waiting}
        assert set(self.cancelled_at) <= self.cancelled
        assert not (self.retiring and self.waiting)
        assert not (self.requested & set(self.data))
        assert all(any(k not in self.data for k in w.keys) for w in self.waiting)  # nothing startable waits
        assert not (self.left and self.drain_since is None)
