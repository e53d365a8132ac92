"""Tasks behave as if they ran locally (issue 8), with real daemons.

What a task warns, prints and logs is captured on the worker and replayed in
the caller; exceptions keep their type and attributes; scikit-learn's config
is in force in the tasks; BLAS/OpenMP pools are not oversubscribed.

The task functions and the custom warning/exception classes are module-level,
so workers import this module by name (``support.daemon_env`` puts this folder on
their PYTHONPATH) and the caller resolves the same classes.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg  # noqa: F401  (its BLAS is loaded when workers import this module)
from joblib import Parallel, delayed, parallel_config
from support import RunningCluster, daemon_env, wait_for_workers
from tasks import square

import jobsched
from jobsched.client.local_cluster import available_cores
from jobsched.worker.cli import THREAD_LIMIT_VARS

sklearn = pytest.importorskip("sklearn")
from sklearn.exceptions import ConvergenceWarning, FitFailedWarning, UnsetMetadataPassedError  # noqa: E402

LOGGER_NAME = "jobsched_tests.task"


# ------------------------------------------------------------------ classes the tasks use
class LabWarning(UserWarning):
    """A warning class defined in the test module (the caller can import it)."""


class KeywordOnlyFailure(Exception):
    """Plain pickling calls ``cls(*args)``, which fails: every argument is keyword-only."""

    def __init__(self, *, code: int, detail: dict) -> None:
        super().__init__(f"failure {code}")
        self.code = code
        self.detail = detail


# ------------------------------------------------------------------ task functions
WARN_LINE = 0  # set below: the line of the warnings.warn call in warn()


def warn(category_name: str, message: str) -> str:
    category = {"UserWarning": UserWarning, "LabWarning": LabWarning, "RuntimeWarning": RuntimeWarning}[category_name]
    warnings.warn(message, category, stacklevel=1)  # WARN_LINE
    return message


def warn_three_times(i: int) -> int:
    for _ in range(3):
        warnings.warn("same place, same text", UserWarning, stacklevel=1)
    return i


def warn_unknown_class(message: str) -> None:
    """A category the caller cannot import: made up on the worker."""
    category = type("EphemeralWarning", (UserWarning,), {"__module__": "no_such_module_anywhere"})
    warnings.warn(message, category, stacklevel=1)


def fit_unconverged(seed: int) -> int:
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    X, y = load_iris(return_X_y=True)
    LogisticRegression(max_iter=1).fit(X, y)  # ConvergenceWarning
    return seed


def print_lines(n: int, text: str = "x" * 90) -> int:
    for i in range(n):
        print(f"line {i:06d} {text}")
    return n


def print_and_write_stderr(i: int) -> int:
    print(f"out {i}")
    print(f"err {i}", file=sys.stderr)
    return i


def print_then_fail(message: str) -> None:
    print("printed before the error")
    raise ValueError(message)


def log_records(i: int) -> int:
    logger = logging.getLogger(LOGGER_NAME)
    logger.warning("disk %s is %d%% full", "sda", 91)
    logger.info("info record %d", i)
    logger.error("error record %d", i)
    return i


def blas_threads() -> tuple[int, list[tuple[str, str, int]]]:
    """(pid, the thread pools of the libraries loaded here): numpy's and scipy's BLAS and
    scikit-learn's OpenMP are loaded when this module is imported, before the task runs."""
    from threadpoolctl import threadpool_info

    np.dot(np.ones((50, 50)), np.ones((50, 50)))
    time.sleep(0.3)  # so that the tasks of one worker overlap
    return os.getpid(), [(i["user_api"], i["internal_api"], i["num_threads"]) for i in threadpool_info()]


def sklearn_config() -> dict:
    return dict(sklearn.get_config())


def raise_keyword_only(code: int) -> None:
    raise KeywordOnlyFailure(code=code, detail={"code": code, "where": "task"})


def raise_unset_metadata() -> None:
    raise UnsetMetadataPassedError(
        message="[sample_weight] are passed but are not explicitly set as requested or not requested",
        unrequested_params={"sample_weight": [1, 2]},
        routed_params={"fit": {"a": 1}},
    )


WARN_LINE = next(i for i, line in enumerate(Path(__file__).read_text().splitlines(), 1) if line.endswith("# WARN_LINE"))


# ------------------------------------------------------------------ helpers
def on_cluster(cluster: RunningCluster, **options):
    return parallel_config(backend="cluster", scheduler=cluster.client, **options)


