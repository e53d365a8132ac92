"""The scheduler's pure state machine: ``handle(event) -> list[command]``.

No sockets, no clock reads (time arrives as ``Ticked``), and every decision
depends only on insertion order, so a sequence of events always produces the
same commands.  The asyncio server (``server.py``) feeds it and carries out
the commands.

Scheduling: each joblib call has its own FIFO queue; calls with queued work and
room under their concurrency cap take turns (round robin), and workers with a
free slot take turns too.  A worker that dies has its running batches
requeued at the front of their call's queue with a new attempt number; a batch
that has been running on ``max_deaths`` workers when they died fails with a
``lost`` status instead of being retried forever.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

from ..protocol import messages as m
from .data import DataDirectory, Sender
from .records import (
    SHORT_BATCH,
    CallKey,
    CallRecord,
    ClientRecord,
    Close,
    Command,
    ConnId,
    Event,
    LogEvent,
    MessageReceived,
    PeerConnected,
    PeerDisconnected,
    Send,
    TaskRecord,
    Ticked,
    WorkerRecord,
)

__all__ = [  # the events and commands, for the state's users
    "MAX_NAME", "SHORT_BATCH", "Close", "Command", "Event", "MessageReceived", "PeerConnected", "PeerDisconnected",
    "SchedulerConfig", "SchedulerState", "Send", "Ticked",
]

MAX_NAME = 200  # peers name themselves: keep what we store and report bounded


@dataclass(frozen=True)
class SchedulerConfig:
    address: str = ""
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 30.0  # silence after which a worker is declared dead
    max_deaths: int = 3  # workers a batch may take down before it fails
    no_worker_timeout: float = 60.0  # how long a batch waits when no worker is connected
    # Send a worker whose slots are all busy one more batch per slot, when the call's batches are
    # short: it starts the next at once instead of waiting a round trip.  Long batches never
    # wait behind another one, so the load stays balanced at the end of a call.
    prefetch: bool = False


DEFAULT_CONFIG = SchedulerConfig()


class SchedulerState:
    def __init__(self, config: SchedulerConfig = DEFAULT_CONFIG) -> None:
        self.config = config
        self.now = 0.0
        self.addresses: dict[ConnId, str] = {}
        self.workers: dict[ConnId, WorkerRecord] = {}
        self.clients: dict[ConnId, ClientRecord] = {}
        self.tasks: dict[int, TaskRecord] = {}
        self.ready_calls: dict[CallKey, CallRecord] = {}  # ordered: round robin
        self.free_workers: dict[ConnId, WorkerRecord] = {}  # ordered: round robin
        self.prefetch_workers: dict[ConnId, WorkerRecord] = {}  # all slots busy, may hold more
        self.data = DataDirectory()
        self._next_task_id = 1
        self.stale_results = 0
        self.counters: Counter[str] = Counter()  # submitted, done:<status>, requeued, worker_deaths, ...
        self.events: deque[LogEvent] = deque(maxlen=100)  # recent joins, deaths and failures, for people
        self.event_seq = 0  # events ever logged, so the server can print each once
        self.no_workers_since = 0.0  # when the last worker left

    def _log_event(self, kind: str, text: str) -> None:
        self.events.append({"time": self.now, "kind": kind, "text": text})
        self.event_seq += 1

    # ---------------------------------------------------------------- entry
    def handle(self, event: Event) -> list[Command]:
        out: list[Command] = []
        match event:
            case MessageReceived(conn, message):
                self._on_message(conn, message, out)
            case Ticked(now):
                self._on_tick(now, out)
            case PeerConnected(conn, address):
                self.addresses[conn] = address
            case PeerDisconnected(conn, reason):
                self._on_disconnect(conn, out, reason)
            case _:
                raise TypeError(f"unknown event {event!r}")
        self._schedule(out)
        return out

    def _on_message(self, conn: ConnId, msg: m.Message, out: list[Command]) -> None:
        worker = self.workers.get(conn)
        if worker is not None:
            worker.last_seen = self.now
            self._on_worker_message(worker, msg, out)
            return
        client = self.clients.get(conn)
        if client is not None:
            self._on_client_message(client, msg, out)
            return
        match msg:
            case m.RegisterWorker():
                self._register_worker(conn, msg, out)
            case m.RegisterClient():
                client = ClientRecord(conn, msg.name[:MAX_NAME], msg.pid, msg.host[:MAX_NAME])
                self.clients[conn] = client
                self._log_event("client-connected", f"{client.name} (pid {client.pid} on {client.host})")
                out.append(Send(conn, m.Welcome(f"client-{conn}", self.config.heartbeat_interval)))
            case _:
                out.append(Close(conn, f"expected a registration, got {msg.op!r}"))
                self.addresses.pop(conn, None)

    def _on_worker_message(self, worker: WorkerRecord, msg: m.Message, out: list[Command]) -> None:
        conn = worker.conn
        match msg:  # the most frequent first: each case is one isinstance check
            case m.TaskDone():
                self._on_task_done(worker, msg, out)
            case m.Heartbeat():
                worker.memory = msg.memory
            case m.NeedData():
                self.data.need(conn, msg.key, msg.from_owner, self._sender(out), msg.shared)
            case m.DataStored():
                self.data.stored(conn, msg.key, msg.nbytes, self._sender(out), msg.segment, msg.sizes)
            case m.WorkerStatus():
                self._on_worker_status(worker, msg.status, out)
            case m.Closing():
                worker.last_words = msg.reason[:500]
            case m.InfoRequest():
                out.append(Send(conn, m.InfoReply(msg.request_id, self.info())))
            case _:
                out.append(Close(conn, f"unexpected {msg.op!r} from a worker"))
                self._on_disconnect(conn, out)

    def _on_client_message(self, client: ClientRecord, msg: m.Message, out: list[Command]) -> None:
        conn = client.conn
        match msg:  # the most frequent first
            case m.SubmitBatch():
                self._on_submit(client, msg, out)
            case m.CancelCall():
                self._cancel_call(client, msg.call_id, out)
            case m.DataRegister():
                self._on_data_register(client, msg, out)
            case m.DataUpload():
                self.data.upload(conn, msg.key, msg.frames, self._sender(out), msg.segment, msg.sizes, msg.share_domain)
            case m.ReleaseData():
                self.data.release(conn, msg.keys, self._sender(out))
            case m.InfoRequest():
                out.append(Send(conn, m.InfoReply(msg.request_id, self.info())))
            case _:
                out.append(Close(conn, f"unexpected {msg.op!r} from a client"))
                self._on_disconnect(conn, out)

    # -------------------------------------------------------------- workers
    def _register_worker(self, conn: ConnId, msg: m.RegisterWorker, out: list[Command]) -> None:
        address = self.addresses.get(conn, f"conn-{conn}")
        name = (msg.name or address)[:MAX_NAME]
        if msg.nthreads < 1 or any(w.name == name for w in self.workers.values()):
            reason = "nthreads must be at least 1" if msg.nthreads < 1 else f"a worker named {name!r} is already registered"
            out.append(Close(conn, reason))
            self.addresses.pop(conn, None)
            return
        worker = WorkerRecord(conn, address, name, msg.nthreads, msg.host[:MAX_NAME], msg.pid, msg.memory_limit, self.now)
        self.workers[conn] = worker
        self._place(worker)
        self.data.worker_joined(conn, msg.data_address, msg.share_domain[:MAX_NAME])
        self.counters["workers_joined"] += 1
        threads = f"{msg.nthreads} thread{'s' if msg.nthreads != 1 else ''}"
        self._log_event("worker-joined", f"{name} ({threads}, {worker.host} pid {msg.pid})")
        out.append(Send(conn, m.Welcome(name, self.config.heartbeat_interval)))

    def _on_worker_status(self, worker: WorkerRecord, status: str, out: list[Command]) -> None:
        if status not in m.WORKER_STATUSES:
            out.append(Close(worker.conn, f"invalid worker status {status[:20]!r}"))
            self._on_disconnect(worker.conn, out)
            return
        if worker.status == m.RETIRING:
            return  # retiring is final
        worker.status = status
        self._place(worker)

    def _place(self, worker: WorkerRecord) -> None:
        """Keep ``free_workers`` and ``prefetch_workers`` in line with the worker's load."""
        for pool, belongs in ((self.free_workers, worker.has_room), (self.prefetch_workers, worker.can_prefetch)):
            if belongs:
                pool.setdefault(worker.conn, worker)
            else:
                pool.pop(worker.conn, None)

    def _on_task_done(self, worker: WorkerRecord, msg: m.TaskDone, out: list[Command]) -> None:
        task = self.tasks.get(msg.task_id)
        if task is None or task.worker != worker.conn or task.attempt != msg.attempt:
            self.stale_results += 1  # a late result of a lost or cancelled attempt
            return
        self._release_slot(worker, task)
        del self.tasks[task.task_id]
        worker.completed += 1
        if task.cancelled:
            return
        call = self._call_of(task)
        if call is not None:
            call.mean_duration = msg.duration if call.mean_duration < 0 else 0.8 * call.mean_duration + 0.2 * msg.duration
        if msg.status not in (m.OK, m.ERROR):
            reason = f"worker {worker.name} reported invalid status {msg.status[:20]!r}"
            out.append(Send(task.call[0], m.BatchDone(task.batch_id, m.FAILED, worker.name, reason)))
            self.counters["done:failed"] += 1
            return
        self.counters[f"done:{msg.status}"] += 1
        if msg.status == m.ERROR:
            self._log_event("batch-error", f"a task of {task.func_name} raised on {worker.name}")
        out.append(Send(task.call[0], m.BatchDone(task.batch_id, msg.status, worker.name, "", msg.frames)))

    def _release_slot(self, worker: WorkerRecord, task: TaskRecord) -> None:
        del worker.running[task.task_id]
        task.worker = None
        self._place(worker)
        call = None if task.cancelled else self._call_of(task)  # a cancelled call's id may be reused
        if call is not None:
            del call.running[task.task_id]
            if call.ready:
                self.ready_calls.setdefault(call.key, call)

    def _on_disconnect(self, conn: ConnId, out: list[Command], reason: str = "") -> None:
        self.addresses.pop(conn, None)
        worker = self.workers.pop(conn, None)
        if worker is not None:
            if not self.workers:
                self.no_workers_since = self.now
            why = worker.last_words or reason or "connection closed"
            if worker.status == m.RETIRING:
                self._log_event("worker-left", f"{worker.name}: {why}")
            else:
                self.counters["worker_deaths"] += 1
                self._log_event("worker-died", f"{worker.name} with {len(worker.running)} batches running: {why}")
            self.free_workers.pop(conn, None)
            self.prefetch_workers.pop(conn, None)
            self.data.worker_left(conn, self._sender(out))
            self._requeue_lost(worker, out)
        client = self.clients.pop(conn, None)
        if client is not None:
            queued = sum(len(c.queue) + len(c.running) for c in client.calls.values())
            self._log_event("client-left", f"{client.name}: {reason or 'disconnected'}; dropped {queued} batches")
            for call_id in list(client.calls):
                self._cancel_call(client, call_id, out)
            self.data.client_left(conn, self._sender(out))

    def _requeue_lost(self, worker: WorkerRecord, out: list[Command]) -> None:
        # the oldest assignments were running; later ones (prefetched) most likely had not started
        started = set(list(worker.running)[: worker.nthreads])
        for task_id in reversed(list(worker.running)):  # reversed: appendleft keeps order
            task = self.tasks[task_id]
            del worker.running[task_id]
            task.worker = None
            if task.cancelled:
                del self.tasks[task_id]
                continue
            if worker.status != m.RETIRING and task_id in started:  # a clean exit is no death
                task.deaths += 1
            call = self._call_of(task)
            assert call is not None
            del call.running[task_id]
            if task.deaths >= self.config.max_deaths:
                del self.tasks[task_id]
                last = f"{worker.name}: {worker.last_words}" if worker.last_words else worker.name
                reason = (
                    f"batch of {task.func_name} was running on {task.deaths} workers that died "
                    f"(last: {last}); giving up after {self.config.max_deaths}"
                )
                out.append(Send(task.call[0], m.BatchDone(task.batch_id, m.LOST, worker.name, reason)))
                self.counters["done:lost"] += 1
                self._log_event("batch-lost", reason)
            else:
                self.counters["requeued"] += 1
                task.queued_at = self.now
                call.queue.appendleft(task_id)
            if call.ready:
                self.ready_calls.setdefault(call.key, call)

    # -------------------------------------------------------------- clients
    def _on_submit(self, client: ClientRecord, msg: m.SubmitBatch, out: list[Command]) -> None:
        call = client.calls.get(msg.call_id)
        if call is None:
            call = client.calls[msg.call_id] = CallRecord((client.conn, msg.call_id), max(msg.max_running, 0))
        task = TaskRecord(self._next_task_id, call.key, msg.batch_id, msg.func_name, msg.frames, self.now, msg.keys)
        self.counters["submitted"] += 1
        self._next_task_id += 1
        self.tasks[task.task_id] = task
        call.queue.append(task.task_id)
        if call.ready:
            self.ready_calls.setdefault(call.key, call)

    def _on_data_register(self, client: ClientRecord, msg: m.DataRegister, out: list[Command]) -> None:
        error = self.data.register(client.conn, msg.key, msg.nbytes)
        if error is not None:
            out.append(Close(client.conn, error))
            self._on_disconnect(client.conn, out)
            return
        if msg.broadcast:
            send = self._sender(out)
            for conn in self.workers:
                self.data.need(conn, msg.key, False, send)

    @staticmethod
    def _sender(out: list[Command]) -> Sender:
        return lambda conn, message: out.append(Send(conn, message))

    def _cancel_call(self, client: ClientRecord, call_id: int, out: list[Command]) -> None:
        call = client.calls.pop(call_id, None)
        if call is None:
            return
        self.ready_calls.pop(call.key, None)
        for task_id in call.queue:
            del self.tasks[task_id]
        call.queue.clear()
        # running batches keep their slot until the worker reports back: the CPU is still busy
        for task_id in call.running:
            task = self.tasks[task_id]
            task.cancelled = True
            assert task.worker is not None  # running
            out.append(Send(task.worker, m.Cancel(task.task_id, task.attempt)))

    def _call_of(self, task: TaskRecord) -> CallRecord | None:
        client = self.clients.get(task.call[0])
        return None if client is None else client.calls.get(task.call[1])

    # ----------------------------------------------------------- scheduling
    def _schedule(self, out: list[Command]) -> None:
        ready = self.ready_calls
        while ready:
            if self.free_workers:
                key, workers = next(iter(ready)), self.free_workers
            elif self.prefetch_workers and self.config.prefetch:
                short = next((k for k, c in ready.items() if c.short), None)  # only short batches wait
                if short is None:
                    return
                key, workers = short, self.prefetch_workers
            else:
                return
            call = ready.pop(key)
            task = self.tasks[call.queue.popleft()]
            conn = self._pick_worker(task, workers)
            worker = workers.pop(conn)
            task.attempt += 1
            task.worker = conn
            worker.running[task.task_id] = None
            call.running[task.task_id] = None
            out.append(Send(conn, m.Execute(task.task_id, task.attempt, task.func_name, task.frames, task.keys)))
            self._place(worker)  # back of its line, or into the other one
            if call.ready:
                ready[key] = call

    def _pick_worker(self, task: TaskRecord, workers: dict[ConnId, WorkerRecord]) -> ConnId:
        """One of ``workers``, preferring one that already holds the task's data."""
        for key in task.keys[:1]:
            for conn in self.data.holders_of(key):
                if conn in workers:
                    return conn
        return next(iter(workers))

    # ----------------------------------------------------------------- time
    def _on_tick(self, now: float, out: list[Command]) -> None:
        self.now = now
        deadline = now - self.config.heartbeat_timeout
        for worker in [w for w in self.workers.values() if w.last_seen < deadline]:
            reason = f"no heartbeat for {self.config.heartbeat_timeout:.0f} s"
            out.append(Close(worker.conn, reason))
            self._on_disconnect(worker.conn, out, reason)
        if not self.workers and self.tasks:
            self._fail_starved(now, out)

    def _fail_starved(self, now: float, out: list[Command]) -> None:
        """Fail batches that have waited ``no_worker_timeout`` while no worker was connected."""
        limit = self.config.no_worker_timeout
        if now - self.no_workers_since < limit:
            return
        reason = f"no worker connected to the scheduler within {limit:.0f} s"
        for client in self.clients.values():
            for call in client.calls.values():
                starved = [t for t in call.queue if self.tasks[t].queued_at <= now - limit]
                for task_id in starved:
                    call.queue.remove(task_id)
                    task = self.tasks.pop(task_id)
                    out.append(Send(client.conn, m.BatchDone(task.batch_id, m.NO_WORKERS, "", reason)))
                    self.counters["done:no-workers"] += 1
                if not call.ready:
                    self.ready_calls.pop(call.key, None)

    # ----------------------------------------------------------------- info
    def info(self) -> dict[str, Any]:
        return {
            "address": self.config.address,
            "workers": {
                w.address: {
                    "name": w.name,
                    "address": w.address,
                    "host": w.host,
                    "pid": w.pid,
                    "nthreads": w.nthreads,
                    "running": len(w.running),
                    "completed": w.completed,
                    "memory": w.memory,
                    "memory_limit": w.memory_limit,
                    "status": w.status,
                    **self.data.info(w.conn),
                }
                for w in self.workers.values()
            },
            "clients": len(self.clients),
            "queued": sum(len(c.queue) for cl in self.clients.values() for c in cl.calls.values()),
            "tasks": len(self.tasks),
            "stale_results": self.stale_results,
            "data_keys": len(self.data.records),
            "running": sum(len(w.running) for w in self.workers.values()),
            "slots": sum(w.nthreads for w in self.workers.values()),
            "counters": dict(self.counters),
            "events": list(self.events),
        }

    def validate(self) -> None:
        """Check the invariants; tests call this after every step."""
        for worker in self.workers.values():
            assert (worker.conn in self.free_workers) == worker.has_room, worker
            assert (worker.conn in self.prefetch_workers) == worker.can_prefetch, worker
            assert len(worker.running) <= 2 * worker.nthreads, worker
            for task_id in worker.running:
                assert self.tasks[task_id].worker == worker.conn
        for conn in self.free_workers:
            assert conn in self.workers
        for client in self.clients.values():
            for call in client.calls.values():
                assert (call.key in self.ready_calls) == call.ready, call
                for task_id in call.running:
                    task = self.tasks[task_id]
                    assert task.worker is not None and not task.cancelled and task.call == call.key
                for task_id in call.queue:
                    assert self.tasks[task_id].worker is None
        for task in self.tasks.values():
            if task.worker is not None:
                assert task.task_id in self.workers[task.worker].running
        self.data.validate()
