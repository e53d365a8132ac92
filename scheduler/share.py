"""Fair share between users, then between one user's calls: which call runs next.

Pure bookkeeping for ``SchedulerState``: no sockets, no clock reads.  The policy:

- Between users with work ready, the one with the fewest running batches per unit of
  ``weight`` goes first, so two users with queued work each hold half the slots (with equal
  weights), however many calls each has open.  A newcomer's first batch takes the next slot
  that frees.
- Ties go to the user with the smaller decayed usage per weight (slot-seconds, halved every
  ``half_life``): whoever used the cluster all night yields the odd slot in the morning.
  Remaining ties take turns.
- A user at ``max_slots`` running batches (prefetched ones included) waits.
- Within a user, the call with the highest ``priority`` goes first; equal ones take turns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .records import CallKey, CallRecord, UserPolicy

HOUR_BUCKETS = 60  # the last hour's usage, kept per minute


@dataclass(slots=True)
class UserShare:
    name: str
    policy: UserPolicy = field(default_factory=UserPolicy)
    running: int = 0  # batches on workers, cancelled ones still running included
    usage: float = 0.0  # slot-seconds, decayed
    minutes: dict[int, float] = field(default_factory=dict)  # minute index -> slot-seconds finished then
    ready: dict[CallKey, CallRecord] = field(default_factory=dict)  # ordered: turns among equal priority

    @property
    def has_room(self) -> bool:
        return self.policy.max_slots == 0 or self.running < self.policy.max_slots

    def order(self) -> tuple[float, float]:
        weight = self.policy.weight
        return self.running / weight, self.usage / weight

    def usage_last_hour(self) -> float:
        return sum(self.minutes.values())


class FairShare:
    """The users, their ready calls, and the pick of the next call to serve."""

    def __init__(self, half_life: float) -> None:
        self.half_life = half_life
        self.users: dict[str, UserShare] = {}
        self.policies: dict[str, UserPolicy] = {}
        self.waiting: dict[str, UserShare] = {}  # users with a ready call and room: ordered, turns
        self.decayed_at: float | None = None

    # ------------------------------------------------------------ the users
    def user(self, name: str) -> UserShare:
        user = self.users.get(name)
        if user is None:
            user = self.users[name] = UserShare(name, self.policies.get(name, UserPolicy()))
        return user

    def peek(self, name: str) -> UserShare:
        """The user's record, or a blank one, without keeping it."""
        return self.users.get(name) or UserShare(name, self.policies.get(name, UserPolicy()))

    def set_policies(self, policies: dict[str, UserPolicy]) -> None:
        self.policies = dict(policies)
        for user in self.users.values():
            user.policy = self.policies.get(user.name, UserPolicy())
            self._update(user)

    # ------------------------------------------------------------ the calls
    def __bool__(self) -> bool:
        return bool(self.waiting)

    def __contains__(self, call: CallRecord) -> bool:
        user = self.users.get(call.user)
        return user is not None and call.key in user.ready

    def mark(self, call: CallRecord) -> None:
        """``call`` may have become ready, or stopped being: keep the lines in step."""
        user = self.user(call.user)
        if call.ready:
            user.ready.setdefault(call.key, call)
        else:
            user.ready.pop(call.key, None)
        self._update(user)

    def drop(self, call: CallRecord) -> None:
        user = self.user(call.user)
        user.ready.pop(call.key, None)
        self._update(user)

    def _update(self, user: UserShare) -> None:
        if user.ready and user.has_room:
            self.waiting.setdefault(user.name, user)
        else:
            self.waiting.pop(user.name, None)

    def started(self, name: str) -> None:
        user = self.user(name)
        user.running += 1
        if not user.has_room:
            self.waiting.pop(name, None)

    def released(self, name: str) -> None:
        user = self.user(name)
        user.running -= 1
        self._update(user)

    def pick(self, short_only: bool = False) -> CallRecord | None:
        """The call to serve next (its user goes to the back of the turns), or None."""
        waiting = self.waiting
        if len(waiting) == 1 and not short_only:  # the common case: one user has work
            user = next(iter(waiting.values()))
        else:
            candidates = [u for u in waiting.values() if not short_only or any(c.short for c in u.ready.values())]
            if not candidates:
                return None
            user = min(candidates, key=UserShare.order)  # the first of equals: turns
            del waiting[user.name]
            waiting[user.name] = user
        calls = user.ready
        if len(calls) == 1 and not short_only:
            return next(iter(calls.values()))
        eligible = [c for c in calls.values() if c.short] if short_only else list(calls.values())
        call = max(eligible, key=_priority)  # the first of equals: turns
        del calls[call.key]
        calls[call.key] = call
        return call

    # ---------------------------------------------------------------- usage
    def finished(self, name: str, duration: float, now: float) -> None:
        user = self.user(name)
        seconds = max(duration, 0.0)
        user.usage += seconds
        minute = int(now // 60)
        user.minutes[minute] = user.minutes.get(minute, 0.0) + seconds

    def tick(self, now: float) -> None:
        """Decay usage, forget minutes older than an hour and users with nothing left."""
        if self.decayed_at is not None and now > self.decayed_at:
            factor = 0.5 ** ((now - self.decayed_at) / self.half_life)
            oldest = int(now // 60) - HOUR_BUCKETS
            for name, user in list(self.users.items()):
                user.usage *= factor
                for minute in [m for m in user.minutes if m <= oldest]:
                    del user.minutes[minute]
                if not user.running and not user.ready and not user.minutes and user.usage < 1.0:
                    del self.users[name]  # re-made from the policies when they come back
        self.decayed_at = now

    def validate(self, running: dict[str, int]) -> None:
        for name, user in self.users.items():
            assert user.running == running.get(name, 0), (name, user.running, running.get(name, 0))
            assert (name in self.waiting) == (bool(user.ready) and user.has_room), user
            for call in user.ready.values():
                assert call.ready and call.user == name, call
        for name in running:
            assert running[name] == 0 or name in self.users, name
        for name in self.waiting:
            assert name in self.users


def _priority(call: CallRecord) -> int:
    return call.priority
