"""The scheduler's handling of shared memory segments for scattered data, event by event.

Workers register with a ``share_domain`` (one machine, /dev/shm and user); the
directory remembers one segment per key and domain and hands its name to the
workers of that domain, peers or uploads to the others.  Every step is
followed by ``validate()`` (SchedulerState's, which includes DataDirectory's:
``support.SchedulerSim``).
"""

from __future__ import annotations

import pytest
from support import SchedulerSim

from jobsched.payload.shm import MAX_FRAMES
from jobsched.protocol import messages as m
from jobsched.scheduler.data import DataDirectory, Segment
from jobsched.scheduler.state import Send

pytestmark = pytest.mark.timeout(30)

D1 = "d1" + "0" * 30  # the client's machine
D2 = "d2" + "0" * 30  # another machine
S = "jobsched-1234-" + "a" * 32  # a segment the client wrote
W = "jobsched-1235-" + "b" * 32  # a segment a worker wrote
SIZES = [120, 4096]
FRAMES = (b"pickled X", b"\x00" * 16)


def addr(conn: int) -> str:
    return f"tcp://10.0.1.{conn}:9000"


class Sim(SchedulerSim):
    """``support.SchedulerSim`` with workers on machines (share domains) and the record of key X."""

    def join(self, conn: int, domain: str, data_address: str | None = None) -> None:
        """Worker ``w<conn>`` joins from ``domain``, serving its data at ``addr(conn)`` by default."""
        address = addr(conn) if data_address is None else data_address
        assert self.worker(conn, f"w{conn}", data_address=address, share_domain=domain) == []

    @property
    def record(self):
        return self.state.data.records["X"]


def cluster() -> Sim:
    """Client 1 on D1; workers 2, 3 on D1; 4, 6 on D2; 5 without shared memory."""
    sim = Sim()
    sim.client(1)
    sim.join(2, D1)
    sim.join(3, D1)
    sim.join(4, D2)
    sim.join(5, "")
    sim.join(6, D2)
    assert sim.msg(1, m.DataRegister("X", 5000)) == []
    return sim


# ------------------------------------------------------------------ registration


def test_domains_are_recorded_and_counted():
    sim = cluster()
    data = sim.state.data
    assert data.domains == {2: D1, 3: D1, 4: D2, 5: "", 6: D2}
    assert data.domain_sizes == {D1: 2, D2: 2}  # no entry for "no domain"
    sim.leave(3)
    assert data.domain_sizes == {D1: 1, D2: 2}
    sim.leave(2)
    assert data.domain_sizes == {D2: 2}
    assert 2 not in data.domains and 3 not in data.domains


# ------------------------------------------------------------------ client segments


def test_upload_request_carries_the_target_workers_domain():
    sim = cluster()
    assert sim.msg(4, m.NeedData("X")) == [Send(1, m.UploadRequest("X", D2))]
    sim = cluster()
    assert sim.msg(5, m.NeedData("X")) == [Send(1, m.UploadRequest("X", ""))]
    sim = cluster()
    assert sim.msg(2, m.NeedData("X")) == [Send(1, m.UploadRequest("X", D1))]


def test_upload_request_carries_no_domain_for_a_worker_that_cannot_map():
    sim = cluster()
    assert sim.msg(2, m.NeedData("X", shared=False)) == [Send(1, m.UploadRequest("X", ""))]


