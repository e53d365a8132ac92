#!/usr/bin/env python
"""Side-by-side benchmark of joblib backends: ``loky``, dask's ``dask``, Ray's ``ray`` and jobsched's ``cluster``.

All run in one process, one backend at a time (the other backends' processes
are shut down meanwhile), each with 2 single-thread worker processes on this machine:

* ``loky``: joblib's default process pool, ``n_jobs=2``;
* ``dask``: ``distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True)``
  and a ``distributed.Client``, then ``parallel_config(backend="dask")``;
* ``ray``: ``ray.init(num_cpus=2)`` and ``ray.util.joblib.register_ray()``, then
  ``parallel_config(backend="ray", n_jobs=2)``; skipped with a note when ray is not installed
  (as dask is);
* ``cluster``: ``jobsched.Client(n_workers=2)`` (embedded LocalCluster: a scheduler and
  2 worker daemons as subprocesses), then ``parallel_config(backend="cluster")``.

A fourth, reference column, ``threading`` (``parallel_config(backend="threading",
n_jobs=2)``: threads in the calling process), times only the thread-preferring
workloads (the random forest: scikit-learn asks joblib for ``prefer="threads"``),
to show whether shipping such a loop to workers beats leaving it in the caller.

Backends run in ``--repeat`` rounds (loky, dask, cluster, loky, dask, ...), one
backend alive at a time, so that a slow spell of a shared machine hits them
alike.  In each round a backend is started afresh, warmed up (pool started,
every workload run once at its ``--quick`` size, untimed), then every workload
is timed once; the table reports the median over the rounds.  Results are
checked on every run (a fast wrong answer does not count), the grid search and
forest results are compared across backends, and CPU used by other processes
during each timed run is measured and reported (the machine may be shared).

    python bench/bench_backends.py                 # issue 2 workloads, 3 repeats
    python bench/bench_backends.py --all           # + 200 MB argument (plain, scatter=), forest, HGB CV
    python bench/bench_backends.py --quick         # smoke run: small sizes, 1 repeat
    python bench/bench_backends.py --only loky,cluster --repeat 5
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
# The task functions live in bench/_tasks.py.  Our own process finds them through
# sys.path; worker processes need PYTHONPATH: loky and dask's spawned workers copy
# the parent's sys.path, but jobsched's worker daemons are plain ``python -m``
# subprocesses that only inherit the environment.  Set before any worker starts.
sys.path.insert(0, HERE)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, os.environ.get("PYTHONPATH")) if p)

import _tasks  # noqa: E402
import joblib  # noqa: E402
import numpy as np  # noqa: E402
from joblib import Parallel, delayed, parallel_config  # noqa: E402

N_WORKERS = 2  # worker processes (one thread each) for every backend
BACKENDS = ("loky", "dask", "ray", "cluster")  # the table's main columns
RIVALS = ("dask", "ray")  # the distributed backends the cluster is measured against
REFERENCE_BACKENDS = ("threading",)  # extra columns: only the workloads they apply to
ALL_BACKENDS = BACKENDS + REFERENCE_BACKENDS


# ------------------------------------------------------------------ sizes
@dataclass(frozen=True)
class Sizes:
    tiny_auto: int = 20_000
    tiny_bs1: int = 2_000
    sleeps: int = 200
    grid_C: int = 7
    grid_gamma: int = 5
    grid_cv: int = 5
    big_mb: int = 200
    big_tasks: int = 64
    forest_trees: int = 200
    forest_samples: int = 20_000
    # 12,500 samples: the 5-fold training sets have 10,000, so early_stopping="auto" stays
    # off and every fit runs hgb_iter iterations (about 6 s with loky on 2 cores)
    hgb_samples: int = 12_500
    hgb_iter: int = 300


FULL = Sizes()
QUICK = Sizes(tiny_auto=2_000, tiny_bs1=200, sleeps=40, grid_C=3, grid_gamma=2, grid_cv=3,
              big_mb=20, big_tasks=16, forest_trees=20, forest_samples=4_000, hgb_samples=2_500, hgb_iter=20)
# Warm-up: the quick sizes, but a big array of its own: the cluster backend keeps an
# automatically scattered array for its whole parallel_config context, so warming up
# with the timed run's array would take the transfer out of the timed run.
WARMUP = replace(QUICK, big_mb=5, big_tasks=4)


# -------------------------------------------------------------- workloads
_cache: dict[Any, Any] = {}


def _digits():
    if "digits" not in _cache:
        from sklearn.datasets import load_digits
        _cache["digits"] = load_digits(return_X_y=True)
    return _cache["digits"]


def _big_array(mb: int):
    key = ("big", mb)
    if key not in _cache:
        for old in [k for k in _cache if isinstance(k, tuple) and k[0] == "big"]:
            del _cache[old]  # one large array at a time
        _cache[key] = np.random.default_rng(0).random(mb * 1_000_000 // 8)
    return _cache[key]


def _classification_data(n_samples: int):
    """The forest's and the HGB cross-validation's dataset: 40 features, 2 classes."""
    key = ("classification", n_samples)
    if key not in _cache:
        from sklearn.datasets import make_classification
        _cache[key] = make_classification(n_samples=n_samples, n_features=40, n_informative=20,
                                          n_classes=2, random_state=0)
    return _cache[key]


# Every run function takes the sizes and the Backend (b.n_jobs, b.config()) and returns
# (seconds, output to compare across backends or None); it checks its own results.
def _run_tiny(n: int, b: Backend, batch_size: int | str, name: str):
    t0 = time.perf_counter()
    out = Parallel(n_jobs=b.n_jobs, batch_size=batch_size)(delayed(_tasks.tiny)(i) for i in range(n))
    dt = time.perf_counter() - t0
    assert out == [i * i for i in range(n)], f"{name}: wrong results"
    return dt, None


def run_tiny_auto(s: Sizes, b: Backend):
    return _run_tiny(s.tiny_auto, b, "auto", "tiny_auto")


def run_tiny_bs1(s: Sizes, b: Backend):
    return _run_tiny(s.tiny_bs1, b, 1, "tiny_bs1")


def run_sleep(s: Sizes, b: Backend):
    n = s.sleeps
    t0 = time.perf_counter()
    out = Parallel(n_jobs=b.n_jobs)(delayed(_tasks.sleep_10ms)(i) for i in range(n))
    dt = time.perf_counter() - t0
    assert out == list(range(n)), "sleep: wrong results"
    return dt, None


def run_grid(s: Sizes, b: Backend):
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC
    X, y = _digits()
    grid = {"C": np.logspace(-3, 3, s.grid_C), "gamma": np.logspace(-4, 0, s.grid_gamma)}
    search = GridSearchCV(SVC(), grid, cv=s.grid_cv, n_jobs=b.n_jobs)
    t0 = time.perf_counter()
    search.fit(X, y)
    dt = time.perf_counter() - t0
    return dt, np.asarray(search.cv_results_["mean_test_score"])


def run_big(s: Sizes, b: Backend):
    # a fresh object every run: the cluster backend keeps an automatically scattered array
    # (matched by identity) for its whole parallel_config context, so a second run with the
    # same object would skip the transfer
    array = _big_array(s.big_mb).copy()
    t0 = time.perf_counter()
    out = Parallel(n_jobs=b.n_jobs)(delayed(_tasks.big_arg)(array, i) for i in range(s.big_tasks))
    dt = time.perf_counter() - t0
    assert out == [_tasks.big_arg(array, i) for i in range(s.big_tasks)], "big_arg: wrong results"
    return dt, None


def run_big_scatter(s: Sizes, b: Backend):
    """The big argument, declared with ``parallel_config(..., scatter=[array])`` (issue 3).

    The backends scatter when the config is built (dask's and ours broadcast to every
    worker then), so the timed span is the whole ``with`` block: scatter, the call, and
    the context exit.  A fresh array object every run, as in run_big.  Backends whose
    joblib backend takes no ``scatter=`` (loky) run it plainly: the same as ``big``.
    """
    array = _big_array(s.big_mb).copy()
    t0 = time.perf_counter()
    with b.config(scatter=[array]):
        out = Parallel(n_jobs=b.n_jobs)(delayed(_tasks.big_arg)(array, i) for i in range(s.big_tasks))
    dt = time.perf_counter() - t0
    assert out == [_tasks.big_arg(array, i) for i in range(s.big_tasks)], "big_scatter: wrong results"
    return dt, None


def run_forest(s: Sizes, b: Backend):
    from sklearn.ensemble import RandomForestClassifier
    X, y = _classification_data(s.forest_samples)
    forest = RandomForestClassifier(n_estimators=s.forest_trees, n_jobs=b.n_jobs, random_state=0)
    t0 = time.perf_counter()
    # scikit-learn's Parallel(prefer="threads"): loky and dask override the hint; the cluster
    # backend takes it when all its workers are on this machine (local_threads)
    forest.fit(X, y)
    dt = time.perf_counter() - t0
    return dt, np.asarray(forest.feature_importances_)


def run_hgb_cv(s: Sizes, b: Backend):
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.model_selection import cross_validate
    X, y = _classification_data(s.hgb_samples)
    model = HistGradientBoostingClassifier(max_iter=s.hgb_iter, random_state=0)
    t0 = time.perf_counter()
    out = cross_validate(model, X, y, cv=5, n_jobs=b.n_jobs)
    dt = time.perf_counter() - t0
    scores = np.asarray(out["test_score"])
    assert scores.shape == (5,) and (scores > 0.6).all(), f"hgb_cv: implausible test scores {scores}"
    return dt, scores


# On a virtual machine that hands freed memory back to its host (free page reporting), a
# page freed more than about a second ago costs a host fault when next touched: measured
# here, 1 GiB took 0.13 s to fill again right after being freed and 1.7-2.5 s one second or
# more later.  The 200 MB workloads fill new pages (loky's memmap, our /dev/shm segment,
# dask's copies), so their time depends on how long ago the previous run freed its own.
# They wait this long first: every backend starts cold, as a call does in a session where
# seconds pass between calls.
COLD_MEMORY = 2.0


@dataclass(frozen=True)
class Workload:
    key: str
    label: Callable[[Sizes], str]
    run: Callable[[Sizes, Backend], tuple]
    unit: str  # "s", or "ms/task" (time divided by the number of tasks)
    extra: bool = False  # only with --all
    threads: bool = False  # a prefer="threads" loop: also timed on the threading reference
    n_tasks: Callable[[Sizes], int] = lambda s: 1
    settle: float = 0.0  # seconds to wait before each timed run, after the quiet wait (see COLD_MEMORY)

    def metric(self, seconds: float, s: Sizes) -> float:
        return seconds / self.n_tasks(s) * 1000 if self.unit == "ms/task" else seconds


WORKLOADS = [
    Workload("tiny_auto", lambda s: f"{s.tiny_auto:,} tiny tasks, auto batching", run_tiny_auto, "s"),
    Workload("tiny_bs1", lambda s: f"{s.tiny_bs1:,} tiny tasks, batch_size=1 (per task)", run_tiny_bs1, "ms/task",
             n_tasks=lambda s: s.tiny_bs1),
    Workload("sleep", lambda s: f"{s.sleeps} x 10 ms sleep (ideal {ideal_sleep(s):.2f} s)", run_sleep, "s"),
    Workload("grid", lambda s: f"GridSearchCV SVC digits, {s.grid_C * s.grid_gamma * s.grid_cv} fits", run_grid, "s"),
    Workload("big", lambda s: f"{s.big_mb} MB argument to {s.big_tasks} tasks", run_big, "s", extra=True,
             settle=COLD_MEMORY),
    Workload("big_scatter", lambda s: f"{s.big_mb} MB argument, scatter=[array] (loky: plain)", run_big_scatter, "s",
             extra=True, settle=COLD_MEMORY),
    Workload("forest", lambda s: f"RandomForest {s.forest_trees} trees (n_jobs=-1)", run_forest, "s", extra=True,
             threads=True),
    Workload("hgb_cv", lambda s: f"cross_validate HGB {s.hgb_iter} iter, 5 folds", run_hgb_cv, "s", extra=True),
]
SKLEARN_WORKLOADS = ("grid", "forest", "hgb_cv")


def ideal_sleep(s: Sizes) -> float:
    return s.sleeps * 0.01 / N_WORKERS


# --------------------------------------------------------------- backends
class Backend:
    name = ""  # also the joblib backend's name
    n_jobs = -1
    supports_scatter = False  # whether the joblib backend takes parallel_config(..., scatter=[...])
    in_caller = False  # tasks run in the calling process (threads): no worker processes to check

    def start(self) -> None: ...

    def config(self, scatter: list | None = None):
        """This backend's parallel_config; ``scatter`` is dropped where it is not supported."""
        params = {"scatter": scatter} if scatter is not None and self.supports_scatter else {}
        return parallel_config(backend=self.name, n_jobs=self.n_jobs, **params)

    def runs(self, w: Workload) -> bool:
        return True

    def close(self) -> None: ...


