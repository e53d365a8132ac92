"""What ``scheduler_info()``, ``jobsched status`` and the HTTP endpoints show, as each viewer
may see it: the admin everything, a user their own work and everyone else's summed."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from .records import CallRecord, ClientRecord

if TYPE_CHECKING:
    from .state import SchedulerState

OTHERS = "(others)"  # a user's view sums everyone else's use under this name


def call_id(call: CallRecord) -> str:
    """A call's name for people (``jobsched status``, ``jobsched cancel``): unique in this scheduler's life."""
    return f"{call.key[0]}-{call.key[1]}"


def cluster_view(state: SchedulerState, viewer: ClientRecord | None = None) -> dict[str, Any]:
    """The cluster as ``viewer`` may see it: the admin (or None, the HTTP endpoints) sees
    everything; a user sees the workers, their own calls and events, and everyone else's
    use of the cluster summed as ``"(others)"``."""
    calls = [
        {"id": call_id(call), "user": call.user, "client": client.name, "running": len(call.running),
         "queued": len(call.queue), "priority": call.priority}
        for client in state.clients.values() for call in client.calls.values()
    ]
    users = _users(state, calls)
    events = list(state.events)
    if viewer is not None and not viewer.admin:
        me = viewer.user
        calls = [c for c in calls if c["user"] == me]
        events = [e for e in events if e["user"] in ("", me)]
        others = [row for name, row in users.items() if name != me]
        users = {me: users.get(me) or _user_row(state, me, 0, 0, _busy(state))}
        if others:
            # policies are per person: their sum would mean nothing
            users[OTHERS] = {key: 0 if key in ("weight", "max_slots") else sum(row[key] for row in others)
                             for key in others[0]}
    return {
        "viewer": {"user": "" if viewer is None else viewer.user, "admin": viewer is None or viewer.admin},
        "users": users,
        "calls": calls,
        "address": state.config.address,
        "workers": {
            w.address: {
                "name": w.name,
                "address": w.address,
                "host": w.host,
                "pid": w.pid,
                "nthreads": w.nthreads,
                "running": len(w.running),
                "completed": w.completed,
                "memory": w.memory,
                "memory_limit": w.memory_limit,
                "status": w.status,
                **state.data.info(w.conn),
            }
            for w in state.workers.values()
        },
        "clients": len(state.clients),
        "queued": sum(len(c.queue) for cl in state.clients.values() for c in cl.calls.values()),
        "tasks": len(state.tasks),
        "stale_results": state.stale_results,
        "data_keys": len(state.data.records),
        "running": sum(len(w.running) for w in state.workers.values()),
        "slots": sum(w.nthreads for w in state.workers.values()),
        "counters": dict(state.counters),
        "events": events,
    }


def _users(state: SchedulerState, calls: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    queued: Counter[str] = Counter()
    count: Counter[str] = Counter()
    for call in calls:
        queued[call["user"]] += call["queued"]
        count[call["user"]] += 1
    names = dict.fromkeys([*state.share.users, *(client.user for client in state.clients.values())])
    busy = _busy(state)
    return {name: _user_row(state, name, queued[name], count[name], busy) for name in names}


def _busy(state: SchedulerState) -> int:
    return sum(u.running for u in state.share.users.values())


def _user_row(state: SchedulerState, name: str, queued: int, calls: int, busy: int) -> dict[str, Any]:
    user = state.share.peek(name)
    return {
        "running": user.running, "queued": queued, "calls": calls,
        "share": user.running / busy if busy else 0.0,
        "usage_hour": user.usage_last_hour(), "usage": user.usage,
        "weight": user.policy.weight, "max_slots": user.policy.max_slots,
    }
