"""The scheduler after a restart or a dropped link: batches named by ref are delivered once and
not rerun; liveness both ways; batches that only paused workers could run fail in time."""

from __future__ import annotations

from support import HB
from test_scheduler_state import Sim, payload

from jobsched.protocol import messages as m
from jobsched.scheduler.records import CLIENT, WORKER
from jobsched.scheduler.state import Close, MessageReceived, PeerConnected, PeerDisconnected, Send, Ticked

SESSION = "c0ffee"


def ref(batch_id: int) -> str:
    return f"{SESSION}/{batch_id}"


def client(sim: Sim, conn: int = 1, resumed: bool = False) -> None:
    sim(PeerConnected(conn, "tcp://10.0.0.1:40000", CLIENT, "ann", True))
    assert sim.msg(conn, m.RegisterClient("laptop", 1001, "laptop.lab", SESSION, resumed)) == [
        Send(conn, m.Welcome(f"client-{conn}", HB))
    ]


def worker(sim: Sim, conn: int, name: str, nthreads: int = 1, running: tuple[str, ...] = ()) -> list:
    sim(PeerConnected(conn, f"tcp://10.0.1.{conn}:41000", WORKER, "root", True))
    out = sim.msg(conn, m.RegisterWorker(name, nthreads, 2000 + conn, "node", 2**30, "", "", list(running)))
    assert out[0] == Send(conn, m.Welcome(name, HB))
    return out[1:]


def execute(wconn: int, task_id: int, batch_id: int, attempt: int = 1) -> Send:
    return Send(wconn, m.Execute(task_id, attempt, "fit", payload(batch_id), [], ref(batch_id)))


def recovered(batch_id: int, status: str = m.OK) -> m.Recovered:
    return m.Recovered(ref(batch_id), status, 0.5, (b"outcome-%d" % batch_id,))


def delivered(batch_id: int, worker: str, status: str = m.OK) -> Send:
    return Send(1, m.BatchDone(batch_id, status, worker, "", (b"outcome-%d" % batch_id,)))


def test_execute_names_the_batch_by_session_and_batch_id():
    sim = Sim()
    client(sim)
    worker(sim, 2, "w")
    assert sim.submit(1, 7) == [execute(2, 1, 7)]


def test_task_ids_start_where_the_config_says():
    sim = Sim(first_task_id=1 << 40)
    client(sim)
    worker(sim, 2, "w")
    assert sim.submit(1, 1) == [execute(2, 1 << 40, 1)]


def test_an_outcome_from_before_is_delivered_when_the_batch_is_resubmitted():
    sim = Sim()
    worker(sim, 2, "w", nthreads=1)
    assert sim.msg(2, recovered(5)) == []  # finished while no scheduler was there
    client(sim)
    assert sim.submit(1, 5) == [delivered(5, "")]
    assert sim.state.tasks == {} and sim.state.recovered == {}
    assert sim.submit(1, 6) == [execute(2, 2, 6)]  # the slot was never taken by it


def test_a_batch_still_running_from_before_holds_its_slot_and_is_not_run_again():
    sim = Sim()
    worker(sim, 2, "w", nthreads=1, running=(ref(5),))
    client(sim)
    assert sim.submit(1, 5) == []  # adopted: it runs on w already
    assert sim.submit(1, 6) == []  # w's one slot is busy with it
    [task5] = [t for t in sim.state.tasks.values() if t.batch_id == 5]
    assert task5.adopted and task5.worker == 2
    assert sim.msg(2, recovered(5)) == [delivered(5, "w"), execute(2, 2, 6)]


def test_an_unclaimed_orphan_holds_its_slot_until_its_outcome_arrives():
    sim = Sim()
    worker(sim, 2, "w", nthreads=1, running=(ref(5),))
    client(sim)
    assert sim.submit(1, 9) == []
    assert sim.msg(2, m.Recovered("other-client/1", m.OK, 0.1, (b"x",))) == []
    assert sim.msg(2, m.Recovered(ref(5), m.OK, 0.1, (b"x",))) == [execute(2, 1, 9)]
    assert ref(5) in sim.state.recovered  # kept for a client that comes back later


