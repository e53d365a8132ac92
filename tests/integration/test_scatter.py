"""Scattered data with real daemons (issue 3): big inputs cross the wire once per worker,
stay in worker memory while used, and are freed when their owner is done with them.

Every test runs a scheduler and worker daemons as subprocesses on 127.0.0.1 (see
conftest.py).  The task functions below are module-level, so the workers import
this module by name (the fixtures put tests/ on their PYTHONPATH).

Byte accounting: the scheduler counts the bytes of its connections
(``bytes_received``/``bytes_sent`` in the dashboard's ``/api/status``), which
is exact for what crosses the scheduler; peer-to-peer copies bypass it, so the
total loopback traffic is measured on ``lo`` with ``psutil`` as a delta.  Other
processes on this machine also use loopback, so that bound is the issue's
(2 x (workers + 1) x array), about twice what jobsched needs (3 x array).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import RunningCluster, assert_same_cv_results, daemon_env, start_cluster, wait_for_workers, wait_until
from joblib import Parallel, delayed, parallel_config
from jobsched.client.scatter import ScatteredRef

import jobsched

MB = 10**6
BIG_LEN = 25_000_000  # float64: 200 MB
N_TASKS = 64


# ------------------------------------------------------------------ task functions
def slice_sum(X, i: int, n: int) -> float:
    """The sum of the i-th of n slices of X."""
    step = len(X) // n
    return float(X[i * step:(i + 1) * step].sum())


def slow_slice_sum(X, i: int, n: int, directory: str, delay: float) -> tuple[int, float]:
    """Leave a ``started-<pid>`` mark, sleep, then return (pid, slice sum)."""
    d = Path(directory)
    tmp = d / f".tmp-{os.getpid()}-{threading.get_ident()}"
    tmp.write_text(str(os.getpid()))
    tmp.rename(d / f"started-{os.getpid()}")  # atomic: readers never see an empty mark
    time.sleep(delay)
    return os.getpid(), slice_sum(X, i, n)


def describe(X) -> tuple[int, bool, float, int]:
    """(pid, writeable, sum, length) of the array a task received."""
    return os.getpid(), bool(X.flags.writeable), float(X.sum()), len(X)


def total(X) -> float:
    return float(np.asarray(X).sum())


def warm_up(i: int) -> int:
    """Import numpy (and this module) in the worker before memory is measured."""
    return int(np.arange(10).sum()) + i


# ------------------------------------------------------------------ helpers
def expected_sums(X, n: int) -> list[float]:
    return [slice_sum(X, i, n) for i in range(n)]


def workers_info(client: jobsched.Client) -> dict[str, dict]:
    """Scheduler's view of the workers, by name."""
    return {w["name"]: w for w in client.scheduler_info()["workers"].values()}


def data_held(client: jobsched.Client) -> dict[str, tuple[int, int]]:
    """(data_keys, data_bytes) per worker name."""
    return {name: (w["data_keys"], w["data_bytes"]) for name, w in workers_info(client).items()}


def wait_data_freed(client: jobsched.Client, timeout: float = 30.0) -> None:
    def freed() -> bool:
        info = client.scheduler_info()
        return info["data_keys"] == 0 and all(w["data_keys"] == 0 and w["data_bytes"] == 0
                                              for w in info["workers"].values())

    wait_until(freed, timeout, lambda: f"data not freed: {client.scheduler_info()['data_keys']} keys known, "
                                       f"held per worker: {data_held(client)}")


def wait_held_everywhere(client: jobsched.Client, keys: int, nbytes: int, timeout: float = 60.0) -> None:
    def held() -> bool:
        return all(k >= keys and b >= nbytes for k, b in data_held(client).values())

    wait_until(held, timeout, lambda: f"data not on every worker: {data_held(client)}")


def find_mark(directory: Path, timeout: float = 60.0) -> int:
    wait_until(lambda: any(directory.glob("started-*")), timeout, "no task started")
    return int(sorted(directory.glob("started-*"))[0].name.split("-")[1])


