"""The jobsched worker: a pure state (``state``), an executor and the daemon that wires them."""

from .state import WorkerState

__all__ = ["WorkerState"]
