"""``Client``: a synchronous handle on a scheduler, over an asyncio loop in a background thread.

Threads: the caller's thread pickles batches and queues them; the loop thread
does the socket I/O, and also unpickles results, replays the tasks' output and
completes the futures, whose callbacks (joblib's) pickle and submit the next
batch right there.  Keeping that path on one thread saves two thread hand-offs
per batch; it never waits on another thread, so it cannot deadlock the loop.

Every decision (what to resend after a reconnection, when to reconnect, when to
give up, when the scheduler is taken for gone) is ``ClientState``'s; this module
feeds it events, under a lock since both threads do, and carries out its commands.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import itertools
import logging
import os
import pickle
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from ..payload.serialize import dumps, load_exception, loads
from ..payload.shm import SharedSegment, share_domain, worth_sharing
from ..protocol import HandshakeError, Role
from ..protocol import messages as m
from ..protocol.address import parse_address
from ..protocol.aio import Connection, open_connection
from ..protocol.handshake import os_user
from ..protocol.tls import TLSConfig, client_context
from ..runtime.daemon import new_event_loop
from ..runtime.scheduler_file import read_scheduler_file
from ..runtime.secret import load_credentials
from ..runtime.tokens import token_user
from . import html_repr
from .errors import (
    CallCancelledError,
    CancelRefusedError,
    ClusterError,
    NoWorkersError,
    SchedulerUnreachableError,
    WorkerLostError,
)
from .local_cluster import LocalCluster
from .replay import replay
from .scatter import ScatteredRef, new_key
from .state import (
    BatchDoneReceived,
    BatchRecord,
    BatchSubmitted,
    CallCancelled,
    ClientConfig,
    ClientState,
    Command,
    Connect,
    Connected,
    ConnectFailed,
    ConnectionLost,
    DataRegistered,
    DataReleased,
    Deliver,
    Disconnect,
    Event,
    Fail,
    MessageReceived,
    Send,
    Ticked,
)

log = logging.getLogger("jobsched.client")
R = TypeVar("R", bound=m.Message)

TICK_INTERVAL = 0.25  # seconds: heartbeats, silence and reconnection are decided on ticks
_open_clients: list[weakref.ref[Client]] = []
_open_lock = threading.Lock()


def current_client() -> Client | None:
    """The most recently created Client that is still open, if any."""
    with _open_lock:
        for ref in reversed(_open_clients):
            client = ref()
            if client is not None and not client.closed:
                return client
    return None


class Client:
    """Connects to a scheduler; with no address, starts and owns an embedded ``LocalCluster``.

    ``Client("tcp://host:8686")``, ``Client(scheduler_file=path)``, or ``Client()``: the
    scheduler named by ``JOBSCHED_SCHEDULER`` / ``JOBSCHED_SCHEDULER_FILE`` if set, else a
    local cluster of ``n_workers`` worker processes (default: one per core).

    When the connection to the scheduler drops (a restart, a freeze, a lost link) calls
    in flight wait while the client reconnects; once back, it registers its scattered
    data again and resubmits every batch still waiting.  ``reconnect_timeout`` (seconds,
    default 60) bounds that wait: past it the waiting batches fail with
    ``SchedulerUnreachableError``.  A scheduler that sends nothing for
    ``heartbeat_timeout`` seconds (default 10; it beats every second) is taken for gone.

    Credentials, the first found wins: ``token`` / ``token_file`` (a user's token, as
    ``jobsched-scheduler --add-user`` printed it) or ``secret`` / ``secret_file`` (the
    cluster secret, the admin's credential, acting as ``user``, by default the OS user
    name); then ``JOBSCHED_TOKEN``, ``JOBSCHED_TOKEN_FILE``, ``JOBSCHED_SECRET``,
    ``JOBSCHED_SECRET_FILE``; then the files ``token`` and ``secret`` in
    ``$XDG_CONFIG_HOME/jobsched`` (default ``~/.config/jobsched``), which must be mode 0600.
    """

    def __init__(
        self,
        address: str | LocalCluster | None = None,
        *,
        secret: str | bytes | None = None,
        secret_file: str | None = None,
        token: str | None = None,
        token_file: str | None = None,
        user: str | None = None,
        timeout: float = 30.0,
        scheduler_file: str | None = None,
        n_workers: int | None = None,
        threads_per_worker: int = 1,
        name: str = "",
        set_as_current: bool = True,
        tls_ca_file: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        reconnect_timeout: float = 60.0,
        heartbeat_timeout: float = 10.0,
    ) -> None:
        if not reconnect_timeout >= 0 or not heartbeat_timeout > 0:
            raise ValueError("reconnect_timeout must be >= 0 and heartbeat_timeout > 0 (seconds)")
        self.cluster: LocalCluster | None = None
        self._owns_cluster = False
        self.closed = False
        self.timeout = timeout
        if address is None and scheduler_file is None:  # as dask reads DASK_SCHEDULER_ADDRESS
            address = os.environ.get("JOBSCHED_SCHEDULER") or None
            scheduler_file = os.environ.get("JOBSCHED_SCHEDULER_FILE") or None
        if address is None and scheduler_file is not None:
            address = read_scheduler_file(scheduler_file)
        if address is None:
            address = LocalCluster(n_workers, threads_per_worker)
            self._owns_cluster = True
        if isinstance(address, LocalCluster):
            self.cluster = address
            address, secret = self.cluster.address, self.cluster.secret
            secret_file = token = token_file = None  # its daemons know their own secret only
        self.address = parse_address(address)
        tls = TLSConfig(tls_cert, tls_key, tls_ca_file)
        self._ssl = client_context(tls) if self.address.scheme == "tls" else None
        self.secret, self.token = load_credentials(secret, secret_file, token, token_file)
        self.user = token_user(self.token) if self.token else user or os_user()  # who the scheduler sees
        if user and self.user != user:
            raise ValueError(f"the token is user {self.user!r}'s: it cannot act as {user!r}")
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"

        # names this client's batches across reconnections and scheduler restarts
        self.session = secrets.token_hex(8)
        self._state = ClientState(ClientConfig(reconnect_timeout, heartbeat_timeout))
        self._state_lock = threading.Lock()
        self._batch_ids = itertools.count(1)
        self._call_ids = itertools.count(1)
        self._request_ids = itertools.count(1)
        self._pending: dict[int, tuple[Future, int]] = {}  # batch_id -> (future, call_id)
        self._requests: dict[int, Future] = {}
        # call_id -> where that call's task output goes (backend.py: the caller's cell, in order)
        self._call_replays: dict[int, Callable[[Future, list], None]] = {}
        self._outbox: list[m.Message] = []
        self._outbox_lock = threading.Lock()
        self._wakeup_scheduled = False
        self._conn: Connection | None = None
        self._data: dict[str, tuple] = {}  # scattered by us: key -> pickled frames, until released
        # keys also put in this machine's shared memory: the writes, done in a thread of their own
        self._segments: dict[str, Future] = {}
        self._writer: ThreadPoolExecutor | None = None
        self._uploads: set[asyncio.Task] = set()
        self._ticker: asyncio.Task | None = None
        self._reconnecting: asyncio.Task | None = None

        self._loop = new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="jobsched-client-io", daemon=True)
        self._loop_thread.start()
        try:
            self._connect()
            if self.cluster is not None and self.cluster.n_workers:
                self.wait_for_workers(self.cluster.n_workers, timeout=max(timeout, 60.0))
        except BaseException:
            self.close()
            raise
        if set_as_current:
            with _open_lock:
                _open_clients.append(weakref.ref(self))

    @property
    def reconnect_timeout(self) -> float:
        return self._state.config.reconnect_timeout

    @reconnect_timeout.setter
    def reconnect_timeout(self, seconds: float) -> None:
        if not seconds >= 0:
            raise ValueError(f"reconnect_timeout must be >= 0 seconds, not {seconds!r}")
        with self._state_lock:
            self._state.config = dataclasses.replace(self._state.config, reconnect_timeout=float(seconds))

    # ------------------------------------------------------------- the state
    def _handle(self, event: Event) -> None:
        with self._state_lock:
            commands = self._state.handle(event)
        for command in commands:  # outside the lock: a future's callback submits the next batch
            self._carry_out(command)

    def _carry_out(self, command: Command) -> None:
        match command:
            case Send(message):
                self._send(message)
            case Deliver(message):
                self._deliver(message)
            case Fail(batch_ids, reason):
                for batch_id in batch_ids:
                    entry = self._pending.pop(batch_id, None)
                    if entry is not None:
                        entry[0].set_exception(SchedulerUnreachableError(f"{reason} (scheduler {self.address})"))
            case Connect():
                self._loop.call_soon_threadsafe(self._start_reconnecting)
            case Disconnect(reason):
                conn = self._conn
                if conn is not None:
                    log.warning("closing the connection to the scheduler at %s: %s", self.address, reason)
                    self._loop.call_soon_threadsafe(conn.abort, reason)

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(TICK_INTERVAL)
            self._handle(Ticked(time.monotonic()))

    def _start_reconnecting(self) -> None:
        if self.closed or (self._reconnecting is not None and not self._reconnecting.done()):
            return
        self._reconnecting = self._loop.create_task(self._reconnect())

    async def _reconnect(self) -> None:
        try:
            await self._open()
        except Exception as exc:  # noqa: BLE001 - whatever failed, the state decides when to retry
            log.info("reconnecting to the scheduler at %s failed: %s", self.address, exc or type(exc).__name__)
            self._handle(ConnectFailed(str(exc) or type(exc).__name__, time.monotonic()))

    # ------------------------------------------------------------ connection
    def _connect(self) -> None:
        future = asyncio.run_coroutine_threadsafe(self._open_unless_reconnecting(), self._loop)
        try:
            future.result(self.timeout + 1)
        except HandshakeError:
            raise
        except (OSError, asyncio.TimeoutError, TimeoutError, ConnectionError) as exc:
            future.cancel()
            reason = str(exc) or f"no handshake within {self.timeout:.0f} s"
            raise SchedulerUnreachableError(f"cannot reach the scheduler at {self.address}: {reason}") from None

    async def _open_unless_reconnecting(self) -> None:
        """Connect now, or wait for the reconnection under way: never two connections at once."""
        if self._reconnecting is not None and not self._reconnecting.done():
            await asyncio.shield(self._reconnecting)
        if self._conn is None or self._conn.closed:
            await self._open()

    async def _open(self) -> None:
        conn = await open_connection(
            self.address.host, self.address.port, Role.CLIENT, self.secret, ssl=self._ssl, timeout=self.timeout,
            token=self.token, user=self.user,
        )
        welcomed = self._loop.create_future()

        def on_message(_c: Connection, message: m.Message) -> None:
            now = time.monotonic()
            match message:  # the most frequent first
                case m.BatchDone():
                    self._handle(BatchDoneReceived(message, now))
                    return
                case m.Heartbeat():
                    pass  # the scheduler is alive
                case m.InfoReply() | m.CancelReply():
                    request = self._requests.pop(message.request_id, None)
                    if request is not None:
                        request.set_result(message)
                case m.UploadRequest():
                    upload = self._loop.create_task(self._upload(conn, message))
                    self._uploads.add(upload)  # the loop keeps only a weak reference to a task
                    upload.add_done_callback(self._uploads.discard)
                case m.Welcome():
                    if not welcomed.done():
                        welcomed.set_result(message)
                case m.Closing():
                    conn.close(message.reason)
                case _:
                    conn.abort(f"unexpected {message.op!r} from the scheduler")
            self._handle(MessageReceived(now))

        def on_close(_c: Connection, reason: str) -> None:
            if not welcomed.done():
                welcomed.set_exception(ConnectionError(reason))
            if conn is self._conn:
                self._conn = None
                if not self.closed:
                    log.warning("lost the scheduler at %s: %s; reconnecting", self.address, reason)
                    self._handle(ConnectionLost(reason, time.monotonic()))

        conn.set_handlers(on_message, on_close)
        resumed = bool(self._state.pending)  # the scheduler then waits a moment for the workers holding them
        conn.send(m.RegisterClient(self.name, os.getpid(), socket.gethostname(), self.session, resumed))
        try:
            welcome = await asyncio.wait_for(welcomed, self.timeout)
        except BaseException:
            conn.abort("no welcome")
            raise
        self._conn = conn
        self._flush_outbox()
        self._handle(Connected(time.monotonic(), welcome.heartbeat_interval))  # resends what waits
        if self._ticker is None:
            self._ticker = self._loop.create_task(self._tick_forever())

    def ensure_connected(self) -> None:
        """Reconnect now if the client gave up on a lost scheduler (``reconnect_timeout``
        passed); while it is still reconnecting, calls wait for it instead."""
        self._check_open()
        if self._state.gave_up:
            self._connect()

    def _check_open(self) -> None:
        if self.closed:
            raise ClusterError("this Client is closed")

    # --------------------------------------------------------------- sending
    def _send(self, message: m.Message) -> None:
        """Queue a message from any thread; the loop thread writes queued messages in bulk."""
        on_loop = threading.get_ident() == self._loop_thread.ident
        with self._outbox_lock:
            self._outbox.append(message)
            wake = not on_loop and not self._wakeup_scheduled
            self._wakeup_scheduled = self._wakeup_scheduled or wake
        if on_loop:
            # from a callback (joblib's, submitting the next batch as a result arrives): hand it
            # to the connection now, behind what other threads queued, so it leaves this loop turn
            self._flush_outbox()
        elif wake:
            self._loop.call_soon_threadsafe(self._flush_outbox)

    def _flush_outbox(self) -> None:
        with self._outbox_lock:
            messages, self._outbox = self._outbox, []
            self._wakeup_scheduled = False
        conn = self._conn
        if conn is None or conn.closed:
            return  # lost with the connection: the state resends what still matters once back
        for message in messages:
            conn.send(message)

    def submit_batch(
        self, frames: list, *, call_id: int, func_name: str, max_running: int = 0, keys: list[str] | None = None,
        priority: int = 0,
    ) -> Future:
        """Send a pickled batch; the returned future resolves to its result (or exception).
        ``priority`` orders this user's calls on the scheduler (higher first)."""
        future: Future = Future()
        batch_id = next(self._batch_ids)
        self._pending[batch_id] = (future, call_id)
        self._handle(BatchSubmitted(BatchRecord(batch_id, call_id, func_name[:200], max_running, tuple(frames),
                                                tuple(keys or ()), priority)))
        return future

    def new_call_id(self) -> int:
        return next(self._call_ids)

    def replay_call_with(self, call_id: int, replay_events: Callable[[Future, list], None] | None) -> None:
        """Hand the output of ``call_id``'s batches to ``replay_events(future, events)``, on the
        I/O thread before the future completes (it may raise: the batch's error); None: the default,
        replayed at once on the I/O thread."""
        if replay_events is None:
            self._call_replays.pop(call_id, None)
        else:
            self._call_replays[call_id] = replay_events

    def cancel_call(self, call_id: int) -> None:
        """Drop a call's queued batches and cancel its running ones; their futures are forgotten."""
        for batch_id in [b for b, (_, c) in list(self._pending.items()) if c == call_id]:
            self._pending.pop(batch_id, None)
        self._handle(CallCancelled(call_id))

    # --------------------------------------------------------- scattered data
    def scatter(self, obj: Any, broadcast: bool = False) -> ScatteredRef:
        """Send ``obj`` to the cluster once; pass the returned reference as a task argument.

        Workers fetch it when a task needs it (from each other when one has it);
        ``broadcast=True`` copies it to every worker now.  It is freed when the
        reference is garbage collected, or when this Client closes.
        """
        self._check_open()
        frames = dumps(obj, out_of_band_min=0)  # every array read-only and shared on the workers
        key = new_key(obj)
        ref = ScatteredRef(key, m.frames_nbytes(frames))
        self.register_data(key, frames, broadcast=broadcast)
        weakref.finalize(ref, self.release, [key])
        return ref

    def register_data(self, key: str, frames: list, *, broadcast: bool = False) -> None:
        """Make pickled ``frames`` available to the workers under ``key`` (kept until released)."""
        self._data[key] = tuple(frames)
        self._handle(DataRegistered(key, m.frames_nbytes(frames), broadcast))

    def release(self, keys: list[str]) -> None:
        """Free scattered data on every worker and here."""
        keys = [k for k in keys if self._data.pop(k, None) is not None]
        self._unlink_segments(keys)
        if keys and not self.closed:
            self._handle(DataReleased(tuple(keys)))

    async def _upload(self, conn: Connection, request: m.UploadRequest) -> None:
        """Send our copy of ``request.key``: as a shared segment to a worker on this machine."""
        key = request.key
        frames = self._data.get(key)
        if frames is None:
            return  # released meanwhile: the scheduler forgot it too
        segment = None
        if request.share_domain and request.share_domain == share_domain() and worth_sharing(frames):
            segment = await self._segment_of(key, frames)
        if key not in self._data:  # released by the caller's thread meanwhile
            self._unlink_segments([key])
        elif segment is not None:
            conn.send(m.DataUpload(key, segment.name, segment.sizes, share_domain()))
        else:
            conn.send(m.DataUpload(key, frames=frames))

    async def _segment_of(self, key: str, frames: tuple) -> SharedSegment | None:
        """``key``'s shared segment, written once, off the loop (a large array takes a while)."""
        writing = self._segments.get(key)
        if writing is None:
            if self._writer is None:
                self._writer = ThreadPoolExecutor(1, thread_name_prefix="jobsched-shm")
            writing = self._segments[key] = self._writer.submit(SharedSegment, frames)
        try:
            return await asyncio.wrap_future(writing)
        except Exception as exc:  # noqa: BLE001 - e.g. a small /dev/shm (containers): send the bytes
            log.info("cannot put %s in shared memory (%s); sending it", key, exc)
            if self._segments.get(key) is writing:
                del self._segments[key]
            return None

    def _unlink_segments(self, keys: list[str]) -> None:
        for key in keys:
            writing = self._segments.pop(key, None)
            if writing is not None:  # workers that mapped it keep their copy until they drop it
                writing.add_done_callback(_unlink_written)

    # -------------------------------------------------------------- receiving
    def _deliver(self, message: m.BatchDone) -> None:
        """Complete a batch's future (on the loop thread; its callbacks run here too)."""
        entry = self._pending.pop(message.batch_id, None)
        if entry is None:
            return  # cancelled call
        future = entry[0]
        status = message.status
        try:
            if status == m.OK:
                result, events = loads(message.frames)
                self._replay(entry, events)  # may raise: a warning the caller's filters turn into an error
                future.set_result(result)
                return
            if status == m.ERROR:
                error: BaseException = load_exception(message.frames[:1])
                if len(message.frames) > 1:
                    with contextlib.suppress(Exception):  # the task's own error comes first
                        self._replay(entry, pickle.loads(message.frames[1]))
            elif status == m.LOST:
                error = WorkerLostError(message.error)
            elif status == m.NO_WORKERS:
                error = NoWorkersError(message.error)
            elif status == m.CANCELLED:
                error = CallCancelledError(message.error or "the call was cancelled on the scheduler")
            else:
                error = ClusterError(message.error or f"batch failed with status {status!r}")
        except Exception as exc:  # noqa: BLE001 - any failure to load the result is the batch's error (e.g. its class cannot be unpickled here)
            error = exc
        future.set_exception(error)

    def _replay(self, entry: tuple[Future, int], events: list) -> None:
        replay_events = self._call_replays.get(entry[1])
        if replay_events is None:
            replay(events)
        else:
            replay_events(entry[0], events)

    # ------------------------------------------------------------ information
    def scheduler_info(self) -> dict:
        """The scheduler's view: ``address``, ``workers`` (by address: name, nthreads, running, ...);
        ``users`` and ``calls`` as this client's user may see them (others only in aggregate)."""
        return self._request(m.InfoRequest, m.InfoReply).info

    def cancel(self, call: str | None = None, user: str | None = None) -> int:
        """Cancel one call (its ``id`` in ``scheduler_info()["calls"]``) or every call of ``user``;
        returns how many calls the scheduler cancelled.  Only the admin credential (the cluster
        secret) may cancel another user's work: otherwise, and for an unknown call or user, the
        scheduler refuses with ``CancelRefusedError`` saying why.  The cancelled calls raise
        ``CallCancelledError`` in their callers."""
        if (call is None) == (user is None):
            raise ValueError("cancel() needs exactly one of call= (a call id) or user= (a user name)")
        reply = self._request(lambda request_id: m.CancelRequest(request_id, user or "", call or ""), m.CancelReply)
        if reply.error:
            raise CancelRefusedError(f"the scheduler at {self.address} refused to cancel: {reply.error}")
        return reply.cancelled

    def _request(self, make: Callable[[int], m.Message], reply_type: type[R]) -> R:
        """Send the request ``make(request_id)`` and wait up to ``timeout`` for its reply."""
        self._check_open()
        self._wait_while_reconnecting()
        future: Future = Future()
        request_id = next(self._request_ids)

        def register() -> None:
            self._requests[request_id] = future
            if self._conn is None or self._conn.closed:
                self._requests.pop(request_id, None)
                future.set_exception(SchedulerUnreachableError(f"not connected to the scheduler at {self.address}"))
            else:
                self._conn.send(make(request_id))

        self._loop.call_soon_threadsafe(register)
        try:
            reply = future.result(self.timeout)
        except TimeoutError:
            self._loop.call_soon_threadsafe(self._requests.pop, request_id, None)
            raise SchedulerUnreachableError(f"the scheduler at {self.address} did not answer within {self.timeout} s") from None
        if not isinstance(reply, reply_type):
            raise ClusterError(f"the scheduler at {self.address} answered a request with {reply.op!r}")
        return reply

    def _wait_while_reconnecting(self) -> None:
        """A request made while the client reconnects waits for it, up to ``timeout``."""
        deadline = time.monotonic() + self.timeout
        while self._conn is None and self._state.lost_since is not None and not self._state.gave_up:
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)

    def total_slots(self) -> int:
        return sum(w["nthreads"] for w in self.scheduler_info()["workers"].values())

    def wait_for_workers(self, n: int = 1, timeout: float | None = None) -> None:
        """Block until at least ``n`` workers are connected; TimeoutError after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            count = len(self.scheduler_info()["workers"])
            if count >= n:
                return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"only {count} of {n} workers joined the scheduler at {self.address} within {timeout} s")
            time.sleep(0.05)

    # ---------------------------------------------------------------- closing
    def close(self) -> None:
        if self.closed:
            return
        self.closed = True

        def shutdown() -> None:
            for task in (self._ticker, self._reconnecting):
                if task is not None:
                    task.cancel()
            if self._conn is not None:
                self._conn.close("client closed")

        if self._loop.is_running():
            self._loop.call_soon_threadsafe(shutdown)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(5)
        for future, _ in self._pending.values():
            if not future.done():
                future.set_exception(ClusterError("the Client was closed"))
        self._pending = {}
        self._data = {}
        self._unlink_segments(list(self._segments))
        if self._writer is not None:
            self._writer.shutdown(wait=False)
        if self._owns_cluster and self.cluster is not None:
            self.cluster.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return html_repr.one_line("Client", str(self.address), None, state)

    @property
    def dashboard_link(self) -> str:
        """The scheduler's status page, where known (an embedded cluster's, or the scheduler file's)."""
        return self.cluster.dashboard if self.cluster is not None else ""

    def _repr_html_(self) -> str:
        """Jupyter's view: address, dashboard link, workers, slots, memory and data held."""
        info, error = None, "closed" if self.closed else ""
        if not self.closed:
            try:
                info = self.scheduler_info()
            except Exception as exc:  # noqa: BLE001 - a repr must not raise: say what went wrong instead
                error = str(exc) or type(exc).__name__
        return html_repr.html("Client", str(self.address), self.dashboard_link, info, error)


def _unlink_written(writing: Future) -> None:
    if not writing.cancelled() and writing.exception() is None:
        writing.result().unlink()


def _close_all() -> None:
    with _open_lock:
        clients = [ref() for ref in _open_clients]
    for client in clients:
        if client is not None:
            client.close()


atexit.register(_close_all)
