"""The joblib backend ``'cluster'``: a thin ``ParallelBackendBase`` adapter over ``Client``."""

from __future__ import annotations

import functools
import logging
import operator
import pickle
import socket
import sys
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from joblib import register_parallel_backend
from joblib._parallel_backends import AutoBatchingMixin, FallbackToBackend, ParallelBackendBase, ThreadingBackend
from joblib._utils import eval_expr

from ..payload.context import CallContext
from ..payload.serialize import dumps
from .client import Client, current_client
from .errors import NoWorkersError
from .progress import CallProgress
from .replay import CallReplay
from .scatter import DEFAULT_AUTO_THRESHOLD, ByReference, dumps_batch, new_key

# Parallel's own default: joblib keeps 2 batches per worker dispatched.  With a fixed
# batch_size, a batch's round trip (caller -> scheduler -> worker and back) can be much
# longer than the batch, and 2 leave the workers idle in between: the backend keeps more.
# Auto-batched calls keep joblib's depth: joblib grows their batches until the round trip
# is hidden, timing each from dispatch to completion, and time spent queued behind more
# batches would count as batch time and keep the batches small.
JOBLIB_PRE_DISPATCH = "2 * n_jobs"
DEFAULT_PRE_DISPATCH = "8 * n_jobs"

_shared_clients: dict[tuple, Client] = {}
_shared_lock = threading.Lock()


def _shared_client(address: str | None, secret: Any, token: str | None = None) -> Client:
    """One Client per (address, secret, token) for ``scheduler=`` given as an address, and one
    embedded local cluster when there is no address and no current Client.  They live
    until the interpreter exits, so successive ``parallel_config`` blocks reuse them."""
    key = (address, secret, token)
    with _shared_lock:
        client = _shared_clients.get(key)
        if client is None or client.closed:
            client = _shared_clients[key] = Client(address, secret=secret, token=token, set_as_current=False)
        return client


def _func_name(batch: Any) -> str:
    items = getattr(batch, "items", None)
    func = items[0][0] if items else batch
    func = getattr(func, "function", func)  # scikit-learn's delayed wraps the function
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or type(func).__name__