def test_client_segment_goes_to_every_waiting_worker_of_its_domain_at_once():
    sim = cluster()
    assert sim.msg(2, m.NeedData("X")) == [Send(1, m.UploadRequest("X", D1))]
    assert sim.msg(4, m.NeedData("X")) == []
    assert sim.msg(3, m.NeedData("X")) == []
    assert sim.msg(5, m.NeedData("X")) == []
    assert sim.msg(1, m.DataUpload("X", S, SIZES, D1)) == [
        Send(2, m.StoreData("X", S, SIZES)),
        Send(3, m.StoreData("X", S, SIZES)),
    ]
    assert sim.record.segments == {D1: Segment(1, S, SIZES)}
    assert sim.record.waiting == {4: True, 5: True}
    assert sim.record.uploading_to is None
    # the first worker of D1 to hold it serves the others over the network
    assert sim.msg(2, m.DataStored("X", 5000)) == [
        Send(4, m.DataSources("X", [addr(2)], True)),  # D2 has two workers: 4 should share what it gets
        Send(5, m.DataSources("X", [addr(2)], False)),  # no domain: nobody to share with
    ]
    assert sim.msg(3, m.DataStored("X", 5000)) == []
    assert sim.record.waiting == {}
    # a worker of D1 joining later maps the segment directly; one of D2 gets peers
    sim.join(7, D1)
    assert sim.msg(7, m.NeedData("X")) == [Send(7, m.StoreData("X", S, SIZES))]
    assert sim.msg(6, m.NeedData("X")) == [Send(6, m.DataSources("X", [addr(2), addr(3)], True))]


def test_client_segment_is_not_offered_to_a_worker_that_asked_without_shared_memory():
    sim = cluster()
    assert sim.msg(2, m.NeedData("X")) == [Send(1, m.UploadRequest("X", D1))]
    assert sim.msg(1, m.DataUpload("X", S, SIZES, D1)) == [Send(2, m.StoreData("X", S, SIZES))]
    # mapping failed on worker 2: it asks again, for bytes
    assert sim.msg(2, m.NeedData("X", shared=False)) == [Send(1, m.UploadRequest("X", ""))]
    assert sim.record.waiting == {2: False}
    # worker 3 of the same domain may still map it
    assert sim.msg(3, m.NeedData("X")) == [Send(3, m.StoreData("X", S, SIZES))]
    # the bytes go to 2, which is told not to make a segment of its own
    assert sim.msg(1, m.DataUpload("X", frames=FRAMES)) == [Send(2, m.StoreData("X", "", [], False, FRAMES))]
    assert sim.msg(2, m.DataStored("X", 5000)) == []
    assert sim.record.holders == {2: None}
    assert sim.record.segments == {D1: Segment(1, S, SIZES)}


def test_a_holder_that_lost_its_copy_is_offered_the_segment_again():
    sim = cluster()
    sim.msg(2, m.NeedData("X"))
    sim.msg(1, m.DataUpload("X", S, SIZES, D1))
    sim.msg(2, m.DataStored("X", 5000))
    assert sim.msg(2, m.NeedData("X")) == [Send(2, m.StoreData("X", S, SIZES))]
    assert sim.record.holders == {}
    assert sim.state.data.held[2] == {}


def test_broadcast_uploads_once_into_the_clients_domain():
    sim = cluster()
    assert sim.msg(1, m.DataRegister("B", 10, broadcast=True)) == [Send(1, m.UploadRequest("B", D1))]
    assert sim.msg(1, m.DataUpload("B", S, SIZES, D1)) == [
        Send(2, m.StoreData("B", S, SIZES)),
        Send(3, m.StoreData("B", S, SIZES)),
    ]
    assert sim.msg(3, m.DataStored("B", 10)) == [
        Send(4, m.DataSources("B", [addr(3)], True)),
        Send(5, m.DataSources("B", [addr(3)], False)),
        Send(6, m.DataSources("B", [addr(3)], True)),
    ]


def test_release_forgets_the_segment_and_tells_holders_and_waiters():
    sim = cluster()
    sim.msg(2, m.NeedData("X"))
    sim.msg(4, m.NeedData("X"))
    sim.msg(1, m.DataUpload("X", S, SIZES, D1))
    sim.msg(2, m.DataStored("X", 5000))
    sim.msg(3, m.NeedData("X"))
    sim.msg(3, m.DataStored("X", 5000))
    sim.msg(5, m.NeedData("X", from_owner=True))  # peers failed it
    assert sim.msg(1, m.ReleaseData(["X"])) == [
        Send(5, m.DataMissing("X", "data 'X' was released by its client")),
        Send(2, m.DeleteData(["X"])),
        Send(3, m.DeleteData(["X"])),
    ]
    assert sim.state.data.records == {}
    assert sim.msg(3, m.NeedData("X")) == [
        Send(3, m.DataMissing("X", "data 'X' is not available: its client released it or disconnected"))
    ]


