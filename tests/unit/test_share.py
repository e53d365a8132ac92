"""The share policy in SchedulerState, driven without sockets or clocks: users and their
weights, caps and usage, a user's calls by priority, roles, cancel rights and the views."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import SchedulerSim

from jobsched.protocol import messages as m
from jobsched.scheduler.records import CLIENT, WORKER, UserPolicy, UsersChanged
from jobsched.scheduler.state import Close, PeerConnected, Send, Ticked, call_id

pytestmark = pytest.mark.unit

WORKER_CONN = 100


def lab(slots: int = 2, users: dict[str, UserPolicy] | None = None, **config) -> SchedulerSim:
    sim = SchedulerSim(**config)
    if users:
        sim(UsersChanged(users))
    sim.worker(WORKER_CONN, "w", nthreads=slots)
    return sim


def submit(sim: SchedulerSim, conn: int, batches: int, call: int = 1, priority: int = 0, first: int = 0) -> list:
    out = []
    for batch in range(first, first + batches):
        out += sim.msg(conn, m.SubmitBatch(batch, call, "f", 0, (b"x",), [], priority))
    return out


def executes(out: list) -> list[m.Execute]:
    return [c.message for c in out if isinstance(c, Send) and isinstance(c.message, m.Execute)]


def running_by_user(sim: SchedulerSim) -> dict[str, int]:
    counts: dict[str, int] = {}
    for task in sim.state.tasks.values():
        if task.worker is not None:
            counts[task.user] = counts.get(task.user, 0) + 1
    return counts


def finish_one(sim: SchedulerSim, user: str | None = None, duration: float = 0.5) -> list:
    """The oldest running batch (of ``user``, if given) finishes."""
    task = next(t for t in sim.state.tasks.values() if t.worker is not None and (user is None or t.user == user))
    return sim.msg(task.worker, m.TaskDone(task.task_id, task.attempt, m.OK, duration))


def test_a_newcomer_takes_the_next_free_slot_and_then_holds_half():
    sim = lab(slots=2)
    sim.client(1, user="alice")
    sim.client(2, user="alice")
    sim.client(3, user="alice")
    for conn in (1, 2, 3):
        submit(sim, conn, 10)
    assert running_by_user(sim) == {"alice": 2}
    sim.client(4, user="bob")
    assert executes(submit(sim, 4, 4)) == []  # every slot is busy
    started = executes(finish_one(sim, "alice"))
    assert [sim.state.tasks[e.task_id].user for e in started] == ["bob"]  # three calls of alice's don't outvote him
    for _ in range(6):  # whichever finishes, its owner's slot goes back to the user with fewer running
        finish_one(sim)
        if sim.state.share.users["bob"].ready:
            assert running_by_user(sim) == {"alice": 1, "bob": 1}


def test_weights_divide_the_slots():
    sim = lab(slots=4, users={"alice": UserPolicy(weight=3), "bob": UserPolicy(weight=1)})
    sim.client(1, user="alice")
    sim.client(2, user="bob")
    submit(sim, 2, 20)  # bob first: he takes every slot while alone
    submit(sim, 1, 20)
    for _ in range(12):
        finish_one(sim)
    assert running_by_user(sim) == {"alice": 3, "bob": 1}


def test_max_slots_caps_a_user_even_with_slots_free():
    sim = lab(slots=4, users={"carol": UserPolicy(max_slots=1)})
    sim.client(1, user="carol")
    submit(sim, 1, 5, call=1)
    submit(sim, 1, 5, call=2)
    assert running_by_user(sim) == {"carol": 1}
    assert len(sim.state.free_workers) == 1  # three slots stay free for others
    sim.client(2, user="dave")
    submit(sim, 2, 5)
    assert running_by_user(sim) == {"carol": 1, "dave": 3}
    finish_one(sim, "carol")
    assert running_by_user(sim) == {"carol": 1, "dave": 3}


def test_a_lowered_cap_takes_effect_as_batches_finish():
    sim = lab(slots=4)
    sim.client(1, user="carol")
    submit(sim, 1, 10)
    assert running_by_user(sim) == {"carol": 4}
    sim(UsersChanged({"carol": UserPolicy(max_slots=2)}))
    for _ in range(2):
        assert executes(finish_one(sim)) == []
    assert executes(finish_one(sim)) != [] and running_by_user(sim) == {"carol": 2}


def test_priority_orders_one_users_calls_and_equals_take_turns():
    sim = lab(slots=1)
    sim.client(1, user="alice")
    submit(sim, 1, 1, call=9)  # takes the slot
    submit(sim, 1, 3, call=1, priority=0)
    submit(sim, 1, 3, call=2, priority=5)
    submit(sim, 1, 3, call=3, priority=5)
    order = []
    for _ in range(8):
        (started,) = executes(finish_one(sim))
        order.append(sim.state.tasks[started.task_id].call[1])
    assert order == [2, 3, 2, 3, 2, 3, 1, 1]


def test_priority_does_not_cross_users():
    sim = lab(slots=1)
    sim.client(1, user="alice")
    sim.client(2, user="bob")
    submit(sim, 1, 1, call=9)
    submit(sim, 1, 3, call=1, priority=100)
    submit(sim, 2, 3, call=1, priority=0)
    (started,) = executes(finish_one(sim))
    assert sim.state.tasks[started.task_id].user == "bob"  # alice has had her turn: her priority is hers only


def test_decayed_usage_breaks_ties_and_fades_over_half_lives():
    sim = lab(slots=1, usage_half_life=1.0)
    sim(Ticked(0.0))
    for conn, user in ((1, "alice"), (2, "bob"), (3, "carol")):
        sim.client(conn, user=user)

    def tie() -> str:
        """carol holds the slot; alice, then bob, queue a batch; who gets the slot carol frees?"""
        submit(sim, 3, 1, call=len(sim.log))
        submit(sim, 1, 1, call=len(sim.log))
        submit(sim, 2, 1, call=len(sim.log))
        (started,) = executes(finish_one(sim, "carol", duration=0.0))
        user = sim.state.tasks[started.task_id].user
        finish_one(sim, user, duration=0.0)
        finish_one(sim, duration=0.0)  # the other one
        return user

    submit(sim, 1, 1, call=100)
    finish_one(sim, duration=1000.0)  # alice used the cluster all night
    assert tie() == "bob"  # she yields the tie to the lighter user
    for now in range(1, 20):  # 19 half-lives later her night is forgotten
        sim(Ticked(float(now)))
    assert sim.state.info()["users"]["alice"]["usage"] < 0.01  # ... and so are the minutes of an hour ago
    submit(sim, 2, 1, call=101)
    finish_one(sim, duration=5.0)  # while bob used a little this morning
    assert tie() == "alice"


def test_usage_of_the_last_hour_is_reported():
    sim = lab(slots=1)
    sim(Ticked(10.0))
    sim.client(1, user="alice")
    submit(sim, 1, 3)
    for _ in range(3):
        finish_one(sim, duration=2.0)
    assert sim.state.info()["users"]["alice"]["usage_hour"] == pytest.approx(6.0)
    for now in range(70, 3800, 20):  # an hour later, with the worker alive all along
        sim.msg(WORKER_CONN, m.Heartbeat())
        sim(Ticked(float(now)))
    assert sim.state.info()["users"]["alice"]["usage_hour"] == 0.0


def test_a_client_connection_may_not_register_a_worker_and_nothing_it_sent_takes_effect():
    sim = lab(slots=1)
    sim(PeerConnected(5, "tcp://10.0.0.5:1", CLIENT, "mallory", False))
    out = sim.msg(5, m.RegisterWorker("evil", 64))
    assert out == [Close(5, "a client connection may not register a worker")]
    assert set(sim.state.workers) == {WORKER_CONN}
    sim.client(6, user="mallory", admin=False)
    submit(sim, 6, 1)
    out = sim.msg(6, m.RegisterWorker("evil", 64))
    assert Close(6, "a client connection may not register a worker") in out
    assert set(sim.state.workers) == {WORKER_CONN} and 6 not in sim.state.clients
    assert not sim.state.tasks or all(t.user != "mallory" or t.cancelled for t in sim.state.tasks.values())


def test_a_worker_connection_may_not_register_a_client():
    sim = lab(slots=1)
    sim(PeerConnected(5, "tcp://10.0.0.5:1", WORKER, "root", True))
    assert sim.msg(5, m.RegisterClient("c")) == [Close(5, "a worker connection may not register a client")]
    assert 5 not in sim.state.clients


@pytest.mark.parametrize("message", [m.Execute(1, 1, "f"), m.BatchDone(1), m.Welcome("x"), m.TaskDone(1, 1)])
def test_a_client_sending_a_schedulers_or_workers_message_is_closed(message):
    sim = lab(slots=1)
    sim.client(6, user="mallory", admin=False)
    out = sim.msg(6, message)
    assert [type(c) for c in out] == [Close] and 6 not in sim.state.clients


def test_revoked_users_connections_close_but_not_the_admins():
    sim = lab(slots=1)
    sim.client(1, user="bob", admin=False)
    sim.client(2, user="bob", admin=True)  # the admin acting as bob keeps the cluster secret
    sim.client(3, user="ann", admin=False)
    out = sim(UsersChanged({"ann": UserPolicy()}, frozenset({"bob"})))
    assert out == [Close(1, "user bob was removed or their token rotated")]
    assert set(sim.state.clients) == {2, 3}


def cancel(sim: SchedulerSim, conn: int, call: str = "", user: str = "") -> tuple[m.CancelReply, list]:
    out = sim.msg(conn, m.CancelRequest(7, user, call))
    replies = [c.message for c in out if isinstance(c, Send) and isinstance(c.message, m.CancelReply)]
    assert len(replies) == 1 and out[-1].conn == conn
    return replies[0], out


def test_a_user_cannot_cancel_another_users_work_and_the_admin_can():
    sim = lab(slots=1)
    sim.client(1, user="alice", admin=False)
    sim.client(2, user="bob", admin=False)
    sim.client(3, user="root", admin=True)
    submit(sim, 2, 3)  # bob: one running, two queued
    bob_call = call_id(sim.state.clients[2].calls[1])
    for kwargs in ({"call": bob_call}, {"user": "bob"}):
        reply, out = cancel(sim, 1, **kwargs)
        assert reply.error == "only the admin may cancel another user's work" and reply.cancelled == 0
        assert len(out) == 1 and sim.state.clients[2].calls
    reply, _ = cancel(sim, 1, call="no-such-call")
    assert reply.error and reply.cancelled == 0
    reply, out = cancel(sim, 3, call=bob_call)
    assert reply == m.CancelReply(7, 1, "")
    told = [c.message for c in out if c.conn == 2]
    assert [(d.status, d.error) for d in told] == [(m.CANCELLED, "cancelled by root (admin)")] * 3
    assert [type(c.message) for c in out if c.conn == WORKER_CONN] == [m.Cancel]
    assert sim.state.clients[2].calls == {}


def test_a_user_may_cancel_their_own_calls_from_another_client():
    sim = lab(slots=1)
    sim.client(1, user="alice", admin=False)
    sim.client(2, user="alice", admin=False)
    submit(sim, 1, 2, call=1)
    submit(sim, 1, 2, call=2)
    reply, out = cancel(sim, 2, user="alice")
    assert reply.cancelled == 2
    assert {d.message.error for d in out if d.conn == 1} == {"cancelled by alice"}


def test_a_users_view_shows_their_own_work_and_the_rest_summed():
    sim = lab(slots=2)
    sim.client(1, user="alice", admin=False)
    sim.client(2, user="bob", admin=False)
    submit(sim, 1, 3)  # alice takes both slots
    submit(sim, 2, 3)
    finish_one(sim, "alice")  # and bob the one she frees
    alice = sim.state.info(sim.state.clients[1])
    assert alice["viewer"] == {"user": "alice", "admin": False}
    assert set(alice["users"]) == {"alice", "(others)"}
    assert alice["users"]["(others)"]["queued"] == 2 and alice["users"]["(others)"]["running"] == 1
    assert [c["user"] for c in alice["calls"]] == ["alice"]
    assert all(e["user"] in ("", "alice") for e in alice["events"])
    admin = sim.state.info()
    assert admin["viewer"]["admin"] and set(admin["users"]) == {"alice", "bob"}
    assert {c["user"] for c in admin["calls"]} == {"alice", "bob"}
    assert admin["users"]["bob"]["share"] == pytest.approx(0.5)


def test_a_batch_may_not_name_another_users_data():
    sim = lab(slots=1)
    sim.client(1, user="alice", admin=False)
    sim.client(2, user="bob", admin=False)
    sim.client(3, user="bob", admin=False)
    sim.msg(2, m.DataRegister("bobs-key", 10))
    out = sim.msg(1, m.SubmitBatch(1, 1, "f", 0, (b"x",), ["bobs-key"]))
    assert [(c.conn, c.message.status) for c in out] == [(1, m.FAILED)]
    assert "another user" in out[0].message.error and not sim.state.tasks
    assert executes(sim.msg(3, m.SubmitBatch(1, 1, "f", 0, (b"x",), ["bobs-key"])))  # bob's other client may


# ------------------------------------------------------------ random sequences
ACTIONS = st.lists(
    st.tuples(st.sampled_from(["submit", "finish", "cancel", "leave", "join", "policy", "tick"]),
              st.integers(0, 3), st.integers(0, 3), st.integers(1, 4)),
    max_size=60,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions=ACTIONS, caps=st.lists(st.integers(0, 3), min_size=3, max_size=3))
def test_random_sequences_keep_every_user_under_their_cap(actions, caps):
    users = ["u0", "u1", "u2"]
    policies = {u: UserPolicy(weight=1 + i, max_slots=cap) for i, (u, cap) in enumerate(zip(users, caps, strict=True))}
    sim = lab(slots=3, users=policies)
    sim.worker(WORKER_CONN + 1, "w2", nthreads=2)
    clients: dict[int, str] = {}
    next_conn, now = 1, 0.0
    for action, a, b, n in actions:
        if action == "join" or not clients:
            user = users[a % 3]
            sim.client(next_conn, user=user, admin=False)
            clients[next_conn] = user
            next_conn += 1
            continue
        conn = list(clients)[a % len(clients)]
        if action == "submit":
            submit(sim, conn, n, call=b, priority=n % 2, first=1000 * next_conn + 10 * len(sim.log))
        elif action == "finish" and any(t.worker is not None for t in sim.state.tasks.values()):
            finish_one(sim, duration=float(n))
        elif action == "cancel":
            sim.msg(conn, m.CancelCall(b))
        elif action == "leave":
            sim.leave(conn)
            del clients[conn]
        elif action == "policy":  # weights change; caps stay as the file gave them
            sim(UsersChanged({u: UserPolicy(weight=n + i, max_slots=p.max_slots)
                              for i, (u, p) in enumerate(policies.items())}))
        elif action == "tick":
            now += 60.0 * n
            sim(Ticked(now))
        for user, running in running_by_user(sim).items():
            cap = policies[user].max_slots
            assert cap == 0 or running <= cap, (user, running, cap)
        # a free slot never idles while a user under their cap has a batch ready
        if sim.state.free_workers:
            assert not sim.state.share, "a slot is free and work is ready"
