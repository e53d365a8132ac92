"""jobsched: run joblib and scikit-learn ``n_jobs`` work on a cluster of lab machines.

``import jobsched`` registers the joblib backend ``'cluster'`` and exposes the
public API.  Daemon processes started by jobsched itself (``JOBSCHED_DAEMON=1``)
skip that: importing joblib (and numpy with it) would only slow their start;
the names below are then imported on first use.
"""

import importlib as _importlib
import os as _os
import sys as _sys

if __name__ != "jobsched":
    # This file is the package's root, so a tool that imports the checkout itself (pytest
    # collecting the repository's directory as a package) would load a second copy under
    # another name, whose backend would replace the real one.  Be the real package instead.
    _sys.modules[__name__] = _importlib.import_module("jobsched")
else:
    __version__ = "0.1.0"

    _PUBLIC = {
        "Client": ".client",
        "LocalCluster": ".client",
        "ClusterError": ".client",
        "NoWorkersError": ".client",
        "RemoteError": ".client",
        "SchedulerUnreachableError": ".client",
        "WorkerLostError": ".client",
        "AuthenticationError": ".protocol",
        "HandshakeError": ".protocol",
        "VersionMismatch": ".protocol",
    }
    __all__ = sorted(_PUBLIC)

    def __getattr__(name: str):
        if name not in _PUBLIC:
            raise AttributeError(f"module 'jobsched' has no attribute {name!r}")
        value = getattr(_importlib.import_module(_PUBLIC[name], __name__), name)
        globals()[name] = value
        return value

    def __dir__() -> list:
        return sorted(set(globals()) | set(_PUBLIC))

    if _os.environ.get("JOBSCHED_DAEMON") != "1":
        from .client.backend import register as _register_backend

        _register_backend()
