"""Where scattered data lives: the scheduler's pure directory of data keys.

The scheduler never holds the bytes: it knows which client owns each key,
which workers hold a copy, and who is waiting for one.  A worker that needs a
key is pointed at peers that hold it; if none does, the owning client is asked
for its copy, which goes to one worker, and every other waiting worker then
fetches it from that one.  So each key crosses the scheduler at most once per
time no worker holds it, and every other copy moves worker to worker.

Within a share domain (one machine and user, see ``payload.shm``) a copy in a
shared memory segment serves every worker there: the directory remembers, per
key and domain, the segment and its creator, and sends waiting workers of that
domain its name rather than a peer to fetch from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..payload.shm import valid_reference
from ..protocol import messages as m
from .records import ConnId

MAX_KEY_LENGTH = 200
MAX_SOURCES = 3


@dataclass(slots=True)
class DataRecord:
    key: str
    owner: ConnId
    nbytes: int
    holders: dict[ConnId, None] = field(default_factory=dict)  # worker conn -> None, ordered
    waiting: dict[ConnId, bool] = field(default_factory=dict)  # worker conns waiting for a copy -> may it map a segment
    uploading_to: ConnId | None = None  # worker receiving the owner's copy through us
    segments: dict[str, Segment] = field(default_factory=dict)  # share domain -> Segment


@dataclass(slots=True, frozen=True)
class Segment:
    creator: ConnId  # the client or worker that unlinks it
    name: str
    sizes: list[int]


Sender = Callable[[ConnId, m.Message], None]  # sends a message to a peer


class DataDirectory:
    """Pure bookkeeping; every method reports messages to send through ``send``."""

    def __init__(self) -> None:
        self.records: dict[str, DataRecord] = {}
        self.held: dict[ConnId, dict[str, int]] = {}  # worker -> key -> nbytes
        self.data_addresses: dict[ConnId, str] = {}
        self.domains: dict[ConnId, str] = {}  # worker -> share domain ("" for none)
        self.domain_sizes: dict[str, int] = {}  # share domain -> workers in it

    # ---------------------------------------------------------------- workers
    def worker_joined(self, worker: ConnId, data_address: str, domain: str = "") -> None:
        self.held[worker] = {}
        self.data_addresses[worker] = data_address
        self.domains[worker] = domain
        if domain:
            self.domain_sizes[domain] = self.domain_sizes.get(domain, 0) + 1

    def worker_left(self, worker: ConnId, send: Sender) -> None:
        for key in self.held.pop(worker, {}):
            record = self.records.get(key)
            if record is not None:
                record.holders.pop(worker, None)
        self.data_addresses.pop(worker, None)
        domain = self.domains.pop(worker, "")
        if domain:
            self.domain_sizes[domain] -= 1
            if not self.domain_sizes[domain]:
                del self.domain_sizes[domain]
        for record in self.records.values():
            record.waiting.pop(worker, None)
            segment = record.segments.get(domain)
            if segment is not None and segment.creator == worker:
                del record.segments[domain]  # its creator's exit unlinked it
            if record.uploading_to == worker:
                record.uploading_to = None
                self._request_upload(record, send)

    def need(self, worker: ConnId, key: str, from_owner: bool, send: Sender, shared: bool = True) -> None:
        record = self.records.get(key)
        if record is None:
            send(worker, m.DataMissing(key, f"data {key[:60]!r} is not available: its client released it or disconnected"))
            return
        if worker in record.holders:  # it says it lacks the key: it lost it
            del record.holders[worker]
            self.held[worker].pop(key, None)
        segment = record.segments.get(self.domains.get(worker, "")) if shared else None
        if segment is not None:
            send(worker, m.StoreData(key, segment.name, segment.sizes))
            return
        sources = [] if from_owner else self._sources(record, worker)
        if sources:
            send(worker, m.DataSources(key, sources, self._share(worker, shared)))
            return
        record.waiting[worker] = shared
        if record.uploading_to is None:
            self._request_upload(record, send)

    def stored(
        self, worker: ConnId, key: str, nbytes: int, send: Sender, segment: str = "", sizes: list[int] | None = None
    ) -> None:
        record = self.records.get(key)
        if record is None:
            send(worker, m.DeleteData([key]))  # released while it travelled
            return
        record.holders[worker] = None
        self.held[worker][key] = max(nbytes, 0)
        record.waiting.pop(worker, None)
        if record.uploading_to == worker:
            record.uploading_to = None
        domain = self.domains.get(worker, "")
        if segment and domain and domain not in record.segments and valid_reference(segment, sizes or ()):
            record.segments[domain] = Segment(worker, segment, list(sizes or ()))
        self._offer_segments(record, send)
        address = self.data_addresses.get(worker, "")
        for other, shared in list(record.waiting.items()):
            if address:
                send(other, m.DataSources(key, [address], self._share(other, shared)))
                del record.waiting[other]
        if record.waiting and record.uploading_to is None:  # the holder serves no peers
            self._request_upload(record, send)

    def holders_of(self, key: str) -> dict[ConnId, None]:
        record = self.records.get(key)
        return record.holders if record is not None else {}

    # ---------------------------------------------------------------- clients
    def register(self, owner: ConnId, key: str, nbytes: int) -> str | None:
        """Record a client's key; returns an error text for a bad key."""
        if not key or len(key) > MAX_KEY_LENGTH:
            return f"data key must be 1 to {MAX_KEY_LENGTH} characters"
        existing = self.records.get(key)
        if existing is not None and existing.owner != owner:
            return f"data key {key[:60]!r} belongs to another client"
        if existing is None:
            self.records[key] = DataRecord(key, owner, max(nbytes, 0))
        return None

    def upload(self, owner: ConnId, key: str, frames: m.Frames, send: Sender,
               segment: str = "", sizes: list[int] | None = None, domain: str = "") -> None:
        record = self.records.get(key)
        if record is None or record.owner != owner:
            return
        if segment:
            if record.uploading_to is not None:  # else nobody asked for it
                self._segment_uploaded(record, segment, list(sizes or ()), domain, send)
            return
        target = record.uploading_to
        if target is None or target not in self.held:
            target = next(iter(record.waiting), None)
            if target is None:
                return
            record.uploading_to = target
        send(target, m.StoreData(key, "", [], self._share(target, record.waiting.get(target, True)), frames))

    def _segment_uploaded(self, record: DataRecord, segment: str, sizes: list[int], domain: str, send: Sender) -> None:
        """The client put the data in a shared segment of its domain: offer it to that domain's
        waiting workers; if there are none (the one we asked for left), ask again for whoever
        waits, for bytes if the reference was bad."""
        if domain and domain in self.domain_sizes and valid_reference(segment, sizes):
            record.segments[domain] = Segment(record.owner, segment, sizes)
        elif record.uploading_to in record.waiting:
            record.waiting[record.uploading_to] = False  # so the next request asks for bytes
        record.uploading_to = None
        if not self._offer_segments(record, send) and record.waiting:
            self._request_upload(record, send)  # else the others fetch from those it went to

    def release(self, owner: ConnId, keys: list[str], send: Sender) -> None:
        by_worker: dict[ConnId, list[str]] = {}
        for key in keys:
            record = self.records.get(key)
            if record is None or record.owner != owner:
                continue
            del self.records[key]
            for worker in record.holders:
                self.held[worker].pop(key, None)
                by_worker.setdefault(worker, []).append(key)
            for worker in record.waiting:
                send(worker, m.DataMissing(key, f"data {key[:60]!r} was released by its client"))
        for worker, worker_keys in by_worker.items():
            send(worker, m.DeleteData(worker_keys))

    def shed(self, worker: ConnId, keep: set[str], send: Sender) -> int:
        """Take back ``worker``'s copies of keys outside ``keep`` (a worker paused by its memory
        limit frees what no batch of its own needs; another copy, or the owner's, serves a later
        batch).  Keys whose shared segment this worker created stay: its siblings map them.
        Returns the bytes freed."""
        held = self.held.get(worker, {})
        shed = [key for key in held if key not in keep and not self._created_segment(worker, key)]
        for key in shed:
            self.records[key].holders.pop(worker, None)
        if shed:
            send(worker, m.DeleteData(shed))
        return sum(held.pop(key) for key in shed)

    def _created_segment(self, worker: ConnId, key: str) -> bool:
        record = self.records.get(key)
        return record is not None and any(s.creator == worker for s in record.segments.values())

    def client_left(self, owner: ConnId, send: Sender) -> None:
        self.release(owner, [k for k, r in self.records.items() if r.owner == owner], send)

    # -------------------------------------------------------------- internals
    def _offer_segments(self, record: DataRecord, send: Sender) -> int:
        """Send waiting workers the name of a segment of their domain, if there is one;
        returns to how many."""
        offered = 0
        for worker, shared in list(record.waiting.items()):
            segment = record.segments.get(self.domains.get(worker, "")) if shared else None
            if segment is not None:
                del record.waiting[worker]
                if record.uploading_to == worker:
                    record.uploading_to = None
                send(worker, m.StoreData(record.key, segment.name, segment.sizes))
                offered += 1
        return offered

    def _share(self, worker: ConnId, shared: bool) -> bool:
        """Should ``worker`` put bytes it receives in a segment: are there others in its domain?"""
        return shared and self.domain_sizes.get(self.domains.get(worker, ""), 0) > 1

    def _sources(self, record: DataRecord, exclude: ConnId) -> list[str]:
        addresses = [self.data_addresses.get(w, "") for w in record.holders if w != exclude]
        return [a for a in addresses if a][:MAX_SOURCES]

    def _request_upload(self, record: DataRecord, send: Sender) -> None:
        target = next(iter(record.waiting), None)
        if target is None:
            return
        record.uploading_to = target
        domain = self.domains.get(target, "") if record.waiting[target] else ""
        send(record.owner, m.UploadRequest(record.key, domain))

    def info(self, worker: ConnId) -> dict[str, int]:
        held = self.held.get(worker, {})
        return {"data_keys": len(held), "data_bytes": sum(held.values())}

    def validate(self) -> None:
        for key, record in self.records.items():
            for worker in record.holders:
                assert key in self.held[worker], (key, worker)
            assert record.uploading_to is None or record.uploading_to in self.held
            for domain, segment in record.segments.items():
                assert segment.creator == record.owner or self.domains.get(segment.creator) == domain, (key, segment)
        for worker, held in self.held.items():
            for key in held:
                assert worker in self.records[key].holders, (key, worker)