def run_in_thread(fn: Callable) -> tuple[ThreadPoolExecutor, object]:
    pool = ThreadPoolExecutor(1)
    return pool, pool.submit(fn)


class Status:
    """The scheduler's /api/status (dashboard) endpoint."""

    def __init__(self, url: str) -> None:
        self.url = url

    def get(self) -> dict:
        with urllib.request.urlopen(self.url + "/api/status", timeout=10) as response:
            return json.load(response)

    def bytes_moved(self) -> int:
        status = self.get()
        return int(status["bytes_received"]) + int(status["bytes_sent"])


def dashboard_of(address: str, tmp_path: Path) -> Status:
    for path in tmp_path.glob("scheduler-*.json"):
        content = json.loads(path.read_text())
        if content.get("address") == address and content.get("dashboard"):
            return Status(content["dashboard"])
    raise AssertionError("the scheduler file names no dashboard")


def shm_segments() -> dict[str, int]:
    """jobsched's shared memory segments on this machine: name -> size."""
    found = {}
    for path in Path("/dev/shm").glob("jobsched-*"):
        with contextlib.suppress(OSError):
            found[path.name] = path.stat().st_size
    return found


def lo_bytes() -> int:
    counters = psutil.net_io_counters(pernic=True)
    if "lo" not in counters:
        pytest.skip("no loopback interface counters on this machine")
    return counters["lo"].bytes_sent  # on lo every packet is sent once and received once


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def big() -> np.ndarray:
    # arange: every slice sum is an integer below 2**53, so sums are exact in any order
    return np.arange(BIG_LEN, dtype=np.float64)


@pytest.fixture(params=["network", "shared-memory"])
def data_path(request) -> str:
    """How data moves between processes of one machine: over TCP only (workers started
    with shared memory disabled, as if on other machines), or through shared memory."""
    return request.param


@pytest.fixture
def data_cluster(daemons, tmp_path, data_path) -> tuple[RunningCluster, Status]:
    """Two 1-slot workers, a Client, and the scheduler's status endpoint."""
    worker_env = {"JOBSCHED_SHARED_MEMORY": "0"} if data_path == "network" else None
    running = start_cluster(daemons, scheduler_args=("--dashboard-address", "127.0.0.1:0"), worker_env=worker_env)
    try:
        yield running, dashboard_of(running.address, tmp_path)
    finally:
        running.client.close()


# ------------------------------------------------------------------ the big array
@pytest.mark.timeout(300)
def test_200mb_array_to_64_tasks_on_2_workers_crosses_the_wire_once_per_worker(data_cluster, data_path, big):
    cluster, status = data_cluster
    n_workers = len(cluster.workers)
    expected = expected_sums(big, N_TASKS)
    sched_before, lo_before = status.bytes_moved(), lo_bytes()
    with parallel_config(backend="cluster", scheduler=cluster.client):
        results = Parallel(n_jobs=-1, batch_size=1)(delayed(slice_sum)(big, i, N_TASKS) for i in range(N_TASKS))
        held = data_held(cluster.client)
        segments = shm_segments()
    lo_moved, sched_moved = lo_bytes() - lo_before, status.bytes_moved() - sched_before

    print(f"loopback {lo_moved / MB:.0f} MB, through the scheduler {sched_moved / MB:.0f} MB, held {held}")
    assert results == expected
    info = workers_info(cluster.client)
    assert all(w["completed"] > 0 for w in info.values()), "both workers should have run tasks"
    # both held the one auto-scattered key (and only it) while the context was open
    assert held == {name: (1, held[name][1]) for name in held}, held
    assert all(b >= big.nbytes for _, b in held.values()), held
    if data_path == "network":
        # the bound, for everything that crossed loopback
        bound = 2 * (n_workers + 1) * big.nbytes
        assert lo_moved <= bound, f"{lo_moved / MB:.0f} MB crossed loopback, bound {bound / MB:.0f} MB"
        # the scheduler carried the array once (in from the client, out to one worker);
        # the other worker got its copy peer to peer
        assert sched_moved <= 2 * big.nbytes + 20 * MB, f"{sched_moved / MB:.0f} MB through the scheduler"
        assert sched_moved >= 2 * big.nbytes, "the array did not go through the scheduler: where did it come from?"
    else:
        # the client wrote it to /dev/shm once; both workers mapped that segment
        assert lo_moved <= 20 * MB, f"{lo_moved / MB:.0f} MB crossed loopback"
        assert sched_moved <= 20 * MB, f"{sched_moved / MB:.0f} MB through the scheduler"
        ours = {name: size for name, size in segments.items() if size >= big.nbytes}
        assert len(ours) == 1, segments
        assert not set(ours) & set(shm_segments()), "the segment outlived the context"


