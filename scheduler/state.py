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

import math
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

from ..protocol import messages as m
from .data import MAX_KEY_LENGTH, DataDirectory, Sender
from .records import (
    CLIENT,
    SHORT_BATCH,
    WORKER,
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
    UserPolicy,
    UsersChanged,
    WorkerRecord,
)
from .share import FairShare
from .views import call_id, cluster_view

__all__ = [  # the events and commands, for the state's users
    "MAX_NAME", "MAX_NTHREADS", "SHORT_BATCH", "call_id", "Close", "Command", "Event", "MessageReceived", "PeerConnected",
    "PeerDisconnected", "SchedulerConfig", "SchedulerState", "Send", "Ticked",
]

# What peers tell about themselves is checked before it is stored: what is only shown (names,
# hosts, function names) is cut to MAX_NAME characters; what scheduling or recovery depends on
# (threads, refs, keys, priorities, addresses, domains) is refused out of range, and the peer's
# connection closed with a reason saying which bound it broke.  Measurements (memory, durations)
# are clamped: they are reports, not claims.
MAX_NAME = 200  # peers name themselves: keep what we store and report bounded
MAX_NTHREADS = 4096  # slots one worker may claim (SchedulerConfig.max_nthreads): more would take every queued batch
MAX_ADDRESS = 300  # a worker's data address: "tcp://" or "tls://", a host name or [IPv6 address], a port
MAX_REF = 2 * MAX_NAME + 24  # "<client session>/<batch id>"
MAX_KEYS_PER_BATCH = 10_000  # scattered objects one batch may name
MAX_PID = 2**32 - 1
MAX_MEMORY = 2**62  # bytes: far above any machine, far below a float's exact range
PRIORITY_RANGE = (-(2**31), 2**31 - 1)  # what the client accepts (client/backend.py)
MAX_DURATION = 10.0**7  # seconds (16 weeks): a batch's reported run time, as the fair share counts it
UNCLAIMED = float("inf")  # an orphan's arrival once it has been cancelled for want of a claim


@dataclass(frozen=True)
class SchedulerConfig:
    address: str = ""
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 30.0  # silence after which a worker is declared dead
    max_deaths: int = 3  # workers a batch may take down before it fails
    no_worker_timeout: float = 60.0  # how long a batch waits when no worker is connected
    paused_timeout: float = 60.0  # how long batches wait while every worker is paused by its memory limit
    recovery_window: float = 300.0  # how long an outcome of an unclaimed batch from before is kept
    first_task_id: int = 1  # the server starts each incarnation elsewhere, so ids never repeat on a worker
    heartbeats: bool = True  # send every peer a heartbeat each interval, so that it notices a frozen scheduler
    # how long after this scheduler's first tick the batches a client resubmits wait for workers
    # to come back: one may still run or hold it (workers retry up to every 5 s)
    recovery_grace: float = 6.0
    # Send a worker whose slots are all busy one more batch per slot, when the call's batches are
    # short: it starts the next at once instead of waiting a round trip.  Long batches never
    # wait behind another one, so the load stays balanced at the end of a call.
    prefetch: bool = False
    usage_half_life: float = 3600.0  # seconds for a user's past usage to count half: see share.py
    max_nthreads: int = MAX_NTHREADS  # a worker claiming more slots is refused


DEFAULT_CONFIG = SchedulerConfig()


def worker_registration_problem(msg: m.RegisterWorker, max_nthreads: int) -> str:
    """Why a worker's registration is refused ("" if it is not)."""
    if msg.nthreads < 1:
        return "nthreads must be at least 1"
    if msg.nthreads > max_nthreads:
        return f"nthreads must be between 1 and {max_nthreads}"
    if not 0 <= msg.pid <= MAX_PID:
        return f"pid must be between 0 and {MAX_PID}"
    if not 0 <= msg.memory_limit <= MAX_MEMORY:
        return f"memory_limit must be between 0 and {MAX_MEMORY} bytes"
    if len(msg.data_address) > MAX_ADDRESS:
        return f"data_address must be at most {MAX_ADDRESS} characters"
    if len(msg.share_domain) > MAX_NAME:
        return f"share_domain must be at most {MAX_NAME} characters"
    if any(len(ref) > MAX_REF for ref in msg.running):
        return f"a batch ref must be at most {MAX_REF} characters"
    return ""


