"""Which unauthenticated connections a listener keeps: a budget per source address and in all.

Sans-IO: ``admit`` says which pending connections to close to make room for a new one;
the asyncio side (``aio.start_server``) closes them.  A connection is pending from the
moment it reaches the protocol (with TLS, once TLS is up) until it is authenticated or closed.

A new connection is never refused; the *oldest* pending connection of the busiest source
makes room for it instead.  A flood from one address therefore only churns its own
connections, and a legitimate peer, even one behind the flooding address, gets in if it
completes its handshake before ``max_per_source`` newer connections from that address
arrive (milliseconds on a LAN), whereas refusing newcomers would lock everyone out for as
long as the flood holds its connections open.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

MAX_PENDING = 256
MAX_PENDING_PER_SOURCE = 64


@dataclass
class Admission:
    max_pending: int = MAX_PENDING
    max_per_source: int = MAX_PENDING_PER_SOURCE
    # source -> its pending connections, oldest first (dicts keep insertion order)
    by_source: dict[str, dict[Hashable, None]] = field(default_factory=dict)
    source_of: dict[Hashable, str] = field(default_factory=dict)
    evicted: int = 0  # connections closed to make room, since start

    def __post_init__(self) -> None:
        if self.max_pending < 1 or not 1 <= self.max_per_source <= self.max_pending:
            raise ValueError(f"need 1 <= max_per_source ({self.max_per_source}) <= max_pending ({self.max_pending})")

    @property
    def pending(self) -> int:
        return len(self.source_of)

    def admit(self, conn: Hashable, source: str) -> list[Hashable]:
        """Count ``conn`` as pending; returns the connections to close to make room for it."""
        evict: list[Hashable] = []
        mine = self.by_source.get(source, {})
        if len(mine) >= self.max_per_source:
            evict.append(self._oldest(source))
        elif self.pending >= self.max_pending:
            evict.append(self._oldest(max(self.by_source, key=lambda s: len(self.by_source[s]))))
        self.evicted += len(evict)
        self.by_source.setdefault(source, {})[conn] = None
        self.source_of[conn] = source
        return evict

    def release(self, conn: Hashable) -> None:
        """``conn`` authenticated or closed (idempotent)."""
        source = self.source_of.pop(conn, None)
        if source is None:
            return
        mine = self.by_source[source]
        del mine[conn]
        if not mine:
            del self.by_source[source]

    def _oldest(self, source: str) -> Hashable:
        oldest = next(iter(self.by_source[source]))
        self.release(oldest)
        return oldest
