"""Errors a user of the client sees (besides the tasks' own exceptions)."""

from __future__ import annotations

from ..payload.serialize import RemoteError
from ..protocol.errors import JobschedError


class ClusterError(JobschedError, RuntimeError):
    """The cluster could not run a batch; the message says why."""


class WorkerLostError(ClusterError):
    """The workers running a batch died too many times (see ``--allowed-failures``)."""


class NoWorkersError(ClusterError):
    """No worker joined the scheduler in time."""


class SchedulerUnreachableError(ClusterError, ConnectionError):
    """The scheduler cannot be reached, or the connection to it was lost."""


class CallCancelledError(ClusterError):
    """Someone with the right (the admin, or the same user from another client) cancelled
    the call on the scheduler; the message is the scheduler's, naming who."""


class CancelRefusedError(JobschedError, RuntimeError):
    """The scheduler refused a cancel request (another user's work without the admin
    credential, or no such call or user); the message is the scheduler's reason."""


__all__ = [
    "ClusterError", "WorkerLostError", "NoWorkersError", "SchedulerUnreachableError", "CallCancelledError",
    "CancelRefusedError", "RemoteError",
]