# ------------------------------------------------------------------ worker segments


def worker_segment_cluster() -> Sim:
    """The client (not in a domain the workers share) sent bytes to worker 2, which put them
    in segment W; 3 (D1) and 4 (D2) were waiting."""
    sim = cluster()
    assert sim.msg(2, m.NeedData("X")) == [Send(1, m.UploadRequest("X", D1))]
    assert sim.msg(3, m.NeedData("X")) == []
    assert sim.msg(4, m.NeedData("X")) == []
    # the client is elsewhere after all: bytes.  D1 has two workers, so 2 should share
    assert sim.msg(1, m.DataUpload("X", frames=FRAMES)) == [Send(2, m.StoreData("X", "", [], True, FRAMES))]
    assert sim.msg(2, m.DataStored("X", 5000, W, SIZES)) == [
        Send(3, m.StoreData("X", W, SIZES)),
        Send(4, m.DataSources("X", [addr(2)], True)),
    ]
    assert sim.record.segments == {D1: Segment(2, W, SIZES)}
    return sim


def test_worker_segment_serves_later_workers_of_its_domain_and_peers_serve_the_others():
    sim = worker_segment_cluster()
    assert sim.msg(3, m.DataStored("X", 5000)) == []
    assert sim.record.segments == {D1: Segment(2, W, SIZES)}  # 3 mapped it; it created nothing
    sim.join(7, D1)
    assert sim.msg(7, m.NeedData("X")) == [Send(7, m.StoreData("X", W, SIZES))]
    assert sim.msg(6, m.NeedData("X")) == [Send(6, m.DataSources("X", [addr(2), addr(3)], True))]
    assert sim.msg(5, m.NeedData("X")) == [Send(5, m.DataSources("X", [addr(2), addr(3)], False))]
    # a worker of D1 that could not map it is pointed at peers, with no share
    sim.join(8, D1)
    assert sim.msg(8, m.NeedData("X", shared=False)) == [Send(8, m.DataSources("X", [addr(2), addr(3)], False))]


def test_worker_segment_of_another_domain_does_not_replace_or_leak():
    sim = worker_segment_cluster()
    # 4 (D2) got the bytes from 2 and made its own segment for D2
    assert sim.msg(4, m.DataStored("X", 5000, S, SIZES)) == []
    assert sim.record.segments == {D1: Segment(2, W, SIZES), D2: Segment(4, S, SIZES)}
    assert sim.msg(6, m.NeedData("X")) == [Send(6, m.StoreData("X", S, SIZES))]
    # a second segment reported for D1 does not replace the first
    assert sim.msg(3, m.DataStored("X", 5000, "jobsched-1236-" + "c" * 32, [1])) == []
    assert sim.record.segments[D1] == Segment(2, W, SIZES)


