"""Bounded decoding (protocol/messages.py), and the range checks of what the scheduler stores
(scheduler/state.py).

Decoding: a control message of up to 16 MiB, crafted so that
msgpack would build far more Python objects than it has bytes, is refused before it is built,
or decoded within DECODE_AMPLIFICATION times its size; every real message still decodes.

The figures (peak memory over body size, before and after) are printed with the prefix
``HOSTILE-DECODE`` (run with ``-s``)."""

from __future__ import annotations

import tracemalloc

import msgpack
import pytest
from support import SchedulerSim, message_bytes

from jobsched.protocol import Frame, FrameDecoder, FrameLimits, MalformedMessage
from jobsched.protocol import messages as m
from jobsched.scheduler.records import CLIENT, WORKER
from jobsched.scheduler.state import (
    MAX_KEYS_PER_BATCH,
    MAX_NAME,
    MAX_NTHREADS,
    MAX_REF,
    Close,
    PeerConnected,
    Send,
)

MAX_BODY = FrameLimits().max_body


def raw_message(op: str, *fields: bytes) -> bytes:
    """A body ``[op, field...]`` from already-packed fields (which msgpack.packb could not build
    without first building the objects, in this test's memory)."""
    return bytes([0x90 | (len(fields) + 1), 0xA0 | len(op)]) + op.encode() + b"".join(fields)


def array(n: int) -> bytes:
    return b"\xdd" + n.to_bytes(4, "big")


def map_(n: int) -> bytes:
    return b"\xdf" + n.to_bytes(4, "big")