class LokyBackend(Backend):
    name = "loky"
    n_jobs = N_WORKERS

    def close(self) -> None:
        from joblib.externals.loky import reusable_executor
        executor = reusable_executor._executor
        if executor is not None:
            executor.terminate(kill_workers=False)  # joblib's MemmappingExecutor: also cleans its temp folder


class DaskBackend(Backend):
    name = "dask"
    supports_scatter = True

    def start(self) -> None:
        import distributed
        self.cluster = distributed.LocalCluster(n_workers=N_WORKERS, threads_per_worker=1, processes=True,
                                                dashboard_address=None, silence_logs=logging.ERROR)
        self.client = distributed.Client(self.cluster)

    def close(self) -> None:
        client, cluster = getattr(self, "client", None), getattr(self, "cluster", None)
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()


class RayBackend(Backend):
    """Ray's joblib backend (``ray.util.joblib``) on a local Ray instance of 2 CPUs."""

    name = "ray"
    n_jobs = N_WORKERS

    def start(self) -> None:
        import ray
        from ray.util.joblib import register_ray
        register_ray()
        ray.init(num_cpus=N_WORKERS, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)

    def close(self) -> None:
        import ray
        ray.shutdown()


class ClusterBackend(Backend):
    name = "cluster"  # parallel_config(backend="cluster") uses the current Client: self.client
    supports_scatter = True

    def start(self) -> None:
        import jobsched
        self.client = jobsched.Client(n_workers=N_WORKERS)

    def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()  # also ends the embedded LocalCluster it owns