class ClusterBackend(AutoBatchingMixin, ParallelBackendBase):
    """Runs joblib batches on a jobsched cluster.

    Parameters (through ``parallel_config(backend="cluster", ...)``):
    ``scheduler``: an address or a ``Client`` (default: the current Client, else an
    embedded local cluster); ``secret``: the shared secret for an address; ``token``: a
    user's token for an address (``NAME:SECRET``, see ``Client`` for the environment and files
    used when neither is given);
    ``wait_for_workers_timeout``: seconds to wait for a first worker before failing;
    ``reconnect_timeout``: seconds a call waits for a lost scheduler to come back before its
    batches fail with ``SchedulerUnreachableError`` (default: the Client's, 60);
    ``capture_output`` (default True): replay what tasks print on ``sys.stdout``/``sys.stderr``;
    ``capture_warnings`` (default True): re-issue the tasks' warnings in the caller;
    ``forward_logging`` (default ``logging.WARNING``): forward the tasks' log records at this
    level and above to the caller's loggers (``None`` or ``False``: off);
    ``output_cap`` (default 1 MiB): output kept per batch, the rest is cut with a note;
    ``scatter``: objects to send to the cluster once when the context opens; tasks given
    them (by identity) use the worker's copy;
    ``auto_scatter_threshold`` (default 512 KiB, 0 disables): numpy/pandas/scipy.sparse
    arguments at least this large are scattered automatically and deduplicated across
    the batches and calls of this context.  Scattered data is freed when the context exits;
    ``progress`` (default False): show a tqdm bar of the call's tasks and the cluster's running
    and queued counts (``pip install tqdm``; a notebook widget where ipywidgets is installed);
    ``pre_dispatch`` (default ``"8 * n_jobs"``): how many batches a call with a fixed
    ``batch_size`` keeps dispatched, as joblib's ``Parallel(pre_dispatch=...)``, when the
    ``Parallel`` leaves that at joblib's default ``"2 * n_jobs"``: short batches then wait on
    the cluster instead of for a round trip.  ``"2 * n_jobs"`` restores joblib's depth (fewer
    large arguments held at once).  Auto-batched calls always keep joblib's depth;
    ``local_threads`` (default True): a ``prefer="threads"`` call (scikit-learn's forests) runs
    in threads in the caller when every worker is on this machine, as it would without this
    backend: the cores are the same, and threads share the inputs and results that processes
    would pickle.  False ships such calls to the workers too;
    ``priority`` (default 0, an integer): orders your own calls on the scheduler, higher first
    (round robin among equals); it never takes slots from other users, whose share is set by
    the scheduler's users file.
    """

    supports_retrieve_callback = True
    supports_inner_max_num_threads = True
    default_n_jobs = -1

    def __init__(
        self,
        scheduler: str | Client | None = None,
        secret: str | bytes | None = None,
        token: str | None = None,
        wait_for_workers_timeout: float = 60.0,
        capture_output: bool = True,
        capture_warnings: bool = True,
        forward_logging: int | bool | None = logging.WARNING,
        output_cap: int = 1 << 20,
        scatter: Any = None,
        auto_scatter_threshold: int = DEFAULT_AUTO_THRESHOLD,
        progress: bool = False,
        local_threads: bool = True,
        pre_dispatch: str | int = DEFAULT_PRE_DISPATCH,
        nesting_level: int | None = None,
        inner_max_num_threads: int | None = None,
        reconnect_timeout: float | None = None,
        priority: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads, **kwargs)
        self.scheduler = scheduler
        self.secret = secret
        self.token = token
        self.wait_for_workers_timeout = wait_for_workers_timeout
        if reconnect_timeout is not None and not reconnect_timeout >= 0:
            raise ValueError(f"reconnect_timeout must be >= 0 seconds, not {reconnect_timeout!r}")
        self.reconnect_timeout = reconnect_timeout
        self.priority = _checked_priority(priority)
        if forward_logging is True:
            forward_logging = logging.WARNING
        self.capture_output = bool(capture_output)
        self.capture_warnings = bool(capture_warnings)
        self.log_level = None if forward_logging is False or forward_logging is None else int(forward_logging)
        self.output_cap = int(output_cap)
        self._parallels: list[Any] = []
        self.client: Client | None = None
        self.auto_scatter_threshold = int(auto_scatter_threshold or 0)
        self._refs: dict[int, tuple[str, Any]] = {}  # id(obj) -> (key, obj): scattered by this context
        self._owned_keys: list[str] = []
        self._context = b""  # the call's context, pickled once for all its batches
        self._by_reference = ByReference()  # renewed for each call
        self._call_id = 0
        self._max_running = 0
        self.progress = bool(progress)
        self.local_threads = bool(local_threads)
        self.pre_dispatch = _checked_pre_dispatch(pre_dispatch)
        self._cluster_is_local: bool | None = None  # found out once per context
        self._progress: CallProgress | None = None
        self._replay: CallReplay | None = None  # the current call's, made on the caller's thread
        self._replay_call_id = 0
        if scatter is not None:
            self.client = self._resolve_client()
            for obj in scatter if isinstance(scatter, (list, tuple)) else [scatter]:
                if id(obj) not in self._refs:
                    self._register(obj, broadcast=True)

    # ----------------------------------------------------------- joblib API
    def configure(self, n_jobs: int = 1, parallel: Any = None, prefer: Any = None, require: Any = None, **kwargs: Any) -> int:
        self.client = self._resolve_client()
        if self.reconnect_timeout is not None:  # the Client's own setting otherwise
            self.client.reconnect_timeout = self.reconnect_timeout
        self.client.ensure_connected()
        if prefer == "threads" and self.local_threads and self._cluster_on_this_machine():
            raise FallbackToBackend(ThreadingBackend(nesting_level=self.nesting_level))
        self.parallel = parallel
        if parallel is not None and parallel.pre_dispatch == JOBLIB_PRE_DISPATCH and parallel.batch_size != "auto":
            parallel.pre_dispatch = self.pre_dispatch  # read by joblib after configure()
        n_jobs = self.effective_n_jobs(n_jobs)
        self._max_running = n_jobs if parallel is not None and parallel.n_jobs is not None and parallel.n_jobs > 0 else 0
        return n_jobs

    def _cluster_on_this_machine(self) -> bool:
        """Do all the workers run on this machine (an embedded cluster, or only local daemons)?"""
        if self._cluster_is_local is None:
            assert self.client is not None
            if self.client.cluster is not None:
                self._cluster_is_local = True
            else:
                workers = self.client.scheduler_info()["workers"].values()
                here = socket.gethostname()
                self._cluster_is_local = bool(workers) and all(w.get("host") == here for w in workers)
        return self._cluster_is_local

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            n_jobs = self.default_n_jobs
        if n_jobs > 0:
            return n_jobs
        client = self.client or self._resolve_client()
        # at least 2: joblib runs n_jobs == 1 in the caller, and -1 on a one-slot cluster means the cluster
        return max(self._wait_for_slots(client) + 1 + n_jobs, 2)

    def start_call(self) -> None:
        assert self.client is not None
        self._call_id = self.client.new_call_id()
        self._context = pickle.dumps(self._call_context(), protocol=5)
        self._by_reference = ByReference()
        self._replay = CallReplay(ordered=getattr(self.parallel, "return_ordered", True))
        self._replay_call_id = self._call_id
        self.client.replay_call_with(self._call_id, self._replay.arrived)
        if self.progress:
            self._progress = CallProgress(self.client)

    def _call_context(self) -> CallContext:
        """What the worker needs to run a task as if locally (see worker/executor.py)."""
        sklearn = sys.modules.get("sklearn")
        return CallContext(
            self.capture_output, self.capture_warnings, self.log_level, self.output_cap, self.inner_max_num_threads,
            sklearn.get_config() if sklearn is not None and hasattr(sklearn, "get_config") else None,
        )

    def submit(self, func: Callable, callback: Callable | None = None) -> Future:
        assert self.client is not None
        try:
            frames, keys = dumps_batch(
                (func, self._context), self._refs, self.auto_scatter_threshold, self._register, self._by_reference
            )
        except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable argument
            # joblib may submit from its callback, where a raise is lost: fail the batch instead
            future: Future = Future()
            future.set_exception(exc)
            if callback is not None:
                future.add_done_callback(callback)
            return future
        future = self.client.submit_batch(
            frames, keys=keys, call_id=self._call_id, func_name=_func_name(func), max_running=self._max_running,
            priority=self.priority,
        )
        if self._replay is not None:
            self._replay.submitted(future)
            future.add_done_callback(self._replay.settled)
        if self._progress is not None:
            n_tasks = _n_tasks(func)
            self._progress.submitted(n_tasks)
            future.add_done_callback(functools.partial(self._progress.finished, n_tasks))
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def retrieve_result_callback(self, future: Future) -> Any:
        return future.result()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        if self.client is not None and self._call_id:
            self.client.cancel_call(self._call_id)
            self._call_id = self.client.new_call_id()

    def stop_call(self) -> None:
        # a generator dropped mid-way leaves batches behind: cancel whatever is still out
        if self.client is not None and self._call_id and not self.client.closed:
            self.client.cancel_call(self._call_id)
        if self._replay is not None:  # what finished batches printed but an earlier one held back
            self._replay.flush()
            if self.client is not None:
                self.client.replay_call_with(self._replay_call_id, None)
            self._replay = None
        if self._progress is not None:
            self._progress.close()
            self._progress = None

    def terminate(self) -> None:
        self.reset_batch_stats()
        if self._parallels:
            self._parallels.pop()

    # joblib sets ``backend.parallel`` in configure() and calls terminate() when the call ends.
    # Hold the Parallel objects as a stack: a Parallel run inside a managed one (``with
    # Parallel() as p``) on this same backend gives the outer one back when it ends, and once
    # every call has ended no reference is left, so there is no backend <-> Parallel cycle and
    # the backend (and the data it scattered) is freed as soon as its context exits.
    @property
    def parallel(self) -> Any:
        return self._parallels[-1] if self._parallels else None

    @parallel.setter
    def parallel(self, value: Any) -> None:
        if value is not None and (not self._parallels or self._parallels[-1] is not value):
            self._parallels.append(value)

    # ------------------------------------------------------------ internals
    def _register(self, obj: Any, nbytes: int = 0, broadcast: bool = False) -> str:
        """Scatter ``obj`` for the lifetime of this backend (the parallel_config context)."""
        assert self.client is not None
        key = new_key(obj)
        self.client.register_data(key, dumps(obj, out_of_band_min=0), broadcast=broadcast)
        self._refs[id(obj)] = (key, obj)
        if not self._owned_keys:
            weakref.finalize(self, _release, weakref.ref(self.client), self._owned_keys)
        self._owned_keys.append(key)
        return key

    def _resolve_client(self) -> Client:
        if isinstance(self.scheduler, Client):
            if self.scheduler.closed:
                raise ValueError("the Client given as scheduler= is closed")
            return self.scheduler
        if self.scheduler is not None:
            return _shared_client(str(self.scheduler), self.secret, self.token)
        if self.token is not None:  # for the scheduler JOBSCHED_SCHEDULER names, not the current Client's
            return _shared_client(None, None, self.token)
        return current_client() or _shared_client(None, None)

    def _wait_for_slots(self, client: Client) -> int:
        try:
            client.wait_for_workers(1, timeout=self.wait_for_workers_timeout)
        except TimeoutError:
            raise NoWorkersError(
                f"no worker joined the scheduler at {client.address} within {self.wait_for_workers_timeout:.0f} s; "
                "start one with: jobsched-worker " + str(client.address)
            ) from None
        return client.total_slots()