def run(cluster: RunningCluster, func, args_list, **options) -> list:
    with on_cluster(cluster, **options):
        return Parallel(n_jobs=-1, batch_size=1)(delayed(func)(*args) for args in args_list)


# ------------------------------------------------------------------ warnings
@pytest.mark.timeout(60)
def test_user_warning_is_caught_by_pytest_warns(cluster: RunningCluster):
    with pytest.warns(UserWarning, match="^careful: 42$") as record:
        assert run(cluster, warn, [("UserWarning", "careful: 42")]) == ["careful: 42"]
    [w] = [w for w in record if str(w.message) == "careful: 42"]
    assert w.category is UserWarning
    assert w.filename == __file__  # the task's file and line, as a local run shows
    assert w.lineno == WARN_LINE


@pytest.mark.timeout(120)
def test_convergence_warning_is_caught_by_pytest_warns(cluster: RunningCluster):
    with pytest.warns(ConvergenceWarning) as record:
        assert run(cluster, fit_unconverged, [(0,)]) == [0]
    assert any(w.category is ConvergenceWarning for w in record)


@pytest.mark.timeout(120)
def test_convergence_warning_of_sklearn_n_jobs(cluster: RunningCluster):
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    X, y = load_iris(return_X_y=True)
    with on_cluster(cluster), pytest.warns(ConvergenceWarning):
        cross_val_score(LogisticRegression(max_iter=1), X, y, cv=3, n_jobs=-1)


@pytest.mark.timeout(60)
def test_custom_warning_class_of_the_test_module_is_caught_by_pytest_warns(cluster: RunningCluster):
    with pytest.warns(LabWarning, match="lab says hi") as record:
        run(cluster, warn, [("LabWarning", "lab says hi")])
    [w] = list(record)
    assert w.category is LabWarning  # the caller's class, not a stand-in
    assert isinstance(w.message, LabWarning)


@pytest.mark.timeout(60)
def test_warning_class_unknown_to_the_caller_arrives_as_user_warning(cluster: RunningCluster):
    with pytest.warns(UserWarning) as record:
        run(cluster, warn_unknown_class, [("made up on the worker",)])
    [w] = list(record)
    assert w.category is UserWarning
    assert "EphemeralWarning" in str(w.message) and "made up on the worker" in str(w.message)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("category_name, category", [("UserWarning", UserWarning), ("LabWarning", LabWarning)])
def test_simplefilter_error_raises_in_the_caller(cluster: RunningCluster, category_name, category):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(category, match="now an error"):
            run(cluster, warn, [(category_name, "now an error")])
    # the cluster is fine afterwards
    with pytest.warns(UserWarning):
        assert run(cluster, warn, [("UserWarning", "again")]) == ["again"]


@pytest.mark.timeout(60)
def test_caller_filters_ignore_and_once_per_location_as_locally(cluster: RunningCluster):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("ignore")
        run(cluster, warn, [("UserWarning", "ignored")])
    assert record == []

    def recorded(backend_options: dict) -> list:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("default")  # once per location and text
            with parallel_config(**backend_options):
                Parallel(n_jobs=-1, batch_size=1)(delayed(warn_three_times)(i) for i in range(4))
        return [(w.category, str(w.message), os.path.basename(w.filename), w.lineno) for w in record]

    local = recorded({"backend": "sequential"})
    assert len(local) == 1  # 12 warnings at one place: shown once
    assert recorded({"backend": "cluster", "scheduler": cluster.client}) == local


# ------------------------------------------------------------------ GridSearchCV(verbose=3)
TIME_FIELD = re.compile(r"(total )?time=\s*[\d.]+\s*(s|min)")
DOTS = re.compile(r"\.{3,}")


def normalized_lines(text: str) -> Counter:
    return Counter(DOTS.sub("...", TIME_FIELD.sub("time=T", line)).rstrip() for line in text.splitlines() if line.strip())


def failing_search(n_jobs: int):
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    # C=-1.0 fails parameter validation in fit: 3 of 9 fits fail
    return GridSearchCV(SVC(), {"C": [-1.0, 0.5, 1.0]}, cv=3, verbose=3, error_score=np.nan, n_jobs=n_jobs)


