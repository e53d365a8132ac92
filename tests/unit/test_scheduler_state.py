"""The scheduler's pure state machine, event by event: ``assert state.handle(ev) == [...]``.

Every step goes through ``Sim.__call__``, which calls ``validate()`` after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from support import HB, SchedulerSim

from jobsched.protocol import messages as m
from jobsched.scheduler.records import CLIENT, WORKER
from jobsched.scheduler.state import (
    Close,
    MessageReceived,
    PeerConnected,
    PeerDisconnected,
    SchedulerState,
    Send,
    Ticked,
)


def payload(batch_id: int) -> tuple:
    return (b"batch-%d" % batch_id,)


def result(batch_id: int) -> tuple:
    return (b"result-%d" % batch_id,)


class Sim(SchedulerSim):
    """``support.SchedulerSim`` with batches to submit and finish."""

    def submit(self, conn: int, batch_id: int, call_id: int = 1, func: str = "fit", max_running: int = 0) -> list:
        return self.msg(conn, m.SubmitBatch(batch_id, call_id, func, max_running, payload(batch_id)))

    def done(self, wconn: int, task_id: int, attempt: int = 1, status: str = m.OK, frames=None) -> list:
        frames = result(task_id) if frames is None else frames
        return self.msg(wconn, m.TaskDone(task_id, attempt, status, 0.5, frames))


def execute(wconn: int, task_id: int, batch_id: int, attempt: int = 1, func: str = "fit") -> Send:
    return Send(wconn, m.Execute(task_id, attempt, func, payload(batch_id)))


def batch_done(cconn: int, batch_id: int, worker: str, task_id: int | None = None, status: str = m.OK) -> Send:
    frames = result(batch_id if task_id is None else task_id)
    return Send(cconn, m.BatchDone(batch_id, status, worker, "", frames))


# ---------------------------------------------------------------- registration


def test_client_registration():
    sim = Sim()
    sim.client(1)
    assert sim.state.clients[1].name == "laptop"
    assert sim.state.info()["clients"] == 1


def test_worker_registration_gets_welcome_with_heartbeat_interval():
    sim = Sim(heartbeat_interval=2.5)
    assert sim(PeerConnected(7, "tcp://10.0.0.7:1", WORKER, "root", True)) == []
    assert sim.msg(7, m.RegisterWorker("w7", 4)) == [Send(7, m.Welcome("w7", 2.5))]
    assert sim.state.workers[7].nthreads == 4
    assert 7 in sim.state.free_workers


def test_unnamed_worker_is_named_after_its_address():
    sim = Sim()
    sim(PeerConnected(3, "tcp://10.9.9.9:5555", WORKER, "root", True))
    assert sim.msg(3, m.RegisterWorker("", 1)) == [Send(3, m.Welcome("tcp://10.9.9.9:5555", HB))]


def test_duplicate_worker_name_is_refused():
    sim = Sim()
    sim.worker(1, "w")
    sim(PeerConnected(2, "tcp://10.0.0.2:1", WORKER, "root", True))
    assert sim.msg(2, m.RegisterWorker("w", 2)) == [Close(2, "a worker named 'w' is already registered")]
    assert list(sim.state.workers) == [1]
    assert sim.msg(2, m.Heartbeat(1)) == [Close(2, "expected a registration, got 'heartbeat'")]
    assert sim(PeerDisconnected(2, "closed")) == []
    assert list(sim.state.workers) == [1]


def test_worker_name_is_free_again_after_its_owner_left():
    sim = Sim()
    sim.worker(1, "w")
    assert sim(PeerDisconnected(1, "gone")) == []
    assert sim.worker(2, "w") == []


@pytest.mark.parametrize("nthreads", [0, -1])
def test_worker_with_no_threads_is_refused(nthreads):
    sim = Sim()
    sim(PeerConnected(1, "tcp://10.0.0.1:1", WORKER, "root", True))
    assert sim.msg(1, m.RegisterWorker("w", nthreads)) == [Close(1, "nthreads must be at least 1")]
    assert sim.state.workers == {} and sim.state.free_workers == {}
    sim.client(2)
    assert sim.submit(2, 1) == []  # nobody to run it


@pytest.mark.parametrize(
    "message",
    [
        m.SubmitBatch(1, 1, "f", 0, (b"x",)),
        m.TaskDone(1, 1),
        m.Heartbeat(5),
        m.CancelCall(1),
        m.InfoRequest(1),
        m.Welcome("x"),
        m.Execute(1, 1, "f"),
    ],
    ids=lambda msg: msg.op,
)
def test_messages_before_registration_are_refused(message):
    sim = Sim()
    sim(PeerConnected(1, "tcp://10.0.0.1:1", CLIENT, "ann", True))
    assert sim.msg(1, message) == [Close(1, f"expected a registration, got {message.op!r}")]
    assert sim.state.addresses == {} and sim.state.tasks == {}


def test_client_sending_worker_messages_is_closed():
    sim = Sim()
    sim.client(1)
    assert sim.msg(1, m.TaskDone(1, 1)) == [Close(1, "unexpected 'task-done' from a client")]
    assert sim.state.clients == {}


def test_registering_twice_is_refused():
    sim = Sim()
    sim.client(1)
    assert sim.msg(1, m.RegisterClient("again")) == [Close(1, "unexpected 'register-client' from a client")]
    sim.worker(2, "w")
    assert sim.msg(2, m.RegisterWorker("w2", 1)) == [Close(2, "unexpected 'register-worker' from a worker")]
    assert sim.state.workers == {}


def test_worker_sending_client_messages_is_closed_and_its_batches_requeued():
    sim = Sim()
    sim.client(1)
    sim.worker(2, "a")
    sim.worker(3, "b")
    assert sim.submit(1, 10) == [execute(2, 1, 10)]
    assert sim.msg(2, m.SubmitBatch(5, 5, "evil", 0, ())) == [
        Close(2, "unexpected 'submit' from a worker"),
        execute(3, 1, 10, attempt=2),
    ]
    assert sim(PeerDisconnected(2, "closed by us")) == []  # the server reports the close later: harmless


def test_unknown_event_type():
    with pytest.raises(TypeError):
        SchedulerState().handle("not an event")  # type: ignore[arg-type]


def test_disconnect_of_unknown_or_unregistered_peer():
    sim = Sim()
    assert sim(PeerDisconnected(99, "never seen")) == []
    sim(PeerConnected(1, "tcp://10.0.0.1:1", CLIENT, "ann", True))
    assert sim(PeerDisconnected(1, "left before registering")) == []
    assert sim.state.addresses == {}


# -------------------------------------------------------------------- submit


def test_submit_goes_to_a_free_worker_and_the_result_comes_back():
    sim = Sim()
    sim.client(1)
    sim.worker(2, "w")
    assert sim.submit(1, 100, func="GridSearchCV.fit") == [execute(2, 1, 100, func="GridSearchCV.fit")]
    assert sim.done(2, 1) == [batch_done(1, 100, "w", task_id=1)]
    assert sim.state.tasks == {}
    assert sim.state.workers[2].completed == 1


def test_submit_before_any_worker_is_queued_until_one_registers():
    sim = Sim()
    sim.client(1)
    assert sim.submit(1, 1) == []
    assert sim.submit(1, 2) == []
    assert sim.worker(2, "w", nthreads=4) == [execute(2, 1, 1), execute(2, 2, 2)]


def test_queueing_when_all_slots_are_busy():
    sim = Sim()
    sim.client(1)
    sim.worker(2, "w", nthreads=2)
    assert sim.submit(1, 1) == [execute(2, 1, 1)]
    assert sim.submit(1, 2) == [execute(2, 2, 2)]
    assert sim.submit(1, 3) == []
    assert sim.submit(1, 4) == []
    assert sim.state.info()["queued"] == 2
    assert sim.done(2, 2) == [batch_done(1, 2, "w"), execute(2, 3, 3)]
    assert sim.done(2, 1) == [batch_done(1, 1, "w"), execute(2, 4, 4)]
    assert sim.done(2, 3) == [batch_done(1, 3, "w")]
    assert sim.done(2, 4) == [batch_done(1, 4, "w")]
    assert 2 in sim.state.free_workers


def test_error_result_is_relayed_with_its_frames():
    sim = Sim()
    sim.client(1)
    sim.worker(2, "w")
    sim.submit(1, 5)
    exc_frames = (b"pickled exception",)
    assert sim.done(2, 1, status=m.ERROR, frames=exc_frames) == [
        Send(1, m.BatchDone(5, m.ERROR, "w", "", exc_frames))
    ]


@pytest.mark.parametrize("status", [m.CANCELLED, m.LOST, "weird"])
def test_invalid_status_from_a_worker_fails_the_batch(status):
    sim = Sim()
    sim.client(1)
    sim.worker(2, "w")
    sim.submit(1, 5)
    assert sim.done(2, 1, status=status) == [
        Send(1, m.BatchDone(5, m.FAILED, "w", f"worker w reported invalid status {status!r}"))
    ]
    assert 2 in sim.state.free_workers


def test_results_go_to_the_client_that_submitted():
    sim = Sim()
    sim.client(1, "alice")
    sim.client(2, "bob")
    sim.worker(3, "w", nthreads=2)
    assert sim.submit(1, 7) == [execute(3, 1, 7)]
    assert sim.submit(2, 7) == [execute(3, 2, 7)]  # batch ids are per client
    assert sim.done(3, 2) == [batch_done(2, 7, "w", task_id=2)]
    assert sim.done(3, 1) == [batch_done(1, 7, "w", task_id=1)]


def test_round_robin_between_calls():
    sim = Sim()
    sim.client(1)
    sim.worker(2, "w", nthreads=1)
    assert sim.submit(1, 1, call_id=1) == [execute(2, 1, 1)]
    assert sim.submit(1, 2, call_id=1) == []
    assert sim.submit(1, 3, call_id=1) == []
    assert sim.submit(1, 4, call_id=2) == []
    assert sim.submit(1, 5, call_id=2) == []
    assert sim.done(2, 1) == [batch_done(1, 1, "w", task_id=1), execute(2, 2, 2)]
    assert sim.done(2, 2) == [batch_done(1, 2, "w", task_id=2), execute(2, 4, 4)]
    assert sim.done(2, 4) == [batch_done(1, 4, "w", task_id=4), execute(2, 3, 3)]
    assert sim.done(2, 3) == [batch_done(1, 3, "w", task_id=3), execute(2, 5, 5)]
    assert sim.done(2, 5) == [batch_done(1, 5, "w", task_id=5)]


def test_round_robin_between_clients():
    sim = Sim()
    sim.client(1)
    sim.client(2)
    sim.worker(3, "w", nthreads=1)
    assert sim.submit(1, 1) == [execute(3, 1, 1)]
    sim.submit(1, 2)
    sim.submit(1, 3)
    sim.submit(2, 1)
    assert sim.done(3, 1) == [batch_done(1, 1, "w", task_id=1), execute(3, 2, 2)]
    assert sim.done(3, 2) == [batch_done(1, 2, "w", task_id=2), Send(3, m.Execute(4, 1, "fit", payload(1)))]
    assert sim.done(3, 4) == [batch_done(2, 1, "w", task_id=4), execute(3, 3, 3)]


def test_round_robin_between_workers():
    sim = Sim()
    sim.client(1)
    sim.worker(2, "a", nthreads=2)
    sim.worker(3, "b", nthreads=2)
    assert [sim.submit(1, b) for b in range(1, 6)] == [
        [execute(2, 1, 1)],
        [execute(3, 2, 2)],
        [execute(2, 3, 3)],
        [execute(3, 4, 4)],
        [],
    ]
    assert sim.done(3, 4) == [batch_done(1, 4, "b"), execute(3, 5, 5)]


def test_max_running_caps_a_call_but_not_the_others():
    sim = Sim()
    sim.client(1)
    sim.worker(2, "w", nthreads=4)
    assert sim.submit(1, 1, call_id=1, max_running=2) == [execute(2, 1, 1)]
    assert sim.submit(1, 2, call_id=1, max_running=2) == [execute(2, 2, 2)]
    assert sim.submit(1, 3, call_id=1, max_running=2) == []  # capped, although 2 slots are free
    assert 2 in sim.state.free_workers
    assert sim.submit(1, 4, call_id=2) == [execute(2, 4, 4)]  # another call uses the free slot
    assert sim.done(2, 1) == [batch_done(1, 1, "w"), execute(2, 3, 3)]
    assert len(sim.state.clients[1].calls[1].running) == 2


def test_max_running_of_one_serializes_a_call():
    sim = Sim()
    sim.client(1)
    sim.worker(2, "a", nthreads=2)
    sim.worker(3, "b", nthreads=2)
    assert sim.submit(1, 1, max_running=1) == [execute(2, 1, 1)]
    assert sim.submit(1, 2, max_running=1) == []
    assert sim.done(2, 1) == [batch_done(1, 1, "a"), execute(3, 2, 2)]


def test_negative_max_running_means_no_cap():
    sim = Sim()
    sim.client(1)
    sim.worker(2, "w", nthreads=3)
    assert [sim.submit(1, b, max_running=-5) for b in (1, 2, 3)] == [[execute(2, b, b)] for b in (1, 2, 3)]


# --------------------------------------------------------------- worker death


def test_worker_death_requeues_with_a_new_attempt_and_drops_the_late_result():
    sim = Sim()
    sim.client(1)
    sim.worker(2, "a")
    sim.worker(3, "b")
    assert sim.submit(1, 1) == [execute(2, 1, 1)]
    assert sim.submit(1, 2) == [execute(3, 2, 2)]
    assert sim(PeerDisconnected(2, "connection reset")) == []  # b is busy: batch 1 waits
    assert sim.state.tasks[1].attempt == 1 and sim.state.tasks[1].worker is None
    assert sim.done(3, 2) == [batch_done(1, 2, "b"), execute(3, 1, 1, attempt=2)]
    # worker a comes back on a new connection and reports its old result: dropped
    assert sim.worker(4, "a") == []
    assert sim.done(4, 1, attempt=1) == []
    assert sim.state.stale_results == 1
    assert sim.done(3, 1, attempt=1) == []  # right worker, old attempt: also stale
    assert sim.state.stale_results == 2
    assert sim.done(3, 1, attempt=2) == [batch_done(1, 1, "b")]
    assert sim.state.tasks == {}


def test_requeued_batch_goes_to_the_front_of_its_call():
    sim = Sim()
    sim.client(1)
    sim.worker(2, "a", nthreads=2)
    assert sim.submit(1, 1) == [execute(2, 1, 1)]
    assert sim.submit(1, 2) == [execute(2, 2, 2)]
    assert sim.submit(1, 3) == []
    assert sim(PeerDisconnected(2, "killed")) == []
    assert list(sim.state.clients[1].calls[1].queue) == [1, 2, 3]
    assert sim.worker(3, "b", nthreads=1) == [execute(3, 1, 1, attempt=2)]


def test_duplicate_and_unknown_results_are_stale():
    sim = Sim()
    sim.client(1)
    sim.worker(2, "w")
    sim.submit(1, 1)
    assert sim.done(2, 1) == [batch_done(1, 1, "w")]
    assert sim.done(2, 1) == []
    assert sim.done(2, 999) == []
    assert sim.state.stale_results == 2
    assert sim.state.info()["stale_results"] == 2


def test_result_from_another_worker_is_stale():
    sim = Sim()
    sim.client(1)
    sim.worker(2, "a")
    sim.worker(3, "b")
    sim.submit(1, 1)  # runs on a
    assert sim.done(3, 1) == []
    assert sim.state.stale_results == 1
    assert sim.done(2, 1) == [batch_done(1, 1, "a")]


def test_batch_that_kills_max_deaths_workers_is_lost():
    sim = Sim(max_deaths=3)
    sim.client(1)
    assert sim.worker(10, "w10") == []
    assert sim.submit(1, 1, func="crashy_fit") == [execute(10, 1, 1, func="crashy_fit")]
    assert sim(PeerDisconnected(10, "segfault")) == []
    assert sim.worker(11, "w11") == [execute(11, 1, 1, attempt=2, func="crashy_fit")]
    assert sim(PeerDisconnected(11, "segfault")) == []
    assert sim.worker(12, "w12") == [execute(12, 1, 1, attempt=3, func="crashy_fit")]
    out = sim(PeerDisconnected(12, "segfault"))
    assert out == [
        Send(
            1,
            m.BatchDone(
                1, m.LOST, "w12", "batch of crashy_fit was running on 3 workers that died (last: w12); giving up after 3"
            ),
        )
    ]
    assert sim.state.tasks == {}
    assert sim.worker(13, "w13") == []  # nothing left to run


def test_max_deaths_one_fails_at_the_first_death_and_others_are_requeued():
    sim = Sim(max_deaths=1)
    sim.client(1)
    sim.worker(2, "a", nthreads=2)
    sim.worker(3, "b", nthreads=1)
    assert sim.submit(1, 1, func="f") == [execute(2, 1, 1, func="f")]
    out = sim(PeerDisconnected(2, "oom"))
    assert [type(c.message) for c in out] == [m.BatchDone]
    assert out[0].message.status == m.LOST and "f" in out[0].message.error


def test_deaths_count_per_batch_not_per_call():
    sim = Sim(max_deaths=2)
    sim.client(1)
    sim.worker(2, "a", nthreads=2)
    sim.submit(1, 1)
    sim.submit(1, 2)
    sim(PeerDisconnected(2, "x"))
    assert sim.worker(3, "b", nthreads=2) == [execute(3, 1, 1, attempt=2), execute(3, 2, 2, attempt=2)]
    assert sim.done(3, 1, attempt=2) == [batch_done(1, 1, "b")]
    out = sim(PeerDisconnected(3, "y"))
    assert out == [Send(1, m.BatchDone(2, m.LOST, "b", out[0].message.error))]
    assert "2 workers" in out[0].message.error


# -------------------------------------------------------------------- cancel


def test_client_disconnect_drops_queued_and_cancels_running():
    sim = Sim()
    sim.client(1)
    sim.client(2)
    sim.worker(3, "w", nthreads=2)
    assert sim.submit(1, 1) == [execute(3, 1, 1)]
    assert sim.submit(1, 2) == [execute(3, 2, 2)]
    assert sim.submit(1, 3) == []
    assert sim.submit(2, 50) == []
    assert sim(PeerDisconnected(1, "client gone")) == [Send(3, m.Cancel(1, 1)), Send(3, m.Cancel(2, 1))]
    assert 3 not in sim.state.tasks  # the queued batch is dropped
    assert 3 not in sim.state.free_workers  # both slots still busy: the threads are still running
    assert sim.done(3, 2, status=m.CANCELLED, frames=()) == [Send(3, m.Execute(4, 1, "fit", payload(50)))]
    assert sim.done(3, 1, status=m.CANCELLED, frames=()) == []
    assert 3 in sim.state.free_workers
    assert sim.state.stale_results == 0
    assert sim.done(3, 4) == [Send(2, m.BatchDone(50, m.OK, "w", "", result(4)))]


def test_cancelled_batch_result_is_dropped_even_if_it_finished_ok():
    sim = Sim()
    sim.client(1)
    sim.worker(2, "w")
    sim.submit(1, 1)
    assert sim.msg(1, m.CancelCall(1)) == [Send(2, m.Cancel(1, 1))]
    assert sim.done(2, 1, status=m.OK) == []  # raced the cancel: no BatchDone
    assert sim.state.tasks == {}


def test_cancel_call_only_touches_that_call():
    sim = Sim()
    sim.client(1)
    sim.worker(2, "w", nthreads=2)
    assert sim.submit(1, 1, call_id=1) == [execute(2, 1, 1)]
    assert sim.submit(1, 2, call_id=2) == [execute(2, 2, 2)]
    assert sim.submit(1, 3, call_id=1) == []
    assert sim.submit(1, 4, call_id=2) == []
    assert sim.msg(1, m.CancelCall(1)) == [Send(2, m.Cancel(1, 1))]
    assert sorted(sim.state.tasks) == [1, 2, 4]
    assert sim.done(2, 1, status=m.CANCELLED, frames=()) == [execute(2, 4, 4)]
    assert sim.done(2, 2) == [batch_done(1, 2, "w")]
    assert sim.done(2, 4) == [batch_done(1, 4, "w")]
    assert sim.state.tasks == {}


def test_cancel_of_unknown_call_is_a_no_op():
    sim = Sim()
    sim.client(1)
    assert sim.msg(1, m.CancelCall(42)) == []


def test_cancel_call_with_only_queued_batches():
    sim = Sim()
    sim.client(1)
    sim.submit(1, 1)
    sim.submit(1, 2)
    assert sim.msg(1, m.CancelCall(1)) == []
    assert sim.state.tasks == {} and not sim.state.share
    assert sim.worker(2, "w") == []


def test_worker_dying_with_a_cancelled_batch_does_not_requeue_it():
    sim = Sim()
    sim.client(1)
    sim.worker(2, "a")
    sim.worker(3, "b")
    sim.submit(1, 1)
    sim.msg(1, m.CancelCall(1))
    assert sim(PeerDisconnected(2, "died")) == []
    assert sim.state.tasks == {}


def test_a_call_id_reused_after_cancel_is_a_fresh_call():
    """The late CANCELLED report of the old call's batch must not touch the new call's records."""
    sim = Sim()
    sim.client(1)
    sim.worker(2, "w")
    assert sim.submit(1, 1, call_id=1) == [execute(2, 1, 1)]
    assert sim.msg(1, m.CancelCall(1)) == [Send(2, m.Cancel(1, 1))]
    assert sim.submit(1, 2, call_id=1) == []  # the only slot is still busy with the cancelled batch
    assert sim.done(2, 1, status=m.CANCELLED, frames=()) == [execute(2, 2, 2)]
    assert sim.done(2, 2) == [batch_done(1, 2, "w")]
    assert sim.state.tasks == {}


# ------------------------------------------------------------- worker status


def test_paused_worker_takes_no_new_batches_until_it_resumes():
    sim = Sim()
    sim.client(1)
    sim.worker(2, "w", nthreads=2)
    assert sim.submit(1, 1) == [execute(2, 1, 1)]
    assert sim.msg(2, m.WorkerStatus(m.PAUSED)) == []
    assert 2 not in sim.state.free_workers
    assert sim.submit(1, 2) == []  # a slot is free, but the worker is over its memory mark
    assert sim.done(2, 1) == [batch_done(1, 1, "w")]  # its running batch still completes
    assert sim.state.info()["workers"]["tcp://10.0.1.2:41000"]["status"] == m.PAUSED
    assert sim.msg(2, m.WorkerStatus(m.RUNNING)) == [execute(2, 2, 2)]


def test_paused_worker_is_skipped_in_favour_of_a_running_one():
    sim = Sim()
    sim.client(1)
    sim.worker(2, "a")
    sim.worker(3, "b")
    sim.msg(2, m.WorkerStatus(m.PAUSED))
    assert sim.submit(1, 1) == [execute(3, 1, 1)]
    assert sim.submit(1, 2) == []


def test_a_paused_worker_gives_back_the_data_no_batch_of_its_own_needs():
    sim = data_cluster()
    for key in ("X", "Y"):
        sim.msg(1, m.DataRegister(key, 10))
        sim.msg(2, m.NeedData(key))
        sim.msg(1, m.DataUpload(key, frames=(b"x",)))
        sim.msg(2, m.DataStored(key, 10))
    assert sim.msg(1, m.SubmitBatch(1, 1, "fit", 0, payload(1), ["X"])) == [
        Send(2, m.Execute(1, 1, "fit", payload(1), ["X"]))]
    assert sim.msg(2, m.WorkerStatus(m.PAUSED)) == [Send(2, m.DeleteData(["Y"]))]  # X: its running batch's
    assert sim.state.data.holders_of("Y") == {} and list(sim.state.data.holders_of("X")) == [2]
    assert any(e["kind"] == "data-shed" and "dropped" in e["text"] for e in sim.state.events)
    # a later batch needing Y goes to the running worker, which asks the owner again
    assert sim.msg(1, m.SubmitBatch(1, 2, "fit", 0, payload(2), ["Y"])) == [
        Send(3, m.Execute(2, 1, "fit", payload(2), ["Y"]))]
    assert sim.msg(3, m.NeedData("Y")) == [Send(1, m.UploadRequest("Y"))]
    # once its own batch is done, X goes too
    assert sim.done(2, 1)[0] == Send(2, m.DeleteData(["X"]))
    assert sim.state.data.held[2] == {}


def test_retiring_is_final_and_its_exit_is_no_death():
    sim = Sim(max_deaths=1)
    sim.client(1)
    sim.worker(2, "old")
    assert sim.submit(1, 1) == [execute(2, 1, 1)]
    assert sim.msg(2, m.WorkerStatus(m.RETIRING)) == []
    assert sim.msg(2, m.WorkerStatus(m.RUNNING)) == []  # retiring cannot be undone
    assert sim.msg(2, m.WorkerStatus(m.PAUSED)) == []
    assert sim.state.workers[2].status == m.RETIRING
    assert sim.submit(1, 2) == []
    assert sim(PeerDisconnected(2, "drain timed out")) == []  # requeued, not LOST despite max_deaths=1
    assert sim.state.tasks[1].deaths == 0
    assert sim.worker(3, "new", nthreads=2) == [execute(3, 1, 1, attempt=2), execute(3, 2, 2)]


def test_retiring_worker_finishes_its_running_batches():
    sim = Sim()
    sim.client(1)
    sim.worker(2, "w", nthreads=2)
    sim.submit(1, 1)
    sim.msg(2, m.WorkerStatus(m.RETIRING))
    assert sim.done(2, 1) == [batch_done(1, 1, "w")]
    assert 2 not in sim.state.free_workers


def test_invalid_worker_status_closes_the_worker():
    sim = Sim()
    sim.client(1)
    sim.worker(2, "a")
    sim.worker(3, "b")
    sim.submit(1, 1)
    assert sim.msg(2, m.WorkerStatus("sleepy")) == [
        Close(2, "invalid worker status 'sleepy'"),
        execute(3, 1, 1, attempt=2),
    ]
    assert list(sim.state.workers) == [3]


def test_worker_status_from_a_client_is_refused():
    sim = Sim()
    sim.client(1)
    assert sim.msg(1, m.WorkerStatus(m.PAUSED)) == [Close(1, "unexpected 'worker-status' from a client")]


def test_last_words_of_a_dying_worker_are_in_the_lost_reason():
    sim = Sim(max_deaths=1)
    sim.client(1)
    sim.worker(2, "w")
    sim.submit(1, 1, func="big_fit")
    assert sim.msg(2, m.Closing("exceeded its memory limit (900 MiB > 512 MiB)")) == []
    assert sim(PeerDisconnected(2, "closed")) == [
        Send(
            1,
            m.BatchDone(
                1,
                m.LOST,
                "w",
                "batch of big_fit was running on 1 workers that died "
                "(last: w: exceeded its memory limit (900 MiB > 512 MiB)); giving up after 1",
            ),
        )
    ]


# ----------------------------------------------------------- scattered data


def data_cluster() -> Sim:
    sim = Sim()
    sim.client(1)
    sim.worker(2, "a", nthreads=2, data_address="tcp://10.0.1.2:9000")
    sim.worker(3, "b", nthreads=2, data_address="tcp://10.0.1.3:9000")
    return sim


def test_scatter_flow_owner_uploads_once_then_peer_to_peer():
    sim = data_cluster()
    assert sim.msg(1, m.DataRegister("X", 1000)) == []
    assert sim.msg(2, m.NeedData("X")) == [Send(1, m.UploadRequest("X"))]
    assert sim.msg(3, m.NeedData("X")) == []  # an upload is already under way
    assert sim.msg(1, m.DataUpload("X", frames=(b"pickled X",))) == [Send(2, m.StoreData("X", frames=(b"pickled X",)))]
    assert sim.msg(2, m.DataStored("X", 1000)) == [Send(3, m.DataSources("X", ["tcp://10.0.1.2:9000"]))]
    assert sim.msg(3, m.DataStored("X", 1000)) == []
    info = sim.state.info()
    assert info["data_keys"] == 1
    assert [(w["data_keys"], w["data_bytes"]) for w in info["workers"].values()] == [(1, 1000), (1, 1000)]
    # a third worker is pointed at both holders, no upload
    sim.worker(4, "c", data_address="tcp://10.0.1.4:9000")
    assert sim.msg(4, m.NeedData("X")) == [Send(4, m.DataSources("X", ["tcp://10.0.1.2:9000", "tcp://10.0.1.3:9000"]))]


def test_peers_failing_falls_back_to_the_owner():
    sim = data_cluster()
    sim.msg(1, m.DataRegister("X", 10))
    sim.msg(2, m.NeedData("X"))
    sim.msg(1, m.DataUpload("X", frames=(b"x",)))
    sim.msg(2, m.DataStored("X", 10))
    assert sim.msg(3, m.NeedData("X")) == [Send(3, m.DataSources("X", ["tcp://10.0.1.2:9000"]))]
    assert sim.msg(3, m.NeedData("X", from_owner=True)) == [Send(1, m.UploadRequest("X"))]
    assert sim.msg(1, m.DataUpload("X", frames=(b"x",))) == [Send(3, m.StoreData("X", frames=(b"x",)))]


def test_holder_without_data_address_cannot_serve_peers():
    sim = Sim()
    sim.client(1)
    sim.worker(2, "a", data_address="")
    sim.worker(3, "b", data_address="tcp://10.0.1.3:9000")
    sim.msg(1, m.DataRegister("X", 10))
    sim.msg(2, m.NeedData("X"))
    sim.msg(3, m.NeedData("X"))
    sim.msg(1, m.DataUpload("X", frames=(b"x",)))
    assert sim.msg(2, m.DataStored("X", 10)) == [Send(1, m.UploadRequest("X"))]  # b needs the owner's copy
    assert sim.msg(1, m.DataUpload("X", frames=(b"x",))) == [Send(3, m.StoreData("X", frames=(b"x",)))]


def test_batches_prefer_a_worker_that_holds_their_data():
    sim = data_cluster()
    sim.msg(1, m.DataRegister("X", 10))
    sim.msg(3, m.NeedData("X"))
    sim.msg(1, m.DataUpload("X", frames=(b"x",)))
    sim.msg(3, m.DataStored("X", 10))
    assert list(sim.state.free_workers) == [2, 3]
    assert sim.msg(1, m.SubmitBatch(1, 1, "fit", 0, payload(1), ["X"])) == [
        Send(3, m.Execute(1, 1, "fit", payload(1), ["X"]))  # b holds X, although a is first in line
    ]
    assert sim.submit(1, 2) == [execute(2, 2, 2)]  # no data: plain round robin


def test_need_for_an_unknown_key():
    sim = data_cluster()
    assert sim.msg(2, m.NeedData("nope")) == [
        Send(2, m.DataMissing("nope", "data 'nope' is not available: its client released it or disconnected"))
    ]


def test_release_deletes_copies_and_tells_waiters():
    sim = data_cluster()
    sim.msg(1, m.DataRegister("X", 10))
    sim.msg(2, m.NeedData("X"))
    sim.msg(1, m.DataUpload("X", frames=(b"x",)))
    sim.msg(2, m.DataStored("X", 10))
    sim.msg(1, m.DataRegister("Y", 10))
    sim.msg(3, m.NeedData("Y"))
    assert sim.msg(1, m.ReleaseData(["X", "Y", "unknown"])) == [
        Send(3, m.DataMissing("Y", "data 'Y' was released by its client")),
        Send(2, m.DeleteData(["X"])),
    ]
    assert sim.state.data.records == {}
    assert sim.state.info()["data_keys"] == 0


def test_stored_after_release_is_deleted():
    sim = data_cluster()
    sim.msg(1, m.DataRegister("X", 10))
    sim.msg(2, m.NeedData("X"))
    sim.msg(1, m.DataUpload("X", frames=(b"x",)))
    sim.msg(1, m.ReleaseData(["X"]))
    assert sim.msg(2, m.DataStored("X", 10)) == [Send(2, m.DeleteData(["X"]))]


def test_client_disconnect_frees_its_data():
    sim = data_cluster()
    sim.client(4)
    sim.msg(1, m.DataRegister("X", 10))
    sim.msg(4, m.DataRegister("Z", 10))
    sim.msg(2, m.NeedData("X"))
    sim.msg(1, m.DataUpload("X", frames=(b"x",)))
    sim.msg(2, m.DataStored("X", 10))
    assert sim(PeerDisconnected(1, "gone")) == [Send(2, m.DeleteData(["X"]))]
    assert list(sim.state.data.records) == ["Z"]


def test_another_clients_key_is_refused():
    sim = data_cluster()
    sim.client(4)
    sim.msg(1, m.DataRegister("X", 10))
    assert sim.msg(4, m.DataRegister("X", 10)) == [Close(4, "data key 'X' belongs to another client")]
    assert sim.state.data.records["X"].owner == 1
    assert sim.msg(1, m.DataRegister("X", 10)) == []  # the owner may register it again


@pytest.mark.parametrize("key", ["", "k" * 201])
def test_bad_data_key_closes_the_client(key):
    sim = data_cluster()
    assert sim.msg(1, m.DataRegister(key, 10)) == [Close(1, "data key must be 1 to 200 characters")]
    assert sim.state.clients == {}


def test_upload_from_a_non_owner_is_ignored():
    sim = data_cluster()
    sim.client(4)
    sim.msg(1, m.DataRegister("X", 10))
    sim.msg(2, m.NeedData("X"))
    assert sim.msg(4, m.DataUpload("X", frames=(b"forged",))) == []
    assert sim.msg(1, m.DataUpload("X", frames=(b"x",))) == [Send(2, m.StoreData("X", frames=(b"x",)))]


def test_broadcast_sends_to_every_worker_through_one_upload():
    sim = data_cluster()
    assert sim.msg(1, m.DataRegister("X", 10, broadcast=True)) == [Send(1, m.UploadRequest("X"))]
    assert sim.msg(1, m.DataUpload("X", frames=(b"x",))) == [Send(2, m.StoreData("X", frames=(b"x",)))]
    assert sim.msg(2, m.DataStored("X", 10)) == [Send(3, m.DataSources("X", ["tcp://10.0.1.2:9000"]))]


def test_worker_leaving_during_an_upload_passes_it_to_the_next_waiter():
    sim = data_cluster()
    sim.msg(1, m.DataRegister("X", 10))
    sim.msg(2, m.NeedData("X"))
    sim.msg(3, m.NeedData("X"))
    assert sim(PeerDisconnected(2, "died")) == [Send(1, m.UploadRequest("X"))]
    assert sim.msg(1, m.DataUpload("X", frames=(b"x",))) == [Send(3, m.StoreData("X", frames=(b"x",)))]


def test_worker_that_lost_its_copy_is_no_longer_a_holder():
    sim = data_cluster()
    sim.msg(1, m.DataRegister("X", 10))
    sim.msg(2, m.NeedData("X"))
    sim.msg(1, m.DataUpload("X", frames=(b"x",)))
    sim.msg(2, m.DataStored("X", 10))
    assert sim.msg(2, m.NeedData("X")) == [Send(1, m.UploadRequest("X"))]
    assert 2 not in sim.state.data.records["X"].holders


def test_data_messages_from_the_wrong_side_are_refused():
    sim = data_cluster()
    assert sim.msg(1, m.NeedData("X")) == [Close(1, "unexpected 'need-data' from a client")]
    assert sim.msg(2, m.DataRegister("X", 1)) == [Close(2, "unexpected 'data-register' from a worker")]


# ---------------------------------------------------------------------- time


def test_heartbeat_timeout_closes_the_silent_worker_and_requeues():
    sim = Sim(heartbeat_timeout=30.0)
    sim(Ticked(100.0))
    sim.client(1)
    sim.worker(2, "quiet")
    sim.worker(3, "chatty")
    assert sim.submit(1, 1) == [execute(2, 1, 1)]
    sim(Ticked(120.0))
    assert sim.msg(3, m.Heartbeat(12345)) == []
    assert sim(Ticked(130.0)) == []  # exactly the timeout: not yet
    assert sim(Ticked(130.5)) == [Close(2, "no heartbeat for 30 s"), execute(3, 1, 1, attempt=2)]
    assert list(sim.state.workers) == [3]
    assert sim(PeerDisconnected(2, "closed")) == []
    assert sim.done(3, 1, attempt=2) == [batch_done(1, 1, "chatty")]


def test_any_message_from_a_worker_counts_as_a_sign_of_life():
    sim = Sim(heartbeat_timeout=10.0)
    sim.client(1)
    sim.worker(2, "w")
    sim.submit(1, 1)
    sim(Ticked(8.0))
    assert sim.done(2, 1) == [batch_done(1, 1, "w")]
    assert sim(Ticked(15.0)) == []
    assert sim(Ticked(18.5)) == [Close(2, "no heartbeat for 10 s")]


def test_heartbeat_updates_memory_in_info():
    sim = Sim()
    sim.worker(2, "w")
    assert sim.msg(2, m.Heartbeat(777)) == []
    assert sim.state.info()["workers"]["tcp://10.0.1.2:41000"]["memory"] == 777


def test_no_worker_timeout_fails_queued_batches():
    sim = Sim(no_worker_timeout=60.0)
    sim(Ticked(5.0))
    sim.client(1)
    assert sim.submit(1, 1) == []
    sim(Ticked(20.0))
    assert sim.submit(1, 2) == []
    assert sim(Ticked(64.9)) == []
    reason = "no worker connected to the scheduler within 60 s"
    assert sim(Ticked(65.0)) == [Send(1, m.BatchDone(1, m.NO_WORKERS, "", reason))]
    assert sim(Ticked(80.0)) == [Send(1, m.BatchDone(2, m.NO_WORKERS, "", reason))]
    assert sim.state.tasks == {} and not sim.state.share


def test_no_worker_timeout_does_not_apply_while_workers_are_busy():
    sim = Sim(no_worker_timeout=60.0, heartbeat_timeout=1e9)
    sim.client(1)
    sim.worker(2, "w")
    sim.submit(1, 1)
    sim.submit(1, 2)
    assert sim(Ticked(1000.0)) == []
    assert sim.state.info()["queued"] == 1


def test_no_worker_timeout_counts_from_when_the_last_worker_left():
    """A worker restarting (memory limit, supervisor) leaves the cluster empty for a moment: the
    batches that were queued behind it for minutes must not fail at the next tick."""
    sim = Sim(no_worker_timeout=60.0, heartbeat_timeout=1e9)
    sim(Ticked(0.0))
    sim.client(1)
    sim.worker(2, "w")
    assert sim.submit(1, 1, call_id=1) == [execute(2, 1, 1)]
    assert sim.submit(1, 2, call_id=2) == []  # queued at t=0 behind a long batch
    sim(Ticked(100.0))
    assert sim(PeerDisconnected(2, "restarting")) == []
    assert sim(Ticked(100.25)) == []  # no worker for 0.25 s, not 60 s
    executes = sim.worker(3, "w", nthreads=2)  # calls take turns: either order is fair
    assert sorted(executes, key=lambda c: c.message.task_id) == [execute(3, 1, 1, attempt=2), execute(3, 2, 2)]


def test_no_worker_timeout_after_a_paused_worker_restarts():
    sim = Sim(no_worker_timeout=60.0, heartbeat_timeout=1e9)
    sim.client(1)
    sim.worker(2, "w")
    sim.msg(2, m.WorkerStatus(m.PAUSED))  # over its memory mark
    assert sim.submit(1, 1) == []
    sim(Ticked(300.0))
    assert sim(PeerDisconnected(2, "exceeded its memory limit")) == []  # the supervisor restarts it
    assert sim(Ticked(300.25)) == []
    assert [c.message.status for c in sim(Ticked(360.25))] == [m.NO_WORKERS]  # a minute with no worker


def test_no_worker_timeout_counts_from_the_requeue():
    sim = Sim(no_worker_timeout=60.0, heartbeat_timeout=1e9)
    sim.client(1)
    sim.worker(2, "w")
    sim.submit(1, 1)
    sim(Ticked(100.0))
    assert sim(PeerDisconnected(2, "gone")) == []
    assert sim(Ticked(159.0)) == []
    assert [c.message.status for c in sim(Ticked(160.0))] == [m.NO_WORKERS]


# ---------------------------------------------------------------------- info


def test_info_content_and_info_request_from_either_side():
    sim = Sim(address="tcp://10.0.0.1:8686")
    sim.client(1)
    sim.worker(2, "w", nthreads=2)
    sim.submit(1, 1)
    sim.submit(1, 2)
    sim.submit(1, 3)
    sim.msg(2, m.Heartbeat(5000))
    info = sim.state.info()
    expected_top = {
        "address": "tcp://10.0.0.1:8686",
        "clients": 1,
        "queued": 1,
        "tasks": 3,
        "stale_results": 0,
        "data_keys": 0,
    }
    assert {k: info[k] for k in expected_top} == expected_top
    assert list(info["workers"]) == ["tcp://10.0.1.2:41000"]
    expected_worker = {
        "name": "w",
        "address": "tcp://10.0.1.2:41000",
        "host": "node2",
        "pid": 2002,
        "nthreads": 2,
        "running": 2,
        "completed": 0,
        "memory": 5000,
        "memory_limit": 2**30,
        "status": "running",
        "data_keys": 0,
        "data_bytes": 0,
    }
    worker_info = info["workers"]["tcp://10.0.1.2:41000"]
    assert {k: worker_info[k] for k in expected_worker} == expected_worker
    assert sim.msg(1, m.InfoRequest(9)) == [Send(1, m.InfoReply(9, sim.state.info()))]
    assert sim.msg(2, m.InfoRequest(10)) == [Send(2, m.InfoReply(10, sim.state.info()))]
    # and the reply survives the wire
    reply = m.InfoReply(9, sim.state.info())
    from jobsched.protocol import FrameDecoder

    (frame,) = FrameDecoder().feed(b"".join(bytes(p) for p in m.encode(reply)))
    assert m.decode(frame) == reply


def test_counters_and_events_for_people():
    sim = Sim(max_deaths=1, heartbeat_timeout=1e9)
    sim(Ticked(10.0))
    sim.client(1, "alice")
    sim.worker(2, "a", nthreads=2)
    sim.worker(3, "b")
    assert sim.submit(1, 1, func="fit") == [execute(2, 1, 1, func="fit")]
    assert sim.submit(1, 2, func="fit") == [execute(3, 2, 2, func="fit")]
    assert sim.submit(1, 3, func="fit") == [execute(2, 3, 3, func="fit")]
    sim.done(2, 1)
    sim.done(2, 3, status=m.ERROR)
    sim.msg(3, m.Closing("killed by the OOM killer"))
    lost = sim(PeerDisconnected(3, "reset"))
    assert [c.message.status for c in lost] == [m.LOST]
    info = sim.state.info()
    assert info["counters"] == {
        "workers_joined": 2,
        "submitted": 3,
        "done:ok": 1,
        "done:error": 1,
        "worker_deaths": 1,
        "done:lost": 1,
    }
    assert info["running"] == 0 and info["slots"] == 2
    assert [(e["kind"], e["time"]) for e in info["events"]] == [
        ("client-connected", 10.0),
        ("worker-joined", 10.0),
        ("worker-joined", 10.0),
        ("batch-error", 10.0),
        ("worker-died", 10.0),
        ("batch-lost", 10.0),
    ]
    texts = [e["text"] for e in info["events"]]
    assert "alice" in texts[0]
    assert texts[1] == "a (2 threads, node2 pid 2002)"
    assert "fit" in texts[3] and "a" in texts[3]
    assert texts[4] == "b with 1 batches running: killed by the OOM killer"
    assert texts[5] == lost[0].message.error
    assert sim.state.event_seq == 6


def test_retiring_worker_leaves_without_a_death_event():
    sim = Sim()
    sim.worker(2, "old")
    sim.msg(2, m.WorkerStatus(m.RETIRING))
    sim(PeerDisconnected(2, "drained"))
    assert sim.state.events[-1]["kind"] == "worker-left"
    assert sim.state.events[-1]["text"] == "old: drained"
    assert "worker_deaths" not in sim.state.counters


def test_client_left_event_counts_dropped_batches_and_requeues_are_counted():
    sim = Sim(heartbeat_timeout=1e9)
    sim.client(1, "bob")
    sim.worker(2, "a")
    sim.submit(1, 1)
    sim.submit(1, 2)
    sim(PeerDisconnected(2, "x"))
    assert sim.state.counters["requeued"] == 1
    sim(PeerDisconnected(1, "laptop closed"))
    assert sim.state.events[-1] == {"time": 0.0, "kind": "client-left", "text": "bob of ann: laptop closed; dropped 2 batches",
                                    "user": "ann"}


def test_event_log_is_bounded():
    sim = Sim()
    for conn in range(1, 251):
        sim.worker(conn, f"w{conn}")
    assert len(sim.state.events) == 100
    assert sim.state.event_seq == 250
    assert sim.state.events[-1]["text"].startswith("w250 ")


def test_info_reply_stays_within_the_frame_caps_whatever_peers_call_themselves():
    """Names come from peers; echoed into every InfoReply (events, worker table) they must not
    push the reply over ``FrameLimits.max_body``, or every status request would be refused."""
    from jobsched.protocol import FrameLimits

    sim = Sim()
    for conn in range(1, 21):
        sim(PeerConnected(conn, f"tcp://10.0.0.{conn}:1", CLIENT, "ann", True))
        sim.msg(conn, m.RegisterClient("n" * 2**20, conn, "h" * 2**10))
        sim(PeerDisconnected(conn, "bye"))
    sim.worker(50, "w" * 2**20)
    sim.client(100)
    (reply,) = sim.msg(100, m.InfoRequest(1))
    body = m.encode(reply.message)[1]
    assert len(body) <= FrameLimits().max_body


# --------------------------------------------------------------- determinism


def scripted(sim: Sim) -> None:
    sim(Ticked(1.0))
    sim.client(1)
    sim.client(2)
    sim.worker(3, "a", nthreads=2)
    sim.worker(4, "b", nthreads=1)
    for b in range(1, 8):
        sim.submit(1 + b % 2, b, call_id=b % 3, max_running=2)
    sim.done(3, 1)
    sim(PeerDisconnected(4, "x"))
    sim.msg(1, m.CancelCall(1))
    sim.worker(5, "c", nthreads=3)
    sim(Ticked(50.0))
    sim(PeerDisconnected(2, "y"))
    for task_id in range(1, 10):
        for conn in (3, 5):
            for attempt in (1, 2):
                sim.done(conn, task_id, attempt=attempt)


def test_same_events_give_the_same_commands():
    first, second = Sim(heartbeat_timeout=1e9), Sim(heartbeat_timeout=1e9)
    scripted(first)
    scripted(second)
    assert first.log == second.log
    kinds = {type(c.message) for _, out in first.log for c in out if type(c) is Send}
    assert {m.Execute, m.Cancel, m.BatchDone} <= kinds  # the script exercised scheduling


# ----------------------------------------------------------- random sequences


@dataclass
class ClientModel:
    outstanding: dict = field(default_factory=dict)  # batch_id -> call_id
    call_id: int = 1


@dataclass
class WorkerModel:
    name: str
    nthreads: int
    data_address: str
    tasks: dict = field(default_factory=dict)  # (task_id, attempt) -> cancelled
    status: str = m.RUNNING
    incoming: dict = field(default_factory=dict)  # data keys it was sent or pointed to -> None


KEYS = ["K1", "K2", "K3"]
ACTIONS = ["client", "worker", "worker", "submit", "submit", "submit", "finish", "finish", "finish", "stale", "cancel",
           "newcall", "disconnect", "tick", "tick", "silence", "heartbeat", "info", "junk", "status", "lastwords",
           "register", "register", "need", "need", "need", "upload", "upload", "stored", "stored", "stored",
           "release"]  # fmt: skip


class World:
    """Drives a SchedulerState like the server would, and checks every command against a model."""

    def __init__(self, reuse_call_ids: bool) -> None:
        self.reuse = reuse_call_ids
        self.sim = Sim(heartbeat_timeout=30.0, no_worker_timeout=60.0, max_deaths=2)
        self.state = self.sim.state
        self.now = 0.0
        self.next_conn = 1
        self.next_batch = 1
        self.pending: dict[int, tuple] = {}  # registration sent: conn -> ("worker", name, n, address) | ("client",)
        self.clients: dict[int, ClientModel] = {}
        self.workers: dict[int, WorkerModel] = {}
        self.keys: dict[str, int] = {}  # data key -> owning client
        self.asked: dict[str, None] = {}  # keys whose owner was asked for an upload
        self.attempts: dict[int, int] = {}

    @staticmethod
    def pick(seq, n):
        seq = list(seq)
        return seq[n % len(seq)] if seq else None

    def forget(self, conn: int) -> None:
        self.clients.pop(conn, None)
        self.workers.pop(conn, None)
        self.pending.pop(conn, None)
        self.keys = {k: owner for k, owner in self.keys.items() if owner != conn}

    def step(self, event) -> list:
        out = self.sim(event)
        closed: list[int] = []
        for cmd in out:
            assert cmd.conn not in closed, f"{cmd} after Close"
            if type(cmd) is Close:
                assert cmd.conn in self.clients or cmd.conn in self.workers or cmd.conn in self.pending, cmd
                self.forget(cmd.conn)
                closed.append(cmd.conn)
                continue
            msg = cmd.message
            kind = type(msg)
            if kind is m.Welcome:
                reg = self.pending.pop(cmd.conn)
                if reg[0] == "client":
                    self.clients[cmd.conn] = ClientModel()
                else:
                    self.workers[cmd.conn] = WorkerModel(reg[1], reg[2], reg[3])
            elif kind is m.Execute:
                worker = self.workers[cmd.conn]
                assert worker.status == m.RUNNING, "a paused or retiring worker got a batch"
                key = (msg.task_id, msg.attempt)
                assert msg.attempt == self.attempts.get(msg.task_id, 0) + 1
                self.attempts[msg.task_id] = msg.attempt
                worker.tasks[key] = False
                assert len(worker.tasks) <= worker.nthreads
            elif kind is m.Cancel:
                worker = self.workers[cmd.conn]
                assert worker.tasks[(msg.task_id, msg.attempt)] is False
                worker.tasks[(msg.task_id, msg.attempt)] = True
            elif kind is m.BatchDone:
                client = self.clients[cmd.conn]
                assert msg.batch_id in client.outstanding, (msg, client)
                del client.outstanding[msg.batch_id]
                assert msg.status in (m.OK, m.ERROR, m.LOST, m.NO_WORKERS, m.FAILED)
            elif kind is m.UploadRequest:
                assert self.keys.get(msg.key) == cmd.conn, "upload asked of a client that does not own the key"
                self.asked[msg.key] = None
            elif kind in (m.StoreData, m.DataSources):
                worker = self.workers[cmd.conn]
                if kind is m.DataSources:
                    live = {w.data_address for c, w in self.workers.items() if c != cmd.conn}
                    assert msg.addresses and set(msg.addresses) <= live, (msg, live)
                worker.incoming[msg.key] = None
            elif kind in (m.DataMissing, m.DeleteData):
                assert cmd.conn in self.workers
            else:
                assert kind is m.InfoReply, msg
        for conn in closed:  # the server closes the transport, then reports it
            assert self.step(PeerDisconnected(conn, "closed")) == []
        return out

    def act(self, action: str, n: int) -> None:
        if action == "client":
            conn, self.next_conn = self.next_conn, self.next_conn + 1
            self.step(PeerConnected(conn, f"tcp://c{conn}:1", CLIENT, "ann", True))
            self.pending[conn] = ("client",)
            assert self.step(MessageReceived(conn, m.RegisterClient("c"))) == [Send(conn, m.Welcome(f"client-{conn}", HB))]
        elif action == "worker":
            conn, self.next_conn = self.next_conn, self.next_conn + 1
            nthreads = 0 if n % 10 == 1 else n % 3 + 1
            taken = [w.name for w in self.workers.values()]
            name = self.pick(taken, n) if n % 10 == 0 and taken else f"w{conn}"
            address = "" if n % 4 == 3 else f"tcp://w{conn}:9"
            refused = nthreads < 1 or name in taken
            self.step(PeerConnected(conn, f"tcp://w{conn}:1", WORKER, "root", True))
            self.pending[conn] = ("worker", name, nthreads, address)
            out = self.step(MessageReceived(conn, m.RegisterWorker(name, nthreads, 0, "", 0, address)))
            assert (type(out[0]) is Close) == refused
        elif action == "submit" and self.clients:
            conn = self.pick(self.clients, n)
            client = self.clients[conn]
            call_id = n // 7 % 2 + 1 if self.reuse else client.call_id
            batch_id, self.next_batch = self.next_batch, self.next_batch + 1
            client.outstanding[batch_id] = call_id
            keys = [KEYS[n % 3]] if n % 5 == 0 else []
            self.step(MessageReceived(conn, m.SubmitBatch(batch_id, call_id, "f", n // 3 % 3, payload(batch_id), keys)))
        elif action == "finish":
            busy = [(c, k) for c, w in self.workers.items() for k in w.tasks]
            if busy:
                conn, key = self.pick(busy, n)
                cancelled = self.workers[conn].tasks.pop(key)
                status = m.CANCELLED if cancelled else [m.OK, m.ERROR][n % 2]
                self.step(MessageReceived(conn, m.TaskDone(key[0], key[1], status, 0.1, () if cancelled else (b"r",))))
        elif action == "stale" and self.workers:
            conn = self.pick(self.workers, n)
            key = (n % 7 + 1, n // 7 % 3 + 1)
            if key not in self.workers[conn].tasks:
                before = self.state.stale_results
                assert self.step(MessageReceived(conn, m.TaskDone(key[0], key[1], m.OK))) == []
                assert self.state.stale_results == before + 1
        elif action in ("cancel", "newcall") and self.clients:
            conn = self.pick(self.clients, n)
            client = self.clients[conn]
            call_id = n // 7 % 2 + 1 if self.reuse else client.call_id
            if action == "cancel":
                client.outstanding = {b: c for b, c in client.outstanding.items() if c != call_id}
                self.step(MessageReceived(conn, m.CancelCall(call_id)))
            client.call_id += 1
        elif action == "disconnect" and (self.clients or self.workers):
            conn = self.pick([*self.clients, *self.workers], n)
            self.forget(conn)
            self.step(PeerDisconnected(conn, "gone"))
        elif action == "tick":  # time passes; the workers that are alive send heartbeats
            for conn in list(self.workers):
                assert self.step(MessageReceived(conn, m.Heartbeat(n))) == []
            self.now += [0.5, 5.0, 20.0][n % 3]
            self.step(Ticked(self.now))
        elif action == "silence":  # a long silence: heartbeat and no-worker timeouts fire
            self.now += [31.0, 61.0][n % 2]
            self.step(Ticked(self.now))
        elif action == "heartbeat" and self.workers:
            assert self.step(MessageReceived(self.pick(self.workers, n), m.Heartbeat(n))) == []
        elif action == "status" and self.workers:
            conn = self.pick(self.workers, n)
            status = [m.RUNNING, m.PAUSED, m.RETIRING][n % 3]
            if self.workers[conn].status != m.RETIRING:
                self.workers[conn].status = status
            self.step(MessageReceived(conn, m.WorkerStatus(status)))
        elif action == "lastwords" and self.workers:
            assert self.step(MessageReceived(self.pick(self.workers, n), m.Closing("out of memory"))) == []
        elif action == "info" and (self.clients or self.workers):
            conn = self.pick([*self.clients, *self.workers], n)
            assert self.step(MessageReceived(conn, m.InfoRequest(n))) == [Send(conn, m.InfoReply(n, self.state.info()))]
        elif action == "junk" and (self.clients or self.workers):
            conn = self.pick([*self.clients, *self.workers], n)
            assert [type(c) for c in self.step(MessageReceived(conn, m.Welcome("junk")))][:1] == [Close]
        elif action == "register" and self.clients:
            conn, key = self.pick(self.clients, n), KEYS[n % 3]
            owner = self.keys.setdefault(key, conn)
            out = self.step(MessageReceived(conn, m.DataRegister(key, n, broadcast=n % 4 == 0)))
            assert (out[:1] == [Close(conn, f"data key {key!r} belongs to another client")]) == (owner != conn)
        elif action == "need" and self.workers:
            conn = self.pick(self.workers, n)
            key = self.pick(sorted(self.keys), n // 3) if self.keys and n % 4 else KEYS[n % 3]
            self.workers[conn].incoming.pop(key, None)
            self.step(MessageReceived(conn, m.NeedData(key, from_owner=n % 3 == 0)))
        elif action == "upload" and self.keys:
            asked = [k for k in self.asked if k in self.keys]
            key = self.pick(asked, n) if asked and n % 4 else self.pick(sorted(self.keys), n)
            self.asked.pop(key, None)
            self.step(MessageReceived(self.keys[key], m.DataUpload(key, frames=(b"data",))))
        elif action == "stored":
            receiving = [(c, k) for c, w in self.workers.items() for k in w.incoming]
            if receiving:
                conn, key = self.pick(receiving, n)
                del self.workers[conn].incoming[key]
                self.step(MessageReceived(conn, m.DataStored(key, n)))
        elif action == "release" and self.keys:
            key = self.pick(sorted(self.keys), n)
            owner = self.keys.pop(key)
            self.step(MessageReceived(owner, m.ReleaseData([key])))

    def drain(self) -> None:
        """A fresh worker joins and every worker finishes everything: every batch must end."""
        self.act("tick", 0)
        conn, self.next_conn = self.next_conn, self.next_conn + 1
        self.step(PeerConnected(conn, "tcp://drain:1", WORKER, "root", True))
        self.pending[conn] = ("worker", "drain", 4, "tcp://drain:9")
        self.step(MessageReceived(conn, m.RegisterWorker("drain", 4, 0, "", 0, "tcp://drain:9")))
        for _ in range(10_000):
            busy = [(c, k) for c, w in self.workers.items() for k in w.tasks]
            if not busy:
                break
            self.act("finish", 0)
        for client in self.clients.values():
            assert client.outstanding == {}, "a batch never ended"
        assert self.state.tasks == {}
        assert all(not w.running for w in self.state.workers.values())
        assert set(self.state.free_workers) == {c for c, w in self.state.workers.items() if w.status == m.RUNNING}
        # every client that left took its data with it
        assert {r.owner for r in self.state.data.records.values()} <= set(self.clients)


action_lists = st.lists(st.tuples(st.sampled_from(ACTIONS), st.integers(0, 10_000)), min_size=20, max_size=150)


def run_world(actions, reuse: bool) -> World:
    world = World(reuse_call_ids=reuse)
    for action, n in actions:
        world.act(action, n)
    world.drain()
    return world


@pytest.mark.timeout(60)
@pytest.mark.parametrize("reuse", [False, True], ids=["call-ids-never-reused", "call-ids-reused-after-cancel"])
@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.reuse, Phase.generate],  # shrinking these long runs takes minutes
)
@given(actions=action_lists)
def test_random_sequences_keep_invariants_and_every_batch_ends(actions, reuse):
    """Any well-typed message sequence: with call ids never reused after a cancel (what
    jobsched.client does), and with a call id reused after CancelCall."""
    world = run_world(actions, reuse=reuse)
    again = run_world(actions, reuse=reuse)
    assert world.sim.log == again.sim.log  # deterministic
