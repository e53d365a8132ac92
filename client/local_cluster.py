"""``LocalCluster``: a real scheduler and worker daemons as subprocesses on 127.0.0.1."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from ..payload.shm import sweep_stale_segments


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class LocalCluster:
    """A scheduler and ``n_workers`` worker daemons on loopback, owned by this process.

    ``n_workers`` defaults to the number of cores, each worker with
    ``threads_per_worker`` threads.  The daemons authenticate with a fresh
    random secret, so other users of the machine cannot submit work to them,
    and they exit on their own if this process dies.
    """

    def __init__(
        self,
        n_workers: int | None = None,
        threads_per_worker: int = 1,
        *,
        startup_timeout: float = 60.0,
        log_level: str = "WARNING",
    ) -> None:
        if n_workers is not None and n_workers < 0:
            raise ValueError(f"n_workers must be >= 0, got {n_workers}")
        if threads_per_worker < 1:
            raise ValueError(f"threads_per_worker must be >= 1, got {threads_per_worker}")
        self.n_workers = available_cores() if n_workers is None else n_workers
        self.threads_per_worker = threads_per_worker
        self.secret = secrets.token_hex(32)
        self.log_level = log_level
        self._dir = tempfile.mkdtemp(prefix="jobsched-")
        self.processes: list[subprocess.Popen] = []
        self.address = ""
        self.dashboard = ""  # http://127.0.0.1:PORT of the scheduler's status page
        # the worker supervisor's --name; its processes are named as worker/cli.py does (NAME-i
        # with more than one), which _repr_html_ shows
        self._worker_name = f"local-{os.getpid()}"
        try:
            self._start(startup_timeout)
        except BaseException:
            self.close()
            raise

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["JOBSCHED_SECRET"] = self.secret
        env["JOBSCHED_PARENT_PID"] = str(os.getpid())
        env["JOBSCHED_DAEMON"] = "1"  # see jobsched/__init__.py: daemons skip importing joblib
        # workers unpickle functions by module name: let them import what this process can
        paths = [os.path.abspath(p or os.curdir) for p in sys.path]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths + env.get("PYTHONPATH", "").split(os.pathsep)))
        for variable in ("JOBSCHED_SECRET_FILE", "JOBSCHED_TOKEN", "JOBSCHED_TOKEN_FILE", "JOBSCHED_USERS_FILE"):
            env.pop(variable, None)  # its own secret only: no users, nothing of a cluster this process may use
        return env

    def _spawn(self, module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args, "--log-level", self.log_level],
            env=env or self._env(),
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: close() ends it and its children
        )
        self.processes.append(proc)
        return proc

    def _start(self, timeout: float) -> None:
        """Start the scheduler and the workers at once; the workers wait for the scheduler file."""
        path = os.path.join(self._dir, "scheduler.json")
        scheduler = self._spawn(
            "jobsched.scheduler", "--host", "127.0.0.1", "--port", "0", "--scheduler-file", path,
            "--dashboard-address", "127.0.0.1:0",
        )
        if self.n_workers:
            # one supervisor running n_workers processes; it restarts any that crash, and caps
            # their BLAS/OpenMP threads so that workers x threads <= cores
            self._spawn(
                "jobsched.worker", "--scheduler-file", path, "--nworkers", str(self.n_workers),
                "--nthreads", str(self.threads_per_worker), "--name", self._worker_name,
                "--death-timeout", "10", "--drain-timeout", "5",
            )
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if scheduler.poll() is not None:
                raise RuntimeError(f"the local scheduler exited at start with status {scheduler.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the local scheduler did not start within {timeout:.0f} s")
            time.sleep(0.01)
        with open(path) as f:
            written = json.load(f)
        self.address, self.dashboard = written["address"], written.get("dashboard", "")

    def close(self, timeout: float = 5.0) -> None:
        """End every daemon (SIGTERM, then SIGKILL after ``timeout``) and remove the temp dir."""
        for proc in reversed(self.processes):
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.processes:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        self.processes = []
        shutil.rmtree(self._dir, ignore_errors=True)
        # a worker killed with its resource tracker (the SIGKILL above) leaves its shared segments
        sweep_stale_segments()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LocalCluster({self.address!r}, workers={self.n_workers}, threads_per_worker={self.threads_per_worker})"

    def _repr_html_(self) -> str:
        """Jupyter's view: address, dashboard link, workers and slots (as started; a Client shows live counts)."""
        from .html_repr import html

        names = [self._worker_name] if self.n_workers == 1 else [f"{self._worker_name}-{i}" for i in range(self.n_workers)]
        workers = {name: {"name": name, "address": "", "nthreads": self.threads_per_worker}
                   for name in (names if self.processes else [])}
        return html("LocalCluster", self.address, self.dashboard, {"workers": workers},
                    "" if self.processes else "closed")


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