def test_share_flag_only_when_another_worker_of_the_domain_is_connected():
    sim = Sim()
    sim.client(1)
    sim.join(2, D1)
    sim.join(4, D2)
    sim.join(5, "")
    sim.msg(1, m.DataRegister("X", 10))
    assert sim.msg(2, m.NeedData("X")) == [Send(1, m.UploadRequest("X", D1))]
    assert sim.msg(1, m.DataUpload("X", frames=FRAMES)) == [Send(2, m.StoreData("X", "", [], False, FRAMES))]
    assert sim.msg(2, m.DataStored("X", 10)) == []
    assert sim.msg(4, m.NeedData("X")) == [Send(4, m.DataSources("X", [addr(2)], False))]
    sim.join(6, D2)  # now D2 has two workers
    assert sim.msg(6, m.NeedData("X")) == [Send(6, m.DataSources("X", [addr(2)], True))]
    assert sim.msg(6, m.NeedData("X", shared=False)) == [Send(6, m.DataSources("X", [addr(2)], False))]
    assert sim.msg(5, m.NeedData("X")) == [Send(5, m.DataSources("X", [addr(2)], False))]
    sim.leave(4)  # D2 is down to one again
    assert sim.msg(6, m.NeedData("X")) == [Send(6, m.DataSources("X", [addr(2)], False))]
    # two workers without shared memory are not a domain
    sim.join(7, "")
    assert sim.msg(7, m.NeedData("X")) == [Send(7, m.DataSources("X", [addr(2)], False))]


def test_creator_leaving_drops_its_segment_and_peers_serve_its_domain():
    sim = worker_segment_cluster()
    sim.msg(3, m.DataStored("X", 5000))
    sim.msg(4, m.DataStored("X", 5000))
    assert sim.leave(2) == []
    assert sim.record.segments == {}
    sim.join(7, D1)
    # not the dead segment: a peer that still holds (maps) it, and 7 should share its copy
    assert sim.msg(7, m.NeedData("X")) == [Send(7, m.DataSources("X", [addr(3), addr(4)], True))]


def test_creator_leaving_with_no_holder_left_leads_to_an_upload():
    sim = worker_segment_cluster()
    sim.leave(3)  # it was mapping W; gone before it reported
    sim.leave(4)  # it was fetching from 2; gone too
    assert sim.leave(2) == []
    assert sim.record.segments == {} and sim.record.holders == {}
    sim.join(7, D1)
    assert sim.msg(7, m.NeedData("X")) == [Send(1, m.UploadRequest("X", D1))]


def test_a_non_creator_leaving_keeps_the_segment():
    sim = worker_segment_cluster()
    sim.msg(3, m.DataStored("X", 5000))
    assert sim.leave(3) == []
    assert sim.record.segments == {D1: Segment(2, W, SIZES)}
    sim.join(7, D1)
    assert sim.msg(7, m.NeedData("X")) == [Send(7, m.StoreData("X", W, SIZES))]


def test_client_segment_survives_any_worker_leaving():
    sim = cluster()
    sim.msg(2, m.NeedData("X"))
    sim.msg(1, m.DataUpload("X", S, SIZES, D1))
    sim.msg(2, m.DataStored("X", 5000))
    sim.leave(2)
    assert sim.record.segments == {D1: Segment(1, S, SIZES)}
    assert sim.msg(3, m.NeedData("X")) == [Send(3, m.StoreData("X", S, SIZES))]


# ------------------------------------------------------------------ invalid references


BAD_REFERENCES = [
    ("jobsched-../../etc/passwd", [10]),
    ("../x", [10]),
    ("jobsched-" + "A" * 32, [10]),
    ("jobsched-" + "a" * 33, [10]),
    ("psm_1234", [10]),
    (S, []),
    (S, [1] * (MAX_FRAMES + 1)),
    (S, [-1]),
    (S, [True]),
    (S, [2**48]),
]
BAD_IDS = ["traversal", "dotdot", "uppercase", "too-long", "prefix", "no-sizes", "too-many", "negative", "bool", "huge"]


@pytest.mark.parametrize("segment, sizes", BAD_REFERENCES, ids=BAD_IDS)
def test_invalid_client_reference_is_not_relayed_and_bytes_are_asked_for(segment, sizes):
    sim = cluster()
    assert sim.msg(2, m.NeedData("X")) == [Send(1, m.UploadRequest("X", D1))]
    assert sim.msg(3, m.NeedData("X")) == []
    assert sim.msg(1, m.DataUpload("X", segment, sizes, D1)) == [Send(1, m.UploadRequest("X", ""))]
    assert sim.record.segments == {}
    assert sim.record.uploading_to == 2 and sim.record.waiting == {2: False, 3: True}
    assert sim.msg(1, m.DataUpload("X", frames=FRAMES)) == [Send(2, m.StoreData("X", "", [], False, FRAMES))]
    assert sim.msg(2, m.DataStored("X", 5000)) == [Send(3, m.DataSources("X", [addr(2)], True))]


