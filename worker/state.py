"""The worker's pure state machine: which batches it holds, runs and has cancelled,
and which scattered data it holds or waits for.

Events in, commands out; no threads, no sockets: the daemon carries out the
commands and feeds back the events.  A batch starts when a slot is free and
all the data keys it needs are held; a missing key is requested once.
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


Event = Union[ExecuteReceived, CancelReceived, TaskCompleted, RetireRequested, DataArrived, DataUnavailable, DataDeleted]


@dataclass(frozen=True, slots=True)
class StartTask:
    task_id: int
    attempt: int
    func_name: str
    frames: tuple


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


Command = Union[StartTask, SendMessage, RequestData, FailTask]


@dataclass
class WorkerState:
    nthreads: int
    waiting: deque = field(default_factory=deque)  # Execute messages not yet started
    running: dict = field(default_factory=dict)  # TaskKey -> func_name
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
                self.waiting.append(event.message)
                for key in event.message.keys:
                    if key not in self.data and key not in self.requested:
                        self.requested.add(key)
                        out.append(RequestData(key))
        elif kind is RetireRequested:
            self.retiring = True
            self.waiting.clear()
        elif kind is CancelReceived:
            self._cancel((event.task_id, event.attempt), out)
        elif kind is TaskCompleted:
            self._completed(event, out)
        elif kind is DataArrived:
            self.requested.discard(event.key)
            self.data[event.key] = event.nbytes
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
        self._start_ready(out)
        return out

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

    def _start_ready(self, out: list[Command]) -> None:
        if not self.waiting or len(self.running) >= self.nthreads:
            return
        for msg in list(self.waiting):
            if len(self.running) >= self.nthreads:
                return
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
        if key in self.running:
            self.cancelled.add(key)  # threads cannot be interrupted: drop the result when it comes

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting

    def validate(self) -> None:
        assert len(self.running) <= self.nthreads
        assert self.cancelled <= set(self.running)
        assert not (self.retiring and self.waiting)
        assert not (self.requested & set(self.data))
        if len(self.running) < self.nthreads:  # nothing startable is left waiting
            assert all(any(k not in self.data for k in w.keys) for w in self.waiting)
