"""The scheduler is no single point of failure: real daemons, real kills and freezes.

Each test asserts exact results and that nothing it started is left running (the
``pool`` fixture).  Recovery times are printed as ``RECOVERY`` lines (``pytest -s``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fault_tasks
import pytest
from joblib import Parallel, delayed, parallel_config
from support import DaemonPool, RunningCluster, by_name, daemon_env, run_in_thread, start_cluster, wait_until

import jobsched

DASHBOARD = ("--dashboard-address", "127.0.0.1:0")  # a free port: tests may run side by side


def recovery(name: str, seconds: float, detail: str) -> None:
    print(f"\nRECOVERY {name}: {seconds:.2f} s ({detail})", flush=True)


def cluster_with_restartable_scheduler(pool: DaemonPool, n_workers: int = 2, scheduler_args: tuple[str, ...] = (),
                                       **client_options: float) -> tuple[RunningCluster, int]:
    cluster = start_cluster(pool, n_workers, (*DASHBOARD, *scheduler_args), worker_args=("--death-timeout", "60"),
                            client_timeout=10, join_timeout=60)
    for name, value in client_options.items():
        setattr(cluster.client, name, value)
    return cluster, int(cluster.address.rsplit(":", 1)[1])


def restart_scheduler(pool: DaemonPool, cluster: RunningCluster, port: int, down: float,
                      *args: str) -> float:
    """SIGKILL the scheduler, start a new one on the same port ``down`` seconds later; returns
    when the old one died."""
    cluster.scheduler.kill()
    killed = time.monotonic()
    time.sleep(down)
    cluster.scheduler = pool.scheduler(*DASHBOARD, "--port", str(port), *args)
    assert cluster.scheduler.address == cluster.address
    return killed


def executions(directory: Path) -> dict[int, int]:
    """How many times each task ``i`` of ``fault_tasks.mark_then_sleep`` started."""
    counts: dict[int, int] = {}
    for path in fault_tasks.marks(directory, "task"):
        i = int(path.name.split("-")[1])
        counts[i] = counts.get(i, 0) + 1
    return counts


# ------------------------------------------------ 1. a search survives restarts
@pytest.mark.timeout(300)
@pytest.mark.parametrize("restarts", [1, 2])
def test_grid_search_with_scatter_survives_scheduler_restarts(pool, restarts):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import GridSearchCV
    from slow_estimators import SlowSVC

    X, y = load_digits(return_X_y=True)
    X, y = X[:600], y[:600]
    grid = {"C": [0.1, 1.0, 10.0, 100.0], "gamma": [1e-3, 1e-2, 3e-2]}  # 12 candidates x 3 folds
    serial = GridSearchCV(SlowSVC(), grid, cv=3, n_jobs=1).fit(X, y)
    cluster, port = cluster_with_restartable_scheduler(pool)
    client = cluster.client

    def search():
        with parallel_config(backend="cluster", scheduler=client, scatter=[X, y]):
            return GridSearchCV(SlowSVC(), grid, cv=3, n_jobs=-1).fit(X, y)

    executor, future = run_in_thread(search)
    downtimes = []
    with executor:
        for _ in range(restarts):
            # four more fits done under this scheduler (a new one counts from zero)
            wait_until(lambda: client.scheduler_info()["counters"].get("done:ok", 0) >= 4, 60,
                       "the search made no progress")
            killed = restart_scheduler(pool, cluster, port, 1.5)
            wait_until(lambda: {"w0", "w1"} <= set(by_name(client.scheduler_info())), 30,
                       "the workers did not come back")
            downtimes.append(time.monotonic() - killed)
        fitted = future.result(240)
    import numpy as np

    for key in ("params", "mean_test_score", "std_test_score", "rank_test_score"):
        assert list(map(str, fitted.cv_results_[key])) == list(map(str, serial.cv_results_[key])), key
    for split in range(3):
        np.testing.assert_array_equal(fitted.cv_results_[f"split{split}_test_score"],
                                      serial.cv_results_[f"split{split}_test_score"])
    assert fitted.best_params_ == serial.best_params_
    recovery(f"search-{restarts}-restarts", max(downtimes),
             f"kill to workers back, each restart {', '.join(f'{d:.1f} s' for d in downtimes)}")


# ----------------------- 2 and 3. what finished during the outage is not rerun
@pytest.mark.timeout(180)
@pytest.mark.parametrize(("seconds", "down", "count"), [
    (2.0, 3.0, 6),  # the two running batches end while the scheduler is down
    (6.0, 1.0, 4),  # the scheduler is back while the first two still run
], ids=["ended-during-the-outage", "still-running-after-it"])
def test_a_batch_running_when_the_scheduler_died_is_not_run_again(pool, tmp_path, seconds, down, count):
    cluster, port = cluster_with_restartable_scheduler(pool)
    client = cluster.client
    marks = tmp_path / "marks"

    def call():
        with parallel_config(backend="cluster", scheduler=client):
            return Parallel(n_jobs=2, batch_size=1)(
                delayed(fault_tasks.mark_then_sleep)(str(marks), i, seconds) for i in range(count))

    executor, future = run_in_thread(call)
    with executor:
        wait_until(lambda: len(executions(marks)) >= 2, 60, "the call never started")
        killed = restart_scheduler(pool, cluster, port, down)
        results = future.result(120)
        finished = time.monotonic() - killed
    assert [i for i, _ in results] == list(range(count))
    assert executions(marks) == {i: 1 for i in range(count)}, "a batch ran twice"
    log = cluster.scheduler.log()
    assert "invalid status" not in log, log

    # 3. the next call on the same Client just works
    with parallel_config(backend="cluster", scheduler=client):
        assert [sq for _, sq, _ in Parallel(n_jobs=2)(delayed(fault_tasks.tagged)(i) for i in range(30))] == [
            i * i for i in range(30)]
    recovery(f"kept-{seconds:g}s-batches-down-{down:g}s", finished,
             f"from SIGKILL to the call's end, {count} x {seconds:g} s batches, none rerun")


# --------------------------------------------------------- 4. a short freeze
@pytest.mark.timeout(180)
def test_a_scheduler_frozen_for_5_s_only_delays_the_call(pool, tmp_path):
    cluster, _ = cluster_with_restartable_scheduler(pool)
    client = cluster.client
    marks = tmp_path / "marks"

    def call():
        with parallel_config(backend="cluster", scheduler=client):
            return Parallel(n_jobs=2, batch_size=1)(
                delayed(fault_tasks.mark_then_sleep)(str(marks), i, 0.5) for i in range(12))

    executor, future = run_in_thread(call)
    with executor:
        wait_until(lambda: len(executions(marks)) >= 2, 60, "the call never started")
        cluster.scheduler.signal(signal.SIGSTOP)
        time.sleep(5.0)
        cluster.scheduler.signal(signal.SIGCONT)
        resumed = time.monotonic()
        results = future.result(120)
        finished = time.monotonic() - resumed
    assert [i for i, _ in results] == list(range(12))
    assert executions(marks) == {i: 1 for i in range(12)}
    recovery("freeze-5s", finished, "from SIGCONT to the call's end")


# ------------------------------------------------------ 5. frozen for good
@pytest.mark.timeout(180)
def test_a_scheduler_frozen_for_good_fails_the_call_within_the_bound(pool, tmp_path):
    heartbeat_timeout, reconnect_timeout = 3.0, 4.0
    cluster, _ = cluster_with_restartable_scheduler(pool)
    client = jobsched.Client(cluster.address, timeout=5, heartbeat_timeout=heartbeat_timeout,
                             reconnect_timeout=reconnect_timeout)
    marks = tmp_path / "marks"

    def call():
        with parallel_config(backend="cluster", scheduler=client):
            return Parallel(n_jobs=2, batch_size=1)(
                delayed(fault_tasks.mark_then_sleep)(str(marks), i, 30.0) for i in range(4))

    try:
        executor, future = run_in_thread(call)
        with executor:
            wait_until(lambda: len(executions(marks)) >= 2, 60, "the call never started")
            cluster.scheduler.signal(signal.SIGSTOP)
            frozen = time.monotonic()
            with pytest.raises(jobsched.SchedulerUnreachableError, match=r"could not reconnect for \d+ s"):
                future.result(60)
            failed = time.monotonic() - frozen
    finally:
        client.close()
        cluster.scheduler.signal(signal.SIGCONT)
    bound = heartbeat_timeout + reconnect_timeout + 2.0  # plus ticks and a loaded machine
    assert failed < bound, f"took {failed:.1f} s, documented bound {bound:.0f} s"
    recovery("frozen-for-good", failed, f"SIGSTOP to SchedulerUnreachableError; heartbeat_timeout "
             f"{heartbeat_timeout:g} + reconnect_timeout {reconnect_timeout:g}")


@pytest.mark.timeout(180)
def test_a_vanished_client_has_its_batches_dropped_within_the_heartbeat_timeout(pool, tmp_path):
    """A client frozen by SIGSTOP keeps its TCP connection open and sends nothing, as one whose
    machine vanished: the scheduler must drop its batches and data on its own."""
    cluster, _ = cluster_with_restartable_scheduler(pool, scheduler_args=("--heartbeat-timeout", "3"))
    client = subprocess.Popen([sys.executable, "-m", "fault_tasks", "client", cluster.address, str(tmp_path)],
                              env=daemon_env(), start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: (tmp_path / "ready").exists(), 60, "the client never started its call")
        wait_until(lambda: cluster.client.scheduler_info()["tasks"] >= 2, 30, "its batches never arrived")
        os.killpg(client.pid, signal.SIGSTOP)
        frozen = time.monotonic()
        wait_until(lambda: cluster.client.scheduler_info()["clients"] == 1, 20,
                   "the frozen client was never dropped")
        dropped = time.monotonic() - frozen
        wait_until(lambda: cluster.client.scheduler_info()["tasks"] == 0, 20, "its batches stayed")
        wait_until(lambda: cluster.client.scheduler_info()["data_keys"] == 0, 20, "its data stayed")
    finally:
        os.killpg(client.pid, signal.SIGKILL)
        client.wait(10)
    assert dropped < 3.0 + 2.0
    recovery("vanished-client", dropped, "SIGSTOP of a client to its batches dropped (--heartbeat-timeout 3)")


# --------------------------------------------------- 6. workers paused by memory
@pytest.mark.timeout(180)
def test_a_call_that_only_paused_workers_could_run_fails_with_a_clear_error(pool, tmp_path):
    limit_mib = 400
    cluster = start_cluster(pool, 1, (*DASHBOARD, "--paused-timeout", "3"), nthreads=2,
                            worker_args=("--memory-limit", f"{limit_mib}MiB"), client_timeout=10, join_timeout=60)
    marks = tmp_path / "marks"
    started = time.monotonic()
    with parallel_config(backend="cluster", scheduler=cluster.client):
        with pytest.raises(jobsched.ClusterError, match="paused by its memory limit") as failure:
            # the first task holds 85% of the limit for 60 s: the worker pauses, the rest wait on it
            Parallel(n_jobs=2, batch_size=1)(
                delayed(fault_tasks.hold_memory)(str(marks), int(0.85 * limit_mib), 60.0) if i == 0
                else delayed(fault_tasks.tagged)(i, 1.0) for i in range(10))
    ended = time.monotonic() - started
    assert "w0" in str(failure.value) and f"of its {limit_mib} MiB limit" in str(failure.value), failure.value
    assert ended < 45, f"the call took {ended:.0f} s to fail"
    recovery("all-workers-paused", ended, "call start to the clear error (--paused-timeout 3)")


@pytest.mark.timeout(240)
def test_scattered_data_that_fills_a_workers_memory_mark_is_shed_and_the_next_call_runs(pool):
    """Scattered data alone pushes the only worker over its pause mark.  Once no batch of its
    own needs that data any more, the scheduler takes the copy back, the worker resumes, and
    the next call of the same context runs instead of waiting for ``--paused-timeout``."""
    import numpy as np

    limit_mib, held_mib = 900, 700
    cluster = start_cluster(pool, 1, (*DASHBOARD, "--paused-timeout", "60"), nthreads=2,
                            worker_args=("--memory-limit", f"{limit_mib}MiB"),
                            worker_env={"JOBSCHED_SHARED_MEMORY": "0"},  # private memory: it counts
                            client_timeout=10, join_timeout=60)
    big = np.ones(held_mib * 2**20 // 8)
    with parallel_config(backend="cluster", scheduler=cluster.client, scatter=[big]):
        assert Parallel(n_jobs=2)(delayed(np.sum)(big) for _ in range(2)) == [float(big.size)] * 2
        wait_until(lambda: any(e["kind"] == "data-shed" for e in cluster.client.scheduler_info()["events"]), 30,
                   "the paused worker's copy of the data was never taken back")
        started = time.monotonic()
        assert Parallel(n_jobs=2)(delayed(pow)(i, 2) for i in range(20)) == [i * i for i in range(20)]
        took = time.monotonic() - started
        # and a call that needs the data again gets it back
        assert Parallel(n_jobs=2)(delayed(np.sum)(big) for _ in range(2)) == [float(big.size)] * 2
    assert took < 30, f"the call after the shed took {took:.0f} s"
    events = [e["text"] for e in cluster.client.scheduler_info()["events"] if e["kind"] == "data-shed"]
    recovery("data-shed", took, f"next call after {held_mib} MiB of scattered data paused the worker; {events[0]}")