def test_a_resubmission_that_arrives_first_waits_for_the_worker_that_still_runs_it():
    sim = Sim()
    client(sim)
    sim.submit(1, 5)  # queued: no worker yet
    assert worker(sim, 2, "w", nthreads=2, running=(ref(5),)) == []
    assert sim.msg(2, recovered(5)) == [delivered(5, "w")]


def test_a_worker_registering_with_a_queued_batch_still_running_adopts_it():
    sim = Sim()
    client(sim)
    sim.submit(1, 5)
    sim.submit(1, 6)
    worker(sim, 2, "w", nthreads=1, running=(ref(5),))  # 5 adopted: the slot is taken
    worker(sim, 3, "v", nthreads=1)
    assert sim.state.free_workers == {} and list(sim.state.tasks.values())[1].worker == 3


def test_the_first_outcome_wins_and_the_other_run_is_cancelled():
    sim = Sim()
    client(sim)
    worker(sim, 3, "v", nthreads=1)
    assert sim.submit(1, 5) == [execute(3, 1, 5)]  # run again before the old worker came back
    worker(sim, 2, "w", nthreads=1, running=(ref(5),))
    assert sim.msg(2, recovered(5)) == [Send(3, m.Cancel(1, 1)), delivered(5, "w")]
    assert sim.done(3, 1) == []  # the cancelled run's result is dropped
    assert sim.state.tasks == {}


def test_an_orphan_lost_with_its_worker_is_run_again():
    sim = Sim()
    worker(sim, 2, "w", nthreads=1, running=(ref(5),))
    client(sim)
    assert sim.submit(1, 5) == []
    worker(sim, 3, "v")
    assert sim(PeerDisconnected(2, "killed")) == [execute(3, 1, 5, attempt=2)]


def test_cancelling_a_call_with_an_adopted_batch_frees_the_slot_when_its_outcome_comes():
    sim = Sim()
    worker(sim, 2, "w", nthreads=1, running=(ref(5),))
    client(sim)
    sim.submit(1, 5)
    assert sim.msg(1, m.CancelCall(1)) == []  # no Cancel: w knows it by ref only
    assert sim.msg(2, recovered(5)) == []
    assert sim.state.tasks == {} and 2 in sim.state.free_workers


def test_unclaimed_outcomes_expire_after_the_recovery_window():
    sim = Sim(recovery_window=100.0)
    worker(sim, 2, "w")
    sim(Ticked(1.0))
    sim.msg(2, recovered(5))
    sim.msg(2, m.Heartbeat())
    sim(Ticked(50.0))
    sim.msg(2, m.Heartbeat())
    assert ref(5) in sim.state.recovered
    sim(Ticked(101.5))
    assert sim.state.recovered == {}


def test_batches_without_a_session_are_not_matched():
    sim = Sim()
    sim.client(1)  # an old-style client: no session
    worker(sim, 2, "w")
    [send] = sim.submit(1, 5)
    assert send.message.ref == "" and sim.state.by_ref == {}


# ------------------------------------------------------------------ liveness

def test_the_scheduler_beats_to_every_peer_each_interval():
    sim = Sim(heartbeats=True)
    client(sim)
    worker(sim, 2, "w")
    assert sim(Ticked(0.0)) == [Send(2, m.Heartbeat()), Send(1, m.Heartbeat())]
    assert sim(Ticked(0.5)) == []
    assert sim(Ticked(1.0)) == [Send(2, m.Heartbeat()), Send(1, m.Heartbeat())]


def test_a_beating_client_that_falls_silent_is_dropped_with_its_batches():
    sim = Sim(heartbeat_timeout=30.0)
    client(sim)
    worker(sim, 2, "w")
    sim.msg(1, m.Heartbeat())
    assert sim.submit(1, 5) == [execute(2, 1, 5)]
    sim(Ticked(20.0))
    sim.msg(2, m.Heartbeat())
    assert sim(Ticked(30.0)) == []  # exactly the timeout: not yet
    sim.msg(2, m.Heartbeat())
    assert sim(Ticked(30.5)) == [Close(1, "no heartbeat for 30 s"), Send(2, m.Cancel(1, 1))]
    assert sim.state.clients == {}


# ------------------------------------------------------------ memory pauses