@pytest.mark.timeout(180)
def test_grid_search_verbose_lines_and_fit_failed_warning_match_the_serial_run(cluster: RunningCluster, capsys):
    from sklearn.datasets import load_iris

    X, y = load_iris(return_X_y=True)

    def fit(n_jobs: int) -> tuple[Counter, Counter, str]:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            failing_search(n_jobs).fit(X, y)
        captured = capsys.readouterr()
        found = Counter((w.category.__name__, str(w.message)) for w in record)
        return normalized_lines(captured.out), found, captured.err

    serial_out, serial_warnings, serial_err = fit(1)
    with on_cluster(cluster):
        cluster_out, cluster_warnings, cluster_err = fit(-1)

    end_lines = [line for line in serial_out if "END" in line]
    assert sum(serial_out[line] for line in end_lines) == 9, serial_out  # one per fit
    assert any("score=nan" in line for line in end_lines)
    assert any(category == "FitFailedWarning" for category, _ in serial_warnings)
    assert cluster_out == serial_out
    assert cluster_warnings == serial_warnings
    assert cluster_err == serial_err
    workers = cluster.client.scheduler_info()["workers"].values()
    assert sum(w["completed"] for w in workers) > 0, "the fits did not run on the cluster"


@pytest.mark.timeout(180)
def test_fit_failed_warning_is_caught_by_pytest_warns(cluster: RunningCluster, capsys):
    from sklearn.datasets import load_iris

    X, y = load_iris(return_X_y=True)
    with on_cluster(cluster), pytest.warns(FitFailedWarning, match="3 fits failed out of a total of 9"):
        with pytest.warns(UserWarning, match="non-finite"):
            failing_search(-1).fit(X, y)
    assert "[CV 1/3] END" in capsys.readouterr().out


# ------------------------------------------------------------------ output
@pytest.mark.timeout(60)
def test_task_output_reaches_the_caller_stdout_and_stderr(cluster: RunningCluster, capsys):
    run(cluster, print_and_write_stderr, [(i,) for i in range(4)])
    captured = capsys.readouterr()
    assert sorted(captured.out.splitlines()) == [f"out {i}" for i in range(4)]
    assert sorted(captured.err.splitlines()) == [f"err {i}" for i in range(4)]


@pytest.mark.timeout(60)
def test_output_of_a_failing_task_comes_back_with_its_error(cluster: RunningCluster, capsys):
    with pytest.raises(ValueError, match="broken"):
        run(cluster, print_then_fail, [("broken",)])
    assert "printed before the error" in capsys.readouterr().out


@pytest.mark.timeout(120)
def test_print_loop_past_the_default_cap_is_truncated_with_a_note(cluster: RunningCluster, capsys):
    n = 30_000  # 30,000 lines of 102 bytes: about 3 MB, past the 1 MiB default
    assert run(cluster, print_lines, [(n,)]) == [n]
    captured = capsys.readouterr()
    assert captured.out.startswith("line 000000 ")
    assert len(captured.out.encode()) <= 1 << 20
    assert len(captured.out.encode()) > (1 << 20) - 200
    assert f"line {n - 1:06d}" not in captured.out
    assert "truncated" in captured.err and str(1 << 20) in captured.err


@pytest.mark.timeout(60)
def test_output_cap_option(cluster: RunningCluster, capsys):
    assert run(cluster, print_lines, [(100,)], output_cap=1000) == [100]
    captured = capsys.readouterr()
    assert captured.out.startswith("line 000000 ")
    assert len(captured.out) <= 1000
    assert "truncated at 1000 bytes" in captured.err
    # under the cap: nothing cut, no note
    run(cluster, print_lines, [(5,)], output_cap=1000)
    captured = capsys.readouterr()
    assert captured.out.count("\n") == 5 and captured.err == ""


@pytest.mark.timeout(60)
def test_output_cap_counts_bytes_not_characters(cluster: RunningCluster, capsys):
    # "output_cap=bytes": three-byte characters must not let 3x the cap through
    run(cluster, print_lines, [(100, "€" * 30)], output_cap=1000)
    captured = capsys.readouterr()
    assert "truncated" in captured.err
    assert len(captured.out.encode("utf-8")) <= 1000, f"{len(captured.out.encode('utf-8'))} bytes kept for a 1000-byte cap"


# ------------------------------------------------------------------ logging
class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def task_logger():
    logger = logging.getLogger(LOGGER_NAME)
    handler = ListHandler()
    logger.addHandler(handler)
    old_level = logger.level
    try:
        yield logger, handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


@pytest.mark.timeout(60)
def test_task_logging_warning_reaches_a_handler_attached_in_the_caller(cluster: RunningCluster, task_logger):
    logger, handler = task_logger
    logger.setLevel(logging.DEBUG)
    run(cluster, log_records, [(0,)])
    got = [(r.name, r.levelno, r.getMessage()) for r in handler.records]
    # WARNING and up by default: the info record stays on the worker
    assert got == [(LOGGER_NAME, logging.WARNING, "disk sda is 91% full"), (LOGGER_NAME, logging.ERROR, "error record 0")]
    assert handler.records[0].funcName == "log_records"
    assert handler.records[0].pathname == __file__


