"""jobsched: run joblib and scikit-learn ``n_jobs`` work on a cluster of lab machines.

``import jobsched`` registers the joblib backend ``'cluster'``.
"""

from .client import (
    Client,
    ClusterError,
    LocalCluster,
    NoWorkersError,
    RemoteError,
    SchedulerUnreachableError,
    WorkerLostError,
)
from .client.backend import register as _register_backend
from .protocol import AuthenticationError, HandshakeError, VersionMismatch

__version__ = "0.1.0"
__all__ = [
    "Client", "LocalCluster", "RemoteError", "SchedulerUnreachableError", "WorkerLostError",
    "NoWorkersError", "ClusterError", "AuthenticationError", "HandshakeError", "VersionMismatch",
]

_register_backend()
