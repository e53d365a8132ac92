"""Prefetching in the pure scheduler state: only calls whose batches are short get a second
batch queued on a busy worker, and a worker that dies with one is not blamed for it."""

from __future__ import annotations

from jobsched.protocol import messages as m
from jobsched.scheduler.state import (
    SHORT_BATCH,
    MessageReceived,
    PeerConnected,
    PeerDisconnected,
    SchedulerConfig,
    SchedulerState,
    Send,
    Ticked,
)


def step(state: SchedulerState, event) -> list:
    out = state.handle(event)
    state.validate()
    return out


def executes(commands: list) -> list[tuple[int, int]]:
    return [(c.conn, c.message.task_id) for c in commands if type(c) is Send and type(c.message) is m.Execute]


def setup(prefetch: bool = True) -> SchedulerState:
    state = SchedulerState(SchedulerConfig(prefetch=prefetch, max_deaths=1))
    step(state, Ticked(1.0))
    step(state, PeerConnected(1, "tcp://c:1"))
    step(state, MessageReceived(1, m.RegisterClient("c", 1, "h")))
    step(state, PeerConnected(2, "tcp://w:2"))
    step(state, MessageReceived(2, m.RegisterWorker("w", 1, 2, "h")))
    return state


def submit(state: SchedulerState, batch_id: int) -> list:
    return step(state, MessageReceived(1, m.SubmitBatch(batch_id, 7, "f", 0, (b"x",))))


def done(state: SchedulerState, task_id: int, duration: float) -> list:
    return step(state, MessageReceived(2, m.TaskDone(task_id, 1, m.OK, duration, (b"r",))))


def test_no_prefetch_before_a_batch_has_finished():
    state = setup()
    assert executes(submit(state, 1)) == [(2, 1)]
    assert executes(submit(state, 2)) == []  # duration unknown: the worker's one slot is busy


def test_short_batches_get_one_more_per_slot():
    state = setup()
    submit(state, 1), submit(state, 2), submit(state, 3)
    assert executes(done(state, 1, SHORT_BATCH / 10)) == [(2, 2), (2, 3)]  # the slot, plus one held
    assert len(state.workers[2].running) == 2
    assert executes(submit(state, 4)) == []  # one per slot, no more


def test_long_batches_never_wait_behind_another():
    state = setup()
    submit(state, 1), submit(state, 2), submit(state, 3)
    assert executes(done(state, 1, SHORT_BATCH * 10)) == [(2, 2)]
    assert len(state.workers[2].running) == 1


def test_prefetch_can_be_turned_off():
    state = setup(prefetch=False)
    submit(state, 1), submit(state, 2), submit(state, 3)
    assert executes(done(state, 1, 0.0)) == [(2, 2)]


def test_a_prefetched_batch_is_no_death_when_its_worker_dies():
    state = setup()
    submit(state, 1), submit(state, 2), submit(state, 3)
    done(state, 1, 0.0)  # task 2 runs, task 3 is held
    out = step(state, PeerDisconnected(2, "killed"))
    lost = [c.message.batch_id for c in out if type(c) is Send and type(c.message) is m.BatchDone]
    assert lost == [2]  # max_deaths=1: the running one fails, the held one is requeued
    assert state.tasks[3].deaths == 0 and 3 in state.ready_calls[(1, 7)].queue
