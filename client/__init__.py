"""The jobsched client: ``Client``, ``LocalCluster`` and the joblib backend ``'cluster'``."""

from .client import Client, current_client
from .errors import ClusterError, NoWorkersError, RemoteError, SchedulerUnreachableError, WorkerLostError
from .local_cluster import LocalCluster

__all__ = [
    "Client", "current_client", "LocalCluster", "ClusterError", "NoWorkersError", "RemoteError",
    "SchedulerUnreachableError", "WorkerLostError",
]
