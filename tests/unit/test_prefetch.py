"""Prefetching in the pure scheduler state: only calls whose batches are short get a second
batch queued on a busy worker, and a worker that dies with one is not blamed for it."""

from __future__ import annotations

from support import SchedulerSim

from jobsched.protocol import messages as m
from jobsched.scheduler.state import SHORT_BATCH, Send, Ticked


def executes(commands: list) -> list[tuple[int, int]]:
    return [(c.conn, c.message.task_id) for c in commands if type(c) is Send and type(c.message) is m.Execute]


def setup(prefetch: bool = True) -> SchedulerSim:
    """Client 1 and worker 2 (one slot), at time 1."""
    sim = SchedulerSim(prefetch=prefetch, max_deaths=1)
    sim(Ticked(1.0))
    sim.client(1)
    assert sim.worker(2, "w") == []
    return sim


def submit(sim: SchedulerSim, batch_id: int) -> list:
    return sim.msg(1, m.SubmitBatch(batch_id, 7, "f", 0, (b"x",)))


def done(sim: SchedulerSim, task_id: int, duration: float) -> list:
    return sim.msg(2, m.TaskDone(task_id, 1, m.OK, duration, (b"r",)))


def test_no_prefetch_before_a_batch_has_finished():
    sim = setup()
    assert executes(submit(sim, 1)) == [(2, 1)]
    assert executes(submit(sim, 2)) == []  # duration unknown: the worker's one slot is busy


def test_short_batches_get_one_more_per_slot():
    sim = setup()
    submit(sim, 1), submit(sim, 2), submit(sim, 3)
    assert executes(done(sim, 1, SHORT_BATCH / 10)) == [(2, 2), (2, 3)]  # the slot, plus one held
    assert len(sim.state.workers[2].running) == 2
    assert executes(submit(sim, 4)) == []  # one per slot, no more


def test_long_batches_never_wait_behind_another():
    sim = setup()
    submit(sim, 1), submit(sim, 2), submit(sim, 3)
    assert executes(done(sim, 1, SHORT_BATCH * 10)) == [(2, 2)]
    assert len(sim.state.workers[2].running) == 1


def test_prefetch_can_be_turned_off():
    sim = setup(prefetch=False)
    submit(sim, 1), submit(sim, 2), submit(sim, 3)
    assert executes(done(sim, 1, 0.0)) == [(2, 2)]


def test_a_prefetched_batch_is_no_death_when_its_worker_dies():
    sim = setup()
    submit(sim, 1), submit(sim, 2), submit(sim, 3)
    done(sim, 1, 0.0)  # task 2 runs, task 3 is held
    out = sim.leave(2, "killed")
    lost = [c.message.batch_id for c in out if type(c) is Send and type(c.message) is m.BatchDone]
    assert lost == [2]  # max_deaths=1: the running one fails, the held one is requeued
    call = sim.state.clients[1].calls[7]
    assert sim.state.tasks[3].deaths == 0 and 3 in call.queue and call in sim.state.share