@pytest.mark.timeout(60)
def test_forward_logging_level_option(cluster: RunningCluster, task_logger):
    logger, handler = task_logger
    logger.setLevel(logging.DEBUG)
    run(cluster, log_records, [(1,)], forward_logging=logging.INFO)
    assert [r.getMessage() for r in handler.records] == ["disk sda is 91% full", "info record 1", "error record 1"]
    handler.records.clear()
    run(cluster, log_records, [(2,)], forward_logging=logging.ERROR)
    assert [r.getMessage() for r in handler.records] == ["error record 2"]


@pytest.mark.timeout(60)
def test_caller_logger_level_still_applies(cluster: RunningCluster, task_logger):
    logger, handler = task_logger
    logger.setLevel(logging.ERROR)
    run(cluster, log_records, [(3,)])
    assert [r.getMessage() for r in handler.records] == ["error record 3"]


# ------------------------------------------------------------------ switching each off
@pytest.mark.timeout(60)
def test_capture_output_off(cluster: RunningCluster, capsys):
    run(cluster, print_and_write_stderr, [(7,)], capture_output=False)
    captured = capsys.readouterr()
    assert "out 7" not in captured.out and "err 7" not in captured.err
    # it went to the worker's own stdout/stderr (its log file here)
    deadline = time.monotonic() + 10
    while not any("out 7" in w.log() for w in cluster.workers):
        assert time.monotonic() < deadline, "the output went nowhere"
        time.sleep(0.1)


@pytest.mark.timeout(60)
def test_capture_warnings_off(cluster: RunningCluster):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert run(cluster, warn, [("UserWarning", "stays on the worker")], capture_warnings=False) == [
            "stays on the worker"]
    assert [str(w.message) for w in record] == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("off", [False, None])
def test_forward_logging_off(cluster: RunningCluster, task_logger, off):
    logger, handler = task_logger
    logger.setLevel(logging.DEBUG)
    run(cluster, log_records, [(4,)], forward_logging=off)
    assert handler.records == []


# ------------------------------------------------------------------ threads
def assert_thread_limit(results: list, limit: int) -> None:
    assert os.getpid() not in {pid for pid, _ in results}, "the tasks ran in the caller, not on a worker"
    pools = [pool for _, info in results for pool in info if pool[0] in ("blas", "openmp")]
    assert pools, "no BLAS/OpenMP pool was loaded in the tasks"
    assert all(n <= limit for _, _, n in pools), f"pools {sorted(set(pools))}, limit {limit}"


def unlimited_env() -> dict[str, str]:
    """A daemon environment without inherited BLAS/OpenMP thread settings."""
    env = daemon_env()
    for var in THREAD_LIMIT_VARS:
        env.pop(var, None)
    return env