@pytest.mark.timeout(300)
def test_auto_scatter_is_deduplicated_across_calls_of_one_context(data_cluster, big):
    cluster, status = data_cluster
    expected = expected_sums(big, 16)
    before = status.bytes_moved()
    with parallel_config(backend="cluster", scheduler=cluster.client):
        first = Parallel(n_jobs=-1, batch_size=1)(delayed(slice_sum)(big, i, 16) for i in range(16))
        second = Parallel(n_jobs=-1)(delayed(slice_sum)(big, i, 16) for i in range(16))  # auto batching
        keys = cluster.client.scheduler_info()["data_keys"]
    moved = status.bytes_moved() - before
    assert first == expected and second == expected
    assert keys == 1, f"{keys} keys for one array"
    assert moved <= 2 * big.nbytes + 20 * MB, f"{moved / MB:.0f} MB through the scheduler for two calls"
    wait_data_freed(cluster.client)


@pytest.mark.timeout(120)
def test_small_arrays_are_not_scattered_automatically(data_cluster):
    cluster, _ = data_cluster
    small = np.arange(1000, dtype=np.float64)  # 8 kB, far below the 512 KiB default threshold
    with parallel_config(backend="cluster", scheduler=cluster.client):
        results = Parallel(n_jobs=-1)(delayed(total)(small) for _ in range(4))
        keys = cluster.client.scheduler_info()["data_keys"]
    assert results == [float(small.sum())] * 4
    assert keys == 0


@pytest.mark.timeout(180)
def test_auto_scatter_threshold_option(data_cluster):
    cluster, status = data_cluster
    X = np.arange(500_000, dtype=np.float64)  # 4 MB
    # disabled: nothing is scattered, the array goes in every batch
    with parallel_config(backend="cluster", scheduler=cluster.client, auto_scatter_threshold=0):
        assert Parallel(n_jobs=-1, batch_size=1)(delayed(total)(X) for _ in range(4)) == [float(X.sum())] * 4
        assert cluster.client.scheduler_info()["data_keys"] == 0
    # lowered: a 400 kB array is scattered
    Y = np.arange(50_000, dtype=np.float64)
    with parallel_config(backend="cluster", scheduler=cluster.client, auto_scatter_threshold=100_000):
        assert Parallel(n_jobs=-1, batch_size=1)(delayed(total)(Y) for _ in range(4)) == [float(Y.sum())] * 4
        assert cluster.client.scheduler_info()["data_keys"] == 1
    wait_data_freed(cluster.client)


# ------------------------------------------------------------------ explicit scatter
@pytest.mark.timeout(300)
def test_client_scatter_returns_a_reference_usable_as_a_task_argument(data_cluster, big):
    cluster, status = data_cluster
    client = cluster.client
    ref = client.scatter(big)
    assert isinstance(ref, ScatteredRef)
    assert ref.nbytes >= big.nbytes
    with parallel_config(backend="cluster", scheduler=client):
        results = Parallel(n_jobs=-1, batch_size=1)(delayed(slice_sum)(ref, i, 16) for i in range(16))
        described = Parallel(n_jobs=-1, batch_size=1)(delayed(describe)(ref) for _ in range(4))
    assert results == expected_sums(big, 16)
    for _pid, writeable, s, n in described:
        assert (writeable, s, n) == (False, float(big.sum()), BIG_LEN)  # the worker's read-only copy
    assert client.scheduler_info()["data_keys"] == 1, "the reference is alive: its data must stay"
    # the data outlives parallel_config contexts: it is freed with the reference
    with parallel_config(backend="cluster", scheduler=client):
        assert Parallel(n_jobs=-1)(delayed(total)(ref) for _ in range(2)) == [float(big.sum())] * 2
    del ref, described
    gc.collect()
    wait_data_freed(client)


