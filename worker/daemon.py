"""The worker daemon: connects to the scheduler, runs batches in threads, reports back.

It wires three pieces together: the connection (``protocol.aio``), the pure
``WorkerState`` and the threads running ``executor.run_batch``.  Every decision is
the state's: the daemon feeds it events (messages, finished batches, clock ticks,
memory samples, the outcomes of its own work) and carries out its commands.  When the
scheduler goes away it reconnects with exponential backoff, and gives up after
``death_timeout`` seconds without a scheduler (exit status 1, so a service
manager restarts it).  On SIGTERM it drains: it tells the scheduler it is
retiring, finishes its running batches (up to ``drain_timeout``) and leaves.

Exit statuses, chosen apart from the small numbers user code passes to
``os._exit``: 0 clean stop, 70 scheduler gone for ``death_timeout``, 78 fatal
configuration error (wrong secret, refused), 75 restart requested (memory limit
exceeded, or a cancelled batch overran its grace period; see supervisor.py).
The command line turns 70 into 1 and 78 into 2.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import socket
import ssl as ssl_module
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

import psutil

from ..payload.serialize import dump_exception
from ..payload.shm import SharedSegment, attach, share_domain
from ..protocol import HandshakeError, JobschedError, Role
from ..protocol import messages as m
from ..protocol.address import Address, parse_address
from ..protocol.aio import Connection, open_connection
from ..runtime.scheduler_file import read_scheduler_file
from ..runtime.tokens import looks_like_token
from .data import DataService
from .events import (
    CancelReceived,
    Command,
    DataDeleted,
    DataSourcesReceived,
    DataUnavailable,
    DrainRequested,
    Event,
    ExecuteReceived,
    FailTask,
    FetchFromPeers,
    ForgetData,
    FramesStored,
    Leave,
    Log,
    MapSegment,
    MemorySampled,
    PeersFetched,
    Reconnect,
    RequestData,
    Restart,
    SchedulerHeard,
    SegmentMapped,
    SegmentUnmappable,
    SendMessage,
    SessionEnded,
    SessionStarted,
    ShareCopy,
    SharedCopyMade,
    StartTask,
    StoreDataReceived,
    StoreFailed,
    StoreFrames,
    TaskCompleted,
    TaskWithdrawn,
    Ticked,
    UnlinkSegment,
    Welcomed,
    WithdrawTask,
)
from .executor import BatchThreads
from .memory import private_memory
from .state import WorkerConfig, WorkerState

log = logging.getLogger("jobsched.worker")

EXIT_SCHEDULER_GONE = 70
EXIT_FATAL = 78
EXIT_RESTART = 75
TICK = 0.1  # seconds between the state's clock ticks (cancel grace, drain timeout)


def cli_status(code: int) -> int:
    """The status the command line exits with for a daemon status."""
    return {EXIT_SCHEDULER_GONE: 1, EXIT_FATAL: 2}.get(code, code)


class FatalWorkerError(JobschedError):
    """Retrying cannot help (wrong secret, version mismatch, refused registration)."""


class Executor(Protocol):
    """What the daemon needs of ``BatchThreads``."""

    def submit(self, key: Any, frames: tuple) -> None: ...
    def withdraw(self, key: Any) -> bool: ...
    def shutdown(self) -> None: ...


class WorkerDaemon:
    def __init__(
        self,
        address: Address | None,
        *,
        scheduler_file: str | None = None,
        nthreads: int = 1,
        name: str = "",
        secret: bytes | None = None,
        death_timeout: float = 60.0,
        memory_limit: int = 0,
        ssl: ssl_module.SSLContext | None = None,
        data_ssl: ssl_module.SSLContext | None = None,
        drain_timeout: float = 30.0,
        data_port: int = 0,
        cancel_grace: float = 10.0,
        supervised: bool = False,
        executor: Callable[[int, Callable[[Any, str, list, float], None]], Executor] = BatchThreads,
        connect: Callable[..., Awaitable[Connection]] = open_connection,
    ) -> None:
        """``executor`` (made with ``nthreads`` and the callback for outcomes) and ``connect``
        (as ``protocol.aio.open_connection``) can be replaced in tests."""
        if address is None and scheduler_file is None:
            raise ValueError("a worker needs the scheduler's address or a scheduler file")
        if secret and looks_like_token(secret):
            raise ValueError("a worker authenticates with the cluster secret, never a user token (NAME:SECRET)")
        self.address = address
        self.scheduler_file = scheduler_file
        self.nthreads = nthreads
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.secret = secret
        self.death_timeout = death_timeout
        self.memory_limit = memory_limit
        self.ssl = ssl
        self.data_port = data_port
        self.state = WorkerState(WorkerConfig(cancel_grace, supervised, memory_limit, drain_timeout, bool(share_domain())))
        self.threads = executor(nthreads, self._finished)
        self._connect = connect
        self.data = DataService(secret, data_ssl, ssl)
        self._process = psutil.Process()
        self._conn: Connection | None = None
        self._exit_code: int | None = None
        self.in_flight = 0  # batches in the task threads (queued or running), whatever their session
        self._outcomes: deque = deque()  # finished batches, from the task threads to the loop
        self._wakeup_scheduled = False
        self._data_tasks: set[asyncio.Task] = set()
        self._ticker: asyncio.TimerHandle | None = None

    async def run(self, stop: asyncio.Event) -> int:
        """Serve until ``stop`` is set (exit 0) or the scheduler is gone for good (exit 1)."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stop = stop
        if self.memory_limit:
            threading.Thread(target=self._watch_memory, name="jobsched-memory", daemon=True).start()
        self._tick()
        lost_since = loop.time()
        delay = 0.1
        try:
            while not stop.is_set():
                try:
                    self.address = self._current_address()
                    conn = await self._connect(
                        self.address.host, self.address.port, Role.WORKER, self.secret,
                        ssl=self.ssl if self.address.scheme == "tls" else None,
                    )
                except HandshakeError as exc:
                    log.error("cannot join the scheduler at %s: %s", self.address, exc)
                    return EXIT_FATAL
                except (OSError, ValueError, KeyError, asyncio.TimeoutError, ConnectionError) as exc:
                    if loop.time() - lost_since > self.death_timeout:
                        where = self.address or self.scheduler_file
                        log.error("no scheduler at %s for %.0f s (--death-timeout); exiting", where, self.death_timeout)
                        return EXIT_SCHEDULER_GONE
                    log.info("scheduler at %s unreachable (%s); retrying in %.1f s", self.address, exc, delay)
                    await _wait_or_stop(stop, delay)
                    delay = min(delay * 2, 5.0)
                    continue
                delay = 0.1
                try:
                    await self._session_loop(conn, stop)
                except FatalWorkerError as exc:
                    log.error("%s", exc)
                    return EXIT_FATAL
                if self._exit_code is not None:
                    return self._exit_code
                lost_since = loop.time()
        finally:
            if self._ticker is not None:
                self._ticker.cancel()
            self.threads.shutdown()
            self.data.close()
        return self._exit_code or 0

    def _current_address(self) -> Address:
        """The address given, or the one in the scheduler file now (a restarted scheduler may move)."""
        if self.scheduler_file is None:
            assert self.address is not None
            return self.address
        return parse_address(read_scheduler_file(self.scheduler_file))

    async def _session_loop(self, conn: Connection, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        self._conn = None  # nothing goes out before RegisterWorker
        self._feed(SessionStarted())
        closed: asyncio.Future[str] = loop.create_future()
        welcomed: asyncio.Future[m.Welcome] = loop.create_future()

        def on_message(_conn: Connection, message: m.Message) -> None:
            match message:
                case m.Welcome() if not welcomed.done():
                    welcomed.set_result(message)
                case m.Closing(reason=reason):
                    conn.close(reason)
                case m.Heartbeat():
                    self._feed(SchedulerHeard(loop.time()))
                case _:
                    self._on_message(conn, message)

        def on_close(_conn: Connection, reason: str) -> None:
            self._feed(SessionEnded())  # start nothing more: the scheduler requeues what waited here
            if not closed.done():
                closed.set_result(reason)

        conn.set_handlers(on_message, on_close)
        sockname = conn.transport.get_extra_info("sockname") if conn.transport else None
        data_address = await self.data.start(sockname[0] if sockname else "127.0.0.1", self.data_port)
        conn.send(m.RegisterWorker(
            self.name, self.nthreads, os.getpid(), socket.gethostname(), self.memory_limit, data_address, share_domain(),
            self.state.orphan_refs,
        ))
        self._conn = conn
        first: list[asyncio.Future[Any]] = [welcomed, closed]
        done, _ = await asyncio.wait(first, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if welcomed not in done:
            reason = closed.result() if closed.done() else "no welcome within 30 s"
            conn.close(reason)
            if "nthreads" in reason:
                raise FatalWorkerError(f"the scheduler refused this worker: {reason}")
            log.warning("registration with %s failed: %s", self.address, reason)
            return
        interval = welcomed.result().heartbeat_interval
        self._feed(Welcomed(loop.time()))  # what ended while no scheduler was there goes out now
        log.info("worker %s joined the scheduler at %s with %d threads", self.name, self.address, self.nthreads)
        stopper = loop.create_task(stop.wait())
        ends: list[asyncio.Future[Any]] = [closed, stopper]
        try:
            while not closed.done() and not stop.is_set():
                await asyncio.wait(ends, timeout=interval, return_when=asyncio.FIRST_COMPLETED)
                conn.send(m.Heartbeat(private_memory(self._process)))
        finally:
            stopper.cancel()
        if stop.is_set() and not closed.done() and self._exit_code is None:
            self._feed(DrainRequested())  # ends with a Leave: when the batches are done, or timed out
            await closed
        elif closed.done():
            log.warning("lost the scheduler at %s: %s", self.address, closed.result())

    def _on_message(self, conn: Connection, message: m.Message) -> None:
        match message:
            case m.Execute():
                self._feed(ExecuteReceived(message))
            case m.Cancel(task_id=task_id, attempt=attempt):
                self._feed(CancelReceived(task_id, attempt, message.ref))
            case m.StoreData():
                self._feed(StoreDataReceived(message))
            case m.DataSources():
                self._feed(DataSourcesReceived(message))
            case m.DataMissing(key=key, reason=reason):
                self._feed(DataUnavailable(key, reason))
            case m.DeleteData(keys=keys):
                self.data.delete(keys)
                self._feed(DataDeleted(tuple(keys)))
            case _:
                conn.abort(f"unexpected {message.op!r} from the scheduler")

    # ------------------------------------------------------------ commands
    def _feed(self, event: Event) -> None:
        self._carry_out(self.state.handle(event))

    def _carry_out(self, commands: list[Command]) -> None:
        for command in commands:
            match command:
                case SendMessage(message=message):
                    self._send(message)
                case StartTask(task_id=task_id, attempt=attempt, frames=frames):
                    self.in_flight += 1
                    self.threads.submit((task_id, attempt), frames)
                case WithdrawTask(task_id=task_id, attempt=attempt):
                    if self.threads.withdraw((task_id, attempt)):
                        self.in_flight -= 1
                        self._feed(TaskWithdrawn(task_id, attempt))
                case RequestData(key=key):
                    self._send(m.NeedData(key))
                case FailTask(task_id=task_id, attempt=attempt, reason=reason):
                    error = LookupError(f"a batch could not get its scattered data: {reason}")
                    frames = (*dump_exception(error), pickle.dumps([]))
                    self._send(m.TaskDone(task_id, attempt, m.ERROR, 0.0, frames))
                case Log(level=level, text=text):
                    log.log(level, "%s", text)
                case Leave(reason=reason):
                    self._send(m.Closing(reason))
                    if self._conn is not None:
                        self._conn.close(reason)
                case Reconnect(reason=reason):
                    log.warning("%s; reconnecting", reason)
                    if self._conn is not None:
                        self._conn.abort(reason)
                case Restart(reason=reason, clean=clean):
                    self._restart(reason, clean=clean)
                case MapSegment(key=key, name=name, sizes=sizes):
                    try:
                        mapped = attach(name, sizes)
                    except (OSError, ValueError) as exc:
                        self._feed(SegmentUnmappable(key, name, str(exc)))
                    else:
                        self._feed(SegmentMapped(key, mapped))
                case ShareCopy(key=key, frames=frames, session=session):
                    self._spawn(self._share_copy(key, frames, session))
                case FetchFromPeers(key=key, addresses=addresses, share=share, session=session):
                    self._spawn(self._fetch(key, list(addresses), share, session))
                case StoreFrames(key=key, frames=frames, segment=segment):
                    self._store(key, frames, segment)
                case UnlinkSegment(segment=segment):
                    segment.unlink()
                case ForgetData(keys=keys):
                    self.data.delete(list(keys))

    def _send(self, message: m.Message) -> None:
        if self._conn is not None and not self._conn.closed:  # else the report goes nowhere
            self._conn.send(message)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(coroutine)
        self._data_tasks.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._data_tasks.discard)

    def _store(self, key: str, frames: tuple, segment: SharedSegment | None) -> None:
        try:
            nbytes = self.data.store(key, frames, segment)
        except Exception as exc:  # noqa: BLE001 - unpickling user data can raise anything
            self._feed(StoreFailed(key, repr(exc)))
            return
        if segment is None:
            self._feed(FramesStored(key, nbytes))
        else:
            self._feed(FramesStored(key, nbytes, segment.name, tuple(segment.sizes)))

    async def _share_copy(self, key: str, frames: tuple, session: int) -> None:
        shared = await self.data.share(frames)
        if shared is None:
            self._feed(SharedCopyMade(key, frames, None, session))
        else:
            segment, mapped_frames = shared
            self._feed(SharedCopyMade(key, mapped_frames, segment, session))

    async def _fetch(self, key: str, addresses: list[str], share: bool, session: int) -> None:
        try:
            frames = await self.data.fetch(key, addresses)
        except Exception:  # noqa: BLE001 - whatever went wrong, the owner's copy is the way out
            log.exception("fetching %s from peers failed", key)
            frames = None
        self._feed(PeersFetched(key, frames, share, session))

    # ------------------------------------------------------------ restarts
    def _restart(self, reason: str, *, clean: bool) -> None:
        """Leave so the supervisor starts a fresh process; ``clean``: running batches are no deaths."""
        if self._exit_code is not None:
            return
        self._exit_code = EXIT_RESTART
        log.warning("restarting: %s", reason)
        conn = self._conn
        if conn is not None and not conn.closed:
            if clean:
                conn.send(m.WorkerStatus(m.RETIRING))
            conn.send(m.Closing(reason))
            conn.close(reason)
        # let the goodbye go out, then stop: the command line ends the process even though
        # threads still run user code (see ``in_flight``); the timer is a backstop for a stuck loop
        self._loop.call_later(0.2, self._stop.set)
        threading.Timer(5.0, os._exit, [EXIT_RESTART]).start()

    def _finished(self, key: tuple[int, int], status: str, frames: list, duration: float) -> None:
        """In a task thread: hand the outcome to the loop.  Outcomes that finish before the
        loop has woken up for the first go with it: one wake-up, and one write, for them all."""
        self._outcomes.append((*key, status, frames, duration))
        if self._wakeup_scheduled:
            return
        self._wakeup_scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._completed)
        except RuntimeError:  # the loop is closed: this worker is leaving, nobody wants the result
            pass

    def _completed(self) -> None:
        # cleared before reading: an outcome appended after the last popleft finds it false
        self._wakeup_scheduled = False
        outcomes = self._outcomes
        while outcomes:
            task_id, attempt, status, frames, duration = outcomes.popleft()
            self.in_flight -= 1
            # always free the slot, whatever the session; the state decides who hears of it
            self._feed(TaskCompleted(task_id, attempt, status, tuple(frames), duration))

    def _tick(self) -> None:
        """Time for the state: cancel grace periods and the drain timeout."""
        self._feed(Ticked(self._loop.time()))
        self._ticker = self._loop.call_later(TICK, self._tick)

    def _watch_memory(self) -> None:
        """Sample memory for the state (pause, resume, restart).  A thread, so it runs even
        while the event loop waits on a task that holds the GIL between bytecodes."""
        while True:
            time.sleep(0.05)
            try:
                self._loop.call_soon_threadsafe(self._feed, MemorySampled(private_memory(self._process)))
            except RuntimeError:  # the loop is closed: the worker is leaving
                return


async def _wait_or_stop(stop: asyncio.Event, delay: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), delay)
    except asyncio.TimeoutError:
        pass
