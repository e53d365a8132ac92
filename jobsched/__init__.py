"""jobsched: run joblib and scikit-learn ``n_jobs`` work on a cluster of lab machines.

``import jobsched`` registers the joblib backend ``'cluster'`` and exposes the
public API.  Daemon processes started by jobsched itself (``JOBSCHED_DAEMON=1``)
skip that: importing joblib (and numpy with it) would only slow their start;
the names below are then imported on first use.

This is the only file in the ``jobsched/`` folder: the subpackages are the
repository's top-level folders (``protocol/``, ``scheduler/``...).  An installed
copy maps them beneath this package (``[tool.setuptools.package-dir]``); in a
checkout, ``jobsched/protocol`` and its siblings are symbolic links to them, so
``python -m pytest`` and mypy find the same ``jobsched.*`` names without installing.
"""

from __future__ import annotations

import importlib as _importlib
import os as _os
from typing import Any as _Any

__version__ = "0.1.0"

_PUBLIC = {
    "Client": ".client",
    "LocalCluster": ".client",
    "JobschedError": ".protocol.errors",
    "ProtocolError": ".protocol.errors",
    "HandshakeError": ".protocol.errors",
    "AuthenticationError": ".protocol.errors",
    "VersionMismatch": ".protocol.errors",
    "TLSError": ".protocol.errors",
    "ClusterError": ".client.errors",
    "NoWorkersError": ".client.errors",
    "RemoteError": ".client.errors",
    "SchedulerUnreachableError": ".client.errors",
    "WorkerLostError": ".client.errors",
    "CallCancelledError": ".client.errors",
    "CancelRefusedError": ".client.errors",
    "ConfigError": ".runtime.config",
    "SecretError": ".runtime.secret",
    "UsersFileError": ".runtime.users",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> _Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'jobsched' has no attribute {name!r}")
    value = getattr(_importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


if _os.environ.get("JOBSCHED_DAEMON") != "1":
    from .client.backend import register as _register_backend

    _register_backend()
