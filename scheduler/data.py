"""Where scattered data lives: the scheduler's pure directory of data keys.

The scheduler never holds the bytes: it knows which client owns each key,
which workers hold a copy, and who is waiting for one.  A worker that needs a
key is pointed at peers that hold it; if none does, the owning client is asked
for its copy, which goes to one worker, and every other waiting worker then
fetches it from that one.  So each key crosses the scheduler at most once per
time no worker holds it, and every other copy moves worker to worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..protocol import messages as m

ConnId = int
MAX_KEY_LENGTH = 200
MAX_SOURCES = 3


@dataclass(slots=True)
class DataRecord:
    key: str
    owner: ConnId
    nbytes: int
    holders: dict = field(default_factory=dict)  # worker conn -> None, ordered
    waiting: dict = field(default_factory=dict)  # worker conns waiting for a copy -> None
    uploading_to: ConnId | None = None  # worker receiving the owner's copy through us


Send = Callable[[ConnId, m.Message], None]


class DataDirectory:
    """Pure bookkeeping; every method reports messages to send through ``send``."""

    def __init__(self) -> None:
        self.records: dict[str, DataRecord] = {}
        self.held: dict[ConnId, dict[str, int]] = {}  # worker -> key -> nbytes
        self.data_addresses: dict[ConnId, str] = {}

    # ---------------------------------------------------------------- workers
    def worker_joined(self, worker: ConnId, data_address: str) -> None:
        self.held[worker] = {}
        self.data_addresses[worker] = data_address

    def worker_left(self, worker: ConnId, send: Send) -> None:
        for key in self.held.pop(worker, {}):
            record = self.records.get(key)
            if record is not None:
                record.holders.pop(worker, None)
        self.data_addresses.pop(worker, None)
        for record in self.records.values():
            record.waiting.pop(worker, None)
            if record.uploading_to == worker:
                record.uploading_to = None
                self._request_upload(record, send)

    def need(self, worker: ConnId, key: str, from_owner: bool, send: Send) -> None:
        record = self.records.get(key)
        if record is None:
            send(worker, m.DataMissing(key, f"data {key[:60]!r} is not available: its client released it or disconnected"))
            return
        if worker in record.holders:  # it says it lacks the key: it lost it
            del record.holders[worker]
            self.held[worker].pop(key, None)
        sources = [] if from_owner else self._sources(record, worker)
        if sources:
            send(worker, m.DataSources(key, sources))
            return
        record.waiting[worker] = None
        if record.uploading_to is None:
            self._request_upload(record, send)

    def stored(self, worker: ConnId, key: str, nbytes: int, send: Send) -> None:
        record = self.records.get(key)
        if record is None:
            send(worker, m.DeleteData([key]))  # released while it travelled
            return
        record.holders[worker] = None
        self.held[worker][key] = max(nbytes, 0)
        record.waiting.pop(worker, None)
        if record.uploading_to == worker:
            record.uploading_to = None
        address = self.data_addresses.get(worker, "")
        for other in list(record.waiting):
            if address:
                send(other, m.DataSources(key, [address]))
                del record.waiting[other]
        if record.waiting and record.uploading_to is None:  # the holder serves no peers
            self._request_upload(record, send)

    def holders_of(self, key: str) -> dict:
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

    def upload(self, owner: ConnId, key: str, frames: tuple, send: Send) -> None:
        record = self.records.get(key)
        if record is None or record.owner != owner:
            return
        target = record.uploading_to
        if target is None or target not in self.held:
            target = next(iter(record.waiting), None)
            if target is None:
                return
            record.uploading_to = target
        send(target, m.StoreData(key, frames))

    def release(self, owner: ConnId, keys: list[str], send: Send) -> None:
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

    def client_left(self, owner: ConnId, send: Send) -> None:
        self.release(owner, [k for k, r in self.records.items() if r.owner == owner], send)

    # -------------------------------------------------------------- internals
    def _sources(self, record: DataRecord, exclude: ConnId) -> list[str]:
        addresses = [self.data_addresses.get(w, "") for w in record.holders if w != exclude]
        return [a for a in addresses if a][:MAX_SOURCES]

    def _request_upload(self, record: DataRecord, send: Send) -> None:
        target = next(iter(record.waiting), None)
        if target is None:
            return
        record.uploading_to = target
        send(record.owner, m.UploadRequest(record.key))

    def info(self, worker: ConnId) -> dict:
        held = self.held.get(worker, {})
        return {"data_keys": len(held), "data_bytes": sum(held.values())}

    def validate(self) -> None:
        for key, record in self.records.items():
            for worker in record.holders:
                assert key in self.held[worker], (key, worker)
            assert record.uploading_to is None or record.uploading_to in self.held
        for worker, held in self.held.items():
            for key in held:
                assert worker in self.records[key].holders, (key, worker)
