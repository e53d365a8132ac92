"""The client's pure state machine, event by event: ``assert client(event) == [...]``.

Every step goes through ``Sim.__call__``, which calls ``validate()`` after it.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobsched.client.state import (
    FIRST_RETRY,
    MAX_RETRY,
    BatchDoneReceived,
    BatchRecord,
    BatchSubmitted,
    CallCancelled,
    ClientConfig,
    ClientState,
    Connect,
    Connected,
    ConnectFailed,
    ConnectionLost,
    DataRegistered,
    DataReleased,
    Deliver,
    Disconnect,
    Fail,
    MessageReceived,
    Send,
    Ticked,
)
from jobsched.protocol import messages as m

HB = 1.0


def batch(batch_id: int, call_id: int = 1, keys: tuple[str, ...] = ()) -> BatchRecord:
    return BatchRecord(batch_id, call_id, "f", 0, (b"batch-%d" % batch_id,), keys)


def done(batch_id: int) -> m.BatchDone:
    return m.BatchDone(batch_id, m.OK, "w", "", (b"result-%d" % batch_id,))


class Sim:
    def __init__(self, **config: float) -> None:
        self.state = ClientState(ClientConfig(**config))

    def __call__(self, event: object) -> list:
        out = self.state.handle(event)  # type: ignore[arg-type]
        self.state.validate()
        return out

    def connect(self, now: float = 0.0) -> list:
        return self(Connected(now, HB))


def test_a_batch_is_sent_and_its_result_delivered_once():
    sim = Sim()
    sim.connect()
    assert sim(BatchSubmitted(batch(1))) == [Send(batch(1).submission())]
    assert sim(BatchDoneReceived(done(1), 0.5)) == [Deliver(done(1))]
    assert sim(BatchDoneReceived(done(1), 0.6)) == []  # a duplicate is dropped
    assert sim.state.pending == {}


def test_the_submission_carries_the_frames_and_keys():
    sent = batch(3, call_id=7, keys=("X-1",)).submission()
    assert (sent.batch_id, sent.call_id, sent.frames, sent.keys) == (3, 7, (b"batch-3",), ["X-1"])


def test_a_cancelled_call_forgets_its_batches_and_drops_their_results():
    sim = Sim()
    sim.connect()
    sim(BatchSubmitted(batch(1, call_id=1)))
    sim(BatchSubmitted(batch(2, call_id=2)))
    assert sim(CallCancelled(1)) == [Send(m.CancelCall(1))]
    assert list(sim.state.pending) == [2]
    assert sim(BatchDoneReceived(done(1), 1.0)) == []


def test_the_submission_carries_the_calls_priority():
    record = BatchRecord(4, 2, "f", 0, (b"x",), (), priority=-7)
    assert record.submission().priority == -7
    assert batch(5).submission().priority == 0


def cancelled(batch_id: int, reason: str = "cancelled by root (admin)") -> m.BatchDone:
    return m.BatchDone(batch_id, m.CANCELLED, "", reason)


def test_a_call_cancelled_on_the_scheduler_ends_every_batch_of_it_with_the_reason():
    sim = Sim()
    sim.connect()
    for batch_id, call_id in ((1, 1), (2, 1), (3, 2), (4, 1)):
        sim(BatchSubmitted(batch(batch_id, call_id)))
    # the first cancelled batch ends the call's others at once, with the same reason
    assert sim(BatchDoneReceived(cancelled(2), 1.0)) == [Deliver(cancelled(2)), Deliver(cancelled(1)),
                                                         Deliver(cancelled(4))]
    assert list(sim.state.pending) == [3]  # another call goes on
    assert sim(BatchDoneReceived(cancelled(1), 1.1)) == []  # the scheduler's own reports of the rest: dropped
    # joblib dispatches until it sees the error: those batches end here, never reach the scheduler
    assert sim(BatchSubmitted(batch(5, call_id=1))) == [Deliver(cancelled(5))]
    assert list(sim.state.pending) == [3]
    # the caller ends the call (joblib's abort): the scheduler hears it, the reason is forgotten
    assert sim(CallCancelled(1)) == [Send(m.CancelCall(1))]
    assert sim.state.cancelled_calls == {}
    assert sim(BatchDoneReceived(done(3), 1.2)) == [Deliver(done(3))]


def test_a_lost_connection_keeps_the_batches_and_reconnects_at_once():
    sim = Sim()
    sim.connect()
    sim(BatchSubmitted(batch(1)))
    assert sim(ConnectionLost("reset by peer", 5.0)) == [Connect()]
    assert sim(ConnectionLost("reset by peer", 5.0)) == []  # reported twice: one reconnection
    assert list(sim.state.pending) == [1]
    assert sim(BatchSubmitted(batch(2))) == []  # waits for the scheduler with the others


def test_reconnecting_registers_the_data_then_resubmits_in_order():
    sim = Sim()
    sim.connect()
    assert sim(DataRegistered("X-1", 100, broadcast=True)) == [Send(m.DataRegister("X-1", 100, True))]
    sim(DataRegistered("y-2", 10))
    for batch_id in (1, 2, 3):
        sim(BatchSubmitted(batch(batch_id)))
    sim(BatchDoneReceived(done(2), 1.0))
    sim(ConnectionLost("eof", 2.0))
    assert sim(DataReleased(("y-2",))) == []  # released while away: not re-registered
    assert sim(Connected(3.0, HB)) == [
        Send(m.Heartbeat()),  # the scheduler now knows we beat
        Send(m.DataRegister("X-1", 100, True)),
        Send(batch(1).submission()),
        Send(batch(3).submission()),
    ]


def test_releasing_data_is_sent_once_and_only_for_owned_keys():
    sim = Sim()
    sim.connect()
    sim(DataRegistered("X-1", 100))
    assert sim(DataReleased(("X-1", "never-ours"))) == [Send(m.ReleaseData(["X-1"]))]
    assert sim(DataReleased(("X-1",))) == []


def test_failed_attempts_back_off_up_to_the_cap():
    sim = Sim(reconnect_timeout=1000.0)
    sim.connect()
    assert sim(ConnectionLost("eof", 0.0)) == [Connect()]
    now, delays = 0.0, []
    for _ in range(8):
        assert sim(ConnectFailed("refused", now)) == []
        retry_at = sim.state.retry_at
        delays.append(round(retry_at - now, 6))
        assert sim(Ticked(retry_at - 0.01)) == []
        now = retry_at
        assert sim(Ticked(now)) == [Connect()]
        assert sim(Ticked(now)) == []  # one attempt at a time
    assert delays[0] == FIRST_RETRY and delays == sorted(delays) and delays[-1] == MAX_RETRY


def test_after_the_reconnect_timeout_waiting_batches_fail_and_new_ones_fail_at_once():
    sim = Sim(reconnect_timeout=30.0)
    sim.connect()
    sim(BatchSubmitted(batch(1)))
    sim(BatchSubmitted(batch(2)))
    sim(ConnectionLost("eof", 100.0))
    assert sim(ConnectFailed("refused", 110.0)) == []
    [fail] = sim(ConnectFailed("connection refused", 131.0))
    assert isinstance(fail, Fail) and fail.batch_ids == (1, 2)
    assert "could not reconnect for 31 s" in fail.reason and "reconnect_timeout=30" in fail.reason
    assert "connection refused" in fail.reason and "eof" in fail.reason
    [late] = sim(BatchSubmitted(batch(3)))
    assert late == Fail((3,), fail.reason)
    # it keeps trying; once back, batches flow again
    assert Connect() in sim(Ticked(200.0))
    sim(Connected(201.0, HB))
    assert sim(BatchSubmitted(batch(4))) == [Send(batch(4).submission())]


def test_the_timeout_also_fires_on_a_tick_while_an_attempt_hangs():
    sim = Sim(reconnect_timeout=30.0)
    sim.connect()
    sim(BatchSubmitted(batch(1)))
    sim(ConnectionLost("eof", 0.0))  # the attempt it starts never answers
    assert sim(Ticked(29.0)) == []
    [fail] = sim(Ticked(30.5))
    assert fail.batch_ids == (1,)


def test_heartbeats_go_out_every_interval():
    sim = Sim()
    sim.connect(now=10.0)
    assert sim(Ticked(10.5)) == []
    assert sim(Ticked(11.0)) == [Send(m.Heartbeat())]
    assert sim(Ticked(11.5)) == []
    assert sim(Ticked(12.1)) == [Send(m.Heartbeat())]


def test_a_silent_scheduler_is_disconnected_after_the_heartbeat_timeout():
    sim = Sim(heartbeat_timeout=10.0)
    sim.connect(now=0.0)
    sim(MessageReceived(8.0))
    assert all(not isinstance(c, Disconnect) for c in sim(Ticked(17.9)))  # within 10 s of 8.0
    [disconnect] = sim(Ticked(18.5))
    assert disconnect == Disconnect("the scheduler sent nothing for 10 s")
    assert sim(ConnectionLost(disconnect.reason, 18.5)) == [Connect()]


def test_unknown_events_are_refused():
    with pytest.raises(TypeError, match="unknown event"):
        ClientState().handle(object())  # type: ignore[arg-type]


# ------------------------------------------------ random sequences, invariants

events = st.one_of(
    st.builds(lambda i, c: BatchSubmitted(batch(i, c)), st.integers(1, 30), st.integers(1, 3)),
    st.builds(lambda i: ("done", i), st.integers(1, 30)),
    st.builds(lambda i: ("cancelled", i), st.integers(1, 30)),
    st.builds(CallCancelled, st.integers(1, 3)),
    st.builds(lambda k: DataRegistered(f"k{k}", k), st.integers(1, 5)),
    st.builds(lambda k: DataReleased((f"k{k}",)), st.integers(1, 5)),
    st.just("connected"),
    st.builds(lambda r: ConnectFailed(r, 0.0), st.sampled_from(["refused", "timeout"])),
    st.builds(lambda r: ConnectionLost(r, 0.0), st.sampled_from(["eof", "reset"])),
    st.just("tick"),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(events, st.floats(0.0, 20.0)), max_size=60))
def test_random_sequences_deliver_each_result_at_most_once_and_never_lose_a_batch(steps):
    sim = Sim(reconnect_timeout=30.0, heartbeat_timeout=10.0)
    sim.connect()
    now = 0.0
    submitted: dict[int, int] = {}  # batch id -> call id, of batches accepted (not failed at once)
    ended: set[int] = set()  # delivered, failed or cancelled
    for event, advance in steps:
        now += advance
        if isinstance(event, tuple):
            event = BatchDoneReceived(done(event[1]) if event[0] == "done" else cancelled(event[1]), now)
        elif event == "connected":
            if sim.state.connected:
                continue
            event = Connected(now, HB)
        elif event == "tick":
            event = Ticked(now)
        elif isinstance(event, (ConnectFailed, ConnectionLost)):
            event = type(event)(event.reason, now)
        if isinstance(event, BatchSubmitted) and event.batch.batch_id in submitted:
            continue  # ids are unique per client
        out = sim(event)
        if isinstance(event, BatchSubmitted):
            submitted[event.batch.batch_id] = event.batch.call_id
        if isinstance(event, CallCancelled):
            ended |= {b for b, c in submitted.items() if c == event.call_id}
        for command in out:
            if isinstance(command, Deliver):
                assert command.message.batch_id not in ended, "delivered twice or after its end"
                ended.add(command.message.batch_id)
            elif isinstance(command, Fail):
                assert not set(command.batch_ids) & ended, "failed after its end"
                ended |= set(command.batch_ids)
        # every accepted batch is either still waiting or has ended, never both
        assert set(sim.state.pending) == set(submitted) - ended
