"""The jobsched scheduler: a pure state machine (``state``) behind an asyncio server (``server``)."""

from .state import SchedulerConfig, SchedulerState

__all__ = ["SchedulerConfig", "SchedulerState"]
