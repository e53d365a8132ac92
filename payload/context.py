"""The per-call context: what a worker needs to run a call's tasks as they would run locally.

The client (``client/backend.py``) builds one per joblib call and pickles it once; every
batch of the call carries ``(batch, pickled context)``, and the worker
(``worker/executor.py``) parses the bytes once per call.  Shared by both sides through this
module, so neither imports the other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class CallContext:
    capture_output: bool = True  # replay what tasks print on stdout/stderr in the caller
    capture_warnings: bool = True  # re-issue the tasks' warnings in the caller
    log_level: int | None = logging.WARNING  # forward the tasks' log records from this level; None: none
    output_cap: int = 1 << 20  # bytes of output kept per batch
    inner_max_num_threads: int | None = None  # joblib's limit for BLAS/OpenMP pools inside the tasks
    sklearn_config: dict[str, Any] | None = None  # the caller's ``sklearn.get_config()``, if it imported sklearn