def test_queued_batches_fail_once_every_worker_has_been_paused_too_long():
    sim = Sim(paused_timeout=60.0, heartbeat_timeout=1000.0)
    client(sim)
    worker(sim, 2, "w")
    sim.msg(2, m.Heartbeat(900 * 2**20))
    sim.msg(2, m.WorkerStatus(m.PAUSED))
    assert sim.submit(1, 5) == []
    sim(Ticked(10.0))
    sim.msg(2, m.Heartbeat(900 * 2**20))
    assert sim(Ticked(69.0)) == []
    sim.msg(2, m.Heartbeat(900 * 2**20))
    [failed] = sim(Ticked(70.5))
    assert failed.conn == 1 and failed.message.batch_id == 5 and failed.message.status == m.FAILED
    text = failed.message.error
    assert "paused by its memory limit" in text and "w: 900 MiB of its 1024 MiB limit" in text, text
    assert sim.state.tasks == {}


def test_a_worker_that_resumes_in_time_runs_the_queued_batches():
    sim = Sim(paused_timeout=60.0)
    client(sim)
    worker(sim, 2, "w")
    sim.msg(2, m.WorkerStatus(m.PAUSED))
    sim.submit(1, 5)
    sim(Ticked(10.0))
    sim.msg(2, m.Heartbeat())
    assert sim.msg(2, m.WorkerStatus(m.RUNNING)) == [execute(2, 1, 5)]
    sim(Ticked(75.0))
    assert 1 in sim.state.clients and len(sim.state.tasks) == 1


def test_message_received_for_an_unknown_ref_is_harmless():
    sim = Sim()
    worker(sim, 2, "w")
    assert sim(MessageReceived(2, m.Recovered("", m.CANCELLED, 0.0, ()))) == []
    assert sim.state.recovered == {}


def test_a_resuming_client_s_batches_wait_the_recovery_grace_for_workers_that_hold_them():
    sim = Sim(recovery_grace=6.0, heartbeat_timeout=100.0)
    sim(Ticked(100.0))  # the scheduler's first tick: the grace runs from here
    client(sim, resumed=True)
    worker(sim, 3, "v")
    assert sim.submit(1, 5) == []  # held: w may come back with it
    assert sim.submit(1, 6) == []
    assert worker(sim, 2, "w", running=(ref(5),)) == []  # adopted out of the held queue
    assert sim(Ticked(105.0)) == []
    assert sim(Ticked(106.0)) == [execute(3, 2, 6)]  # the grace is over: the rest runs
    assert sim.msg(2, recovered(5)) == [delivered(5, "w")]


def test_a_new_client_s_batches_do_not_wait_the_recovery_grace():
    sim = Sim(recovery_grace=6.0)
    sim(Ticked(100.0))
    client(sim)
    worker(sim, 2, "w")
    assert sim.submit(1, 5) == [execute(2, 1, 5)]


def test_a_held_call_cancelled_during_the_grace_stays_cancelled():
    sim = Sim(recovery_grace=6.0, heartbeat_timeout=100.0)
    sim(Ticked(100.0))
    client(sim, resumed=True)
    worker(sim, 2, "w")
    sim.submit(1, 5)
    assert sim.msg(1, m.CancelCall(1)) == []
    assert sim(Ticked(107.0)) == [] and sim.state.tasks == {}


def test_an_orphan_no_client_claims_within_the_grace_is_cancelled_and_its_slot_freed():
    sim = Sim(recovery_grace=6.0, heartbeat_timeout=100.0)
    sim(Ticked(100.0))
    worker(sim, 2, "w", nthreads=1, running=(ref(5),))
    client(sim)
    assert sim.submit(1, 9) == []  # w's slot is the orphan's
    assert sim(Ticked(105.0)) == []
    assert sim(Ticked(106.5)) == [Send(2, m.Cancel(0, 0, ref(5)))]
    assert sim(Ticked(107.0)) == []  # once
    assert sim.submit(1, 5) == []  # claimed too late: it runs anew, after the slot is free
    assert sim.msg(2, m.Recovered(ref(5), m.CANCELLED, 0.1)) == [execute(2, 1, 9)]
    assert sim.state.recovered == {}