@pytest.mark.timeout(300)
def test_client_scatter_broadcast_copies_to_every_worker_now(data_cluster, big):
    cluster, status = data_cluster
    client = cluster.client
    ref = client.scatter(big, broadcast=True)
    wait_held_everywhere(client, 1, big.nbytes)  # no task has asked for it yet
    before = status.bytes_moved()
    with parallel_config(backend="cluster", scheduler=client):
        results = Parallel(n_jobs=-1, batch_size=1)(delayed(slice_sum)(ref, i, 16) for i in range(16))
    moved = status.bytes_moved() - before
    assert results == expected_sums(big, 16)
    assert all(w["completed"] > 0 for w in workers_info(client).values())
    assert moved < 10 * MB, f"{moved / MB:.0f} MB through the scheduler although every worker held the data"
    del ref
    gc.collect()
    wait_data_freed(client)


@pytest.mark.timeout(300)
def test_scatter_keyword_sends_once_when_the_context_opens(data_cluster, big):
    cluster, status = data_cluster
    client = cluster.client
    y = np.arange(1000) % 3  # small objects are scattered too when listed
    with parallel_config(backend="cluster", scheduler=client, scatter=[big, y]):
        wait_held_everywhere(client, 2, big.nbytes)  # broadcast when the context opened
        before = status.bytes_moved()
        results = Parallel(n_jobs=-1, batch_size=1)(delayed(slice_sum)(big, i, 16) for i in range(16))
        described = Parallel(n_jobs=-1, batch_size=1)(delayed(describe)(big) for _ in range(4))
        labels = Parallel(n_jobs=-1, batch_size=1)(delayed(total)(y) for _ in range(4))
        moved = status.bytes_moved() - before
        assert client.scheduler_info()["data_keys"] == 2
    assert results == expected_sums(big, 16)
    assert labels == [float(y.sum())] * 4
    # tasks given the listed object (by identity) got the workers' read-only copies
    assert {(w, s, n) for _, w, s, n in described} == {(False, float(big.sum()), BIG_LEN)}
    assert moved < 10 * MB, f"{moved / MB:.0f} MB through the scheduler for data already on the workers"
    wait_data_freed(client)


@pytest.mark.timeout(120)
def test_scatter_keyword_matches_by_identity_not_equality(data_cluster):
    cluster, _ = data_cluster
    listed = np.arange(40_000, dtype=np.float64)  # 320 kB: below the auto-scatter threshold
    equal_copy = listed.copy()
    with parallel_config(backend="cluster", scheduler=cluster.client, scatter=[listed]):
        [(_, w_listed, s1, _)] = Parallel(n_jobs=-1)(delayed(describe)(listed) for _ in range(1))
        [(_, w_copy, s2, _)] = Parallel(n_jobs=-1)(delayed(describe)(equal_copy) for _ in range(1))
        assert cluster.client.scheduler_info()["data_keys"] == 1
    assert s1 == s2 == float(listed.sum())
    assert w_listed is False  # the scattered copy
    assert w_copy is True  # pickled into the batch: a private, writeable copy


def add_one_in_place(X) -> float:
    """Mutates its argument if it can; returns the sum it then sees."""
    try:
        X += 1
    except ValueError:  # read-only: the worker's shared copy
        pass
    return float(X.sum())