def _n_tasks(batch: Any) -> int:
    """How many tasks a joblib batch holds (1 for a lone callable)."""
    items = getattr(batch, "items", None)
    return len(items) if items is not None else 1


def _checked_pre_dispatch(value: str | int) -> str | int:
    """``value`` if joblib's Parallel accepts it as ``pre_dispatch``, else a ValueError."""
    try:
        ok = value == "all" or (
            int(eval_expr(value.replace("n_jobs", "1")) if isinstance(value, str) else value) >= 1
        )
    except Exception:  # noqa: BLE001 - eval_expr raises several kinds for a bad expression
        ok = False
    if not ok or isinstance(value, bool):
        raise ValueError(f"pre_dispatch must be 'all', a positive integer or an expression such as '4 * n_jobs', "
                         f"not {value!r}")
    return value


PRIORITY_RANGE = (-(2**31), 2**31 - 1)  # plenty of levels, and always a small msgpack integer


def _checked_priority(value: Any) -> int:
    """``value`` as a call priority (any integer type, numpy's included), else a ValueError."""
    try:
        priority = operator.index(value)
    except TypeError:
        priority = None
    if priority is None or isinstance(value, bool) or not PRIORITY_RANGE[0] <= priority <= PRIORITY_RANGE[1]:
        raise ValueError(f"priority must be an integer from {PRIORITY_RANGE[0]} to {PRIORITY_RANGE[1]} "
                         f"(higher runs first among your own calls), not {value!r}")
    return priority


def _release(client_ref: weakref.ref[Client], keys: list[str]) -> None:
    client = client_ref()
    if client is not None and not client.closed:
        client.release(keys)


def register() -> None:
    register_parallel_backend("cluster", ClusterBackend)