def crafted(size: int) -> dict[str, bytes]:
    """Bodies of about ``size`` bytes, each built to cost the most per byte in its own way."""
    n = size - 64
    return {
        "empty arrays": raw_message("info-reply", b"\x01", map_(1) + b"\xa1k" + array(n) + b"\x90" * n),
        "nils": raw_message("data-release", array(n) + b"\xc0" * n),
        "nils in info": raw_message("info-reply", b"\x01", map_(1) + b"\xa1k" + array(n) + b"\xc0" * n),
        "negative ints": raw_message("info-reply", b"\x01", map_(1) + b"\xa1k" + array(n) + b"\xec" * n),
        "map of empty maps": raw_message(
            "info-reply", b"\x01", map_(n // 7) + b"".join(b"\xa5" + b"%05x" % (i % 16**5) + b"\x80" for i in range(n // 7))
        ),
        "empty maps in a list field": raw_message("data-release", array(n) + b"\x80" * n),
        "short strs": raw_message("data-release", array(n // 3) + b"\xa2ab" * (n // 3)),
        "nested arrays": raw_message("submit", b"\x01", b"\x01", b"\xa1f", b"\x00", b"\x91" * (n - 8) + b"\x90", b"\x00"),
        "deep info": raw_message("info-reply", b"\x01", map_(1) + b"\xa1k" + b"\x91" * 1000 + b"\xc0"),
        "array announcing 4G items": raw_message("data-release", b"\xdd\xff\xff\xff\xff" + b"\xa1k" * 1000),
    }


def peak_of(decode, body: bytes) -> tuple[int, str]:
    """(peak bytes allocated while ``decode(body)`` runs, what happened)."""
    tracemalloc.start()
    try:
        try:
            decode(body)
            outcome = "decoded"
        except (MalformedMessage, ValueError) as exc:
            outcome = f"refused: {str(exc)[:70]}"
        return tracemalloc.get_traced_memory()[1], outcome
    finally:
        tracemalloc.stop()


def plain_unpack(body: bytes) -> None:
    """What decode did before: msgpack with its default limits, types checked afterwards."""
    msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=True)


@pytest.mark.timeout(300)
def test_crafted_bodies_cost_a_small_multiple_of_their_size():
    # before: measured on 1 MiB bodies (at 16 MiB, plain msgpack would take this test over 1 GiB)
    before = {kind: peak_of(plain_unpack, body)[0] / len(body) for kind, body in crafted(2**20).items()}
    lines = []
    for kind, body in crafted(MAX_BODY).items():
        peak, outcome = peak_of(lambda b: m.decode(Frame(b)), body)
        ratio = peak / len(body)
        lines.append(f"HOSTILE-DECODE {kind:28} {len(body) / 2**20:5.1f} MiB: before x{before[kind]:5.1f}, "
                     f"after x{ratio:5.2f} ({outcome})")
        assert outcome.startswith("refused"), (kind, outcome)
        assert peak <= m.DECODE_AMPLIFICATION * len(body) + m.DECODE_SLACK, (kind, peak)
    print("\n" + "\n".join(lines))
    assert max(before.values()) > 40  # what the bound is for: empty containers cost 64-72 bytes a byte


def test_bodies_that_pass_the_walk_cost_what_it_estimated():
    """Bodies shaped like real traffic, as large as MAX_DECODE_COST lets them be: decoded, within
    the bound; a frame's worth of them is refused."""
    n = 12 * 2**20 // 42
    key = b"\xd9\x28" + b"k" * 40
    bodies = {
        "40-char keys": raw_message("data-release", array(n) + key * n),
        "40-char strs in info": raw_message("info-reply", b"\x07", map_(1) + b"\xa1k" + array(n) + key * n),
    }
    for kind, body in bodies.items():
        peak, outcome = peak_of(lambda b: m.decode(Frame(b)), body)
        print(f"\nHOSTILE-DECODE {kind} {len(body) / 2**20:.1f} MiB: decoded at x{peak / len(body):.2f}")
        assert outcome == "decoded", (kind, outcome)
        assert peak <= m.DECODE_AMPLIFICATION * len(body) + m.DECODE_SLACK
    full = MAX_BODY // 42 - 10
    with pytest.raises(MalformedMessage, match="would take over 33554432 bytes"):
        m.decode(Frame(raw_message("data-release", array(full) + key * full)))


def big_info_reply(workers: int) -> m.InfoReply:
    sim = SchedulerSim()
    for conn in range(1, workers + 1):
        sim.worker(conn, f"worker-{conn:05d}.cluster.lab.example.org", nthreads=64)
    for conn in range(100_001, 100_051):
        sim.client(conn, name=f"client-{conn}", user=f"user{conn % 10}")
        for call in range(4):
            for batch in range(20):
                sim.msg(conn, m.SubmitBatch(batch, call, "sklearn.model_selection._validation._fit_and_score"))
    info = sim.state.info()
    info["history"] = [{"time": 1.7e9 + i, "done": 1e3 * i, "failed": 3.0, "running": 6e4, "queued": 12.0}
                       for i in range(300)]
    return m.InfoReply(1, info)


@pytest.mark.parametrize("workers", [1000, 5000])
def test_a_large_cluster_s_info_reply_decodes(workers):
    reply = big_info_reply(workers)
    body = message_bytes(reply)
    (frame,) = FrameDecoder().feed(body)
    peak, outcome = peak_of(lambda _: m.decode(frame), frame.body)
    print(f"\nHOSTILE-DECODE InfoReply of {workers} workers: {len(frame.body) / 2**10:.0f} KiB, "
          f"decoded at x{peak / len(frame.body):.1f}")
    assert outcome == "decoded"
    assert m.decode(frame) == reply


LONG = "k" * 60


@pytest.mark.parametrize("msg", [
    m.ReleaseData([f"ndarray-{i:032x}" for i in range(100_000)]),  # every key of a big scatter, released at once
    m.DeleteData([f"ndarray-{i:032x}" for i in range(100_000)]),
    m.RegisterWorker("w", 4096, 1, "h", 0, "tcp://h:1", "d", [f"{i:016x}/{i}" for i in range(8192)]),
    m.SubmitBatch(1, 2, "f", 0, (b"x",), [f"DataFrame-{i:032x}" for i in range(10_000)], 3),
    m.Execute(1, 1, "f", (b"x",), [f"DataFrame-{i:032x}" for i in range(10_000)], "s/1"),
    m.DataUpload("k", "seg", list(range(2**40, 2**40 + 4096)), "d"),
    m.BatchDone(1, m.FAILED, "w", "every worker has been paused ... " * 20_000),
    m.Closing(LONG * 1000),
])
def test_large_legitimate_messages_decode(msg):
    body = message_bytes(msg)
    assert len(body) > m.WALK_MIN  # so the walk runs
    (frame,) = FrameDecoder().feed(body)
    assert m.decode(frame) == msg


def test_walk_refuses_what_decode_would_refuse_anyway():
    big = "x" * (m.WALK_MIN + 10)
    cases = {
        "trailing": msgpack.packb(["closing", big]) + b"\x00",
        "truncated": msgpack.packb(["closing", big])[:-5],
        "ext type": raw_message("closing", b"\xc7\x10\x05" + b"x" * (m.WALK_MIN + 16)),
        "map in a fixed message": raw_message("data-release", b"\x81\xa1k" + msgpack.packb(big)),
        "list in a list field": raw_message("data-release", b"\x91\x91" + msgpack.packb(big)),
    }
    for kind, body in cases.items():
        with pytest.raises(MalformedMessage):
            m.decode(Frame(body))
        assert len(body) > m.WALK_MIN, kind


def test_the_op_is_read_before_decoding():
    with pytest.raises(MalformedMessage, match="unknown op"):
        m.decode(Frame(raw_message("no-such-op", array(2**20) + b"\x90" * 2**20)))
    with pytest.raises(MalformedMessage, match="expected 1 fields"):
        m.decode(Frame(raw_message("heartbeat", b"\x00", b"\x00")))


def test_every_message_shape_is_derived_from_its_fields():
    shapes = {cls.op: m._SHAPES[cls] for cls in m.registry().values()}
    assert shapes["info-reply"] == (1 + m.INFO_MAX_DEPTH, True, m.INFO_AMPLIFICATION)
    assert shapes["heartbeat"] == (1, False, m.DECODE_AMPLIFICATION)
    assert shapes["data-release"] == (2, False, m.DECODE_AMPLIFICATION)
    assert sum(maps for _, maps, _ in shapes.values()) == 1  # only InfoReply carries a free-form map


# ------------------------------------------------- what the scheduler stores (state.py)


def registered_worker(sim: SchedulerSim, conn: int, msg: m.RegisterWorker) -> list:
    sim(PeerConnected(conn, f"tcp://10.0.1.{conn}:41000", WORKER, "root", True))
    return sim.msg(conn, msg)


def executes(out: list) -> list[m.Execute]:
    return [c.message for c in out if isinstance(c, Send) and isinstance(c.message, m.Execute)]


def test_a_worker_claiming_a_billion_threads_is_refused_and_takes_nothing():
    sim = SchedulerSim()
    sim.client(1)
    for batch in range(20):
        assert sim.msg(1, m.SubmitBatch(batch, 1, "fit", 0, (b"x",))) == []
    out = registered_worker(sim, 2, m.RegisterWorker("greedy", 10**9))
    assert out == [Close(2, f"nthreads must be between 1 and {MAX_NTHREADS}")]
    assert sim.state.workers == {} and not executes(out)
    fair = sim.worker(3, "fair", nthreads=4)  # a real worker still gets its slots' worth, and no more
    assert len(executes(fair)) == 4


def test_max_nthreads_is_the_scheduler_s_to_choose():
    sim = SchedulerSim(max_nthreads=8)
    assert registered_worker(sim, 1, m.RegisterWorker("w", 9)) == [Close(1, "nthreads must be between 1 and 8")]
    assert sim.worker(2, "w2", nthreads=8) == []
    assert SchedulerSim().worker(1, "big", nthreads=MAX_NTHREADS) == []


@pytest.mark.parametrize("change, reason", [
    ({"pid": -1}, "pid must be between"),
    ({"pid": 2**40}, "pid must be between"),
    ({"memory_limit": -1}, "memory_limit must be between"),
    ({"memory_limit": 2**63}, "memory_limit must be between"),
    ({"data_address": "tcp://" + "h" * 400 + ":1"}, "data_address must be at most"),
    ({"share_domain": "d" * (MAX_NAME + 1)}, "share_domain must be at most"),
    ({"running": ["s" * (MAX_REF + 1)]}, "a batch ref must be at most"),
])
def test_worker_fields_scheduling_depends_on_are_refused_out_of_range(change, reason):
    fields = {"name": "w", "nthreads": 2, "pid": 10, "host": "h", "memory_limit": 2**30, "data_address": "tcp://h:1",
              "share_domain": "d", "running": [], **change}
    out = registered_worker(SchedulerSim(), 1, m.RegisterWorker(**fields))
    assert len(out) == 1 and isinstance(out[0], Close) and out[0].reason.startswith(reason), out


def test_names_for_display_are_cut_not_refused():
    sim = SchedulerSim()
    sim(PeerConnected(1, "tcp://10.0.0.1:1", CLIENT, "ann", True))
    sim.msg(1, m.RegisterClient("n" * 10_000, 5, "h" * 10_000, "session"))
    assert len(sim.state.clients[1].name) == MAX_NAME and len(sim.state.clients[1].host) == MAX_NAME
    sim.msg(1, m.SubmitBatch(1, 1, "f" * 10_000, 0, (b"x",)))
    (execute,) = executes(sim.worker(2, "w" * 10_000))
    assert execute.func_name == "f" * MAX_NAME
    assert sim.state.workers[2].name == "w" * MAX_NAME


@pytest.mark.parametrize("change, reason", [
    ({"session": "s" * (MAX_NAME + 1)}, "session must be at most"),
    ({"pid": -5}, "pid must be between"),
])
def test_client_fields_are_refused_out_of_range(change, reason):
    sim = SchedulerSim()
    sim(PeerConnected(1, "tcp://10.0.0.1:1", CLIENT, "ann", True))
    out = sim.msg(1, m.RegisterClient(**{"name": "c", "pid": 5, "host": "h", "session": "s", **change}))
    assert len(out) == 1 and isinstance(out[0], Close) and out[0].reason.startswith(reason), out
    assert sim.state.clients == {}


@pytest.mark.parametrize("change, reason", [
    ({"keys": [f"k{i}" for i in range(MAX_KEYS_PER_BATCH + 1)]}, "a batch may name at most"),
    ({"keys": ["k" * 201]}, "data keys must be at most"),
    ({"priority": 2**31}, "priority must be between"),
    ({"priority": -(2**31) - 1}, "priority must be between"),
])
def test_a_batch_out_of_range_closes_its_client(change, reason):
    sim = SchedulerSim()
    sim.client(1)
    sim.msg(1, m.SubmitBatch(1, 7, "fit", 0, (b"x",)))  # queued before: dropped with the client
    out = sim.msg(1, m.SubmitBatch(**{"batch_id": 2, "call_id": 7, "func_name": "fit", "frames": (b"x",), **change}))
    assert len(out) == 1 and isinstance(out[0], Close) and out[0].reason.startswith(reason), out
    assert sim.state.clients == {} and sim.state.tasks == {}
    assert executes(sim.worker(2, "w")) == []


@pytest.mark.parametrize("duration", [float("nan"), float("inf"), -1e300, 1e300])
def test_a_reported_duration_never_spoils_the_fair_share(duration):
    sim = SchedulerSim()
    sim.client(1)
    sim.msg(1, m.SubmitBatch(1, 1, "fit", 0, (b"x",)))
    (execute,) = executes(sim.worker(2, "w"))
    sim.msg(2, m.TaskDone(execute.task_id, execute.attempt, m.OK, duration, (b"r",)))
    usage = sim.state.share.peek("ann").usage
    assert 0.0 <= usage <= 1e7, usage


def test_reported_memory_is_clamped():
    sim = SchedulerSim()
    sim.worker(1, "w")
    sim.msg(1, m.Heartbeat(-(2**63)))
    assert sim.state.workers[1].memory == 0


def test_a_recovered_batch_with_an_absurd_ref_closes_its_worker():
    sim = SchedulerSim()
    sim.worker(1, "w")
    out = sim.msg(1, m.Recovered("r" * (MAX_REF + 1), m.OK, 1.0, (b"r",)))
    assert out == [Close(1, f"a batch ref must be at most {MAX_REF} characters")]
    assert sim.state.workers == {} and sim.state.recovered == {}
