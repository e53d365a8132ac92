"""asyncio glue shared by the daemons and the client: frames and handshake over TCP.

This is the only I/O in the protocol package; it pumps bytes through the sans-IO
pieces (``FrameDecoder``, the handshake machines, ``decode``) and hands decoded
messages to a callback.  A peer that breaks the protocol has its one connection
closed with a logged reason; nothing propagates to the server.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl as ssl_module
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, cast

from .admission import Admission
from .errors import HandshakeError, ProtocolError, TLSError
from .framing import DEFAULT_LIMITS, PREAUTH_LIMITS, Frame, FrameDecoder, FrameLimits, encode_frame
from .handshake import AcceptorHandshake, InitiatorHandshake, Role, UserLookup
from .messages import PROTOCOL_VERSION, Message, decode, encode

log = logging.getLogger("jobsched.protocol")

HANDSHAKE_TIMEOUT = 10.0
MessageHandler = Callable[["Connection", Message], None]
CloseHandler = Callable[["Connection", str], None]


SCRATCH_SIZE = 256 * 1024
# an accepting side stops handling a peer's messages while this much output to that peer is
# queued and not yet taken by the transport, or while the transport is above its high-water mark
OUTPUT_HOLD = 1 << 20
_CLOSED_SCRATCH = memoryview(bytearray(64))  # get_buffer may still be called once after close


class Connection(asyncio.BufferedProtocol):
    """One framed, authenticated connection.  Use ``send``; receive via ``on_message``.

    A buffered protocol: while a large payload buffer arrives, the transport reads
    straight into it, so a 200 MB array is copied once on receipt, not twice.

    On the accepting side (scheduler, worker data port) a peer's messages are handled only as
    fast as the peer reads the replies: while its output is held up (``OUTPUT_HOLD``), what it
    sent waits unhandled and its socket is not read, so a peer that sends requests and never
    reads costs a bounded buffer, not an unbounded one; one that has read nothing for
    ``stall_timeout`` seconds is disconnected.  Initiators always read, so two peers can never
    wait on each other.  ``admission`` counts the connection from ``connection_made`` (with TLS:
    once TLS is up) until it is authenticated or closed.
    """

    def __init__(
        self,
        handshake: InitiatorHandshake | AcceptorHandshake,
        limits: FrameLimits,
        *,
        admission: Admission | None = None,
        stall_timeout: float | None = None,
    ) -> None:
        self.handshake = handshake
        self.limits = limits
        self._accepting = isinstance(handshake, AcceptorHandshake)
        self._admission = admission
        self._stall_timeout = stall_timeout
        self.decoder = FrameDecoder(PREAUTH_LIMITS)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.on_message: MessageHandler | None = None
        self.on_close: CloseHandler | None = None
        self.authenticated: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = False
        self.close_reason = ""
        self._outbox: list[Any] = []
        self._flush_scheduled = False
        self._loop = asyncio.get_running_loop()
        self._deadline: asyncio.TimerHandle | None = None
        self._early: list[Message] = []  # messages that arrived before handlers were set
        self._backlog: deque[Frame] = deque()  # received, not handled while the output is held up
        self._outbox_bytes = 0
        self._write_paused = False
        self._reading_paused = False
        self._stall: asyncio.TimerHandle | None = None
        self.bytes_received = 0
        self.bytes_sent = 0
        # small until the peer has authenticated: a stranger's connection must cost little
        self._scratch = memoryview(bytearray(PREAUTH_LIMITS.max_total + 16))
        self._direct = False  # the last get_buffer() handed out the decoder's own buffer

    # ------------------------------------------------------------- transport side
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream connection, TCP or TLS
        peername = transport.get_extra_info("peername")
        self.peer = f"{peername[0]}:{peername[1]}" if peername else "?"
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if self._admission is not None:
            source = str(peername[0]) if peername else "?"
            for older in self._admission.admit(self, source):
                cast(Connection, older).abort(f"too many unauthenticated connections (from {source} or in all)")
        self._deadline = self._loop.call_later(HANDSHAKE_TIMEOUT, self._handshake_timed_out)
        if isinstance(self.handshake, InitiatorHandshake):
            self._write_raw(encode_frame(self.handshake.hello()))

    def get_buffer(self, sizehint: int) -> memoryview:
        target = self.decoder.fill_target()
        self._direct = target is not None and len(target) > 0
        if target is not None and self._direct:
            return target
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        if self.closed:
            return
        self.bytes_received += nbytes
        try:
            if self._direct:
                frames = self.decoder.filled(nbytes)
            else:
                frames = self.decoder.feed(self._scratch[:nbytes])
        except ProtocolError as exc:
            self.abort(f"{type(exc).__name__}: {exc}")
            return
        self._handle_frames(frames)

    def data_received(self, data: bytes) -> None:
        """For transports that do not support buffered protocols."""
        if self.closed:
            return
        self.bytes_received += len(data)
        try:
            frames = self.decoder.feed(data)
        except ProtocolError as exc:
            self.abort(f"{type(exc).__name__}: {exc}")
            return
        self._handle_frames(frames)

    def _handle_frames(self, frames: list[Frame]) -> None:
        if self._backlog:  # older frames wait: keep the order
            self._backlog.extend(frames)
            return
        self._process(frames)

    def _process(self, frames: list[Frame]) -> None:
        try:
            for index, frame in enumerate(frames):
                if self.closed:
                    return
                if self._output_held():
                    self._backlog.extend(frames[index:])
                    self._hold_reading()
                    return
                if not self.handshake.done:
                    self._handshake_frame(frame.body)
                    continue
                message = decode(frame)
                handler = self.on_message
                if handler is None:
                    self._early.append(message)
                else:
                    handler(self, message)
        except ProtocolError as exc:
            self.abort(f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # a bug handling one peer must not take the daemon down
            log.exception("error handling a message from %s", self.peer)
            self.abort(f"internal error: {exc!r}")

    def connection_lost(self, exc: Exception | None) -> None:
        reason = self.close_reason or (f"connection lost: {exc}" if exc else "connection closed by peer")
        self._mark_closed(reason, exc)
        handler = self.on_close
        if handler is not None:
            self.on_close = None
            handler(self, reason)

    def set_handlers(self, on_message: MessageHandler, on_close: CloseHandler) -> None:
        """Install the receivers; messages that arrived before are delivered now."""
        self.on_message = on_message
        early, self._early = self._early, []
        for message in early:
            on_message(self, message)
        if self.closed:
            on_close(self, self.close_reason or "connection closed")
        else:
            self.on_close = on_close

    # ------------------------------------------------------------ flow control
    def pause_writing(self) -> None:
        self._write_paused = True
        if self._stall_timeout is not None and self._stall is None:
            self._stall = self._loop.call_later(self._stall_timeout, self._stalled)

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        self._release_held()

    def _output_held(self) -> bool:
        return self._accepting and (self._write_paused or self._outbox_bytes > OUTPUT_HOLD)

    def _hold_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def _release_held(self) -> None:
        """Handle what waited while the output was held up, then read again."""
        if self.closed or self._output_held():
            return
        frames, self._backlog = list(self._backlog), deque()
        self._process(frames)
        if not self._backlog and self._reading_paused and not self.closed and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def _stalled(self) -> None:
        self._stall = None
        unsent = self._outbox_bytes + (self.transport.get_write_buffer_size() if self.transport else 0)
        self.abort(f"the peer has read nothing for {self._stall_timeout:.0f} s ({unsent} bytes unsent)")

    # ---------------------------------------------------------------- handshake
    def _handshake_frame(self, body: bytes) -> None:
        hs = self.handshake
        if isinstance(hs, AcceptorHandshake):
            self._write_raw(encode_frame(hs.receive(body)))
            if hs.failure is not None:
                log.warning("refused %s: %s", self.peer, hs.failure)
                self.close(f"handshake failed: {hs.failure}")
                return
        else:
            try:
                reply = hs.receive(body)
            except HandshakeError as exc:
                if hs.abort_frame:
                    self._write_raw(encode_frame(hs.abort_frame))
                self._fail_handshake(exc)
                return
            if reply is not None:
                self._write_raw(encode_frame(reply))
        if hs.done:
            self.decoder.limits = self.limits
            self._scratch = memoryview(bytearray(SCRATCH_SIZE))
            if self._deadline is not None:
                self._deadline.cancel()
            if not self.authenticated.done():
                self.authenticated.set_result(None)

    def _fail_handshake(self, exc: HandshakeError) -> None:
        if not self.authenticated.done():
            self.authenticated.set_exception(exc)
        self.close(f"handshake failed: {exc}")

    def _handshake_timed_out(self) -> None:
        if not self.handshake.done and not self.closed:
            log.warning("closing %s: no handshake within %.0f s", self.peer, HANDSHAKE_TIMEOUT)
            self._fail_handshake(HandshakeError(f"handshake not completed within {HANDSHAKE_TIMEOUT:.0f} s"))

    # ------------------------------------------------------------------ sending
    def send(self, message: Message) -> None:
        """Queue a message; queued messages are written together once per loop turn."""
        if self.closed:
            return
        pieces = encode(message)
        self._outbox.extend(pieces)
        self._outbox_bytes += sum(map(len, pieces))  # pieces of encode_frame: len() is bytes
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._outbox and not self.closed and self.transport is not None:
            pieces, self._outbox = self._outbox, []
            self.bytes_sent += self._outbox_bytes
            self._outbox_bytes = 0
            self.transport.writelines(pieces)  # may call pause_writing
            if self._backlog or self._reading_paused:
                self._loop.call_soon(self._release_held)

    def _write_raw(self, pieces: Iterable[Any]) -> None:
        if self.transport is not None and not self.closed:
            self.transport.writelines(list(pieces))

    def close(self, reason: str = "closed") -> None:
        """Flush what is queued, then close."""
        if self.closed:
            return
        self._flush()
        self.close_reason = reason
        if self.transport is not None:
            self.transport.close()
        self._mark_closed(reason)

    def abort(self, reason: str) -> None:
        """Drop the connection at once (protocol violation)."""
        if self.closed:
            return
        log.warning("closing connection from %s: %s", self.peer, reason)
        self.close_reason = reason
        if self.transport is not None:
            self.transport.abort()
        self._mark_closed(reason)

    def _mark_closed(self, reason: str, exc: BaseException | None = None) -> None:
        self.closed = True
        self._outbox = []
        self._outbox_bytes = 0
        self._backlog.clear()
        self._scratch = _CLOSED_SCRATCH
        if not self.authenticated.done():  # whoever waits on it (the listener's count) learns at once
            self.authenticated.set_exception(exc if isinstance(exc, ConnectionError) else ConnectionError(reason))
            self.authenticated.exception()  # mark retrieved: the opener may have given up
        if self._stall is not None:
            self._stall.cancel()
        # a failed handshake's stored exception references this object through its traceback:
        # drop it, so a refused connection is freed at once, not by the cycle collector
        if isinstance(self.handshake, AcceptorHandshake) and self.handshake.failure is not None:
            self.handshake.failure.__traceback__ = None
        if self._deadline is not None:
            self._deadline.cancel()


async def open_connection(
    host: str,
    port: int,
    role: Role,
    secret: bytes | None,
    *,
    ssl: ssl_module.SSLContext | None = None,
    timeout: float = HANDSHAKE_TIMEOUT,
    limits: FrameLimits = DEFAULT_LIMITS,
    peer_name: str = "scheduler",
    token: str | bytes | None = None,
    user: str | None = None,
) -> Connection:
    """Connect and complete the handshake, with the user ``token`` if given, else with the
    ``secret`` (as ``user``, by default the OS user name); raises HandshakeError or OSError
    naming the cause."""
    loop = asyncio.get_running_loop()
    handshake = InitiatorHandshake(role, secret, PROTOCOL_VERSION, peer_name, token=token, user=user)

    async def connect() -> Connection:
        _, conn = await loop.create_connection(
            lambda: Connection(handshake, limits), host, port, ssl=ssl,
            server_hostname=host if ssl else None, ssl_handshake_timeout=timeout if ssl else None,
        )
        await conn.authenticated
        return conn

    try:
        return await asyncio.wait_for(connect(), timeout)
    except ssl_module.SSLError as exc:
        raise TLSError(f"TLS handshake with the {peer_name} at {host}:{port} failed: {exc.reason or exc}") from None
    except ConnectionError as exc:
        if isinstance(exc, (ConnectionRefusedError, ConnectionResetError)):
            raise  # nobody listening, or the peer went away: not a handshake problem
        hint = (
            "with TLS this usually means it did not accept our certificate (--tls-cert / --tls-ca-file)"
            if ssl is not None
            else "it may expect tls:// instead of tcp://, not be a jobsched daemon, or be refusing new connections"
        )
        raise ConnectionError(
            f"the {peer_name} at {host}:{port} closed the connection during the handshake ({exc}); {hint}"
        ) from None


async def start_server(
    host: str,
    port: int,
    secret: bytes | None,
    accept_roles: frozenset[Role],
    on_connection: Callable[[Connection], None],
    *,
    ssl: ssl_module.SSLContext | None = None,
    limits: FrameLimits = DEFAULT_LIMITS,
    admission: Admission | None = None,
    stall_timeout: float | None = None,
    users: UserLookup | None = None,
) -> asyncio.Server:
    """Listen; each connection that completes the handshake is passed to ``on_connection``
    (its ``handshake`` tells the role, user and admin flag it proved).  ``users`` looks a
    user's token up by name, for each new connection: see ``AcceptorHandshake``.

    ``admission`` counts the connections not yet authenticated and says which to close when
    a source or the listener is over its budget.  It counts a connection from the moment it
    reaches the protocol: with TLS, once TLS is up, so a failed TLS handshake (a plain TCP
    probe) is never counted; the loop itself closes one that does not finish TLS within
    ``HANDSHAKE_TIMEOUT``.  ``stall_timeout``: see ``Connection``."""
    loop = asyncio.get_running_loop()
    budget = admission if admission is not None else Admission()

    def factory() -> Connection:
        conn = Connection(AcceptorHandshake(secret, PROTOCOL_VERSION, accept_roles, users), limits,
                          admission=budget, stall_timeout=stall_timeout)

        def settled(fut: asyncio.Future[None]) -> None:
            budget.release(conn)
            if not fut.cancelled() and fut.exception() is None:
                on_connection(conn)

        conn.authenticated.add_done_callback(settled)
        return conn

    return await loop.create_server(
        factory, host, port, ssl=ssl, reuse_address=True, ssl_handshake_timeout=HANDSHAKE_TIMEOUT if ssl else None
    )
