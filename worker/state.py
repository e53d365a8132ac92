"""The worker's pure state machine: which batches it holds, runs and has cancelled.

Events in (``ExecuteReceived``, ``CancelReceived``, ``TaskCompleted``), commands out
(``StartTask``, ``SendMessage``).  No threads, no sockets: the daemon carries
out the commands and feeds back the events.
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


Event = Union[ExecuteReceived, CancelReceived, TaskCompleted, RetireRequested]


@dataclass(frozen=True, slots=True)
class StartTask:
    task_id: int
    attempt: int
    func_name: str
    frames: tuple


@dataclass(frozen=True, slots=True)
class SendMessage:
    message: m.Message


Command = Union[StartTask, SendMessage]


@dataclass
class WorkerState:
    nthreads: int
    waiting: deque = field(default_factory=deque)  # Execute messages not yet started
    running: dict = field(default_factory=dict)  # TaskKey -> func_name
    cancelled: set = field(default_factory=set)  # running TaskKeys whose result is unwanted
    completed: int = 0
    retiring: bool = False

    def handle(self, event: Event) -> list[Command]:
        out: list[Command] = []
        if type(event) is ExecuteReceived:
            if not self.retiring:  # when retiring, the scheduler requeues what we never started
                self.waiting.append(event.message)
        elif type(event) is RetireRequested:
            self.retiring = True
            self.waiting.clear()
        elif type(event) is CancelReceived:
            self._cancel((event.task_id, event.attempt), out)
        elif type(event) is TaskCompleted:
            key = (event.task_id, event.attempt)
            if key in self.running:
                del self.running[key]
                self.completed += 1
                if key in self.cancelled:
                    self.cancelled.discard(key)
                    out.append(SendMessage(m.TaskDone(event.task_id, event.attempt, m.CANCELLED, event.duration)))
                else:
                    out.append(SendMessage(m.TaskDone(event.task_id, event.attempt, event.status, event.duration, event.frames)))
        else:
            raise TypeError(f"unknown event {event!r}")
        while self.waiting and len(self.running) < self.nthreads:
            msg = self.waiting.popleft()
            self.running[(msg.task_id, msg.attempt)] = msg.func_name
            out.append(StartTask(msg.task_id, msg.attempt, msg.func_name, msg.frames))
        return out

    def _cancel(self, key: TaskKey, out: list[Command]) -> None:
        for msg in self.waiting:
            if (msg.task_id, msg.attempt) == key:
                self.waiting.remove(msg)
                out.append(SendMessage(m.TaskDone(key[0], key[1], m.CANCELLED, 0.0)))
                return
        if key in self.running:
            self.cancelled.add(key)  # threads cannot be interrupted: drop the result when it comes

    def validate(self) -> None:
        assert len(self.running) <= self.nthreads
        assert self.cancelled <= set(self.running)
        assert not (self.waiting and len(self.running) < self.nthreads)
        assert not (self.retiring and self.waiting)

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting
