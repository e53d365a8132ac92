"""The worker's pure state machine: which batches it holds, runs and has cancelled,
and which scattered data it holds or waits for.

Events in, commands out; no threads, no sockets: the daemon carries out the
commands and feeds back the events.  A batch goes to the task threads' queue as
soon as all the data keys it needs are held (a missing key is requested once);
the threads run the queue in order, each taking the next batch as it finishes
one, so a batch the scheduler sent ahead (prefetch) starts without a round trip
through the event loop.  How many batches a worker holds is the scheduler's
decision: one per thread, plus one more per thread for short batches.  A batch in the
queue can still be taken back (cancel, retire) until a thread starts it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Union

from ..protocol import messages as m

TaskKey = tuple[int, int]  # (task_id, attempt)


@dataclass(frozen=True, slots=True)
class ExecuteReceived:
    message: m.Execute


@dataclass(frozen=True, slots=True)
class CancelReceived:
    task_id: int
    attempt: int


@dataclass(frozen=True, slots=True)
class TaskCompleted:
    task_id: int
    attempt: int
    status: str
    frames: tuple
    duration: float


@dataclass(frozen=True, slots=True)
class TaskWithdrawn:
    """Taken back from the threads' queue before any thread started it."""

    task_id: int
    attempt: int


@dataclass(frozen=True, slots=True)
class RetireRequested:
    """Stop starting batches: the daemon is draining before a clean exit."""


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
    keys: tuple


Event = Union[ExecuteReceived, CancelReceived, TaskCompleted, TaskWithdrawn, RetireRequested, DataArrived, DataUnavailable, DataDeleted]


@dataclass(frozen=True, slots=True)
class StartTask:
    task_id: int
    attempt: int
    func_name: str
    frames: tuple


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


Command = Union[StartTask, WithdrawTask, SendMessage, RequestData, FailTask]


@dataclass
class WorkerState:
    waiting: deque = field(default_factory=deque)  # Execute messages whose data is not all here
    running: dict = field(default_factory=dict)  # TaskKey -> func_name: in the threads (queued or running)
    cancelled: set = field(default_factory=set)  # running TaskKeys whose result is unwanted
    data: dict = field(default_factory=dict)  # key -> nbytes held here
    requested: set = field(default_factory=set)  # keys asked for, not yet arrived
    completed: int = 0
    retiring: bool = False

    def handle(self, event: Event) -> list[Command]:
        out: list[Command] = []
        kind = type(event)
        if kind is ExecuteReceived:
            if not self.retiring:  # when retiring, the scheduler requeues what we never started
                self._received(event.message, out)
        elif kind is RetireRequested:
            self.retiring = True
            self.waiting.clear()
            # what no thread has started goes back too: the scheduler requeues it when we leave
            out.extend(WithdrawTask(*key) for key in self.running if key not in self.cancelled)
        elif kind is TaskWithdrawn:
            self._withdrawn((event.task_id, event.attempt), out)
        elif kind is CancelReceived:
            self._cancel((event.task_id, event.attempt), out)
        elif kind is TaskCompleted:
            self._completed(event, out)
        elif kind is DataArrived:
            self.requested.discard(event.key)
            self.data[event.key] = event.nbytes
            self._start_ready(out)
        elif kind is DataUnavailable:
            self.requested.discard(event.key)
            for msg in [w for w in self.waiting if event.key in w.keys]:
                self.waiting.remove(msg)
                out.append(FailTask(msg.task_id, msg.attempt, event.reason))
        elif kind is DataDeleted:
            for key in event.keys:
                self.data.pop(key, None)
            for msg in self.waiting:  # rare: deleted while a queued batch needs it
                for key in msg.keys:
                    if key not in self.data and key not in self.requested:
                        self.requested.add(key)
                        out.append(RequestData(key))
        else:
            raise TypeError(f"unknown event {event!r}")
        return out

    def _received(self, msg: m.Execute, out: list[Command]) -> None:
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

    def _completed(self, event: TaskCompleted, out: list[Command]) -> None:
        key = (event.task_id, event.attempt)
        if key not in self.running:
            return
        del self.running[key]
        self.completed += 1
        if key in self.cancelled:
            self.cancelled.discard(key)
            out.append(SendMessage(m.TaskDone(event.task_id, event.attempt, m.CANCELLED, event.duration)))
        else:
            out.append(SendMessage(m.TaskDone(event.task_id, event.attempt, event.status, event.duration, event.frames)))

    def _withdrawn(self, key: TaskKey, out: list[Command]) -> None:
        if key not in self.running:
            return
        del self.running[key]
        if key in self.cancelled:
            self.cancelled.discard(key)
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
            out.append(WithdrawTask(*key))

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting

    def validate(self) -> None:
        assert self.cancelled <= set(self.running)
        assert not (self.retiring and self.waiting)
        assert not (self.requested & set(self.data))
        assert all(any(k not in self.data for k in w.keys) for w in self.waiting)  # nothing startable waits
