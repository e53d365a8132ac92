"""A rate limit for log lines that a misbehaving peer or a persistent bug could repeat endlessly."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RateLimit:
    """At most one event per ``interval`` seconds passes; ``passes`` also says how many were held back."""

    interval: float
    _last: float = float("-inf")
    _held: int = 0

    def passes(self, now: float) -> tuple[bool, int]:
        if now - self._last < self.interval:
            self._held += 1
            return False, 0
        held, self._held, self._last = self._held, 0, now
        return True, held
