"""Fixtures that run real jobsched daemons as subprocesses on 127.0.0.1.

Every daemon gets a random free port (``--port 0`` plus a scheduler file), its
own process group (``start_new_session=True``) and a log file in ``tmp_path``.
At teardown each group gets SIGTERM, then SIGKILL after a timeout: processes
are ended by process group id, never by name.  A failing test prints the
daemons' logs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from jobsched.client import backend as backend_module
from jobsched.client import client as client_module

import jobsched

TESTS_DIR = Path(__file__).resolve().parent
# where test modules live: pytest imports each under its file's name with that folder on
# sys.path, and workers unpickle the task functions some define by that name too
TEST_DIRS = [TESTS_DIR, *(TESTS_DIR / layer for layer in ("unit", "integration", "e2e"))]
BIN_DIR = Path(sys.executable).parent
STARTUP_TIMEOUT = 20.0

def daemon_env(secret: str | None = None) -> dict[str, str]:
    """Environment for a daemon: no inherited JOBSCHED_* settings, ``tasks`` importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBSCHED_")}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, TEST_DIRS), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    # daemons shut down on their own if this test process dies (no leftovers)
    env["JOBSCHED_PARENT_PID"] = str(os.getpid())
    if secret is not None:
        env["JOBSCHED_SECRET"] = secret
    return env


@dataclass
class Daemon:
    """One daemon subprocess, the leader of its own process group."""

    kind: str
    proc: subprocess.Popen
    log_path: Path
    address: str = ""
    name: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def process_tree(self) -> set[int]:
        """The daemon's pid and its descendants' (a worker runs its worker processes
        as children of a supervisor, unless started with --no-nanny)."""
        try:
            root = psutil.Process(self.proc.pid)
            return {root.pid, *(c.pid for c in root.children(recursive=True))}
        except psutil.NoSuchProcess:
            return set()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        """Signal the daemon's process group (if it still runs)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def kill(self) -> None:
        """SIGKILL the process group and reap the daemon."""
        self.signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM the process group, SIGKILL it after ``timeout``; returns the exit status."""
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            return self.proc.wait(10)

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout)


class DaemonPool:
    """Starts daemons for one test and ends every one of them at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.daemons: list[Daemon] = []
        self._count = 0

    def spawn(self, kind: str, module: str, args: list[str], env: dict[str, str]) -> Daemon:
        self._count += 1
        log_path = self.tmp_path / f"{self._count:02d}-{kind}.log"
        home = self.tmp_path / "home"  # no ~/.config/jobsched/jobsched.toml of the developer's
        home.mkdir(exist_ok=True)
        env = {**env, "HOME": str(home)}
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.tmp_path,
                start_new_session=True,
            )
        daemon = Daemon(kind, proc, log_path)
        self.daemons.append(daemon)
        return daemon

    def scheduler(self, *args: str, secret: str | None = None, env: dict[str, str] | None = None,
                  wait: bool = True) -> Daemon:
        """Start ``jobsched-scheduler --port 0 --scheduler-file ...`` and wait until it listens."""
        path = self.tmp_path / f"scheduler-{self._count + 1}.json"
        argv = ["--port", "0", "--scheduler-file", str(path), *args]
        daemon = self.spawn("scheduler", "jobsched.scheduler", argv, env or daemon_env(secret))
        if wait:
            deadline = time.monotonic() + STARTUP_TIMEOUT
            while not path.exists():
                if daemon.proc.poll() is not None:
                    raise RuntimeError(f"scheduler exited with {daemon.proc.returncode}:\n{daemon.log()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"scheduler did not start:\n{daemon.log()}")
                time.sleep(0.02)
            daemon.address = json.loads(path.read_text())["address"]
        return daemon

    def worker(self, address: str, *args: str, name: str | None = None, nthreads: int = 1,
               secret: str | None = None, env: dict[str, str] | None = None) -> Daemon:
        """Start ``jobsched-worker ADDRESS --nthreads N --name NAME``."""
        name = name or f"worker-{self._count + 1}"
        argv = [address, "--nthreads", str(nthreads), "--name", name, *args]
        daemon = self.spawn("worker", "jobsched.worker", argv, env or daemon_env(secret))
        daemon.address = address
        daemon.name = name
        return daemon

    def close(self) -> None:
        for daemon in reversed(self.daemons):
            daemon.signal(signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        for daemon in self.daemons:
            try:
                daemon.proc.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                daemon.kill()

    def report(self) -> str:
        parts = []
        for daemon in self.daemons:
            parts.append(f"----- {daemon.kind} {daemon.name} pid={daemon.pid} rc={daemon.proc.poll()} "
                         f"({daemon.log_path.name}) -----\n{daemon.log()}")
        return "\n".join(parts)


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


def wait_until(predicate: Callable, timeout: float, message: str | Callable[[], str], interval: float = 0.05):
    """Poll ``predicate`` until it returns something truthy, and return that; AssertionError
    naming ``message`` (text, or a function giving it) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout} s: {text}")
        time.sleep(interval)