def client_registration_problem(msg: m.RegisterClient) -> str:
    """Why a client's registration is refused ("" if it is not)."""
    if not 0 <= msg.pid <= MAX_PID:
        return f"pid must be between 0 and {MAX_PID}"
    if len(msg.session) > MAX_NAME:  # it names the client's batches across restarts: never cut it
        return f"session must be at most {MAX_NAME} characters"
    return ""


def submit_problem(msg: m.SubmitBatch) -> str:
    """Why a batch is refused, and its client disconnected ("" if it is not)."""
    if len(msg.keys) > MAX_KEYS_PER_BATCH:
        return f"a batch may name at most {MAX_KEYS_PER_BATCH} scattered objects, not {len(msg.keys)}"
    if any(len(key) > MAX_KEY_LENGTH for key in msg.keys):
        return f"data keys must be at most {MAX_KEY_LENGTH} characters"
    if not PRIORITY_RANGE[0] <= msg.priority <= PRIORITY_RANGE[1]:
        return f"priority must be between {PRIORITY_RANGE[0]} and {PRIORITY_RANGE[1]}"
    return ""


def reported_duration(seconds: float) -> float:
    """A batch's run time as its worker reported it, in range: the fair share adds it up, and
    one NaN would make a user's usage NaN for good."""
    return min(max(seconds, 0.0), MAX_DURATION) if math.isfinite(seconds) else 0.0