class ThreadingBackend(Backend):
    """Reference: joblib's threads in the caller, what prefer="threads" gets by default."""
    name = "threading"
    n_jobs = N_WORKERS
    in_caller = True

    def runs(self, w: Workload) -> bool:
        return w.threads


def make_backend(name: str) -> Backend:
    return {"loky": LokyBackend, "dask": DaskBackend, "ray": RayBackend, "cluster": ClusterBackend,
            "threading": ThreadingBackend}[name]()


# ------------------------------------------------------------------ runner
@dataclass
class BackendResult:
    startups: list = field(default_factory=list)  # seconds: start + first call, one per round
    seconds: dict = field(default_factory=dict)  # workload key -> list of seconds
    noise: dict = field(default_factory=dict)  # workload key -> list of foreign CPU fractions
    outputs: dict = field(default_factory=dict)  # workload key -> last output to compare across backends
    worker_pids: set = field(default_factory=set)
    error: str = ""

    @property
    def startup(self) -> float | None:
        return statistics.median(self.startups) if self.startups else None


class NoiseMeter:
    """CPU time used by processes outside this benchmark's process tree during a run.

    The machine may be shared: another process burning a core during a timed run
    makes that run meaningless, so every run records the fraction of the machine's
    CPU that went elsewhere (other processes, and steal time on a VM).
    """

    def __init__(self) -> None:
        import psutil
        self.psutil = psutil
        self.me = psutil.Process()
        self.ncpu = psutil.cpu_count() or 1

    def _tree_cpu(self) -> float:
        total = 0.0
        for proc in [self.me, *self.me.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                total += t.user + t.system
            except self.psutil.Error:
                pass
        return total

    def _busy(self) -> float:
        t = self.psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._busy0 = self._busy()
        self._tree0 = self._tree_cpu()

    def stop(self) -> float:
        """The fraction (0..1) of all cores used by others since ``start``."""
        wall = time.perf_counter() - self._t0
        foreign = (self._busy() - self._busy0) - (self._tree_cpu() - self._tree0)
        return max(foreign, 0.0) / (wall * self.ncpu) if wall > 0 else 0.0

    def wait_quiet(self, max_wait: float, log, tag: str) -> None:
        """Wait (at most ``max_wait`` s) for a 0.5 s window in which others use < NOISY of the CPU."""
        if max_wait <= 0:
            return
        deadline = time.monotonic() + max_wait
        waited = False
        while True:
            self.start()
            time.sleep(0.5)
            busy = self.stop()
            if busy < NOISY:
                if waited:
                    log(f"{tag} machine quiet again")
                return
            if time.monotonic() > deadline:
                log(f"{tag} machine still busy ({busy:.0%} of the CPU used by others) after {max_wait:.0f} s; going on")
                return
            if not waited:
                log(f"{tag} waiting for other processes to quiet down ({busy:.0%} of the CPU used by others)")
                waited = True


def check_workers(n_jobs: int) -> set:
    """Tasks run in other processes, which import _tasks from this directory."""
    out = Parallel(n_jobs=n_jobs, batch_size=1)(delayed(_tasks.where)(i) for i in range(20))
    pids = {pid for pid, _ in out}
    files = {os.path.realpath(f) for _, f in out}
    assert os.getpid() not in pids, "tasks ran in the calling process"
    assert files == {os.path.realpath(_tasks.__file__)}, f"workers imported _tasks from {files}"
    return pids


def bench_round(name: str, result: BackendResult, workloads: list[Workload], sizes: Sizes,
                round_no: int, meter: NoiseMeter, quiet_wait: float, retries: int, log) -> None:
    """One round for one backend: start it, warm up, time every workload once, close it."""
    backend = make_backend(name)
    tag = f"[{name} round {round_no}]"
    environ = dict(os.environ)  # dask's LocalCluster leaves MALLOC_TRIM_THRESHOLD_, OMP_NUM_THREADS... set here
    try:
        t0 = time.perf_counter()
        backend.start()
        workloads = [w for w in workloads if backend.runs(w)]
        with backend.config():
            if not backend.in_caller:
                pids = check_workers(backend.n_jobs)
                result.startups.append(time.perf_counter() - t0)
                result.worker_pids |= pids
                log(f"{tag} started in {result.startups[-1]:.2f} s; tasks ran in worker pids {sorted(pids)}")
            t1 = time.perf_counter()
            for w in workloads:  # warm-up: every workload once at about its quick size, untimed
                w.run(WARMUP, backend)
            log(f"{tag} warm-up: {time.perf_counter() - t1:.2f} s")
            for w in workloads:
                best = None
                for attempt in range(1 + retries):
                    gc.collect()
                    meter.wait_quiet(quiet_wait, log, f"{tag} {w.key}:")
                    time.sleep(w.settle)
                    meter.start()
                    seconds, output = w.run(sizes, backend)
                    noise = meter.stop() if seconds >= MIN_NOISE_WALL else None
                    flag = f"  <-- other processes used {noise:.0%} of the CPU" if noise and noise > NOISY else ""
                    log(f"{tag} {w.key}: {seconds:.3f} s{flag}")
                    if best is None or (noise or 0.0) < (best[2] or 0.0):
                        best = (seconds, output, noise)
                    if not flag:
                        break
                    if attempt < retries:
                        log(f"{tag} {w.key}: disturbed run, trying again (keeping the least disturbed one)")
                seconds, output, noise = best
                result.seconds.setdefault(w.key, []).append(seconds)
                result.noise.setdefault(w.key, []).append(noise)
                if output is not None:
                    result.outputs[w.key] = output
    except Exception as exc:  # noqa: BLE001 - report it and go on with the other backends
        result.error = f"{type(exc).__name__}: {exc}"
        log(f"{tag} FAILED: {result.error}")
    finally:
        t1 = time.perf_counter()
        backend.close()
        log(f"{tag} closed in {time.perf_counter() - t1:.2f} s")
        if os.environ != environ:  # the next backend's processes must not inherit this one's settings
            changed = sorted(k for k in {*os.environ, *environ} if os.environ.get(k) != environ.get(k))
            log(f"{tag} restoring the environment variables it changed: {', '.join(changed)}")
            os.environ.clear()
            os.environ.update(environ)


NOISY = 0.05  # a run during which others used more than 5% of the machine is flagged
MIN_NOISE_WALL = 0.2  # seconds: CPU times tick at 10 ms, too coarse to judge shorter runs


# ---------------------------------------------------------------- report
def fmt_metric(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "ms/task":
        return f"{value:.2f} ms"
    return f"{value:.3f} s" if value < 10 else f"{value:.2f} s"


def fmt_ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def median_metric(results: dict, name: str, w: Workload, sizes: Sizes) -> float | None:
    r = results.get(name)
    if r is None or w.key not in r.seconds:
        return None
    return w.metric(statistics.median(r.seconds[w.key]), sizes)


def print_table(results: dict, workloads: list[Workload], sizes: Sizes, repeat: int) -> dict:
    # reference columns (threading) only when they timed something
    refs = [b for b in REFERENCE_BACKENDS if b in results and results[b].seconds]
    columns = [*BACKENDS, *refs]
    header = ["workload", *columns, "cluster/loky", *(f"{b}/cluster" for b in RIVALS), *(f"cluster/{b}" for b in refs)]
    rows = []
    noisy_cells = False
    medians: dict = {}
    for w in workloads:
        m = {b: median_metric(results, b, w, sizes) for b in ALL_BACKENDS}
        medians[w.key] = m
        medians.setdefault("noisy", {})[w.key] = {b for b in ALL_BACKENDS
                                                   if b in results and is_noisy(results[b], w.key)}
        cells = []
        for b in columns:
            text = fmt_metric(m[b], w.unit)
            if w.key == "sleep" and m[b] is not None:
                text += f" ({ideal_sleep(sizes) / m[b]:.1%})"
            if m[b] is not None and is_noisy(results[b], w.key):
                text += "*"
                noisy_cells = True
            cells.append(text)
        rows.append([w.label(sizes), *cells, fmt_ratio(m["cluster"], m["loky"]),
                     *(fmt_ratio(m[b], m["cluster"]) for b in RIVALS), *(fmt_ratio(m["cluster"], m[b]) for b in refs)])
    start = {b: (results[b].startup if b in results else None) for b in ALL_BACKENDS}
    rows.append(["start-up: workers ready + first call", *(fmt_metric(start[b], "s") for b in columns),
                 fmt_ratio(start["cluster"], start["loky"]), *(fmt_ratio(start[b], start["cluster"]) for b in RIVALS),
                 *("-" for _ in refs)])
    medians["startup"] = start
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(widths[i]) if i == 0 else str(c).rjust(widths[i])
                                 for i, c in enumerate(cells)) + " |"

    print(f"\nMedian of {repeat} run(s) (backends interleaved round by round); {N_WORKERS} worker processes "
          "x 1 thread per backend; ratios > 1 mean the numerator is slower.")
    if refs:
        print(f"{', '.join(refs)}: a reference in the calling process ({N_WORKERS} threads), "
              "timed only for the thread-preferring workloads.")
    print(line(header))
    print("|" + "|".join("-" * (w_ + 2) for w_ in widths) + "|")
    for r in rows:
        print(line(r))
    if noisy_cells:
        print(f"* the median run had other processes using more than {NOISY:.0%} of the CPU: not a clean figure")
    return medians


def is_noisy(result: BackendResult, key: str) -> bool:
    """Whether the run whose time is the median was disturbed by other processes."""
    times, noise = result.seconds.get(key, []), result.noise.get(key, [])
    if not times:
        return False
    order = sorted(range(len(times)), key=times.__getitem__)
    middle = order[(len(order) - 1) // 2: len(order) // 2 + 1]  # one run, or the two around the median
    return any(noise[i] is not None and noise[i] > NOISY for i in middle)


def print_targets(medians: dict, workloads: list[Workload], sizes: Sizes, quick: bool) -> None:
    keys = {w.key for w in workloads}

    def get(key, backend):
        return medians.get(key, {}).get(backend)

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "NOT MET")

    def check(cond: Callable[[], bool], *needed) -> bool | None:
        if any(v is None for v in needed):
            return None
        return cond()

    def noisy(key: str, *backends: str) -> str:
        hit = medians.get("noisy", {}).get(key, set()) & set(backends)
        return f" (from disturbed figures: {', '.join(sorted(hit))})" if hit else ""

    def faster_than_rivals(key: str, what: str) -> list:
        c = get(key, "cluster")
        return [(f"{what} faster than {rival}", fmt_ratio(r, c), check(lambda r=r: c < r, c, r), noisy(key, "cluster", rival))
                for rival in RIVALS for r in [get(key, rival)]]

    lines2, lines7 = [], []
    if "tiny_bs1" in keys:
        c, lk, dk = get("tiny_bs1", "cluster"), get("tiny_bs1", "loky"), get("tiny_bs1", "dask")
        lines2.append(("batch_size=1 round trip <= 0.5 ms per task", fmt_metric(c, "ms/task"),
                       check(lambda: c <= 0.5, c), noisy("tiny_bs1", "cluster")))
        lines7.append(("batch_size=1 <= 0.2 ms per task", fmt_metric(c, "ms/task"), check(lambda: c <= 0.2, c),
                       noisy("tiny_bs1", "cluster")))
        lines7.append(("batch_size=1 at or below loky", fmt_ratio(c, lk), check(lambda: c <= lk, c, lk),
                       noisy("tiny_bs1", "cluster", "loky")))
        lines7.append(("batch_size=1 >= 25x faster than dask", fmt_ratio(dk, c), check(lambda: dk >= 25 * c, c, dk),
                       noisy("tiny_bs1", "cluster", "dask")))
    if "grid" in keys:
        c, lk = get("grid", "cluster"), get("grid", "loky")
        lines2.append(("grid search within 1.05x of loky", fmt_ratio(c, lk), check(lambda: c <= 1.05 * lk, c, lk),
                       noisy("grid", "cluster", "loky")))
        lines7.append(("grid search within 1.03x of loky", fmt_ratio(c, lk), check(lambda: c <= 1.03 * lk, c, lk),
                       noisy("grid", "cluster", "loky")))
        lines7 += faster_than_rivals("grid", "grid search")
    if "sleep" in keys:
        c = get("sleep", "cluster")
        eff = None if c is None else ideal_sleep(sizes) / c
        lines2.append(("sleep workload >= 95% efficient", "-" if eff is None else f"{eff:.1%}",
                       check(lambda: eff >= 0.95, eff), noisy("sleep", "cluster")))
    if "tiny_auto" in keys:
        c, lk, dk = get("tiny_auto", "cluster"), get("tiny_auto", "loky"), get("tiny_auto", "dask")
        lines7.append(("auto-batched tiny tasks within 2x of loky", fmt_ratio(c, lk), check(lambda: c <= 2 * lk, c, lk),
                       noisy("tiny_auto", "cluster", "loky")))
        lines7.append(("auto-batched tiny tasks >= 5x faster than dask", fmt_ratio(dk, c),
                       check(lambda: dk >= 5 * c, c, dk), noisy("tiny_auto", "cluster", "dask")))
    if "big" in keys:
        c, lk = get("big", "cluster"), get("big", "loky")
        lines7.append(("big argument within 1.5x of loky", fmt_ratio(c, lk), check(lambda: c <= 1.5 * lk, c, lk),
                       noisy("big", "cluster", "loky")))
    if "big_scatter" in keys:
        # issue 3's scatter= under the big-argument bound of issue 7 (loky has no scatter=: plain run)
        c, lk = get("big_scatter", "cluster"), get("big_scatter", "loky")
        lines7.append(("big argument with scatter= within 1.5x of loky", fmt_ratio(c, lk),
                       check(lambda: c <= 1.5 * lk, c, lk), noisy("big_scatter", "cluster", "loky")))
        lines7 += faster_than_rivals("big_scatter", "big argument with scatter=")
    if "forest" in keys:
        c, lk = get("forest", "cluster"), get("forest", "loky")
        th = get("forest", "threading")
        lines7.append(("random forest within 1.03x of loky", fmt_ratio(c, lk), check(lambda: c <= 1.03 * lk, c, lk),
                       noisy("forest", "cluster", "loky")))
        lines7 += faster_than_rivals("forest", "random forest")
        # prefer="threads" loops must not lose by going over the network (else: FallbackToBackend)
        lines7.append(("random forest (prefer=threads) within 1.03x of threading in the caller", fmt_ratio(c, th),
                       check(lambda: c <= 1.03 * th, c, th), noisy("forest", "cluster", "threading")))
    if "hgb_cv" in keys:
        c, lk = get("hgb_cv", "cluster"), get("hgb_cv", "loky")
        lines7.append(("HGB cross_validate within 1.03x of loky", fmt_ratio(c, lk), check(lambda: c <= 1.03 * lk, c, lk),
                       noisy("hgb_cv", "cluster", "loky")))
        lines7 += faster_than_rivals("hgb_cv", "HGB cross_validate")
    c = get("startup", "cluster")
    lines7.append(("embedded local cluster ready in < 2 s", fmt_metric(c, "s"), check(lambda: c < 2.0, c), ""))

    note = "  (--quick sizes: indicative only)" if quick else ""
    for title, lines in (("Targets, issue 2", lines2), ("Targets, issue 7 (stretch)", lines7)):
        if not lines:
            continue
        print(f"\n{title}{note}:")
        width = max(len(t) for t, _, _, _ in lines)
        for text, value, ok, caveat in lines:
            print(f"  {text.ljust(width)}  {value:>8}  {verdict(ok)}{caveat if ok is not None else ''}")


def report_noise(results: dict) -> None:
    runs = [(f, b, k, i + 1) for b, r in results.items() for k, fs in r.noise.items() for i, f in enumerate(fs)
            if f is not None]
    if not runs:
        return
    worst = max(runs)
    noisy = [x for x in runs if x[0] > NOISY]
    median = statistics.median(x[0] for x in runs)
    print(f"CPU used by other processes during timed runs of >= {MIN_NOISE_WALL} s: median {median:.1%}, "
          f"max {worst[0]:.1%} ({worst[1]} {worst[2]} round {worst[3]})"
          + (f"; {len(noisy)} of {len(runs)} runs above {NOISY:.0%}: results are noisy" if noisy else ""))


def compare_outputs(results: dict) -> None:
    for key, what in (("grid", "grid search mean_test_score"), ("forest", "forest feature_importances_"),
                      ("hgb_cv", "HGB cross_validate test_score")):
        outs = {b: r.outputs[key] for b, r in results.items() if key in r.outputs}
        if len(outs) < 2:
            continue
        ref = next(iter(outs.values()))
        same = all(np.array_equal(ref, o) for o in outs.values())
        print(f"{what} identical across {', '.join(outs)}: {'yes' if same else 'NO'}")


def leftover_processes(timeout: float = 10.0) -> list:
    import psutil
    me = psutil.Process()
    deadline = time.monotonic() + timeout
    while True:
        # loky's resource tracker lives as long as this interpreter (it exits with it)
        kids = [p for p in me.children(recursive=True) if _alive(p) and not _is_resource_tracker(p)]
        if not kids or time.monotonic() > deadline:
            return kids
        time.sleep(0.2)


def _alive(p) -> bool:
    import psutil
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _is_resource_tracker(p) -> bool:
    import psutil
    try:
        return "resource_tracker" in " ".join(p.cmdline())
    except psutil.Error:
        return False


def versions() -> str:
    parts = [f"python {platform.python_version()}", f"joblib {joblib.__version__}"]
    for mod in ("sklearn", "numpy", "distributed", "ray", "jobsched", "uvloop"):
        try:
            parts.append(f"{mod} {__import__(mod).__version__}")
        except Exception:  # noqa: BLE001 - a backend that fails to import is reported as absent
            parts.append(f"{mod} -")
    return ", ".join(parts) + git_revision()


def git_revision() -> str:
    """The jobsched checkout's commit (the benchmark measures whatever is checked out)."""
    import subprocess
    try:
        import jobsched
        # the checkout's root: jobsched/ holds only the package's face, the code is beside it
        where = os.path.dirname(os.path.dirname(os.path.abspath(jobsched.__file__)))
        rev = subprocess.run(["git", "-C", where, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":!bench", ":!tests"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return f" (jobsched at git {rev}{' + local changes' if dirty else ''})" if rev else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=None,
                        help="rounds, i.e. timed runs per workload and backend; the median is reported "
                             "(default 3, or 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes and 1 repeat (unless --repeat)")
    parser.add_argument("--all", action="store_true",
                        help="also the issue 7 and issue 3 workloads: 200 MB argument (plain and with scatter=), "
                             "random forest, HGB cross-validation")
    parser.add_argument("--only", default=",".join(ALL_BACKENDS),
                        help="backends to run, e.g. loky,cluster (default: all; threading runs only the "
                             "thread-preferring workloads: forest)")
    parser.add_argument("--workloads", default="",
                        help="workloads to run (default: all selected): " + ",".join(w.key for w in WORKLOADS))
    parser.add_argument("--quiet-wait", type=float, default=60.0, metavar="SECONDS",
                        help="before each timed run, wait up to this long for other processes to leave the CPU "
                             "alone (default 60; 0: do not wait)")
    parser.add_argument("--retry-noisy", type=int, default=2, metavar="N",
                        help="run a timed run again, up to N times, when other processes used more than "
                             f"{NOISY:.0%}% of the CPU during it; the least disturbed attempt counts (default 2)")
    parser.add_argument("--json", metavar="PATH", help="also write every timing to this JSON file")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the table and targets")
    args = parser.parse_args(argv)

    names = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = set(names) - set(ALL_BACKENDS)
    if unknown:
        parser.error(f"unknown backend(s) {sorted(unknown)}; choose from {', '.join(ALL_BACKENDS)}")
    if args.workloads:
        wanted = {w.strip() for w in args.workloads.split(",") if w.strip()}
        unknown = wanted - {w.key for w in WORKLOADS}
        if unknown:
            parser.error(f"unknown workload(s) {sorted(unknown)}")
        workloads = [w for w in WORKLOADS if w.key in wanted]
    else:
        workloads = [w for w in WORKLOADS if args.all or not w.extra]
    sizes = QUICK if args.quick else FULL
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    if repeat < 1:
        parser.error("--repeat must be >= 1")

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    notes = []
    for name, module, package in (("dask", "distributed", "dask[distributed]"), ("ray", "ray", "ray")):
        if name in names:
            try:
                __import__(module)
            except ImportError as exc:
                names.remove(name)
                notes.append(f"{name} skipped: {module} is not importable ({exc}); pip install '{package}'")
    try:
        import sklearn  # noqa: F401
    except ImportError:
        dropped = [w.key for w in workloads if w.key in SKLEARN_WORKLOADS]
        workloads = [w for w in workloads if w.key not in SKLEARN_WORKLOADS]
        if dropped:
            notes.append(f"{', '.join(dropped)} skipped: scikit-learn is not importable")

    # a reference backend times only the workloads it applies to (threading: prefer="threads" loops)
    for name in [n for n in names if not any(make_backend(n).runs(w) for w in workloads)]:
        names.remove(name)
        if name in args.only:
            notes.append(f"{name} skipped: it times only {', '.join(w.key for w in WORKLOADS if make_backend(name).runs(w))}")

    print(f"jobsched backend benchmark: {os.cpu_count()} cores; {versions()}")
    for note in notes:
        print("note:", note)

    meter = NoiseMeter()
    results = {name: BackendResult() for name in names}
    # Rounds: every backend in turn, started afresh each round, so that a slow spell
    # of the machine hits all backends alike; one backend's processes at a time.
    for round_no in range(1, repeat + 1):
        for name in names:
            if not results[name].error:
                bench_round(name, results[name], workloads, sizes, round_no, meter, args.quiet_wait,
                            args.retry_noisy, log)

    medians = print_table(results, workloads, sizes, repeat)
    print_targets(medians, workloads, sizes, args.quick)
    print()
    report_noise(results)
    compare_outputs(results)
    failed = {b: r.error for b, r in results.items() if r.error}
    for b, err in failed.items():
        print(f"backend {b} FAILED: {err}")

    left = leftover_processes()
    if left:
        print("leftover child processes: " + ", ".join(f"{p.pid} {' '.join(p.cmdline())[:80]}" for p in left))
    else:
        log("no worker processes left behind")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"sizes": sizes.__dict__, "repeat": repeat, "versions": versions(),
                       "results": {b: {"startups": r.startups, "seconds": r.seconds, "foreign_cpu": r.noise,
                                       "error": r.error}
                                   for b, r in results.items()}}, f, indent=2)
    return 1 if failed or left else 0


if __name__ == "__main__":
    sys.exit(main())
