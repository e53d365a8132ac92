"""``Client``: a synchronous handle on a scheduler, over an asyncio loop in a background thread.

Threads: the caller's thread pickles batches and queues them; the loop thread
does the socket I/O, and also unpickles results, replays the tasks' output and
completes the futures, whose callbacks (joblib's) pickle and submit the next
batch right there.  Keeping that path on one thread saves two thread hand-offs
per batch; it never waits on another thread, so it cannot deadlock the loop.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import logging
import os
import pickle
import socket
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..payload.serialize import dumps, load_exception, loads
from ..payload.shm import SharedSegment, share_domain, worth_sharing
from ..protocol import HandshakeError, Role
from ..protocol import messages as m
from ..protocol.address import parse_address
from ..protocol.aio import Connection, open_connection
from ..protocol.tls import TLSConfig, client_context
from ..runtime.daemon import new_event_loop
from ..runtime.scheduler_file import read_scheduler_file
from ..runtime.secret import load_secret
from .errors import ClusterError, NoWorkersError, SchedulerUnreachableError, WorkerLostError
from .local_cluster import LocalCluster
from .replay import replay
from .scatter import ScatteredRef, new_key

log = logging.getLogger("jobsched.client")

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
    """

    def __init__(
        self,
        address: str | LocalCluster | None = None,
        *,
        secret: str | bytes | None = None,
        secret_file: str | None = None,
        timeout: float = 30.0,
        scheduler_file: str | None = None,
        n_workers: int | None = None,
        threads_per_worker: int = 1,
        name: str = "",
        set_as_current: bool = True,
        tls_ca_file: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
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
        self.address = parse_address(address)
        tls = TLSConfig(tls_cert, tls_key, tls_ca_file)
        self._ssl = client_context(tls) if self.address.scheme == "tls" else None
        self.secret = load_secret(secret_file, secret)
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"

        self._batch_ids = itertools.count(1)
        self._call_ids = itertools.count(1)
        self._request_ids = itertools.count(1)
        self._pending: dict[int, tuple[Future, int]] = {}  # batch_id -> (future, call_id)
        self._requests: dict[int, Future] = {}
        self._outbox: list[m.Message] = []
        self._outbox_lock = threading.Lock()
        self._wakeup_scheduled = False
        self._conn: Connection | None = None
        self._data: dict[str, tuple] = {}  # scattered by us: key -> pickled frames, until released
        # keys also put in this machine's shared memory: the writes, done in a thread of their own
        self._segments: dict[str, Future] = {}
        self._writer: ThreadPoolExecutor | None = None
        self._uploads: set[asyncio.Task] = set()

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

    # ------------------------------------------------------------ connection
    def _connect(self) -> None:
        future = asyncio.run_coroutine_threadsafe(self._open(), self._loop)
        try:
            future.result(self.timeout + 1)
        except HandshakeError:
            raise
        except (OSError, asyncio.TimeoutError, TimeoutError, ConnectionError) as exc:
            future.cancel()
            reason = str(exc) or f"no handshake within {self.timeout:.0f} s"
            raise SchedulerUnreachableError(f"cannot reach the scheduler at {self.address}: {reason}") from None

    async def _open(self) -> None:
        conn = await open_connection(
            self.address.host, self.address.port, Role.CLIENT, self.secret, ssl=self._ssl, timeout=self.timeout
        )
        welcomed = self._loop.create_future()

        def on_message(_c: Connection, message: m.Message) -> None:
            match message:  # the most frequent first
                case m.BatchDone():
                    self._deliver(message)
                case m.InfoReply():
                    request = self._requests.pop(message.request_id, None)
                    if request is not None:
                        request.set_result(message.info)
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

        def on_close(_c: Connection, reason: str) -> None:
            if not welcomed.done():
                welcomed.set_exception(ConnectionError(reason))
            self._fail_all(conn, reason)

        conn.set_handlers(on_message, on_close)
        conn.send(m.RegisterClient(self.name, os.getpid(), socket.gethostname()))
        await asyncio.wait_for(welcomed, self.timeout)
        self._conn = conn
        for key, frames in self._data.items():  # a restarted scheduler knows none of our data
            conn.send(m.DataRegister(key, m.frames_nbytes(frames), False))
        self._flush_outbox()

    def ensure_connected(self) -> None:
        """Reconnect if the scheduler connection was lost (e.g. the scheduler restarted)."""
        self._check_open()
        if self._conn is None or self._conn.closed:
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
            # the connection-lost path fails what was pending; fail what was queued after it
            for message in messages:
                if type(message) is m.SubmitBatch:
                    error = f"not connected to the scheduler at {self.address}"
                    self._deliver(m.BatchDone(message.batch_id, m.FAILED, "", error))
            return
        for message in messages:
            conn.send(message)

    def submit_batch(
        self, frames: list, *, call_id: int, func_name: str, max_running: int = 0, keys: list[str] | None = None
    ) -> Future:
        """Send a pickled batch; the returned future resolves to its result (or exception)."""
        future: Future = Future()
        batch_id = next(self._batch_ids)
        conn = self._conn
        if conn is None or conn.closed:
            future.set_exception(SchedulerUnreachableError(f"not connected to the scheduler at {self.address}"))
            return future
        self._pending[batch_id] = (future, call_id)
        self._send(m.SubmitBatch(batch_id, call_id, func_name[:200], max_running, tuple(frames), keys or []))
        return future

    def new_call_id(self) -> int:
        return next(self._call_ids)

    def cancel_call(self, call_id: int) -> None:
        """Drop a call's queued batches and cancel its running ones; their futures are forgotten."""
        for batch_id in [b for b, (_, c) in list(self._pending.items()) if c == call_id]:
            self._pending.pop(batch_id, None)
        if self._conn is not None and not self._conn.closed:
            self._send(m.CancelCall(call_id))

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
        self._send(m.DataRegister(key, m.frames_nbytes(frames), broadcast))

    def release(self, keys: list[str]) -> None:
        """Free scattered data on every worker and here."""
        keys = [k for k in keys if self._data.pop(k, None) is not None]
        self._unlink_segments(keys)
        if keys and not self.closed:
            self._send(m.ReleaseData(keys))

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
                replay(events)  # may raise: a warning the caller's filters turn into an error
                future.set_result(result)
                return
            if status == m.ERROR:
                error: BaseException = load_exception(message.frames[:1])
                if len(message.frames) > 1:
                    with contextlib.suppress(Exception):  # the task's own error comes first
                        replay(pickle.loads(message.frames[1]))
            elif status == m.LOST:
                error = WorkerLostError(message.error)
            elif status == m.NO_WORKERS:
                error = NoWorkersError(message.error)
            elif status == m.FAILED and message.error.startswith("not connected"):
                error = SchedulerUnreachableError(message.error)
            else:
                error = ClusterError(message.error or f"batch failed with status {status!r}")
        except Exception as exc:  # noqa: BLE001 - any failure to load the result is the batch's error (e.g. its class cannot be unpickled here)
            error = exc
        future.set_exception(error)

    def _fail_all(self, conn: Connection, reason: str) -> None:
        if conn is not self._conn:
            return
        self._conn = None
        if self.closed:
            return
        log.warning("lost the scheduler at %s: %s", self.address, reason)
        pending, self._pending = self._pending, {}
        for future, _ in pending.values():
            future.set_exception(SchedulerUnreachableError(f"lost the scheduler at {self.address}: {reason}"))

    # ------------------------------------------------------------ information
    def scheduler_info(self) -> dict:
        """The scheduler's view: ``address``, ``workers`` (by address: name, nthreads, running, ...)."""
        self._check_open()
        future: Future = Future()
        request_id = next(self._request_ids)

        def register() -> None:
            self._requests[request_id] = future
            if self._conn is None or self._conn.closed:
                self._requests.pop(request_id, None)
                future.set_exception(SchedulerUnreachableError(f"not connected to the scheduler at {self.address}"))
            else:
                self._conn.send(m.InfoRequest(request_id))

        self._loop.call_soon_threadsafe(register)
        try:
            return future.result(self.timeout)
        except TimeoutError:
            raise SchedulerUnreachableError(f"the scheduler at {self.address} did not answer within {self.timeout} s") from None

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
        return f"<jobsched.Client {self.address} {state}>"


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
