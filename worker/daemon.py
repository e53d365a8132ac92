"""The worker daemon: connects to the scheduler, runs batches in threads, reports back.

It wires three pieces together: the connection (``protocol.aio``), the pure
``WorkerState`` and the threads running ``executor.run_batch``.  When the
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
from collections.abc import Callable

import psutil

from ..payload.serialize import dump_exception
from ..payload.shm import SharedSegment, attach, share_domain, worth_sharing
from ..protocol import HandshakeError, JobschedError, Role
from ..protocol import messages as m
from ..protocol.address import Address, parse_address
from ..protocol.aio import Connection, open_connection
from ..runtime.scheduler_file import read_scheduler_file
from .data import DataService
from .executor import BatchThreads
from .memory import private_memory
from .state import (
    CancelReceived,
    DataArrived,
    DataDeleted,
    DataUnavailable,
    ExecuteReceived,
    FailTask,
    RequestData,
    RetireRequested,
    SendMessage,
    StartTask,
    TaskCompleted,
    TaskWithdrawn,
    WithdrawTask,
    WorkerState,
)

log = logging.getLogger("jobsched.worker")

EXIT_SCHEDULER_GONE = 70
EXIT_FATAL = 78
EXIT_RESTART = 75
PAUSE_FRACTION = 0.8  # of the memory limit: take no new batches above this
RESUME_FRACTION = 0.7


def cli_status(code: int) -> int:
    """The status the command line exits with for a daemon status."""
    return {EXIT_SCHEDULER_GONE: 1, EXIT_FATAL: 2}.get(code, code)


class FatalWorkerError(JobschedError):
    """Retrying cannot help (wrong secret, version mismatch, refused registration)."""


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
    ) -> None:
        if address is None and scheduler_file is None:
            raise ValueError("a worker needs the scheduler's address or a scheduler file")
        self.address = address
        self.scheduler_file = scheduler_file
        self.nthreads = nthreads
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.secret = secret
        self.death_timeout = death_timeout
        self.memory_limit = memory_limit
        self.ssl = ssl
        self.drain_timeout = drain_timeout
        self.data_port = data_port
        self.cancel_grace = cancel_grace
        self.supervised = supervised
        self.threads = BatchThreads(nthreads, self._finished)
        self.data = DataService(secret, data_ssl, ssl)
        self._process = psutil.Process()
        self._session = 0
        self._conn: Connection | None = None
        self._state: WorkerState | None = None
        self._exit_code: int | None = None
        self.in_flight = 0  # batches in the task threads (queued or running), whatever their session
        self._outcomes: deque = deque()  # finished batches, from the task threads to the loop
        self._wakeup_scheduled = False
        self._data_tasks: set[asyncio.Task] = set()
        self._deliver = None

    async def run(self, stop: asyncio.Event) -> int:
        """Serve until ``stop`` is set (exit 0) or the scheduler is gone for good (exit 1)."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stop = stop
        if self.memory_limit:
            threading.Thread(target=self._watch_memory, name="jobsched-memory", daemon=True).start()
        lost_since = loop.time()
        delay = 0.1
        try:
            while not stop.is_set():
                try:
                    self.address = self._current_address()
                    conn = await open_connection(
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
        self._session += 1
        session = self._session
        state = WorkerState()
        orphans = dict(self._state.running) if self._state is not None else {}
        for key, func in orphans.items():  # still running from the last session: their threads stay busy
            state.running[key] = func
            state.cancelled.add(key)
        self.data.delete(list(self.data.frames))  # a new session: the scheduler knows none of it
        closed = loop.create_future()
        welcomed = loop.create_future()
        drained = asyncio.Event()

        def carry_out(commands) -> None:
            for command in commands:
                if type(command) is SendMessage:
                    conn.send(command.message)
                elif type(command) is StartTask:
                    start(command)
                elif type(command) is WithdrawTask:
                    key = (command.task_id, command.attempt)
                    if self.threads.withdraw(key):
                        self.in_flight -= 1
                        carry_out(state.handle(TaskWithdrawn(*key)))
                elif type(command) is RequestData:
                    conn.send(m.NeedData(command.key))
                elif type(command) is FailTask:
                    error = LookupError(f"a batch could not get its scattered data: {command.reason}")
                    frames = (*dump_exception(error), pickle.dumps([]))
                    conn.send(m.TaskDone(command.task_id, command.attempt, m.ERROR, 0.0, frames))
            if state.idle:
                drained.set()

        def start(command: StartTask) -> None:
            self.in_flight += 1
            self.threads.submit((command.task_id, command.attempt), command.frames)

        def completed(task_id: int, attempt: int, status: str, frames: list, duration: float) -> None:
            # always free the slot; the report goes nowhere if the connection is gone
            carry_out(state.handle(TaskCompleted(task_id, attempt, status, tuple(frames), duration)))

        self._deliver = completed  # a batch finishing after a reconnect frees its slot in the new session

        def on_message(_conn: Connection, message: m.Message) -> None:
            kind = type(message)
            if kind is m.Execute:
                drained.clear()
                carry_out(state.handle(ExecuteReceived(message)))  # type: ignore[arg-type]
            elif kind is m.Cancel:
                key = (message.task_id, message.attempt)  # type: ignore[attr-defined]
                carry_out(state.handle(CancelReceived(*key)))
                if key in state.running:
                    loop.call_later(self.cancel_grace, self._cancel_overran, state, key)
            elif kind is m.StoreData:
                if message.segment:  # type: ignore[attr-defined]
                    mapped(message.key, message.segment, message.sizes)  # type: ignore[attr-defined]
                else:
                    received(message.key, message.frames, message.share)  # type: ignore[attr-defined]
            elif kind is m.DataSources:
                spawn(fetch(message.key, message.addresses, message.share))  # type: ignore[attr-defined]
            elif kind is m.DataMissing:
                carry_out(state.handle(DataUnavailable(message.key, message.reason)))  # type: ignore[attr-defined]
            elif kind is m.DeleteData:
                self.data.delete(message.keys)  # type: ignore[attr-defined]
                carry_out(state.handle(DataDeleted(tuple(message.keys))))  # type: ignore[attr-defined]
            elif kind is m.Welcome and not welcomed.done():
                welcomed.set_result(message)
            elif kind is m.Closing:
                conn.close(message.reason)  # type: ignore[attr-defined]
            else:
                conn.abort(f"unexpected {message.op!r} from the scheduler")

        def spawn(coroutine) -> None:
            task = loop.create_task(coroutine)
            self._data_tasks.add(task)  # the loop keeps only a weak reference to a task
            task.add_done_callback(self._data_tasks.discard)

        def arrived(key: str, frames: tuple, segment: SharedSegment | None = None) -> None:
            if session != self._session or conn.closed:
                if segment is not None:
                    segment.unlink()
                return
            try:
                nbytes = self.data.store(key, frames, segment)
            except Exception as exc:  # noqa: BLE001 - unpickling user data can raise anything
                carry_out(state.handle(DataUnavailable(key, f"cannot load it here: {exc!r}")))
                return
            if segment is None:
                conn.send(m.DataStored(key, nbytes))
            else:  # the other workers of this machine map it rather than fetch it
                conn.send(m.DataStored(key, nbytes, segment.name, segment.sizes))
            carry_out(state.handle(DataArrived(key, nbytes)))

        def received(key: str, frames: tuple, share: bool) -> None:
            """Bytes arrived; with ``share``, they go to a shared segment that we keep instead."""
            if share and share_domain() and worth_sharing(frames):
                spawn(shared_copy_arrived(key, frames))  # the copy takes a while: not on the loop
            else:
                arrived(key, frames)

        async def shared_copy_arrived(key: str, frames: tuple) -> None:
            shared = await self.data.share(frames)
            if shared is None:
                arrived(key, frames)
            else:
                segment, mapped_frames = shared
                arrived(key, mapped_frames, segment)

        def mapped(key: str, name: str, sizes: list[int]) -> None:
            try:
                frames = attach(name, sizes)
            except (OSError, ValueError) as exc:
                log.warning("cannot map shared segment %s for %s (%s); asking for a copy", name, key, exc)
                if session == self._session and not conn.closed:
                    conn.send(m.NeedData(key, shared=False))
                return
            arrived(key, frames)

        async def fetch(key: str, addresses: list[str], share: bool) -> None:
            if key in state.data:
                return
            try:
                frames = await self.data.fetch(key, addresses)
            except Exception:  # noqa: BLE001 - whatever went wrong, the owner's copy is the way out
                log.exception("fetching %s from peers failed", key)
                frames = None
            if frames is None:
                if session == self._session and not conn.closed:
                    conn.send(m.NeedData(key, from_owner=True))
            else:
                received(key, frames, share)

        def on_close(_conn: Connection, reason: str) -> None:
            carry_out(state.handle(RetireRequested()))  # start nothing more: the scheduler requeues what waited here
            if not closed.done():
                closed.set_result(reason)

        conn.set_handlers(on_message, on_close)
        sockname = conn.transport.get_extra_info("sockname") if conn.transport else None
        data_address = await self.data.start(sockname[0] if sockname else "127.0.0.1", self.data_port)
        conn.send(m.RegisterWorker(
            self.name, self.nthreads, os.getpid(), socket.gethostname(), self.memory_limit, data_address, share_domain()
        ))
        done, _ = await asyncio.wait([welcomed, closed], timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if welcomed not in done:
            reason = closed.result() if closed.done() else "no welcome within 30 s"
            conn.close(reason)
            if "nthreads" in reason:
                raise FatalWorkerError(f"the scheduler refused this worker: {reason}")
            log.warning("registration with %s failed: %s", self.address, reason)
            return
        self._conn, self._state = conn, state
        for key in orphans:
            loop.call_later(self.cancel_grace, self._cancel_overran, state, key)
        interval = welcomed.result().heartbeat_interval
        log.info("worker %s joined the scheduler at %s with %d threads", self.name, self.address, self.nthreads)
        stopper = loop.create_task(stop.wait())
        try:
            while not closed.done() and not stop.is_set():
                await asyncio.wait([closed, stopper], timeout=interval, return_when=asyncio.FIRST_COMPLETED)
                conn.send(m.Heartbeat(private_memory(self._process)))
        finally:
            stopper.cancel()
        if stop.is_set() and not closed.done() and self._exit_code is None:
            await self._drain(conn, state, drained, carry_out)
        elif closed.done():
            log.warning("lost the scheduler at %s: %s", self.address, closed.result())

    async def _drain(
        self, conn: Connection, state: WorkerState, drained: asyncio.Event, carry_out: Callable[[list], None]
    ) -> None:
        """Retire: take no new batches, finish the running ones, then leave cleanly."""
        conn.send(m.WorkerStatus(m.RETIRING))
        carry_out(state.handle(RetireRequested()))  # sets ``drained`` if nothing runs
        if not drained.is_set():
            log.info("draining %d running batches (up to %.0f s)", len(state.running), self.drain_timeout)
        try:
            await asyncio.wait_for(drained.wait(), self.drain_timeout)
        except asyncio.TimeoutError:
            log.warning("drain timed out with %d batches running; they will be rerun elsewhere", len(state.running))
        conn.send(m.Closing("worker shutting down"))
        conn.close("worker shutting down")

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
            outcome = outcomes.popleft()
            self.in_flight -= 1
            if self._deliver is not None:
                self._deliver(*outcome)

    def _cancel_overran(self, state: WorkerState, key: tuple[int, int]) -> None:
        if state is not self._state or self._conn is None or self._conn.closed or key not in state.running:
            return  # finished, or from a session that has ended
        func = state.running[key]
        if self.supervised:
            self._restart(f"a cancelled batch of {func} overran its {self.cancel_grace:.0f} s grace period", clean=True)
        else:
            log.warning("a cancelled batch of %s is still running after %.0f s; its slot stays busy until it ends "
                        "(run under a supervisor, the default, to have the process restarted)", func, self.cancel_grace)

    def _watch_memory(self) -> None:
        """Pause above the high-water mark; restart past the limit.  A thread, so it runs even
        while the event loop waits on a task that holds the GIL between bytecodes."""
        paused = False
        while True:
            time.sleep(0.05)
            rss = private_memory(self._process)
            if rss > self.memory_limit:
                running = ", ".join(self._state.running.values()) if self._state else ""
                reason = (f"exceeded its memory limit ({rss / 2**20:.0f} MiB > {self.memory_limit / 2**20:.0f} MiB)"
                          + (f" while running {running}" if running else ""))
                self._loop.call_soon_threadsafe(lambda why=reason: self._restart(why, clean=False))
                return
            want_pause = rss > PAUSE_FRACTION * self.memory_limit or (paused and rss > RESUME_FRACTION * self.memory_limit)
            if want_pause != paused:
                paused = want_pause
                status = m.PAUSED if paused else m.RUNNING
                log.warning("memory %.0f MiB of %.0f MiB: %s", rss / 2**20, self.memory_limit / 2**20,
                            "pausing" if paused else "resuming")
                self._loop.call_soon_threadsafe(self._send_status, status)

    def _send_status(self, status: str) -> None:
        if self._conn is not None and not self._conn.closed:
            self._conn.send(m.WorkerStatus(status))


async def _wait_or_stop(stop: asyncio.Event, delay: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), delay)
    except asyncio.TimeoutError:
        pass