def wait_for_workers(client: jobsched.Client, names: list[str], timeout: float = 30.0) -> dict:
    """Wait until workers with these names are registered; returns their info by name."""
    deadline = time.monotonic() + timeout
    while True:
        workers = {w["name"]: w for w in client.scheduler_info()["workers"].values()}
        if all(n in workers for n in names):
            return workers
        if time.monotonic() > deadline:
            raise TimeoutError(f"workers {names} did not join; joined: {sorted(workers)}")
        time.sleep(0.05)


@dataclass
class RunningCluster:
    """A scheduler, its workers and a connected ``Client`` (the current one)."""

    client: jobsched.Client
    scheduler: Daemon
    workers: list[Daemon] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.scheduler.address

    def task_pids(self) -> set[int]:
        """The pids of the worker processes registered with the scheduler now."""
        return {w["pid"] for w in self.client.scheduler_info()["workers"].values()}

    def worker_of(self, pid: int) -> Daemon:
        """The worker daemon whose process tree holds ``pid``."""
        for daemon in self.workers:
            if pid in daemon.process_tree():
                return daemon
        raise AssertionError(f"pid {pid} belongs to no worker daemon of this cluster")


def start_cluster(daemons: DaemonPool, n_workers: int = 2, scheduler_args: tuple[str, ...] = (),
                  nthreads: int = 1, worker_env: dict[str, str] | None = None) -> RunningCluster:
    sched = daemons.scheduler(*scheduler_args)
    env = {**daemon_env(), **worker_env} if worker_env else None
    workers = [daemons.worker(sched.address, name=f"w{i}", nthreads=nthreads, env=env) for i in range(n_workers)]
    client = jobsched.Client(sched.address, timeout=10)
    try:
        wait_for_workers(client, [w.name for w in workers])
    except BaseException:
        client.close()
        raise
    return RunningCluster(client, sched, workers)


@pytest.fixture
def cluster(daemons) -> Iterator[RunningCluster]:
    """A scheduler plus two ``--nthreads 1`` workers, both joined, and a connected Client."""
    running = start_cluster(daemons)
    try:
        yield running
    finally:
        running.client.close()


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


def assert_same_cv_results(actual: dict, expected: dict) -> int:
    """A search's ``cv_results_`` equal to a reference run's, exactly, except the timing keys;
    returns how many keys were compared."""
    import numpy as np

    assert set(actual) == set(expected)
    compared = 0
    for key in sorted(k for k in expected if not k.endswith("_time")):
        a, e = actual[key], expected[key]
        if isinstance(e, np.ma.MaskedArray):
            assert isinstance(a, np.ma.MaskedArray), key
            np.testing.assert_array_equal(np.ma.getmaskarray(a), np.ma.getmaskarray(e), err_msg=key)
            assert a.compressed().tolist() == e.compressed().tolist(), key
        elif isinstance(e, np.ndarray):
            assert a.dtype == e.dtype, key
            np.testing.assert_array_equal(a, e, err_msg=key)  # exact, not approximate
        else:
            assert a == e, key
        compared += 1
    return compared


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True if the peer closes the connection within ``timeout`` (whatever it sent before)."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        if not data:
            return True