@pytest.mark.timeout(120)
def test_small_scattered_array_is_a_read_only_copy_that_tasks_cannot_corrupt(data_cluster):
    """Every task on a worker gets the same object for a scattered key (DATA_STORE): it
    must be read-only, whatever its size, or one task's in-place change leaks into the
    next tasks on that worker (and only that worker)."""
    cluster, _ = data_cluster
    y = np.arange(1000, dtype=np.float64)  # pickled in band (< 64 kB)
    with parallel_config(backend="cluster", scheduler=cluster.client, scatter=[y]):
        wait_held_everywhere(cluster.client, 1, 1)
        writeable = {w for _, w, _, _ in Parallel(n_jobs=-1, batch_size=1)(delayed(describe)(y) for _ in range(4))}
        seen = Parallel(n_jobs=-1, batch_size=1)(delayed(add_one_in_place)(y) for _ in range(6))
        after = Parallel(n_jobs=-1, batch_size=1)(delayed(total)(y) for _ in range(4))
    assert after == [float(y.sum())] * 4, f"tasks mutated the workers' shared copy: sums seen {seen}, then {after}"
    assert writeable == {False}


# ------------------------------------------------------------------ memory
@pytest.mark.timeout(600)
def test_ten_rounds_of_scatter_use_exit_leave_worker_memory_where_it_was(data_cluster, big):
    cluster, _ = data_cluster
    client = cluster.client
    with parallel_config(backend="cluster", scheduler=client):
        Parallel(n_jobs=-1, batch_size=1)(delayed(warm_up)(i) for i in range(8))
    pids = {name: w["pid"] for name, w in workers_info(client).items()}
    procs = {name: psutil.Process(pid) for name, pid in pids.items()}
    start = {name: p.memory_info().rss for name, p in procs.items()}
    expected = expected_sums(big, 8)
    peaks = {name: 0 for name in procs}
    for _ in range(10):
        with parallel_config(backend="cluster", scheduler=client, scatter=[big]):
            assert Parallel(n_jobs=-1, batch_size=1)(delayed(slice_sum)(big, i, 8) for i in range(8)) == expected
            for name, p in procs.items():
                peaks[name] = max(peaks[name], p.memory_info().rss)
        wait_data_freed(client)
    assert {name: w["pid"] for name, w in workers_info(client).items()} == pids, "a worker process was replaced"
    assert all(peaks[name] - start[name] > big.nbytes / 2 for name in procs), "the workers never held the data?"

    def within() -> bool:
        return all(p.memory_info().rss - start[name] < 100 * MB for name, p in procs.items())

    wait_until(within, 20, lambda: "worker memory grew: " + ", ".join(
        f"{name} {start[name] / MB:.0f} -> {p.memory_info().rss / MB:.0f} MB" for name, p in procs.items()))


# ------------------------------------------------------------------ failures
@pytest.mark.timeout(300)
def test_killing_a_worker_holding_the_data_mid_call_still_gives_correct_results(data_cluster, big, tmp_path):
    cluster, _ = data_cluster
    client = cluster.client
    marks = tmp_path / "marks"
    marks.mkdir()

    def call():
        with parallel_config(backend="cluster", scheduler=client):
            return Parallel(n_jobs=-1, batch_size=1)(
                delayed(slow_slice_sum)(big, i, 16, str(marks), 0.5) for i in range(16))

    pool, future = run_in_thread(call)
    with pool:
        victim_pid = find_mark(marks)
        victim = cluster.worker_of(victim_pid)
        wait_until(lambda: data_held(client)[victim.name][0] == 1, 10, "the worker running a task must hold its data")
        victim.kill()
        results = future.result(240)
    assert [s for _, s in results] == expected_sums(big, 16)
    survivor = [w for w in cluster.workers if w is not victim][0]
    assert list(workers_info(client)) == [survivor.name]