def test_a_client_that_keeps_sending_bad_references_gets_one_request_per_reply():
    """No amplification: each bad reply leads to one UploadRequest for bytes, nothing else."""
    sim = cluster()
    for conn in (2, 3, 4, 5):
        sim.msg(conn, m.NeedData("X"))
    requests = 0
    for _ in range(50):
        out = sim.msg(1, m.DataUpload("X", "../evil", [10], D1))
        assert out == [Send(1, m.UploadRequest("X", ""))]
        requests += 1
    assert requests == 50 and sim.record.segments == {}
    assert sim.msg(1, m.DataUpload("X", frames=FRAMES)) == [Send(2, m.StoreData("X", "", [], False, FRAMES))]


def test_an_honest_client_answering_as_asked_needs_at_most_two_requests():
    """A client that answers a request for its own domain with a (bad) segment and one without
    with bytes, like Client._upload: the exchange ends after two requests."""
    sim = cluster()
    out = sim.msg(2, m.NeedData("X")) + sim.msg(3, m.NeedData("X")) + sim.msg(4, m.NeedData("X"))
    requests = 0
    stored = []
    for _ in range(20):
        asks = [c.message for c in out if c.conn == 1 and isinstance(c.message, m.UploadRequest)]
        deliveries = [c for c in out if isinstance(c.message, (m.StoreData, m.DataSources))]
        out = [c for c in out if c not in deliveries and not isinstance(c.message, m.UploadRequest)]
        assert out == []
        requests += len(asks)
        for ask in asks:
            if ask.share_domain == D1:
                out += sim.msg(1, m.DataUpload("X", "jobsched-nothex", [10], D1))
            else:
                out += sim.msg(1, m.DataUpload("X", frames=FRAMES))
        for delivery in deliveries:
            stored.append(delivery.conn)
            out += sim.msg(delivery.conn, m.DataStored("X", 5000))
        if not asks and not deliveries:
            break
    assert requests == 2
    assert sorted(stored) == [2, 3, 4]
    assert sim.record.waiting == {} and sim.record.segments == {}


def test_client_segment_for_a_worker_without_a_domain_is_not_relayed():
    sim = cluster()
    assert sim.msg(5, m.NeedData("X")) == [Send(1, m.UploadRequest("X", ""))]
    # an (odd) client answering a domainless request with a segment: kept for its own
    # domain's workers, and bytes are asked for
    assert sim.msg(1, m.DataUpload("X", S, SIZES, D1)) == [Send(1, m.UploadRequest("X", ""))]
    assert sim.record.segments == {D1: Segment(1, S, SIZES)}


def test_unsolicited_segment_upload_is_ignored():
    sim = cluster()
    assert sim.msg(1, m.DataUpload("X", S, SIZES, D1)) == []
    assert sim.record.segments == {}
    sim.client(9)
    sim.msg(2, m.NeedData("X"))
    assert sim.msg(9, m.DataUpload("X", S, SIZES, D1)) == []  # not the owner
    assert sim.record.segments == {}


@pytest.mark.parametrize("segment, sizes", BAD_REFERENCES, ids=BAD_IDS)
def test_data_stored_with_an_invalid_segment_is_ignored(segment, sizes):
    sim = cluster()
    sim.msg(2, m.NeedData("X"))
    sim.msg(3, m.NeedData("X"))
    sim.msg(1, m.DataUpload("X", frames=FRAMES))
    assert sim.msg(2, m.DataStored("X", 5000, segment, sizes)) == [Send(3, m.DataSources("X", [addr(2)], True))]
    assert sim.record.segments == {}
    assert sim.record.holders == {2: None}
    sim.join(7, D1)
    assert sim.msg(7, m.NeedData("X")) == [Send(7, m.DataSources("X", [addr(2)], True))]