class SchedulerState:
    def __init__(self, config: SchedulerConfig = DEFAULT_CONFIG) -> None:
        self.config = config
        self.now = 0.0
        self.addresses: dict[ConnId, str] = {}
        self.workers: dict[ConnId, WorkerRecord] = {}
        self.clients: dict[ConnId, ClientRecord] = {}
        self.tasks: dict[int, TaskRecord] = {}
        self.peers: dict[ConnId, PeerConnected] = {}  # who each connection proved to be, until it registers
        self.share = FairShare(config.usage_half_life)  # the calls with work ready, by user
        self.free_workers: dict[ConnId, WorkerRecord] = {}  # ordered: round robin
        self.prefetch_workers: dict[ConnId, WorkerRecord] = {}  # all slots busy, may hold more
        self.data = DataDirectory()
        self._next_task_id = config.first_task_id
        self.by_ref: dict[str, int] = {}  # ref -> task id, for the tasks that have one
        self.orphan_of: dict[str, ConnId] = {}  # unclaimed ref -> the worker running it
        self.recovered: dict[str, tuple[m.Recovered, float]] = {}  # unclaimed outcomes, with their arrival
        self.all_paused_since: float | None = None
        self.next_heartbeat = 0.0
        self.started_at: float | None = None  # the first tick
        self.held_calls: list[CallRecord] = []  # resubmitted during the recovery grace
        self.stale_results = 0
        self.counters: Counter[str] = Counter()  # submitted, done:<status>, requeued, worker_deaths, ...
        self.events: deque[LogEvent] = deque(maxlen=100)  # recent joins, deaths and failures, for people
        self.event_seq = 0  # events ever logged, so the server can print each once
        self.no_workers_since = 0.0  # when the last worker left

    def _log_event(self, kind: str, text: str, user: str = "") -> None:
        """``user``: whose work the event is about, if anyone's: only they and the admin see it."""
        self.events.append({"time": self.now, "kind": kind, "text": text, "user": user})
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
                self.peers[conn] = event
            case PeerDisconnected(conn, reason):
                self._on_disconnect(conn, out, reason)
            case UsersChanged(users, revoked):
                self._on_users_changed(users, revoked, out)
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
            client.last_seen = self.now
            self._on_client_message(client, msg, out)
            return
        peer = self.peers.pop(conn, None)  # a connection registers once, as what its handshake proved
        match msg:
            case m.RegisterWorker() if peer is not None and peer.role == WORKER:
                self._register_worker(conn, msg, out)
            case m.RegisterClient() if peer is not None and peer.role == CLIENT:
                problem = client_registration_problem(msg)
                if problem:
                    out.append(Close(conn, problem))
                    self.addresses.pop(conn, None)
                    return
                client = ClientRecord(conn, msg.name[:MAX_NAME], msg.pid, msg.host[:MAX_NAME], msg.session,
                                      self.now, resumed=msg.resumed, user=peer.user, admin=peer.admin)
                self.clients[conn] = client
                self._log_event("client-connected", f"{client.name} of {client.user} (pid {client.pid} on {client.host})",
                                client.user)
                out.append(Send(conn, m.Welcome(f"client-{conn}", self.config.heartbeat_interval)))
            case m.RegisterWorker() | m.RegisterClient():
                proved = peer.role if peer is not None else "unauthenticated"
                kind = "worker" if isinstance(msg, m.RegisterWorker) else "client"
                out.append(Close(conn, f"a {proved} connection may not register a {kind}"))
                self.addresses.pop(conn, None)
            case _:
                out.append(Close(conn, f"expected a registration, got {msg.op!r}"))
                self.addresses.pop(conn, None)

    def _on_worker_message(self, worker: WorkerRecord, msg: m.Message, out: list[Command]) -> None:
        conn = worker.conn
        match msg:  # the most frequent first: each case is one isinstance check
            case m.TaskDone():
                self._on_task_done(worker, msg, out)
            case m.Heartbeat():
                worker.memory = min(max(msg.memory, 0), MAX_MEMORY)
            case m.NeedData():
                self.data.need(conn, msg.key, msg.from_owner, self._sender(out), msg.shared)
            case m.DataStored():
                self.data.stored(conn, msg.key, msg.nbytes, self._sender(out), msg.segment, msg.sizes)
            case m.Recovered():
                self._on_recovered(worker, msg, out)
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
            case m.CancelRequest():
                self._on_cancel_request(client, msg, out)
            case m.DataRegister():
                self._on_data_register(client, msg, out)
            case m.DataUpload():
                self.data.upload(conn, msg.key, msg.frames, self._sender(out), msg.segment, msg.sizes, msg.share_domain)
            case m.ReleaseData():
                self.data.release(conn, msg.keys, self._sender(out))
            case m.Heartbeat():
                client.beats = True
            case m.InfoRequest():
                out.append(Send(conn, m.InfoReply(msg.request_id, self.info())))
            case m.RegisterWorker():  # a role violation, not just a confused peer: say so
                out.append(Close(conn, "a client connection may not register a worker"))
                self._on_disconnect(conn, out)
            case _:
                out.append(Close(conn, f"unexpected {msg.op!r} from a client"))
                self._on_disconnect(conn, out)

    # -------------------------------------------------------------- workers
    def _register_worker(self, conn: ConnId, msg: m.RegisterWorker, out: list[Command]) -> None:
        address = self.addresses.get(conn, f"conn-{conn}")
        name = (msg.name or address)[:MAX_NAME]
        reason = worker_registration_problem(msg, self.config.max_nthreads)
        if not reason and any(w.name == name for w in self.workers.values()):
            reason = f"a worker named {name!r} is already registered"
        if reason:
            out.append(Close(conn, reason))
            self.addresses.pop(conn, None)
            return
        worker = WorkerRecord(conn, address, name, msg.nthreads, msg.host[:MAX_NAME], msg.pid, msg.memory_limit, self.now)
        self.workers[conn] = worker
        for ref in msg.running[: 2 * msg.nthreads]:  # it may run as many (prefetched), no more
            self._adopt(worker, ref)
        self._place(worker)
        self.data.worker_joined(conn, msg.data_address, msg.share_domain)
        self.counters["workers_joined"] += 1
        threads = f"{msg.nthreads} thread{'s' if msg.nthreads != 1 else ''}"
        earlier = f"; {len(msg.running)} batches from before" if msg.running else ""
        self._log_event("worker-joined", f"{name} ({threads}, {worker.host} pid {msg.pid}{earlier})")
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
        self._shed_if_paused(worker, out)

    def _shed_if_paused(self, worker: WorkerRecord, out: list[Command]) -> None:
        """A worker paused by its memory limit drops the scattered data no batch of its own
        needs, so that data alone cannot keep it paused (a later batch fetches it again)."""
        if worker.status != m.PAUSED:
            return
        needed = {key for task_id in worker.running for key in self.tasks[task_id].keys}
        freed = self.data.shed(worker.conn, needed, self._sender(out))
        if freed:
            self._log_event("data-shed", f"{worker.name} paused by its memory limit: dropped "
                            f"{freed / 2**20:.0f} MiB of scattered data no batch of its own needs")

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
        self._finish(worker, task, msg.status, reported_duration(msg.duration), msg.frames, out)

    def _finish(self, worker: WorkerRecord, task: TaskRecord, status: str, duration: float, frames: m.Frames,
                out: list[Command]) -> None:
        """``worker`` reports ``task``'s outcome: free the slot, tell the client."""
        self._release_slot(worker, task)
        self._drop_task(task)
        self._shed_if_paused(worker, out)
        worker.completed += 1
        self.share.finished(task.user, duration, self.now)
        if task.cancelled:
            return
        call = self._call_of(task)
        if call is not None:
            call.mean_duration = duration if call.mean_duration < 0 else 0.8 * call.mean_duration + 0.2 * duration
        self._report(task, worker.name, status, frames, out)

    def _report(self, task: TaskRecord, worker_name: str, status: str, frames: m.Frames, out: list[Command]) -> None:
        if status not in (m.OK, m.ERROR):
            reason = f"worker {worker_name} reported invalid status {status[:20]!r}"
            out.append(Send(task.call[0], m.BatchDone(task.batch_id, m.FAILED, worker_name, reason)))
            self.counters["done:failed"] += 1
            return
        self.counters[f"done:{status}"] += 1
        if status == m.ERROR:
            self._log_event("batch-error", f"a task of {task.func_name} raised on {worker_name}", task.user)
        out.append(Send(task.call[0], m.BatchDone(task.batch_id, status, worker_name, "", frames)))

    def _drop_task(self, task: TaskRecord) -> None:
        del self.tasks[task.task_id]
        if task.ref:
            self.by_ref.pop(task.ref, None)

    # --------------------------------------------------------------- recovery
    # After a restart (or a dropped link) workers still run, or have finished, batches of the
    # earlier session, and clients resubmit those batches under the same refs.  Whichever
    # comes first, the outcome is delivered once and the batch is not run again.
    def _adopt(self, worker: WorkerRecord, ref: str) -> None:
        """``worker`` still runs ``ref``: a waiting resubmission of it waits for that run."""
        task = self._task_of_ref(ref)
        if task is None or task.worker is not None:
            worker.orphans[ref] = self.now  # claimed later by a resubmission, or by its Recovered
            self.orphan_of[ref] = worker.conn
            return
        call = self._call_of(task)
        assert call is not None
        call.queue.remove(task.task_id)  # rare: only after a restart
        self._start(task, call, worker)
        task.adopted = True
        self.share.mark(call)

    def _on_recovered(self, worker: WorkerRecord, msg: m.Recovered, out: list[Command]) -> None:
        ref = msg.ref
        if len(ref) > MAX_REF:
            out.append(Close(worker.conn, f"a batch ref must be at most {MAX_REF} characters"))
            self._on_disconnect(worker.conn, out)
            return
        if ref in worker.orphans:  # its slot is free again
            del worker.orphans[ref]
            del self.orphan_of[ref]
            self._place(worker)
        if msg.status not in (m.OK, m.ERROR):
            return  # cancelled on request: nothing to deliver
        task = self._task_of_ref(ref)
        if task is None:
            if len(self.recovered) < 100_000:
                self.recovered[ref] = (msg, self.now)  # its client may resubmit it yet
            return
        if task.adopted and task.worker == worker.conn:
            self._finish(worker, task, msg.status, reported_duration(msg.duration), msg.frames, out)
            return
        if task.cancelled:
            return
        call = self._call_of(task)
        assert call is not None
        if task.worker is None:  # queued again: it need not run
            call.queue.remove(task.task_id)
            self._drop_task(task)
        else:  # also running elsewhere: the first outcome wins, that run is cancelled
            del call.running[task.task_id]
            task.cancelled = True
            out.append(Send(task.worker, m.Cancel(task.task_id, task.attempt)))
        self.share.mark(call)
        self._report(task, worker.name, msg.status, msg.frames, out)

    def _claim(self, task: TaskRecord, call: CallRecord, out: list[Command]) -> bool:
        """A resubmitted batch whose earlier run finished, or still runs, is not run again."""
        done = self.recovered.pop(task.ref, None)
        if done is not None:
            del self.tasks[task.task_id]
            self._report(task, "", done[0].status, done[0].frames, out)
            return True
        conn = self.orphan_of.get(task.ref)
        if conn is None or self.workers[conn].orphans[task.ref] == UNCLAIMED:
            return False  # cancelled on its worker: this one runs anew
        del self.orphan_of[task.ref]
        worker = self.workers[conn]
        del worker.orphans[task.ref]
        self.by_ref[task.ref] = task.task_id
        self._start(task, call, worker)
        task.adopted = True
        return True

    def _cancel_unclaimed(self, now: float, out: list[Command]) -> None:
        """Orphans that no client claimed within the grace hold slots for nobody: cancel them (the
        worker answers with a cancelled Recovered, or restarts if one overruns its grace)."""
        for ref, conn in self.orphan_of.items():
            orphans = self.workers[conn].orphans
            if orphans[ref] <= now - self.config.recovery_grace:
                orphans[ref] = UNCLAIMED
                out.append(Send(conn, m.Cancel(0, 0, ref)))

    def _in_recovery_grace(self) -> bool:
        return self.started_at is None or self.now - self.started_at < self.config.recovery_grace

    def _release_held_calls(self) -> None:
        for call in self.held_calls:
            call.held = False
            client = self.clients.get(call.key[0])
            if client is not None and client.calls.get(call.key[1]) is call:  # not cancelled since
                self.share.mark(call)
        self.held_calls.clear()

    def _task_of_ref(self, ref: str) -> TaskRecord | None:
        task_id = self.by_ref.get(ref) if ref else None
        return None if task_id is None else self.tasks[task_id]

    def _release_slot(self, worker: WorkerRecord, task: TaskRecord) -> None:
        del worker.running[task.task_id]
        task.worker = None
        self._place(worker)
        self.share.released(task.user)
        call = None if task.cancelled else self._call_of(task)  # a cancelled call's id may be reused
        if call is not None:
            del call.running[task.task_id]
            self.share.mark(call)

    def _on_disconnect(self, conn: ConnId, out: list[Command], reason: str = "") -> None:
        self.addresses.pop(conn, None)
        self.peers.pop(conn, None)
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
            for ref in worker.orphans:
                del self.orphan_of[ref]
            self._requeue_lost(worker, out)
        client = self.clients.pop(conn, None)
        if client is not None:
            queued = sum(len(c.queue) + len(c.running) for c in client.calls.values())
            self._log_event("client-left", f"{client.name} of {client.user}: {reason or 'disconnected'}; "
                            f"dropped {queued} batches", client.user)
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
            self.share.released(task.user)
            if task.cancelled:
                self._drop_task(task)
                continue
            task.adopted = False
            if worker.status != m.RETIRING and task_id in started:  # a clean exit is no death
                task.deaths += 1
            call = self._call_of(task)
            assert call is not None
            del call.running[task_id]
            if task.deaths >= self.config.max_deaths:
                self._drop_task(task)
                last = f"{worker.name}: {worker.last_words}" if worker.last_words else worker.name
                reason = (
                    f"batch of {task.func_name} was running on {task.deaths} workers that died "
                    f"(last: {last}); giving up after {self.config.max_deaths}"
                )
                out.append(Send(task.call[0], m.BatchDone(task.batch_id, m.LOST, worker.name, reason)))
                self.counters["done:lost"] += 1
                self._log_event("batch-lost", reason, task.user)
            else:
                self.counters["requeued"] += 1
                task.queued_at = self.now
                call.queue.appendleft(task_id)
            self.share.mark(call)

    # -------------------------------------------------------------- clients
    def _on_submit(self, client: ClientRecord, msg: m.SubmitBatch, out: list[Command]) -> None:
        problem = submit_problem(msg)
        if problem:
            out.append(Close(client.conn, problem))
            self._on_disconnect(client.conn, out, problem)
            return
        if msg.keys and not self._may_read(client, msg.keys):
            reason = "the batch names data scattered by another user: a task reads only its own user's data"
            out.append(Send(client.conn, m.BatchDone(msg.batch_id, m.FAILED, "", reason)))
            self.counters["done:failed"] += 1
            return
        call = client.calls.get(msg.call_id)
        if call is None:
            call = client.calls[msg.call_id] = CallRecord((client.conn, msg.call_id), max(msg.max_running, 0),
                                                          client.user, msg.priority)
            if client.resumed and self._in_recovery_grace():
                call.held = True
                self.held_calls.append(call)
        ref = f"{client.session}/{msg.batch_id}" if client.session else ""
        task = TaskRecord(self._next_task_id, call.key, msg.batch_id, msg.func_name[:MAX_NAME], msg.frames, self.now, msg.keys,
                          ref=ref, user=client.user)
        self.counters["submitted"] += 1
        self._next_task_id += 1
        self.tasks[task.task_id] = task
        if ref:
            if (self.recovered or self.orphan_of) and self._claim(task, call, out):  # after a restart only
                return
            self.by_ref[ref] = task.task_id
        call.queue.append(task.task_id)
        if call.ready:
            self.share.mark(call)

    def _may_read(self, client: ClientRecord, keys: list[str]) -> bool:
        for key in keys:
            record = self.data.records.get(key)
            owner = None if record is None else self.clients.get(record.owner)
            if owner is not None and owner.user != client.user:
                return False
        return True

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

    def _cancel_call(self, client: ClientRecord, call_id: int, out: list[Command], reason: str = "") -> None:
        """Drop the call's queued batches and cancel its running ones.  ``reason``: someone
        other than the call's own joblib call cancelled it, so its client hears why."""
        call = client.calls.pop(call_id, None)
        if call is None:
            return
        self.share.drop(call)
        if reason:
            for task_id in (*call.queue, *call.running):
                out.append(Send(client.conn, m.BatchDone(self.tasks[task_id].batch_id, m.CANCELLED, "", reason)))
                self.counters["done:cancelled"] += 1
        for task_id in call.queue:
            self._drop_task(self.tasks[task_id])
        # running batches keep their slot until the worker reports back: the CPU is still busy
        for task_id in call.running:
            task = self.tasks[task_id]
            task.cancelled = True
            assert task.worker is not None  # running
            if not task.adopted:  # an adopted one runs under an id its worker never heard of
                out.append(Send(task.worker, m.Cancel(task.task_id, task.attempt)))
        call.queue.clear()

    def _on_cancel_request(self, asker: ClientRecord, msg: m.CancelRequest, out: list[Command]) -> None:
        """The admin may cancel anyone's calls; a user their own, from any of their clients."""
        calls = [(client, call) for client in self.clients.values() for call in client.calls.values()
                 if (not msg.call or call_id(call) == msg.call) and (not msg.user or call.user == msg.user)]
        others = (msg.user and msg.user != asker.user) or any(call.user != asker.user for _, call in calls)
        error = ""
        if not msg.call and not msg.user:
            error = "name a call or a user to cancel"
        elif others and not asker.admin:
            error = "only the admin may cancel another user's work"
        elif not calls:
            error = f"no call {msg.call[:MAX_NAME]!r}" if msg.call else f"user {msg.user[:MAX_NAME]!r} has no calls"
        if error:
            out.append(Send(asker.conn, m.CancelReply(msg.request_id, 0, error)))
            return
        by = f"{asker.user} (admin)" if asker.admin else asker.user
        for client, call in calls:
            self._cancel_call(client, call.key[1], out, f"cancelled by {by}")
        self._log_event("calls-cancelled", f"{by} cancelled {len(calls)} calls", asker.user)
        out.append(Send(asker.conn, m.CancelReply(msg.request_id, len(calls))))

    def _on_users_changed(self, users: dict[str, UserPolicy], revoked: frozenset[str], out: list[Command]) -> None:
        self.share.set_policies(users)
        for client in [c for c in self.clients.values() if c.user in revoked and not c.admin]:
            reason = f"user {client.user} was removed or their token rotated"
            out.append(Close(client.conn, reason))
            self._on_disconnect(client.conn, out, reason)

    def _call_of(self, task: TaskRecord) -> CallRecord | None:
        client = self.clients.get(task.call[0])
        return None if client is None else client.calls.get(task.call[1])

    # ----------------------------------------------------------- scheduling
    def _schedule(self, out: list[Command]) -> None:
        share = self.share
        while share:
            if self.free_workers:
                call, workers = share.pick(), self.free_workers
            elif self.prefetch_workers and self.config.prefetch:
                call, workers = share.pick(short_only=True), self.prefetch_workers  # only short batches wait
            else:
                return
            if call is None:
                return
            task = self.tasks[call.queue.popleft()]
            worker = workers.pop(self._pick_worker(task, workers))
            self._start(task, call, worker)
            out.append(Send(worker.conn, m.Execute(task.task_id, task.attempt, task.func_name, task.frames, task.keys,
                                                   task.ref)))
            share.mark(call)

    def _start(self, task: TaskRecord, call: CallRecord, worker: WorkerRecord) -> None:
        task.attempt += 1
        task.worker = worker.conn
        worker.running[task.task_id] = None
        call.running[task.task_id] = None
        self.share.started(task.user)
        self._place(worker)  # back of its line, or into the other one

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
        if self.started_at is None:
            self.started_at = now
        self.share.tick(now)
        if self.held_calls and not self._in_recovery_grace():
            self._release_held_calls()
        deadline = now - self.config.heartbeat_timeout
        silent = [w.conn for w in self.workers.values() if w.last_seen < deadline]
        silent += [c.conn for c in self.clients.values() if c.beats and c.last_seen < deadline]
        for conn in silent:  # frozen, or cut off without a FIN
            reason = f"no heartbeat for {self.config.heartbeat_timeout:.0f} s"
            out.append(Close(conn, reason))
            self._on_disconnect(conn, out, reason)
        if self.config.heartbeats and now >= self.next_heartbeat:  # so that peers notice a frozen scheduler
            self.next_heartbeat = now + self.config.heartbeat_interval
            beat = m.Heartbeat()
            out.extend(Send(conn, beat) for conn in (*self.workers, *self.clients))
        if self.orphan_of and not self._in_recovery_grace():
            self._cancel_unclaimed(now, out)
        if self.recovered:
            expired = now - self.config.recovery_window
            for ref in [r for r, (_, at) in self.recovered.items() if at < expired]:
                del self.recovered[ref]
        if self.tasks:
            if not self.workers:
                self._fail_starved(now, out)
            self._fail_if_all_paused(now, out)

    def _fail_if_all_paused(self, now: float, out: list[Command]) -> None:
        """Fail the queued batches once every worker has been paused by its memory limit for
        ``paused_timeout``: nothing else would ever run them."""
        workers = self.workers.values()
        if not any(w.status == m.PAUSED for w in workers) or any(w.status == m.RUNNING for w in workers):
            self.all_paused_since = None
            return
        if self.all_paused_since is None:
            self.all_paused_since = now
        limit = self.config.paused_timeout
        if now - self.all_paused_since < limit:
            return
        held = "; ".join(
            f"{w.name}: {w.memory / 2**20:.0f} MiB of its {w.memory_limit / 2**20:.0f} MiB limit, "
            f"{info['data_keys']} scattered objects ({info['data_bytes'] / 2**20:.0f} MiB)"
            for w in workers if w.status == m.PAUSED for info in (self.data.info(w.conn),)
        )
        reason = (f"every worker has been paused by its memory limit (--memory-limit) for {limit:.0f} s, "
                  f"so no worker can run this batch ({held}); scatter less data, free some, or raise the limit")
        self._log_event("batches-failed", reason)
        for client in self.clients.values():
            for call in client.calls.values():
                for task_id in call.queue:
                    task = self.tasks[task_id]
                    self._drop_task(task)
                    out.append(Send(client.conn, m.BatchDone(task.batch_id, m.FAILED, "", reason)))
                    self.counters["done:failed"] += 1
                call.queue.clear()
                self.share.mark(call)
        self.all_paused_since = now

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
                    task = self.tasks[task_id]
                    self._drop_task(task)
                    out.append(Send(client.conn, m.BatchDone(task.batch_id, m.NO_WORKERS, "", reason)))
                    self.counters["done:no-workers"] += 1
                self.share.mark(call)

    # ----------------------------------------------------------------- info
    def info(self, viewer: ClientRecord | None = None) -> dict[str, Any]:
        """The cluster as ``viewer`` may see it (None: the admin's view); see ``views.py``."""
        return cluster_view(self, viewer)

    def validate(self) -> None:
        """Check the invariants; tests call this after every step."""
        for worker in self.workers.values():
            assert (worker.conn in self.free_workers) == worker.has_room, worker
            assert (worker.conn in self.prefetch_workers) == worker.can_prefetch, worker
            assert len(worker.running) + len(worker.orphans) <= 2 * worker.nthreads, worker
            for task_id in worker.running:
                assert self.tasks[task_id].worker == worker.conn
            for ref in worker.orphans:
                assert self.orphan_of[ref] == worker.conn
        assert len(self.orphan_of) == sum(len(w.orphans) for w in self.workers.values())
        for ref, task_id in self.by_ref.items():
            assert self.tasks[task_id].ref == ref
        for conn in self.free_workers:
            assert conn in self.workers
        for client in self.clients.values():
            for call in client.calls.values():
                assert (call in self.share) == call.ready, call
                for task_id in call.running:
                    task = self.tasks[task_id]
                    assert task.worker is not None and not task.cancelled and task.call == call.key
                for task_id in call.queue:
                    assert self.tasks[task_id].worker is None
        for task in self.tasks.values():
            if task.worker is not None:
                assert task.task_id in self.workers[task.worker].running
            assert not task.adopted or task.worker is not None
        running: Counter[str] = Counter(task.user for task in self.tasks.values() if task.worker is not None)
        self.share.validate(dict(running))
        self.data.validate()