@pytest.mark.timeout(300)
def test_sole_holder_dies_and_the_data_comes_again_from_the_client(daemons, big, tmp_path):
    """The only worker holding a key dies mid-call; a new worker gets it from the client's copy."""
    sched = daemons.scheduler()
    first = daemons.worker(sched.address, name="first")
    marks = tmp_path / "marks"
    marks.mkdir()
    with jobsched.Client(sched.address, timeout=10) as client:
        wait_for_workers(client, ["first"])

        def call():
            with parallel_config(backend="cluster", scheduler=client, scatter=[big]):
                return Parallel(n_jobs=2, batch_size=1)(
                    delayed(slow_slice_sum)(big, i, 8, str(marks), 1.0) for i in range(8))

        pool, future = run_in_thread(call)
        with pool:
            find_mark(marks)
            wait_until(lambda: data_held(client)["first"][0] == 1, 10, "the worker running a task must hold its data")
            first.kill()  # the only copy on any worker is gone
            wait_until(lambda: "first" not in workers_info(client), 30, "the dead worker is still listed")
            assert not future.done()
            daemons.worker(sched.address, name="second")
            results = future.result(240)
        assert [s for _, s in results] == expected_sums(big, 8)
        wait_data_freed(client)


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    rows = np.random.RandomState(0).choice(len(X), 600, replace=False)
    return X[rows], y[rows]


def _searches():
    from scipy.stats import loguniform
    from sklearn.model_selection import GridSearchCV, RandomizedSearchCV
    from sklearn.svm import SVC

    return {
        "randomized": lambda n_jobs: RandomizedSearchCV(
            SVC(), {"C": loguniform(1e-2, 1e3), "gamma": loguniform(1e-4, 1e-1), "kernel": ["rbf", "poly"]},
            n_iter=8, cv=3, random_state=0, n_jobs=n_jobs),
        "grid": lambda n_jobs: GridSearchCV(
            SVC(), {"C": [0.1, 1.0, 10.0], "gamma": [1e-3, 1e-2]}, cv=3, n_jobs=n_jobs),
    }


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["randomized", "grid"])
def test_search_with_scatter_matches_the_serial_run(data_cluster, digits, kind):
    cluster, _ = data_cluster
    X, y = digits
    make = _searches()[kind]
    serial = make(1).fit(X, y)
    before = {name: w["completed"] for name, w in workers_info(cluster.client).items()}
    with parallel_config(backend="cluster", scheduler=cluster.client, scatter=[X, y]):
        wait_held_everywhere(cluster.client, 2, X.nbytes)
        search = make(-1).fit(X, y)
    assert_same_cv_results(search.cv_results_, serial.cv_results_)
    assert search.best_params_ == serial.best_params_
    assert search.best_score_ == serial.best_score_
    np.testing.assert_array_equal(search.predict(X), serial.predict(X))
    after = {name: w["completed"] for name, w in workers_info(cluster.client).items()}
    assert sum(after.values()) > sum(before.values()), "the fits did not run on the cluster"
    wait_data_freed(cluster.client)


# ------------------------------------------------------------------ freeing
@pytest.mark.timeout(300)
def test_data_is_freed_when_the_context_exits(data_cluster, big):
    cluster, _ = data_cluster
    client = cluster.client
    with parallel_config(backend="cluster", scheduler=client, scatter=[big]):
        wait_held_everywhere(client, 1, big.nbytes)
    # no gc.collect(): exiting the context is what frees the data
    wait_data_freed(client)
    # automatically scattered data too
    with parallel_config(backend="cluster", scheduler=client):
        Parallel(n_jobs=-1, batch_size=1)(delayed(slice_sum)(big, i, 4) for i in range(4))
        assert client.scheduler_info()["data_keys"] == 1
    wait_data_freed(client)
    # and the cluster serves the next context normally
    with parallel_config(backend="cluster", scheduler=client, scatter=[big]):
        assert Parallel(n_jobs=-1)(delayed(slice_sum)(big, i, 4) for i in range(4)) == expected_sums(big, 4)
    wait_data_freed(client)