@pytest.mark.timeout(120)
def test_worker_with_two_slots_limits_blas_threads_to_half_the_cores(daemons):
    cores = available_cores()
    sched = daemons.scheduler()
    daemons.worker(sched.address, name="two-slots", nthreads=2, env=unlimited_env())
    with jobsched.Client(sched.address, timeout=10) as client:
        wait_for_workers(client, ["two-slots"])
        with parallel_config(backend="cluster", scheduler=client):
            infos = Parallel(n_jobs=-1, batch_size=1)(delayed(blas_threads)() for _ in range(4))
    assert_thread_limit(infos, max(cores // 2, 1))


@pytest.mark.timeout(120)
def test_local_cluster_with_two_threads_per_worker_limits_blas_threads(monkeypatch):
    cores = available_cores()
    for var in THREAD_LIMIT_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PYTHONPATH", daemon_env()["PYTHONPATH"])  # the workers import this module
    with jobsched.Client(n_workers=1, threads_per_worker=2, set_as_current=False) as client:
        with parallel_config(backend="cluster", scheduler=client):
            infos = Parallel(n_jobs=-1, batch_size=1)(delayed(blas_threads)() for _ in range(4))
    assert_thread_limit(infos, max(cores // 2, 1))


@pytest.mark.timeout(120)
def test_inner_max_num_threads_is_honoured(daemons):
    # two 1-slot workers: each may use every core, unless inner_max_num_threads says otherwise
    # (one slot in all would make joblib run the call in the caller: n_jobs=1)
    sched = daemons.scheduler()
    for name in ("a", "b"):
        daemons.worker(sched.address, name=name, nthreads=1, env=unlimited_env())
    with jobsched.Client(sched.address, timeout=10) as client:
        wait_for_workers(client, ["a", "b"])
        with parallel_config(backend="cluster", scheduler=client, inner_max_num_threads=1):
            infos = Parallel(n_jobs=-1, batch_size=1)(delayed(blas_threads)() for _ in range(4))
    assert_thread_limit(infos, 1)


# ------------------------------------------------------------------ sklearn config
@pytest.mark.timeout(60)
def test_sklearn_config_context_is_in_force_in_tasks(cluster: RunningCluster):
    [default] = run(cluster, sklearn_config, [()])
    assert default["assume_finite"] is False
    with sklearn.config_context(assume_finite=True, working_memory=123):
        [inside] = run(cluster, sklearn_config, [()])
    assert inside["assume_finite"] is True
    assert inside["working_memory"] == 123
    [after] = run(cluster, sklearn_config, [()])
    assert after["assume_finite"] is False and after["working_memory"] == default["working_memory"]


# ------------------------------------------------------------------ exceptions
@pytest.mark.timeout(60)
def test_keyword_only_constructor_exception_keeps_type_message_and_attributes(cluster: RunningCluster):
    with pytest.raises(KeywordOnlyFailure, match="^failure 7$") as info:
        run(cluster, raise_keyword_only, [(7,)])
    error = info.value
    assert type(error) is KeywordOnlyFailure
    assert error.code == 7
    assert error.detail == {"code": 7, "where": "task"}
    assert "raise_keyword_only" in str(error.__cause__)  # the remote traceback


@pytest.mark.timeout(60)
def test_sklearn_unset_metadata_passed_error_keeps_type_and_attributes(cluster: RunningCluster):
    with pytest.raises(UnsetMetadataPassedError, match="sample_weight") as info:
        run(cluster, raise_unset_metadata, [()])
    error = info.value
    assert type(error) is UnsetMetadataPassedError
    assert error.unrequested_params == {"sample_weight": [1, 2]}
    assert error.routed_params == {"fit": {"a": 1}}


# ------------------------------------------------------------------ no call hangs (found with scikit-learn's suite)
def run_with_deadline(target, seconds: float) -> tuple[bool, list]:
    """Run ``target(out)`` in a daemon thread; returns (finished in time, out).  A daemon
    thread, so that a hung call cannot keep the test process from exiting."""
    out: list = []

    def body() -> None:
        try:
            out.append(("ok", target()))
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            out.append(("error", exc))

    thread = threading.Thread(target=body, name="call-under-test", daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive(), out


@pytest.mark.timeout(120)
def test_managed_parallel_still_works_after_an_inner_call_on_the_same_backend(cluster: RunningCluster):
    """scikit-learn's test_custom_run_search: BaseSearchCV.fit runs ``with parallel:`` and its
    _run_search fits another search, i.e. a second Parallel on the same backend instance
    (the one parallel_config holds) starts and ends inside the managed one."""

    def call():
        with on_cluster(cluster):
            with Parallel(n_jobs=2) as outer:
                first = outer(delayed(square)(i) for i in range(50))
                inner = Parallel(n_jobs=2)(delayed(square)(i) for i in range(50))
                again = outer(delayed(square)(i) for i in range(50))
        return first, inner, again

    finished, out = run_with_deadline(call, 60)
    assert finished, "the call hung: the managed Parallel's next call never ends"
    [(status, value)] = out
    expected = [i * i for i in range(50)]
    assert status == "ok", value
    assert value == (expected, expected, expected)


@pytest.mark.timeout(120)
def test_batch_that_cannot_be_pickled_raises_in_the_caller_instead_of_hanging(cluster: RunningCluster):
    """Batches after the first pre_dispatch ones are pickled on the client's callback thread;
    an unpicklable one there must fail the call (loky: PicklingError), not hang it."""

    def items():
        for i in range(10):
            yield delayed(square)(i)
        yield delayed(square)(threading.Lock())

    def call():
        with on_cluster(cluster):
            return Parallel(n_jobs=2, batch_size=1)(items())

    finished, out = run_with_deadline(call, 60)
    assert finished, "the call hung on a batch that could not be pickled"
    [(status, value)] = out
    assert status == "error" and "pickle" in str(value).lower(), value
    # the first batches (dispatched from the caller's thread) fail the same way
    with on_cluster(cluster), pytest.raises(Exception, match="(?i)pickle"):
        Parallel(n_jobs=2, batch_size=1)([delayed(square)(threading.Lock())])
