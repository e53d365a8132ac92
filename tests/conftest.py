"""Fixtures of every layer, and the layer markers.

The tests are grouped by layer, one folder each, and each test gets that folder's marker
(``pytest -m unit`` runs the fast layer):

- ``unit/``: no sockets, no subprocesses (protocol, state machines, serialization, config);
- ``integration/``: real daemons as subprocesses on 127.0.0.1, real TCP;
- ``e2e/``: scikit-learn estimators on a cluster compared with a serial run.

The daemon fixtures below run real jobsched daemons as subprocesses on 127.0.0.1.  Every
daemon gets a random free port (``--port 0`` plus a scheduler file), its own process group
(``start_new_session=True``) and a log file in ``tmp_path``.  At teardown each group gets
SIGTERM, then SIGKILL after a timeout: processes are ended by process group id, never by
name.  A failing test prints the daemons' logs.  The helpers these fixtures use, and that
tests use directly, are in ``support.py``.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator

import pytest
from support import LAYERS, TESTS_DIR, DaemonPool, RunningCluster, Status, dashboard_of, start_cluster

from jobsched.client import backend as backend_module
from jobsched.client import client as client_module


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its layer: the folder of tests/ it is in."""
    for item in items:
        try:
            layer = item.path.resolve().relative_to(TESTS_DIR).parts[0]
        except ValueError:  # a test from elsewhere (a path given on the command line)
            continue
        if layer in LAYERS:
            item.add_marker(getattr(pytest.mark, layer))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def daemons(request, tmp_path) -> Iterator[DaemonPool]:
    """Factory for daemons; everything it started is ended at teardown."""
    pool = DaemonPool(tmp_path)
    try:
        yield pool
    finally:
        pool.close()
        rep = getattr(request.node, "rep_call", None)
        if rep is None or rep.failed:
            print(pool.report())


@pytest.fixture
def scheduler(daemons) -> Callable[..., tuple[str, subprocess.Popen]]:
    """``scheduler(*args, secret=None)`` -> (address, proc) of a running scheduler."""

    def start(*args: str, secret: str | None = None) -> tuple[str, subprocess.Popen]:
        d = daemons.scheduler(*args, secret=secret)
        return d.address, d.proc

    return start


@pytest.fixture
def worker(daemons) -> Callable[..., subprocess.Popen]:
    """``worker(address, *args, name=None, nthreads=1, secret=None)`` -> proc of a worker."""

    def start(address: str, *args: str, **kwargs) -> subprocess.Popen:
        return daemons.worker(address, *args, **kwargs).proc

    return start


@pytest.fixture
def cluster(daemons) -> Iterator[RunningCluster]:
    """A scheduler plus two ``--nthreads 1`` workers, both joined, and a connected Client."""
    running = start_cluster(daemons)
    try:
        yield running
    finally:
        running.client.close()


@pytest.fixture(params=["network", "shared-memory"])
def data_path(request) -> str:
    """How data moves between processes of one machine: over TCP only (workers started
    with shared memory disabled, as if on other machines), or through shared memory."""
    return request.param


@pytest.fixture
def data_cluster(daemons, data_path) -> Iterator[tuple[RunningCluster, Status]]:
    """Two 1-slot workers, a Client, and the scheduler's status endpoint, once per ``data_path``."""
    worker_env = {"JOBSCHED_SHARED_MEMORY": "0"} if data_path == "network" else None
    running = start_cluster(daemons, scheduler_args=("--dashboard-address", "127.0.0.1:0"), worker_env=worker_env)
    try:
        yield running, dashboard_of(running.scheduler)
    finally:
        running.client.close()


@pytest.fixture(autouse=True, scope="session")
def _session_config_home(tmp_path_factory) -> Iterator[None]:
    """``XDG_CONFIG_HOME`` for the fixtures wider than one test (set up before any of them): no
    scheduler started by the tests writes its default secret among the developer's files."""
    saved = os.environ.get("XDG_CONFIG_HOME")
    os.environ["XDG_CONFIG_HOME"] = str(tmp_path_factory.mktemp("config-home"))
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("XDG_CONFIG_HOME", None)
        else:
            os.environ["XDG_CONFIG_HOME"] = saved


@pytest.fixture(autouse=True)
def _config_home(tmp_path_factory, monkeypatch) -> str:
    """A ``XDG_CONFIG_HOME`` of each test's own: a scheduler started without a secret creates
    its private default secret there, and the test's workers and clients (which inherit the
    environment) find it there; no two tests share one, nor the developer's."""
    path = tmp_path_factory.mktemp("config-home")  # beside tmp_path: tests may list that folder
    monkeypatch.setenv("XDG_CONFIG_HOME", str(path))
    return str(path)


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Close every Client a test left open, including those the backend creates for
    ``parallel_config(scheduler=address)`` and the embedded local cluster, so no test
    inherits another's "current" Client (and no LocalCluster outlives its test)."""
    yield
    with client_module._open_lock:
        clients = [ref() for ref in client_module._open_clients]
        client_module._open_clients.clear()
    with backend_module._shared_lock:
        clients += list(backend_module._shared_clients.values())
        backend_module._shared_clients.clear()
    for client in clients:
        if client is not None:
            client.close()