@pytest.mark.timeout(300)
def test_data_is_freed_when_the_context_exits_on_an_error(data_cluster, big):
    cluster, _ = data_cluster
    client = cluster.client
    with pytest.raises(ZeroDivisionError):
        with parallel_config(backend="cluster", scheduler=client, scatter=[big]):
            wait_held_everywhere(client, 1, big.nbytes)
            1 / 0
    wait_data_freed(client)


@pytest.mark.timeout(300)
def test_data_is_freed_when_the_client_closes(data_cluster, big):
    cluster, _ = data_cluster
    other = jobsched.Client(cluster.address, timeout=10, set_as_current=False)
    try:
        ref = other.scatter(big, broadcast=True)
        with parallel_config(backend="cluster", scheduler=other, scatter=[np.arange(10.0)]):
            wait_held_everywhere(cluster.client, 2, big.nbytes)
            other.close()  # inside the context: nothing waits for the context to exit
            wait_data_freed(cluster.client)
        assert ref.nbytes >= big.nbytes  # the reference outlived its data: using it is an error now
    finally:
        other.close()
    wait_data_freed(cluster.client)


CLIENT_SCRIPT = textwrap.dedent("""
    import sys, time
    import numpy as np
    import jobsched
    client = jobsched.Client(sys.argv[1], timeout=10)
    ref = client.scatter(np.arange(6_250_000, dtype=np.float64), broadcast=True)  # 50 MB
    print("ready", flush=True)
    time.sleep(600)
""")


@pytest.mark.timeout(180)
def test_data_is_freed_when_the_client_dies(data_cluster, tmp_path):
    cluster, _ = data_cluster
    script = tmp_path / "client.py"
    script.write_text(CLIENT_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), cluster.address], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=daemon_env(),
                            cwd=tmp_path, start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.strip() == "ready", line + proc.stdout.read().decode()
        wait_held_everywhere(cluster.client, 1, 50 * MB)
        os.killpg(proc.pid, signal.SIGKILL)  # no goodbye: the connection just drops
        proc.wait(10)
        wait_data_freed(cluster.client)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


# ------------------------------------------------------------------ released data
@pytest.mark.timeout(60)
def test_released_reference_used_later_fails_with_a_clear_error(data_cluster):
    cluster, _ = data_cluster
    client = cluster.client
    ref = client.scatter(np.arange(1000.0))
    with parallel_config(backend="cluster", scheduler=client):
        assert Parallel(n_jobs=-1)(delayed(total)(ref) for _ in range(2)) == [499500.0] * 2
        client.release([ref.key])
        start = time.monotonic()
        with pytest.raises(LookupError, match="released|not available"):
            Parallel(n_jobs=-1)(delayed(total)(ref) for _ in range(2))
        assert time.monotonic() - start < 30
        # the cluster is still usable
        assert Parallel(n_jobs=-1)(delayed(total)(np.arange(4.0)) for _ in range(2)) == [6.0, 6.0]


@pytest.mark.timeout(60)
def test_reference_released_before_first_use_fails_with_a_clear_error(data_cluster):
    cluster, _ = data_cluster
    client = cluster.client
    ref = client.scatter(np.arange(1000.0))
    client.release([ref.key])
    with parallel_config(backend="cluster", scheduler=client):
        with pytest.raises(LookupError, match="released|not available"):
            Parallel(n_jobs=-1)(delayed(total)(ref) for _ in range(2))


@pytest.mark.timeout(120)
def test_reference_of_a_closed_client_fails_with_a_clear_error(data_cluster):
    cluster, _ = data_cluster
    other = jobsched.Client(cluster.address, timeout=10, set_as_current=False)
    ref = other.scatter(np.arange(1000.0), broadcast=True)
    wait_held_everywhere(cluster.client, 1, 8000)
    other.close()
    wait_data_freed(cluster.client)
    with parallel_config(backend="cluster", scheduler=cluster.client):
        with pytest.raises(LookupError, match="released|not available"):
            Parallel(n_jobs=-1)(delayed(total)(ref) for _ in range(2))
