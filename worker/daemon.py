"""The worker daemon: connects to the scheduler, runs batches in threads, reports back.

It wires three pieces together: the connection (``protocol.aio``), the pure
``WorkerState`` and a thread pool running ``executor.run_batch``.  When the
scheduler goes away it reconnects with exponential backoff, and gives up after
``death_timeout`` seconds without a scheduler (exit status 1, so a service
manager restarts it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl as ssl_module
from concurrent.futures import ThreadPoolExecutor

import psutil

from ..protocol import HandshakeError, Role
from ..protocol import messages as m
from ..protocol.address import Address
from ..protocol.aio import Connection, open_connection
from .executor import run_batch
from .state import CancelReceived, ExecuteReceived, SendMessage, StartTask, TaskCompleted, WorkerState

log = logging.getLogger("jobsched.worker")


class FatalWorkerError(Exception):
    """Retrying cannot help (wrong secret, version mismatch, refused registration)."""


class WorkerDaemon:
    def __init__(
        self,
        address: Address,
        *,
        nthreads: int = 1,
        name: str = "",
        secret: bytes | None = None,
        death_timeout: float = 60.0,
        memory_limit: int = 0,
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        self.ssl = ssl
        self.address = address
        self.nthreads = nthreads
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.secret = secret
        self.death_timeout = death_timeout
        self.memory_limit = memory_limit
        self.pool = ThreadPoolExecutor(max_workers=nthreads, thread_name_prefix="jobsched-task")
        self._process = psutil.Process()
        self._session = 0

    async def run(self, stop: asyncio.Event) -> int:
        """Serve until ``stop`` is set (exit 0) or the scheduler is gone for good (exit 1)."""
        loop = asyncio.get_running_loop()
        lost_since = loop.time()
        delay = 0.1
        try:
            while not stop.is_set():
                try:
                    conn = await open_connection(
                        self.address.host, self.address.port, Role.WORKER, self.secret, ssl=self.ssl
                    )
                except HandshakeError as exc:
                    log.error("cannot join the scheduler at %s: %s", self.address, exc)
                    return 2
                except (OSError, asyncio.TimeoutError, ConnectionError) as exc:
                    if loop.time() - lost_since > self.death_timeout:
                        log.error("no scheduler at %s for %.0f s (--death-timeout); exiting", self.address, self.death_timeout)
                        return 1
                    log.info("scheduler at %s unreachable (%s); retrying in %.1f s", self.address, exc, delay)
                    await _wait_or_stop(stop, delay)
                    delay = min(delay * 2, 5.0)
                    continue
                delay = 0.1
                try:
                    await self._session_loop(conn, stop)
                except FatalWorkerError as exc:
                    log.error("%s", exc)
                    return 2
                lost_since = loop.time()
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)
        return 0

    async def _session_loop(self, conn: Connection, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        self._session += 1
        session = self._session
        state = WorkerState(self.nthreads)
        closed = loop.create_future()
        welcomed = loop.create_future()

        def carry_out(commands) -> None:
            for command in commands:
                if type(command) is SendMessage:
                    conn.send(command.message)
                elif type(command) is StartTask:
                    start(command)

        def start(command: StartTask) -> None:
            future = self.pool.submit(run_batch, command.frames)

            def finished(f) -> None:
                status, frames, duration = f.result()
                loop.call_soon_threadsafe(completed, command.task_id, command.attempt, status, frames, duration)

            future.add_done_callback(finished)

        def completed(task_id: int, attempt: int, status: str, frames: list, duration: float) -> None:
            if session == self._session and not conn.closed:
                carry_out(state.handle(TaskCompleted(task_id, attempt, status, tuple(frames), duration)))

        def on_message(_conn: Connection, message: m.Message) -> None:
            kind = type(message)
            if kind is m.Execute:
                carry_out(state.handle(ExecuteReceived(message)))  # type: ignore[arg-type]
            elif kind is m.Cancel:
                carry_out(state.handle(CancelReceived(message.task_id, message.attempt)))  # type: ignore[attr-defined]
            elif kind is m.Welcome and not welcomed.done():
                welcomed.set_result(message)
            elif kind is m.Closing:
                conn.close(message.reason)  # type: ignore[attr-defined]
            else:
                conn.abort(f"unexpected {message.op!r} from the scheduler")

        def on_close(_conn: Connection, reason: str) -> None:
            if not closed.done():
                closed.set_result(reason)

        conn.set_handlers(on_message, on_close)
        conn.send(m.RegisterWorker(self.name, self.nthreads, os.getpid(), socket.gethostname(), self.memory_limit))
        done, _ = await asyncio.wait([welcomed, closed], timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if welcomed not in done:
            reason = closed.result() if closed.done() else "no welcome within 30 s"
            conn.close(reason)
            if "already registered" in reason or "nthreads" in reason:
                raise FatalWorkerError(f"the scheduler refused this worker: {reason}")
            log.warning("registration with %s failed: %s", self.address, reason)
            return
        interval = welcomed.result().heartbeat_interval
        log.info("worker %s joined the scheduler at %s with %d threads", self.name, self.address, self.nthreads)
        stopper = loop.create_task(stop.wait())
        try:
            while not closed.done() and not stop.is_set():
                await asyncio.wait([closed, stopper], timeout=interval, return_when=asyncio.FIRST_COMPLETED)
                conn.send(m.Heartbeat(self._process.memory_info().rss))
        finally:
            stopper.cancel()
        if stop.is_set():
            conn.close("worker shutting down")
        else:
            log.warning("lost the scheduler at %s: %s", self.address, closed.result())


async def _wait_or_stop(stop: asyncio.Event, delay: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), delay)
    except asyncio.TimeoutError:
        pass
