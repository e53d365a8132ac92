"""pytest plugin: run every joblib call of a test session on one backend, with ``n_jobs=-1``.

Used to run scikit-learn's own test modules on jobsched's ``'cluster'`` backend
(and, for comparison, on ``'loky'``)::

    PYTHONPATH=tests python -m pytest -p sklearn_cluster_plugin --joblib-backend cluster \\
        .../site-packages/sklearn/model_selection/tests/test_search.py

With ``--joblib-backend cluster`` (the default; also ``JOBSCHED_SUITE_BACKEND``)
an embedded ``LocalCluster`` (a scheduler and one worker process per core, on
127.0.0.1) is started once per session, and an autouse fixture wraps every test
in ``parallel_config(backend="cluster", scheduler=<its Client>, n_jobs=-1)``:
every ``Parallel`` whose ``n_jobs`` is left to the configuration (scikit-learn's
``n_jobs=None``) uses every slot of the cluster.  A test that sets its own
backend or ``n_jobs`` keeps it, and joblib runs ``n_jobs=1`` calls in the
caller whatever the backend.  Other backends (``loky``, ``threading``,
``sequential``) get ``parallel_config(backend=<name>, n_jobs=-1)``.

At the end the terminal summary says how many batches ran on the cluster, so a
run that silently stayed local is visible.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from joblib import parallel_config

BACKENDS = ("cluster", "loky", "threading", "sequential")
_stats: dict[str, int] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("jobsched", "run every joblib call on one backend")
    group.addoption(
        "--joblib-backend",
        default=os.environ.get("JOBSCHED_SUITE_BACKEND", "cluster"),
        choices=BACKENDS,
        help="backend for every joblib call, with n_jobs=-1 (default: cluster, an embedded LocalCluster)",
    )
    group.addoption(
        "--jobsched-workers",
        type=int,
        default=None,
        help="worker processes of the embedded LocalCluster (default: one per core)",
    )


def pytest_report_header(config: pytest.Config) -> str:
    return f"joblib: every call on backend={config.getoption('joblib_backend')!r} with n_jobs=-1"


@pytest.fixture(scope="session")
def joblib_suite_client(request: pytest.FixtureRequest) -> Iterator[object]:
    """The session's jobsched Client over an embedded LocalCluster (None for other backends)."""
    if request.config.getoption("joblib_backend") != "cluster":
        yield None
        return
    import jobsched

    cluster = jobsched.LocalCluster(request.config.getoption("jobsched_workers"))
    try:
        client = jobsched.Client(cluster, set_as_current=False)
        try:
            yield client
            workers = client.scheduler_info()["workers"].values()
            _stats["completed"] = sum(w["completed"] for w in workers)
            _stats["workers"] = len(workers)
        finally:
            client.close()
    finally:
        cluster.close()


@pytest.fixture(autouse=True)
def _every_joblib_call_on_the_backend(request: pytest.FixtureRequest, joblib_suite_client) -> Iterator[None]:
    backend = request.config.getoption("joblib_backend")
    if backend == "cluster":
        config = parallel_config(backend="cluster", scheduler=joblib_suite_client, n_jobs=-1)
    else:
        config = parallel_config(backend=backend, n_jobs=-1)
    with config:
        yield


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    if config.getoption("joblib_backend") == "cluster" and _stats:
        terminalreporter.write_line(
            f"jobsched: {_stats.get('completed', 0)} batches completed on {_stats.get('workers', 0)} "
            "cluster workers (still connected at the end)"
        )
