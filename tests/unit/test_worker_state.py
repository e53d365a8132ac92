"""The worker's pure state machine: the threads' queue, cancellation, retiring, scattered data."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobsched.protocol import messages as m
from jobsched.worker.events import (
    CancelReceived,
    DataArrived,
    DataDeleted,
    DataUnavailable,
    ExecuteReceived,
    FailTask,
    RequestData,
    RetireRequested,
    SendMessage,
    StartTask,
    TaskCompleted,
    TaskWithdrawn,
    WithdrawTask,
)
from jobsched.worker.state import WorkerState


class Sim:
    def __init__(self) -> None:
        self.state = WorkerState()
        self.state.validate()

    def __call__(self, event) -> list:
        out = self.state.handle(event)
        self.state.validate()
        return out

    def execute(self, task_id: int, attempt: int = 1, keys=()) -> list:
        return self(ExecuteReceived(m.Execute(task_id, attempt, f"f{task_id}", frames(task_id), list(keys))))

    def complete(self, task_id: int, attempt: int = 1, status: str = m.OK) -> list:
        return self(TaskCompleted(task_id, attempt, status, (b"result-%d" % task_id,), 0.25))


def frames(task_id: int) -> tuple:
    return (b"batch-%d" % task_id,)


def start(task_id: int, attempt: int = 1) -> StartTask:
    return StartTask(task_id, attempt, f"f{task_id}", frames(task_id))


def done(task_id: int, attempt: int = 1, status: str = m.OK) -> SendMessage:
    return SendMessage(m.TaskDone(task_id, attempt, status, 0.25, (b"result-%d" % task_id,)))


def cancelled(task_id: int, attempt: int = 1, duration: float = 0.0) -> SendMessage:
    return SendMessage(m.TaskDone(task_id, attempt, m.CANCELLED, duration))


# ----------------------------------------------------------------- slots


def test_every_batch_with_its_data_goes_to_the_threads_in_order():
    # how many a worker holds is the scheduler's call: its slots, plus prefetched batches
    # that a thread takes as soon as it finishes the one before
    sim = Sim()
    assert sim.execute(1) == [start(1)]
    assert sim.execute(2) == [start(2)]
    assert sim.execute(3) == [start(3)]
    assert list(sim.state.running) == [(1, 1), (2, 1), (3, 1)]
    assert not sim.state.waiting
    assert sim.complete(2) == [done(2)]
    assert sim.complete(1, status=m.ERROR) == [done(1, status=m.ERROR)]
    assert sim.complete(3) == [done(3)]
    assert sim.state.idle
    assert sim.state.completed == 3


def test_result_carries_status_duration_and_frames():
    sim = Sim()
    sim.execute(1)
    out = sim(TaskCompleted(1, 1, m.ERROR, (b"exc", b"buf"), 3.5))
    assert out == [SendMessage(m.TaskDone(1, 1, m.ERROR, 3.5, (b"exc", b"buf")))]


def test_same_task_new_attempt_is_a_different_task():
    sim = Sim()
    assert sim.execute(1, attempt=1) == [start(1, 1)]
    assert sim.execute(1, attempt=2) == [start(1, 2)]
    assert sim.complete(1, attempt=2) == [done(1, 2)]
    assert list(sim.state.running) == [(1, 1)]


def test_completion_of_an_unknown_task_is_ignored():
    sim = Sim()
    sim.execute(1)
    assert sim.complete(9) == []
    assert sim.complete(1, attempt=2) == []
    assert sim.complete(1) == [done(1)]
    assert sim.complete(1) == []  # twice
    assert sim.state.completed == 1


def test_unknown_event():
    with pytest.raises(TypeError):
        WorkerState(1).handle(object())  # type: ignore[arg-type]


# ---------------------------------------------------------------- cancel


def test_cancel_of_a_queued_task_answers_once_withdrawn():
    sim = Sim()
    sim.execute(1)
    sim.execute(2)
    sim.execute(3)
    assert sim(CancelReceived(2, 1)) == [WithdrawTask(2, 1)]
    assert sim(TaskWithdrawn(2, 1)) == [cancelled(2)]
    assert list(sim.state.running) == [(1, 1), (3, 1)]
    assert sim.state.cancelled == set()
    assert sim(TaskWithdrawn(2, 1)) == []  # twice
    assert sim.complete(1) == [done(1)]


def test_cancel_of_a_running_task_reports_cancelled_when_it_ends():
    sim = Sim()
    sim.execute(1)
    sim.execute(2)
    assert sim(CancelReceived(1, 1)) == [WithdrawTask(1, 1)]  # too late: a thread started it
    assert sim.state.cancelled == {(1, 1)}
    assert (1, 1) in sim.state.running  # its thread stays busy
    assert sim(TaskCompleted(1, 1, m.OK, (b"unwanted",), 2.0)) == [cancelled(1, duration=2.0)]
    assert sim.state.cancelled == set()


def test_cancel_of_an_unknown_or_finished_task_is_a_no_op():
    sim = Sim()
    assert sim(CancelReceived(5, 1)) == []
    sim.execute(1)
    sim.complete(1)
    assert sim(CancelReceived(1, 1)) == []
    assert sim.state.cancelled == set()


def test_cancel_names_the_attempt():
    sim = Sim()
    sim.execute(1, attempt=2)
    assert sim(CancelReceived(1, 1)) == []  # an older attempt: not this one
    assert sim.state.cancelled == set()
    assert sim.complete(1, attempt=2) == [done(1, 2)]


def test_cancel_twice():
    sim = Sim()
    sim.execute(1)
    assert sim(CancelReceived(1, 1)) == [WithdrawTask(1, 1)]
    assert sim(CancelReceived(1, 1)) == []
    assert sim.complete(1) == [cancelled(1, duration=0.25)]


# ---------------------------------------------------------------- retire


def test_retiring_drops_waiting_withdraws_queued_ignores_new_and_finishes_running():
    sim = Sim()
    sim.execute(1)
    sim.execute(2)
    sim.execute(3)
    sim.execute(4, keys=["X"])
    sim(CancelReceived(3, 1))
    assert sim(RetireRequested()) == [WithdrawTask(1, 1), WithdrawTask(2, 1)]  # 3: already asked
    assert not sim.state.waiting
    assert sim(TaskWithdrawn(2, 1)) == []  # not answered: the scheduler requeues it when we leave
    assert sim(TaskWithdrawn(3, 1)) == [cancelled(3)]
    assert sim.execute(5) == []  # the scheduler requeues what was never started
    assert not sim.state.waiting
    assert not sim.state.idle
    assert sim.complete(1) == [done(1)]
    assert sim.state.idle


# ------------------------------------------------------------------ data


def test_missing_data_is_requested_once_and_the_batch_starts_when_it_arrives():
    sim = Sim()
    assert sim.execute(1, keys=["X"]) == [RequestData("X")]
    assert sim.execute(2, keys=["X", "y"]) == [RequestData("y")]
    assert sim.state.requested == {"X", "y"}
    assert sim(DataArrived("X", 800)) == [start(1)]
    assert sim(DataArrived("y", 8)) == [start(2)]
    assert sim.state.data == {"X": 800, "y": 8}
    assert sim.state.requested == set()


def test_held_data_is_not_requested_again():
    sim = Sim()
    sim.execute(1, keys=["X"])
    sim(DataArrived("X", 1))
    sim.complete(1)
    assert sim.execute(2, keys=["X"]) == [start(2)]


def test_a_batch_waiting_for_data_does_not_block_the_others():
    sim = Sim()
    assert sim.execute(1, keys=["X"]) == [RequestData("X")]
    assert sim.execute(2) == [start(2)]
    assert sim(DataArrived("X", 1)) == [start(1)]
    assert sim.complete(2) == [done(2)]


def test_unavailable_data_fails_the_batches_that_need_it():
    sim = Sim()
    sim.execute(1, keys=["X"])
    sim.execute(2, keys=["y"])
    sim.execute(3, keys=["X"])
    assert sim(DataUnavailable("X", "released by its client")) == [
        FailTask(1, 1, "released by its client"),
        FailTask(3, 1, "released by its client"),
    ]
    assert [msg.task_id for msg in sim.state.waiting] == [2]
    assert sim.state.requested == {"y"}


def test_deleted_data_is_requested_again_if_a_waiting_batch_needs_it():
    sim = Sim()
    sim(DataArrived("X", 1))
    assert sim.execute(1, keys=["X", "y"]) == [RequestData("y")]  # X held, y missing
    assert sim(DataDeleted(("X", "other"))) == [RequestData("X")]
    assert sim.state.data == {}
    assert sim(DataArrived("y", 1)) == []  # X is missing now
    assert sim(DataArrived("X", 1)) == [start(1)]


def test_deleting_data_nobody_waits_for():
    sim = Sim()
    sim(DataArrived("X", 5))
    assert sim(DataDeleted(("X",))) == []
    assert sim.state.data == {} and sim.state.requested == set()


def test_cancel_of_a_batch_waiting_for_data():
    sim = Sim()
    sim.execute(1, keys=["X"])
    assert sim(CancelReceived(1, 1)) == [cancelled(1)]
    assert sim(DataArrived("X", 1)) == []


# ------------------------------------------------------------ random runs

EVENTS = ["execute", "execute", "complete", "complete", "cancel", "withdrawn", "retire", "arrive", "unavailable", "delete"]


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.tuples(st.sampled_from(EVENTS), st.integers(0, 1000)), max_size=60))
def test_random_events_keep_the_invariants(steps):
    sim = Sim()
    next_id = 1
    started: set = set()
    withdrawable: set = set()  # asked to withdraw, and no thread has started it (in this model)
    answered: set = set()  # every task gets at most one TaskDone or FailTask
    for kind, n in steps:
        keys = [k for k in ("A", "B") if n & {"A": 1, "B": 2}[k]]
        if kind == "execute":
            event = ExecuteReceived(m.Execute(next_id, 1 + n % 2, "f", (), keys))
            next_id += 1
        elif kind == "complete" and sim.state.running:
            key = list(sim.state.running)[n % len(sim.state.running)]
            withdrawable.discard(key)  # a thread ran it
            event = TaskCompleted(key[0], key[1], m.OK, (b"r",), 0.1)
        elif kind == "withdrawn" and withdrawable:
            key = sorted(withdrawable)[n % len(withdrawable)]
            withdrawable.discard(key)
            event = TaskWithdrawn(*key)
        elif kind == "cancel":
            event = CancelReceived(n % (next_id + 1), 1 + n % 2)
        elif kind == "retire" and n % 5 == 0:
            event = RetireRequested()
        elif kind == "arrive":
            event = DataArrived("AB"[n % 2], n)
        elif kind == "unavailable":
            event = DataUnavailable("AB"[n % 2], "gone")
        elif kind == "delete":
            event = DataDeleted(("AB"[n % 2],))
        else:
            continue
        for cmd in sim(event):
            if type(cmd) is StartTask:
                assert (cmd.task_id, cmd.attempt) not in started
                started.add((cmd.task_id, cmd.attempt))
            elif type(cmd) is WithdrawTask:
                assert (cmd.task_id, cmd.attempt) in sim.state.running
                withdrawable.add((cmd.task_id, cmd.attempt))
            elif type(cmd) is SendMessage:
                msg = cmd.message
                assert type(msg) is m.TaskDone
                assert (msg.task_id, msg.attempt) not in answered
                answered.add((msg.task_id, msg.attempt))
            elif type(cmd) is FailTask:
                assert (cmd.task_id, cmd.attempt) not in answered | started
                answered.add((cmd.task_id, cmd.attempt))
            else:
                assert type(cmd) is RequestData
                assert cmd.key not in sim.state.data
        assert set(sim.state.running) <= started
