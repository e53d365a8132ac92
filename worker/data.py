"""A worker's scattered data: the local store, the data server peers fetch from, and fetching.

The store keeps the frames as received: peers are served without pickling, and
each batch unpickles its own copy on top of the shared, read-only buffers (see
``store.resolve_scattered``).  Frames may be a mapping of a shared
memory segment (``payload.shm``): one this worker created for the other workers
of its machine, which it unlinks when the key is deleted, or someone else's.
"""

from __future__ import annotations

import asyncio
import logging
import ssl as ssl_module

from ..payload.serialize import loads_readonly
from ..payload.shm import SharedSegment, attach, share_domain, sweep_stale_segments
from ..protocol import ProtocolError, Role
from ..protocol import messages as m
from ..protocol.address import parse_address
from ..protocol.aio import Connection, open_connection, start_server
from .store import DATA_STORE, UNPICKLING

log = logging.getLogger("jobsched.worker")

FETCH_TIMEOUT = 120.0  # for one peer's reply; then the next source, then the owner's copy


class DataService:
    def __init__(self, secret: bytes | None, server_ssl: ssl_module.SSLContext | None,
                 client_ssl: ssl_module.SSLContext | None) -> None:
        self.secret = secret
        self.server_ssl = server_ssl
        self.client_ssl = client_ssl
        self.frames: dict[str, tuple] = {}
        self.segments: dict[str, SharedSegment] = {}  # the ones we created, by key
        if share_domain():
            removed = sweep_stale_segments()  # left by workers killed with their resource tracker
            if removed:
                log.info("removed %d shared memory segment(s) left by processes that exited", removed)
        self.address = ""
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int = 0) -> str:
        """Listen for peers on ``host`` (the interface we reach the scheduler on)."""
        if self._server is None:
            server = await start_server(host, port, self.secret, frozenset({Role.PEER}), self._on_peer, ssl=self.server_ssl)
            self._server = server
            sock_host, sock_port = server.sockets[0].getsockname()[:2]
            scheme = "tls" if self.server_ssl else "tcp"
            self.address = f"{scheme}://[{sock_host}]:{sock_port}" if ":" in sock_host else f"{scheme}://{sock_host}:{sock_port}"
        return self.address

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._unlink(list(self.segments))

    # ------------------------------------------------------------------ store
    def store(self, key: str, frames: tuple, segment: SharedSegment | None = None) -> int:
        """Keep ``frames`` (mapped from ``segment`` if given, which we then own); returns
        the bytes held.  Raises if they cannot be unpickled here."""
        try:
            with UNPICKLING:
                loads_readonly(frames, "the scattered data's pickle")  # fail now, with a clear error, rather than in every task
        except BaseException:
            if segment is not None:
                segment.unlink()
            raise
        self._unlink([key])  # a segment of an earlier copy
        DATA_STORE[key] = self.frames[key] = tuple(frames)
        if segment is not None:
            self.segments[key] = segment
        return m.frames_nbytes(frames)

    async def share(self, frames: tuple) -> tuple[SharedSegment, tuple] | None:
        """Copy ``frames`` into a new shared segment (off the event loop: it may take a
        while) and map it; returns the segment and its frames, or None if that failed."""
        try:
            segment = await asyncio.to_thread(SharedSegment, frames)
        except Exception as exc:  # noqa: BLE001 - e.g. /dev/shm full: the other workers fetch over TCP
            log.warning("cannot put data in shared memory: %s", exc)
            return None
        try:
            return segment, attach(segment.name, segment.sizes)
        except (OSError, ValueError) as exc:
            log.warning("cannot map the shared segment just written: %s", exc)
            segment.unlink()
            return None

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            DATA_STORE.pop(key, None)
            self.frames.pop(key, None)
        self._unlink(keys)

    def _unlink(self, keys: list[str]) -> None:
        for key in keys:
            segment = self.segments.pop(key, None)
            if segment is not None:
                segment.unlink()  # workers that mapped it keep their mapping until they drop it

    # -------------------------------------------------------------- serving
    def _on_peer(self, conn: Connection) -> None:
        def on_message(_c: Connection, message: m.Message) -> None:
            match message:
                case m.FetchData(key=key):
                    frames = self.frames.get(key)
                    conn.send(m.DataReply(key, frames is not None, frames or ()))
                case _:
                    conn.abort(f"unexpected {message.op!r} on the data port")

        conn.set_handlers(on_message, lambda _c, _r: None)

    # -------------------------------------------------------------- fetching
    async def fetch(self, key: str, addresses: list[str]) -> tuple | None:
        """Get ``key``'s frames from the first peer that has them; None if none does."""
        for text in addresses:
            try:
                address = parse_address(text)
                ssl = self.client_ssl if address.scheme == "tls" else None
                conn = await open_connection(address.host, address.port, Role.PEER, self.secret, ssl=ssl, peer_name="worker")
            except (OSError, ValueError, asyncio.TimeoutError, ConnectionError, ProtocolError) as exc:  # TLS, secret
                log.warning("cannot reach peer %s for %s: %s", text, key, exc)
                continue
            reply: asyncio.Future = asyncio.get_running_loop().create_future()

            def on_message(_c: Connection, message: m.Message, reply=reply) -> None:
                match message:
                    case m.DataReply() if not reply.done():
                        reply.set_result(message)

            def on_close(_c: Connection, reason: str, reply=reply) -> None:
                if not reply.done():
                    reply.set_exception(ConnectionError(reason))

            conn.set_handlers(on_message, on_close)
            conn.send(m.FetchData(key))
            try:
                message = await asyncio.wait_for(reply, FETCH_TIMEOUT)
            except (asyncio.TimeoutError, ConnectionError) as exc:
                log.warning("fetching %s from %s failed: %s", key, text, exc)
                continue
            finally:
                conn.close("fetch done")
            if message.found:
                return message.frames
        return None