def test_data_stored_with_a_segment_from_a_worker_without_a_domain_is_ignored():
    sim = cluster()
    sim.msg(5, m.NeedData("X"))
    sim.msg(1, m.DataUpload("X", frames=FRAMES))
    assert sim.msg(5, m.DataStored("X", 5000, W, SIZES)) == []
    assert sim.record.segments == {}


def test_data_stored_with_a_segment_for_a_released_key_is_deleted():
    sim = cluster()
    sim.msg(2, m.NeedData("X"))
    sim.msg(1, m.DataUpload("X", frames=FRAMES))
    sim.msg(1, m.ReleaseData(["X"]))
    assert sim.msg(2, m.DataStored("X", 5000, W, SIZES)) == [Send(2, m.DeleteData(["X"]))]
    assert sim.state.data.records == {}


# ------------------------------------------------------------------ races


def test_segment_for_a_worker_that_left_is_not_filed_under_the_next_workers_domain():
    sim = cluster()
    assert sim.msg(2, m.NeedData("X")) == [Send(1, m.UploadRequest("X", D1))]
    assert sim.msg(4, m.NeedData("X")) == []
    # worker 2 leaves before the client answers: the upload is passed on to 4, on D2
    assert sim.leave(2) == [Send(1, m.UploadRequest("X", D2))]
    # the client answers the first request (for D1, its own domain) with a segment
    out = sim.msg(1, m.DataUpload("X", S, SIZES, D1))
    assert Send(4, m.StoreData("X", S, SIZES)) not in out, out
    assert D2 not in sim.record.segments, sim.record.segments


# ------------------------------------------------------------------ the directory on its own


class Sent(list):
    def __call__(self, conn, message) -> None:
        self.append((conn, message))


def test_directory_directly_offers_a_segment_to_all_waiting_workers_of_its_domain():
    data = DataDirectory()
    sent = Sent()

    def step():
        data.validate()
        out = list(sent)
        sent.clear()
        return out

    data.worker_joined(10, addr(10), D1)
    data.worker_joined(11, addr(11), D1)
    data.worker_joined(12, addr(12), D2)
    data.worker_joined(13, "", D1)  # a worker that serves no peers
    step()
    assert data.register(1, "X", 100) is None
    data.need(10, "X", False, sent)
    assert step() == [(1, m.UploadRequest("X", D1))]
    data.need(12, "X", False, sent)
    data.need(11, "X", False, sent, shared=False)
    data.need(13, "X", False, sent)
    assert step() == []
    data.upload(1, "X", (), sent, S, SIZES, D1)
    assert step() == [(10, m.StoreData("X", S, SIZES)), (13, m.StoreData("X", S, SIZES))]
    assert data.records["X"].waiting == {12: True, 11: False}
    assert data.records["X"].uploading_to is None
    data.stored(13, "X", 100, sent)  # a holder without an address: the others still need a copy
    assert step() == [(1, m.UploadRequest("X", D2))]
    data.upload(1, "X", FRAMES, sent)
    assert step() == [(12, m.StoreData("X", "", [], False, FRAMES))]  # 12 is alone in D2
    data.stored(12, "X", 100, sent)
    assert step() == [(11, m.DataSources("X", [addr(12)], False))]
    data.worker_left(13, sent)
    data.worker_left(10, sent)
    assert step() == []
    assert data.records["X"].segments == {D1: Segment(1, S, SIZES)}
    data.worker_left(1, sent)  # not a worker: nothing about it is dropped
    step()
    data.client_left(1, sent)
    assert step() == [(12, m.DeleteData(["X"]))]
    assert data.records == {}
