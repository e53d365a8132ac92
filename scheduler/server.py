"""The scheduler daemon: a thin asyncio server around ``SchedulerState``."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
import socket
import ssl as ssl_module
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ..protocol import AcceptorHandshake, Role
from ..protocol import messages as m
from ..protocol.admission import Admission
from ..protocol.aio import Connection, start_server
from ..runtime.rate_limit import RateLimit
from ..runtime.users import Users, UsersFileError, read_users, revoked
from .records import (
    CLIENT,
    WORKER,
    ClientRecord,
    Close,
    Event,
    MessageReceived,
    PeerConnected,
    PeerDisconnected,
    Send,
    Ticked,
    UserPolicy,
    UsersChanged,
)
from .state import DEFAULT_CONFIG, SchedulerConfig, SchedulerState

log = logging.getLogger("jobsched.scheduler")

TICK_INTERVAL = 0.25
HISTORY_INTERVAL = 1.0
TICK_FAILURE_LOG_INTERVAL = 60.0  # a bug that fails every tick logs once a minute, not four times a second


def tune_gc() -> None:
    """Collect the young generation less often: a scheduler holding 10^6 queued batches
    otherwise spends a growing share of its time in the cyclic GC (see bench/bench_scale.py)."""
    gc.set_threshold(50_000, 20, 20)


class SchedulerServer:
    def __init__(
        self,
        host: str,
        port: int,
        secret: bytes | None,
        config: SchedulerConfig = DEFAULT_CONFIG,
        ssl: ssl_module.SSLContext | None = None,
        users_file: str | None = None,
    ) -> None:
        """``users_file``: the users and their tokens (``runtime/users.py``), read now
        (UsersFileError if unusable) and again by ``reload_users`` (on SIGHUP)."""
        self.host = host
        self.ssl = ssl
        self.port = port
        self.secret = secret
        self.config = config
        self.users_file = users_file
        self.users: Users = read_users(users_file) if users_file else {}
        self.state: SchedulerState | None = None
        self.connections: dict[int, Connection] = {}
        self._next_conn = 1
        self._server: asyncio.Server | None = None
        self.admission = Admission()  # the connections not yet authenticated, per source
        self._generation = 0  # events dispatched: a snapshot taken since is current
        self._info_cache: dict[int, tuple[int, dict[str, Any]]] = {}
        self._ticker: asyncio.Task[None] | None = None
        self.address = ""
        self.dashboard = ""  # the HTTP status address, once started
        self.bytes_closed = [0, 0]  # received, sent by connections already closed
        self._events_logged = 0
        self._stopping = False
        self.history: deque[dict[str, float]] = deque(maxlen=300)  # one sample a second: the dashboard's chart
        self.on_dispatch: Callable[[float, bool], None] | None = None  # (seconds, sent a batch): metrics

    async def start(self) -> str:
        self._server = await start_server(
            self.host, self.port, self.secret, frozenset({Role.CLIENT, Role.WORKER}), self._on_connection, ssl=self.ssl,
            users=self._token_of if self.users_file else None, admission=self.admission,
            # a peer that has read nothing for as long as a silent peer is given is as good as dead
            stall_timeout=self.config.heartbeat_timeout,
        )
        sockname = self._server.sockets[0].getsockname()
        host = sockname[0]
        if host in ("0.0.0.0", "::"):  # all interfaces: advertise a name other hosts can reach
            host = socket.getfqdn()
        host = f"[{host}]" if ":" in host else host
        self.address = f"{'tls' if self.ssl else 'tcp'}://{host}:{sockname[1]}"
        # task ids start at a random point in each incarnation: a worker still running an earlier
        # scheduler's batch 7 must never mistake this one's batch 7 for it
        first_task_id = secrets.randbits(40) << 12
        config = SchedulerConfig(**{**self.config.__dict__, "address": self.address, "first_task_id": first_task_id})
        self.state = SchedulerState(config)
        self._dispatch(Ticked(time.monotonic()))
        self._dispatch(UsersChanged(self._policies(), frozenset()))
        self._ticker = asyncio.get_running_loop().create_task(self._tick_forever())
        log.info("scheduler listening at %s", self.address)
        return self.address

    async def stop(self) -> None:
        self._stopping = True  # connections closed from here on are no news: nothing to dispatch
        if self._ticker is not None:
            self._ticker.cancel()
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections.values()):
            conn.send(m.Closing("the scheduler is shutting down"))
            conn.close("scheduler shutting down")
        await asyncio.sleep(0)

    async def _tick_forever(self) -> None:
        """Tick the state for ever: a tick that raises is logged (with its traceback, once a
        minute at most, so that a bug that fails every tick does not fill the disk) and the
        next one runs: heartbeat timeouts, deadlines and the history depend on it."""
        ticks = 0
        failures = 0
        failure_log = RateLimit(TICK_FAILURE_LOG_INTERVAL)
        # TEST HOOK (tests/integration/test_hostile_decode.py): fail every Nth tick
        fault_every = int(os.environ.get("JOBSCHED_TEST_TICK_FAULT") or 0)
        while True:
            await asyncio.sleep(TICK_INTERVAL)
            ticks += 1
            try:
                if fault_every and ticks % fault_every == 0:
                    raise RuntimeError(f"tick fault injected by JOBSCHED_TEST_TICK_FAULT={fault_every}")
                self._dispatch(Ticked(time.monotonic()))
                if ticks % round(HISTORY_INTERVAL / TICK_INTERVAL) == 0:
                    self._sample_history()
            except Exception:  # noqa: BLE001 - whatever it was, the next tick must run
                failures += 1
                logged, held_back = failure_log.passes(time.monotonic())
                if logged:
                    log.exception("the scheduler's periodic tick failed (failure %d, %d unlogged since the last "
                                  "logged one); ticking on", failures, held_back)

    def _sample_history(self) -> None:
        assert self.state is not None
        counters = self.state.counters
        failed = sum(counters[f"done:{s}"] for s in (m.ERROR, m.LOST, m.NO_WORKERS, m.FAILED))
        self.history.append({
            "time": time.time(),
            "done": counters[f"done:{m.OK}"] + failed,
            "failed": failed,
            "running": sum(len(w.running) for w in self.state.workers.values()),
            "queued": len(self.state.tasks) - sum(len(w.running) for w in self.state.workers.values()),
        })

    # ------------------------------------------------------------------ users
    def _token_of(self, user: str) -> bytes | None:
        """The handshake's lookup: read at each new connection, so a reload applies at once."""
        entry = self.users.get(user)
        return entry.token.encode() if entry is not None else None

    def _policies(self) -> dict[str, UserPolicy]:
        return {name: UserPolicy(user.weight, user.max_slots) for name, user in self.users.items()}

    def reload_users(self) -> bool:
        """Read the users file again (on SIGHUP).  New connections are checked against it at
        once; the state closes the connections of removed users and of rotated tokens.  A
        file that cannot be used is logged and the users loaded before are kept."""
        if not self.users_file:
            log.warning("reload requested, but this scheduler has no users file (--users-file): nothing to reload")
            return False
        try:
            users = read_users(self.users_file)
        except UsersFileError as exc:
            log.error("not reloading the users: %s; keeping the %d users loaded before", exc, len(self.users))
            return False
        gone = revoked(self.users, users)
        added = sorted(set(users) - set(self.users))
        self.users = users
        log.info("reloaded the users file %s: %d users (added: %s; removed or rotated: %s)", self.users_file, len(users),
                 ", ".join(added) or "none", ", ".join(sorted(gone)) or "none")
        if self.state is not None:
            self._dispatch(UsersChanged(self._policies(), gone))
        return True

    # ------------------------------------------------------------ connections
    def _on_connection(self, conn: Connection) -> None:
        conn_id = self._next_conn
        self._next_conn += 1
        self.connections[conn_id] = conn
        proved = conn.handshake
        assert isinstance(proved, AcceptorHandshake) and proved.done  # start_server's connections
        role = CLIENT if proved.peer_role == Role.CLIENT else WORKER
        self._dispatch(PeerConnected(conn_id, f"tcp://{conn.peer}", role, proved.peer_user, proved.peer_admin))
        conn.set_handlers(
            lambda _c, message: self._on_message(conn_id, conn, message),
            lambda _c, reason: self._on_close(conn_id, reason),
        )

    def _on_message(self, conn_id: int, conn: Connection, message: m.Message) -> None:
        state = self.state
        assert state is not None
        if type(message) is m.InfoRequest and (conn_id in state.clients or conn_id in state.workers):
            # the same view as /api/status, with what only the server knows (bytes, dashboard, history)
            conn.send(m.InfoReply(message.request_id, self._info_for(conn_id, state.clients.get(conn_id))))
            return
        self._dispatch(MessageReceived(conn_id, message))

    def _info_for(self, conn_id: int, viewer: ClientRecord | None) -> dict[str, Any]:
        """A fresh snapshot, unless nothing happened since this connection's last one (the
        ticker's event, every ``TICK_INTERVAL``, counts): a peer polling in a loop costs at
        most one snapshot per event; backpressure (``Connection``) bounds the replies."""
        cached = self._info_cache.get(conn_id)
        if cached is not None and cached[0] == self._generation:
            return cached[1]
        info = self.snapshot(viewer)
        self._info_cache[conn_id] = (self._generation, info)
        return info

    def _on_close(self, conn_id: int, reason: str) -> None:
        self._info_cache.pop(conn_id, None)
        conn = self.connections.pop(conn_id, None)
        if conn is not None:
            log.debug("connection %s from %s closed: %s", conn_id, conn.peer, reason)
            self.bytes_closed[0] += conn.bytes_received
            self.bytes_closed[1] += conn.bytes_sent
        if not self._stopping:
            self._dispatch(PeerDisconnected(conn_id, reason))

    def _dispatch(self, event: Event) -> None:
        assert self.state is not None
        started = time.perf_counter()
        self._generation += 1
        commands = self.state.handle(event)
        executed = False
        for command in commands:
            conn = self.connections.get(command.conn)
            if conn is None:
                continue
            match command:
                case Send(_, message):
                    conn.send(message)
                    executed = executed or type(message) is m.Execute
                case Close(_, reason):
                    log.warning("closing connection %s from %s: %s", command.conn, conn.peer, reason)
                    conn.send(m.Closing(reason))
                    conn.close(reason)
        if self.on_dispatch is not None:
            self.on_dispatch(time.perf_counter() - started, executed)
        if self.state.event_seq != self._events_logged:
            self._log_new_events()

    def _log_new_events(self) -> None:
        assert self.state is not None
        fresh = min(self.state.event_seq - self._events_logged, len(self.state.events))
        for event in list(self.state.events)[-fresh:]:
            level = logging.WARNING if event["kind"] in ("worker-died", "batch-lost") else logging.INFO
            log.log(level, "%s: %s", event["kind"], event["text"])
        self._events_logged = self.state.event_seq

    def bytes_moved(self) -> tuple[int, int]:
        received = self.bytes_closed[0] + sum(c.bytes_received for c in self.connections.values())
        sent = self.bytes_closed[1] + sum(c.bytes_sent for c in self.connections.values())
        return received, sent

    def snapshot(self, viewer: ClientRecord | None = None) -> dict[str, Any]:
        """Everything the status endpoints show (to ``viewer``, a user's client; None: the admin's
        view, as workers and the HTTP endpoints get); call on the loop thread."""
        assert self.state is not None
        info = self.state.info(viewer)
        received, sent = self.bytes_moved()
        info["bytes_received"], info["bytes_sent"] = received, sent
        offset = time.time() - time.monotonic()  # the state's ticks are monotonic: show wall clock
        info["events"] = [dict(event, time=event["time"] + offset) for event in info["events"]]
        info["time"] = time.time()
        info["dashboard"] = self.dashboard
        info["unauthenticated"] = self.admission.pending
        info["unauthenticated_evicted"] = self.admission.evicted
        info["history"] = list(self.history)
        return info
