"""WorkerState's decisions beyond the threads' queue: sessions and orphans, drain, cancel grace,
memory pause/resume/restart and where data comes from.  No sockets, no clock: time is
``Ticked(now)``, memory ``MemorySampled(rss)``; every step is followed by ``validate()``."""

from __future__ import annotations

import logging

from jobsched.protocol import messages as m
from jobsched.worker.events import (
    CancelReceived,
    DataSourcesReceived,
    DataUnavailable,
    DrainRequested,
    Event,
    ExecuteReceived,
    FailTask,
    FetchFromPeers,
    ForgetData,
    FramesStored,
    Leave,
    Log,
    MapSegment,
    MemorySampled,
    PeersFetched,
    Reconnect,
    RequestData,
    Restart,
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
from jobsched.worker.state import WorkerConfig, WorkerState

MiB = 2**20
BIG = (b"x" * (1 << 20),)  # worth a shared segment


class Sim:
    def __init__(self, **config) -> None:
        self.state = WorkerState(WorkerConfig(**config))
        assert self(SessionStarted()) == []

    def __call__(self, event: Event) -> list:
        out = self.state.handle(event)
        self.state.validate()
        return out

    def execute(self, task_id: int, keys=()) -> list:
        return self(ExecuteReceived(m.Execute(task_id, 1, f"f{task_id}", (b"b",), list(keys))))

    def complete(self, task_id: int) -> list:
        return self(TaskCompleted(task_id, 1, m.OK, (b"r",), 0.5))


def done(task_id: int) -> SendMessage:
    return SendMessage(m.TaskDone(task_id, 1, m.OK, 0.5, (b"r",)))


def start(task_id: int) -> StartTask:
    return StartTask(task_id, 1, f"f{task_id}", (b"b",))


class Segment:  # stands for payload.shm.SharedSegment
    name = "jobsched-seg"
    sizes = [3]


# ---------------------------------------------------------------- sessions


def test_reconnect_keeps_orphans_busy_and_reports_them_to_nobody():
    sim = Sim()
    sim.execute(1)
    sim.execute(2)
    assert sim(FramesStored("X", 10)) == [SendMessage(m.DataStored("X", 10))]
    assert sim(SessionEnded()) == [WithdrawTask(1, 1), WithdrawTask(2, 1)]
    assert sim(TaskWithdrawn(2, 1)) == []  # the scheduler requeued it: no answer
    assert sim(SessionStarted()) == [ForgetData(("X",))]  # the new session knows none of it
    assert sim.state.orphans == {(1, 1)} and sim.state.data == {}
    assert sim.execute(3) == [start(3)]  # queued behind the orphan, in the threads
    assert sim.complete(1) == []  # its result is not reported to the new session
    assert sim.state.running == {(3, 1): "f3"} and not sim.state.orphans
    assert sim.complete(3) == [done(3)]


def test_orphan_overrunning_its_grace_restarts_when_supervised():
    sim = Sim(cancel_grace=5.0, supervised=True)
    sim.execute(1)
    sim(SessionEnded())  # withdrawing fails: a thread runs it
    assert sim(Ticked(100.0)) == []  # no session: nothing decided
    assert sim(SessionStarted()) == []  # the grace starts again with the new session
    assert sim(Ticked(104.0)) == []
    assert sim(Ticked(105.0)) == [Restart("a cancelled batch of f1 overran its 5 s grace period", True)]
    assert sim(Ticked(200.0)) == []  # once


# ------------------------------------------------------------------- drain


def test_drain_withdraws_queued_finishes_running_then_leaves():
    sim = Sim(drain_timeout=30.0)
    sim(Ticked(10.0))
    sim.execute(1)
    sim.execute(2)
    assert sim(DrainRequested()) == [SendMessage(m.WorkerStatus(m.RETIRING)), WithdrawTask(1, 1), WithdrawTask(2, 1)]
    assert sim(TaskWithdrawn(2, 1)) == []  # batch 1 had started
    assert sim(Ticked(10.1)) == [Log(logging.INFO, "draining 1 running batches (up to 30 s)")]
    assert sim.execute(3) == []  # no new batches
    assert sim(Ticked(20.0)) == []
    assert sim.complete(1) == [done(1), Leave("worker shutting down")]
    assert sim(Ticked(50.0)) == []
    assert sim(DrainRequested()) == []


def test_drain_with_nothing_running_leaves_at_once():
    sim = Sim()
    assert sim(DrainRequested()) == [SendMessage(m.WorkerStatus(m.RETIRING)), Leave("worker shutting down")]


def test_drain_times_out():
    sim = Sim(drain_timeout=2.0)
    sim.execute(1)
    sim(DrainRequested())
    assert sim(Ticked(1.0)) == [Log(logging.INFO, "draining 1 running batches (up to 2 s)")]
    assert sim(Ticked(2.0)) == [
        Log(logging.WARNING, "drain timed out with 1 batches running; they will be rerun elsewhere"),
        Leave("worker shutting down"),
    ]
    assert sim.complete(1) == [done(1)]  # reported if the connection still takes it; no second Leave


# ------------------------------------------------------------ cancel grace


def test_cancelled_batch_overrunning_its_grace_restarts_when_supervised():
    sim = Sim(cancel_grace=10.0, supervised=True)
    sim(Ticked(1.0))
    sim.execute(1)
    assert sim(CancelReceived(1, 1)) == [WithdrawTask(1, 1)]  # a thread runs it
    assert sim(Ticked(10.9)) == []
    assert sim(Ticked(11.0)) == [Restart("a cancelled batch of f1 overran its 10 s grace period", True)]
    assert sim(Ticked(30.0)) == []


def test_cancelled_batch_overrunning_unsupervised_is_a_warning():
    sim = Sim(cancel_grace=3.0)
    sim.execute(1)
    sim(CancelReceived(1, 1))
    assert sim(Ticked(3.0)) == [Log(logging.WARNING, (
        "a cancelled batch of f1 is still running after 3 s; its slot stays busy until it ends "
        "(run under a supervisor, the default, to have the process restarted)"))]
    assert sim(Ticked(6.0)) == []


def test_cancelled_batch_ending_or_withdrawn_within_its_grace():
    sim = Sim(cancel_grace=3.0, supervised=True)
    sim.execute(1)
    sim.execute(2)
    sim(CancelReceived(1, 1))
    sim(CancelReceived(2, 1))
    assert sim(TaskWithdrawn(2, 1)) == [SendMessage(m.TaskDone(2, 1, m.CANCELLED, 0.0))]
    assert sim(TaskCompleted(1, 1, m.OK, (b"r",), 2.0)) == [SendMessage(m.TaskDone(1, 1, m.CANCELLED, 2.0))]
    assert sim(Ticked(10.0)) == []


def test_no_grace_decision_without_a_session():
    sim = Sim(cancel_grace=1.0, supervised=True)
    sim.execute(1)
    sim(CancelReceived(1, 1))
    sim(SessionEnded())
    assert sim(Ticked(5.0)) == []


# ------------------------------------------------------------------ memory


def test_memory_pause_resume_and_restart():
    sim = Sim(memory_limit=100 * MiB)
    assert sim(MemorySampled(80 * MiB)) == []
    assert sim(MemorySampled(81 * MiB)) == [
        Log(logging.WARNING, "memory 81 MiB of 100 MiB: pausing"), SendMessage(m.WorkerStatus(m.PAUSED))
    ]
    assert sim(MemorySampled(75 * MiB)) == []  # between the marks: stays paused
    assert sim(MemorySampled(70 * MiB)) == [
        Log(logging.WARNING, "memory 70 MiB of 100 MiB: resuming"), SendMessage(m.WorkerStatus(m.RUNNING))
    ]
    assert sim(MemorySampled(75 * MiB)) == []  # between the marks: stays running
    sim.execute(1)
    assert sim(MemorySampled(101 * MiB)) == [
        Restart("exceeded its memory limit (101 MiB > 100 MiB) while running f1", False)
    ]
    assert sim(MemorySampled(200 * MiB)) == []  # once


def test_memory_restart_with_nothing_running_and_no_limit():
    sim = Sim(memory_limit=100 * MiB)
    assert sim(MemorySampled(150 * MiB)) == [Restart("exceeded its memory limit (150 MiB > 100 MiB)", False)]
    assert Sim()(MemorySampled(10**12)) == []  # no limit


# -------------------------------------------------------------------- data


def test_store_data_maps_a_segment_or_stores_bytes():
    sim = Sim(can_share=True)
    assert sim(StoreDataReceived(m.StoreData("X", segment="seg", sizes=[3]))) == [MapSegment("X", "seg", (3,))]
    assert sim(SegmentMapped("X", (b"abc",))) == [StoreFrames("X", (b"abc",))]
    assert sim(StoreDataReceived(m.StoreData("y", frames=(b"y",), share=True))) == [StoreFrames("y", (b"y",))]  # small
    assert sim(StoreDataReceived(m.StoreData("Z", frames=BIG))) == [StoreFrames("Z", BIG)]  # not asked to share
    assert sim(StoreDataReceived(m.StoreData("Z", frames=BIG, share=True))) == [ShareCopy("Z", BIG, 1)]


def test_bytes_are_not_shared_where_shared_memory_is_unavailable():
    sim = Sim(can_share=False)
    assert sim(StoreDataReceived(m.StoreData("Z", frames=BIG, share=True))) == [StoreFrames("Z", BIG)]


def test_unmappable_segment_asks_for_a_copy():
    sim = Sim()
    assert sim(SegmentUnmappable("X", "seg", "gone")) == [
        Log(logging.WARNING, "cannot map shared segment seg for X (gone); asking for a copy"),
        SendMessage(m.NeedData("X", shared=False)),
    ]


def test_shared_copy_is_stored_with_its_segment_and_announced():
    sim = Sim(can_share=True)
    assert sim.execute(1, keys=["Z"]) == [RequestData("Z")]
    seg = Segment()
    assert sim(SharedCopyMade("Z", (b"m",), seg, 1)) == [StoreFrames("Z", (b"m",), seg)]
    assert sim(FramesStored("Z", 3, seg.name, (3,))) == [
        SendMessage(m.DataStored("Z", 3, seg.name, [3])), start(1)
    ]
    assert sim(SharedCopyMade("W", BIG, None, 1)) == [StoreFrames("W", BIG)]  # the copy failed: the bytes


def test_results_of_an_earlier_session_are_dropped():
    sim = Sim(can_share=True)
    seg = Segment()
    sim(SessionEnded())
    sim(SessionStarted())
    assert sim(SharedCopyMade("Z", (b"m",), seg, 1)) == [UnlinkSegment(seg)]
    assert sim(SharedCopyMade("Z", (b"m",), None, 1)) == []
    assert sim(PeersFetched("Z", None, False, 1)) == []
    sim(SessionEnded())
    assert sim(SharedCopyMade("Z", (b"m",), seg, 2)) == [UnlinkSegment(seg)]  # its connection is gone


def test_data_sources_fetch_from_peers_then_the_owner():
    sim = Sim(can_share=True)
    source = m.DataSources("X", ["tcp://10.0.0.2:4000"], share=True)
    assert sim(DataSourcesReceived(source)) == [FetchFromPeers("X", ("tcp://10.0.0.2:4000",), True, 1)]
    assert sim(PeersFetched("X", None, True, 1)) == [SendMessage(m.NeedData("X", from_owner=True))]
    assert sim(PeersFetched("X", BIG, True, 1)) == [ShareCopy("X", BIG, 1)]
    assert sim(PeersFetched("X", (b"x",), False, 1)) == [StoreFrames("X", (b"x",))]
    sim(FramesStored("X", 1))
    assert sim(DataSourcesReceived(source)) == []  # held already


def test_data_that_cannot_be_loaded_fails_the_batches_needing_it():
    sim = Sim()
    sim.execute(1, keys=["X"])
    assert sim(StoreFailed("X", "ValueError('bad')")) == [
        FailTask(1, 1, "cannot load it here: ValueError('bad')")
    ]
    assert sim(DataUnavailable("X", "gone")) == []


# ------------------------------------------------- recovery across sessions (refs)


def execute_ref(sim: Sim, task_id: int) -> list:
    return sim(ExecuteReceived(m.Execute(task_id, 1, f"f{task_id}", (b"b",), [], f"s/{task_id}")))


def recovered(task_id: int) -> m.Recovered:
    return m.Recovered(f"s/{task_id}", m.OK, 0.5, (b"r",))


def test_an_orphan_with_a_ref_is_still_wanted_and_reported_by_its_ref():
    sim = Sim()
    sim(Welcomed(0.0))
    assert execute_ref(sim, 1) == [start(1)]
    sim(SessionEnded())  # the scheduler died; the batch runs on
    assert sim(SessionStarted()) == []
    assert sim.state.orphan_refs == ["s/1"]  # named in the next registration
    assert sim(Welcomed(1.0)) == []
    assert sim.complete(1) == [SendMessage(recovered(1))]
    assert sim.state.orphans == set() and sim.state.refs == {}


def test_an_outcome_while_no_scheduler_is_there_is_held_until_the_next_welcome():
    sim = Sim()
    sim(Welcomed(0.0))
    execute_ref(sim, 1)
    execute_ref(sim, 2)
    sim(SessionEnded())
    sim(TaskWithdrawn(2, 1))  # never started: the new scheduler's client resubmits it
    assert sim.complete(1) == []  # nobody to tell yet
    assert sim(SessionStarted()) == []
    assert sim.state.orphan_refs == ["s/1"]  # no longer running, but its outcome is held: named too
    assert sim.complete(1) == []  # reported once only
    assert sim(Welcomed(2.0)) == [SendMessage(recovered(1))]
    assert sim(Welcomed(3.0)) == []


def test_a_cancelled_batch_stays_cancelled_across_a_reconnection():
    sim = Sim()
    sim(Welcomed(0.0))
    execute_ref(sim, 1)
    assert sim(CancelReceived(1, 1)) == [WithdrawTask(1, 1)]
    sim(SessionEnded())
    sim(SessionStarted())
    assert sim.state.orphan_refs == []
    sim(Welcomed(1.0))
    assert sim.complete(1) == []


def test_a_silent_scheduler_is_left_after_the_scheduler_timeout():
    sim = Sim(scheduler_timeout=30.0)
    sim(Welcomed(0.0))
    sim(SchedulerHeard(10.0))
    assert sim(Ticked(40.0)) == []
    [reconnect] = sim(Ticked(40.5))
    assert reconnect == Reconnect("no heartbeat from the scheduler for 30 s")
    assert sim(Ticked(41.0)) == []  # once
    sim(SessionEnded())
    sim(SessionStarted())
    assert sim(Ticked(100.0)) == []  # not registered yet: nothing to time


def test_an_orphan_cancelled_by_its_ref_reports_its_slot_free():
    sim = Sim(cancel_grace=5.0, supervised=True)
    sim(Welcomed(0.0))
    execute_ref(sim, 1)
    sim(SessionEnded())
    sim(SessionStarted())
    sim(Welcomed(1.0))
    assert sim(CancelReceived(0, 0, "s/1")) == [WithdrawTask(1, 1)]
    assert sim(CancelReceived(0, 0, "s/unknown")) == []
    assert sim.complete(1) == [SendMessage(m.Recovered("s/1", m.CANCELLED, 0.5))]
