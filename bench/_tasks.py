"""Task functions for bench_backends.py.

They live in a module of their own (not in ``__main__``) so that every backend
ships them the same way: by reference, the worker importing ``_tasks``.
cloudpickle would pickle functions of ``__main__`` by value instead, which
is not what a real user module goes through.  ``bench_backends.py`` puts
this directory on ``sys.path`` and on ``PYTHONPATH`` (for worker processes
that do not inherit the caller's ``sys.path``), and checks before timing that
the workers of each backend can import this module.
"""

from __future__ import annotations

import os
import time


def tiny(i):
    """A task that costs next to nothing: the per-task overhead is all that is measured."""
    return i * i


def sleep_10ms(i):
    time.sleep(0.01)
    return i


def big_arg(array, i):
    """Touches a small slice of a large array: the cost is shipping the array."""
    n = array.shape[0]
    start = (i * 9973) % max(n - 1000, 1)
    return float(array[start:start + 1000].sum())


def where(i):
    """Where a task runs: (pid, path of this module as the worker imported it)."""
    time.sleep(0.005)  # long enough that every worker gets some of these
    return os.getpid(), __file__
