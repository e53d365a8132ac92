"""Plain helpers shared by the tests: every one is defined here once (the fixtures are in the
``conftest.py`` files).

- daemons as subprocesses: ``daemon_env``, ``Daemon``, ``DaemonPool``, ``RunningCluster``, ``run_cli``,
  ``start_cluster``, waiting (``wait_until``, ``wait_for_workers``, ``wait_for_mark``) and
  ``run_in_thread`` for a joblib call that a test interferes with;
- the wire, for tests that speak to a daemon over a raw socket: frame and message bytes,
  hellos and challenges, ``pump_handshake`` (both handshake machines in memory), ``raw_connect``, ``send_frame``, ``read_frame``,
  ``authenticated_socket``, ``closed_by_peer``;
- the scheduler's HTTP side (``http_get``, ``Status``), shared memory and loopback counters;
- scikit-learn results compared with a serial run (``assert_same_search``);
- ``SchedulerSim``, the pure scheduler state machine driven event by event.

``tests/`` is on ``sys.path`` (pyproject's ``pythonpath``) and on the daemons' PYTHONPATH,
so ``import support`` works in the test process and in a worker that imports a test module
(to unpickle a task function defined there).  Processes are ended by process group id,
never by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import tasks
from joblib import Parallel, delayed, parallel_config

import jobsched
from jobsched.payload.shm import SHM_DIR
from jobsched.protocol import (
    PREAUTH_LIMITS,
    Frame,
    FrameDecoder,
    FrameLimits,
    HandshakeError,
    InitiatorHandshake,
    Role,
    encode_frame,
)
from jobsched.protocol import handshake as hs
from jobsched.protocol import messages as m
from jobsched.protocol.address import parse_address
from jobsched.protocol.messages import PROTOCOL_VERSION
from jobsched.runtime.secret import load_credentials
from jobsched.scheduler.records import CLIENT, WORKER
from jobsched.scheduler.state import (
    MAX_NAME,
    MessageReceived,
    PeerConnected,
    PeerDisconnected,
    SchedulerConfig,
    SchedulerState,
    Send,
)

TESTS_DIR = Path(__file__).resolve().parent
LAYERS = ("unit", "integration", "e2e")  # the folders of tests/, one per layer (and pytest marker)
# where test modules live: pytest imports each under its file's name with that folder on
# sys.path, and workers unpickle the task functions some define by that name too
TEST_DIRS = [TESTS_DIR, *(TESTS_DIR / layer for layer in LAYERS)]
BIN_DIR = Path(sys.executable).parent
STARTUP_TIMEOUT = 20.0
MB = 10**6


def _checkout_of_jobsched() -> list[str]:
    """The checkout this process imported jobsched from (``[]`` for an installed copy), so that
    daemons run the same code as the test process however pytest was started."""
    root = Path(jobsched.__file__).resolve().parents[1]
    return [str(root)] if (root / "protocol" / "framing.py").is_file() else []


# ====================================================================== daemons
def daemon_env(secret: str | None = None) -> dict[str, str]:
    """Environment for a daemon: no inherited JOBSCHED_* settings; this jobsched, ``tasks`` and
    the test modules importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBSCHED_")}
    env["PYTHONPATH"] = os.pathsep.join(
        [*_checkout_of_jobsched(), *map(str, TEST_DIRS), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
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
    info: dict = field(default_factory=dict)  # a scheduler's scheduler file: address, dashboard

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


def run_cli(module: str, *args: str, env: dict[str, str], timeout: float = 30.0, **popen) -> tuple[int, str, str]:
    """Run ``python -m module args`` in its own process group; returns (status, stdout, stderr).

    A run that does not end within ``timeout`` is a hang: its group is killed and the test fails.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=env, start_new_session=True, **popen,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{module} {' '.join(args)} did not exit within {timeout} s:\n{out}\n{err}") from None
    finally:
        if proc.poll() is None:  # pragma: no cover - only on an unexpected exception
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode, out, err


def exit_status(daemon: Daemon, timeout: float, what: str) -> int:
    """The exit status of a daemon that must exit by itself; AssertionError naming ``what``
    (with the daemon's log) if it still runs after ``timeout`` seconds."""
    try:
        return daemon.wait_exit(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{what}:\n{daemon.log()}") from None


class DaemonPool:
    """Starts daemons for one test (or module) and ends every one of them in ``close``."""

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
        """Start ``jobsched-scheduler --port 0 --scheduler-file ...`` and wait until it listens
        (its address and the rest of the scheduler file are then in ``address`` and ``info``)."""
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
            daemon.info = json.loads(path.read_text())
            daemon.address = daemon.info["address"]
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


def by_name(info: dict) -> dict[str, dict]:
    """The workers of a ``scheduler_info()`` (or ``/api/status``) by name."""
    return {w["name"]: w for w in info["workers"].values()}


def wait_for_workers(client: jobsched.Client, names: list[str], timeout: float = 30.0) -> dict:
    """Wait until workers with these names are registered; returns their info by name."""
    deadline = time.monotonic() + timeout
    while True:
        workers = by_name(client.scheduler_info())
        if all(n in workers for n in names):
            return workers
        if time.monotonic() > deadline:
            raise TimeoutError(f"workers {names} did not join; joined: {sorted(workers)}")
        time.sleep(0.05)


def wait_for_mark(directory: Path, timeout: float = 20.0) -> int:
    """The pid in the first ``started-<pid>`` mark a task (``tasks.mark_started``) leaves in ``directory``."""
    marks = wait_until(lambda: sorted(directory.glob("started-*")), timeout, f"no task started ({directory})")
    return int(marks[0].name.split("-", 1)[1])


def run_in_thread(fn: Callable, *args) -> tuple[ThreadPoolExecutor, Future]:
    """Run ``fn(*args)`` in a helper thread; returns (executor, future).  joblib's configuration
    is thread-local, so ``fn`` must enter its own ``parallel_config``."""
    pool = ThreadPoolExecutor(1)
    return pool, pool.submit(fn, *args)


def batches_completed(client: jobsched.Client) -> int:
    """How many batches the workers registered now have completed."""
    return sum(w["completed"] for w in client.scheduler_info()["workers"].values())


def squares(client: jobsched.Client, n: int = 20) -> list[int]:
    """``tasks.square`` of ``range(n)`` on the cluster: a call that must keep working."""
    with parallel_config(backend="cluster", scheduler=client):
        return Parallel(n_jobs=-1)(delayed(tasks.square)(i) for i in range(n))


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


def start_cluster(daemons: DaemonPool, n_workers: int = 2, scheduler_args: tuple[str, ...] = (), *,
                  worker_args: tuple[str, ...] = (), nthreads: int = 1, worker_env: dict[str, str] | None = None,
                  client_timeout: float = 10.0, join_timeout: float = 30.0) -> RunningCluster:
    """A scheduler and ``n_workers`` workers named ``w0``, ``w1``..., all joined, and a Client
    (the caller closes it)."""
    sched = daemons.scheduler(*scheduler_args)
    env = {**daemon_env(), **worker_env} if worker_env else None
    workers = [daemons.worker(sched.address, *worker_args, name=f"w{i}", nthreads=nthreads, env=env)
               for i in range(n_workers)]
    client = jobsched.Client(sched.address, timeout=client_timeout)
    try:
        wait_for_workers(client, [w.name for w in workers], timeout=join_timeout)
    except BaseException:
        client.close()
        raise
    return RunningCluster(client, sched, workers)


# ===================================================================== the wire
HELLO = struct.Struct(f"!8sHBB{hs.NONCE_SIZE}sB")  # magic, version, role, credential, nonce, user length; the user
CHALLENGE = struct.Struct(f"!8sHBB{hs.NONCE_SIZE}s{hs.MAC_SIZE}s")  # magic, version, status, credential, nonce, MAC


def frame_bytes(body: bytes, buffers=()) -> bytes:
    """One frame as contiguous bytes."""
    return b"".join(bytes(p) for p in encode_frame(body, buffers))


def message_bytes(msg: m.Message) -> bytes:
    """A message's frame as contiguous bytes."""
    return b"".join(bytes(p) for p in m.encode(msg))


def hello_body(version: int = PROTOCOL_VERSION, role: int = Role.CLIENT, credential: int = hs.Credential.SECRET,
               nonce: bytes | None = None, user: bytes = b"tester") -> bytes:
    """An initiator's hello, with any field chosen."""
    return HELLO.pack(hs.MAGIC, version, role, credential, nonce or os.urandom(hs.NONCE_SIZE), len(user)) + user


def is_hello(body: bytes) -> bool:
    """Whether ``body`` has the shape of a hello (the fixed fields, then as many bytes of user name as they say)."""
    return len(body) >= HELLO.size and body[:8] == hs.MAGIC and len(body) == HELLO.size + body[HELLO.size - 1]


def challenge_body(version: int = PROTOCOL_VERSION, status: int = 0, credential: int = hs.Credential.SECRET) -> bytes:
    """An acceptor's challenge with a random nonce and MAC (a forgery: no secret behind it)."""
    return CHALLENGE.pack(hs.MAGIC, version, status, credential, os.urandom(hs.NONCE_SIZE), os.urandom(hs.MAC_SIZE))


def parse_challenge(body: bytes) -> tuple[int, int, bytes, bytes, str]:
    """(version, status, nonce, MAC, reason) of an acceptor's challenge."""
    magic, version, status, _has_secret, nonce, mac = CHALLENGE.unpack_from(body)
    assert magic == hs.MAGIC
    return version, status, nonce, mac, body[CHALLENGE.size:].decode("utf-8", "replace")


def pump_handshake(ini: InitiatorHandshake, acc: hs.AcceptorHandshake,
                   transcript: list | None = None) -> tuple[HandshakeError | None, HandshakeError | None]:
    """Run the two handshake machines against each other in memory, as ``protocol.aio`` does;
    returns (initiator error, acceptor error), appending ("i->a" or "a->i", frame) to ``transcript``.

    The acceptor sends its refusal frame and closes; the initiator, when it gives up,
    sends its ``abort_frame`` (if any) and closes.
    """
    ini_err: HandshakeError | None = None
    acc_err: HandshakeError | None = None
    to_acc: bytes = ini.hello()
    for _ in range(10):
        if transcript is not None:
            transcript.append(("i->a", to_acc))
        try:
            to_ini = acc.receive(to_acc)
        except HandshakeError as exc:
            assert acc.failure is exc
            return ini_err, exc
        acc_err = acc.failure
        if transcript is not None:
            transcript.append(("a->i", to_ini))
        try:
            reply = ini.receive(to_ini)
        except HandshakeError as exc:
            ini_err = exc
            if ini.abort_frame and acc_err is None:
                try:
                    acc.receive(ini.abort_frame)
                except HandshakeError as exc2:
                    acc_err = exc2
            return ini_err, acc_err
        if acc_err is not None:
            return ini_err, acc_err  # the acceptor closed after its refusal
        if reply is None:
            return None, None
        to_acc = reply
    raise AssertionError("handshake did not terminate")


def raw_connect(address: str) -> socket.socket:
    """A plain TCP connection to a daemon on 127.0.0.1."""
    addr = parse_address(address)
    assert addr.host == "127.0.0.1"
    return socket.create_connection((addr.host, addr.port), timeout=10)


def send_frame(sock: socket.socket, body: bytes) -> None:
    sock.sendall(frame_bytes(body))


def read_frame(sock: socket.socket, decoder: FrameDecoder, timeout: float = 10.0) -> Frame:
    """The next frame from ``sock``: it must come alone, within ``timeout``."""
    sock.settimeout(timeout)
    while True:
        data = sock.recv(1 << 20)
        if not data:
            raise ConnectionError("closed by the peer")
        frames = decoder.feed(data)
        if frames:
            assert len(frames) == 1
            return frames[0]


def read_message(sock: socket.socket, decoder: FrameDecoder, timeout: float = 10.0) -> m.Message:
    """The next message other than the scheduler's heartbeats (it beats every second)."""
    while True:
        message = m.decode(read_frame(sock, decoder, timeout))
        if type(message) is not m.Heartbeat:
            return message


def authenticated_socket(address: str, secret: bytes | None = None, role: Role = Role.CLIENT, *,
                         token: str | None = None) -> tuple[socket.socket, FrameDecoder]:
    """A raw socket past the handshake (not registered yet), and its decoder, now with the
    limits of an authenticated peer.  Without a secret or token, the credentials a Client
    would find (e.g. the default secret a scheduler started without one created)."""
    if secret is None and token is None:
        secret, token = load_credentials()
    sock = raw_connect(address)
    initiator = InitiatorHandshake(role, secret, PROTOCOL_VERSION, token=token)
    decoder = FrameDecoder(PREAUTH_LIMITS)
    send_frame(sock, initiator.hello())
    proof = initiator.receive(read_frame(sock, decoder).body)
    assert proof is not None
    send_frame(sock, proof)
    assert initiator.receive(read_frame(sock, decoder).body) is None and initiator.done
    decoder.limits = FrameLimits()
    return sock, decoder


def registered_client_socket(address: str, secret: bytes | None = None, *,
                             token: str | None = None) -> tuple[socket.socket, FrameDecoder]:
    """A raw socket past the handshake and registered as a client."""
    sock, decoder = authenticated_socket(address, secret, token=token)
    sock.sendall(message_bytes(m.RegisterClient("raw-client", os.getpid(), "test")))
    welcome = read_message(sock, decoder)
    assert type(welcome) is m.Welcome
    return sock, decoder


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


def write_file(path: Path, text: str) -> str:
    """Write ``text`` to ``path``, creating its folders; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def private_file(path: Path, content: bytes | str, mode: int = 0o600) -> str:
    """Write ``content`` to ``path`` with ``mode`` (a secret file); returns the path."""
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    os.chmod(path, mode)
    return str(path)


# ============================================================ HTTP, memory, network
_no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float = 10.0) -> tuple[int, str, str]:
    """(status, content type, body) of a GET, without any proxy from the environment."""
    try:
        with _no_proxy.open(url, timeout=timeout) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


class Status:
    """The scheduler's ``/api/status`` (dashboard) endpoint."""

    def __init__(self, url: str) -> None:
        self.url = url

    def get(self) -> dict:
        code, _, body = http_get(self.url + "/api/status")
        assert code == 200, body
        return json.loads(body)

    def bytes_moved(self) -> int:
        """Bytes the scheduler received and sent on its connections so far."""
        status = self.get()
        return int(status["bytes_received"]) + int(status["bytes_sent"])


def dashboard_of(scheduler: Daemon) -> Status:
    """The status endpoint of a scheduler started with ``--dashboard-address``."""
    url = scheduler.info.get("dashboard")
    assert url, f"the scheduler file names no dashboard: {scheduler.info}"
    return Status(url)


def shm_segments() -> dict[str, int]:
    """jobsched's shared memory segments on this machine: name -> size."""
    found = {}
    for path in Path(SHM_DIR).glob("jobsched-*"):
        with contextlib.suppress(OSError):
            found[path.name] = path.stat().st_size
    return found


def shm_path(name: str) -> str:
    """The file of the shared memory segment ``name``."""
    return os.path.join(SHM_DIR, name)


def lo_bytes() -> int:
    """Bytes sent on the loopback interface so far (skips the test where it has no counters)."""
    counters = psutil.net_io_counters(pernic=True)
    if "lo" not in counters:
        pytest.skip("no loopback interface counters on this machine")
    return counters["lo"].bytes_sent  # on lo every packet is sent once and received once


def data_held(client: jobsched.Client) -> dict[str, tuple[int, int]]:
    """(data_keys, data_bytes) per worker name."""
    return {name: (w["data_keys"], w["data_bytes"]) for name, w in by_name(client.scheduler_info()).items()}


def wait_data_freed(client: jobsched.Client, timeout: float = 30.0) -> None:
    """Wait until neither the scheduler nor any worker holds scattered data."""
    def freed() -> bool:
        info = client.scheduler_info()
        return info["data_keys"] == 0 and all(w["data_keys"] == 0 and w["data_bytes"] == 0
                                              for w in info["workers"].values())

    wait_until(freed, timeout, lambda: f"data not freed: {client.scheduler_info()['data_keys']} keys known, "
                                       f"held per worker: {data_held(client)}")


def wait_held_everywhere(client: jobsched.Client, keys: int, nbytes: int, timeout: float = 60.0) -> None:
    """Wait until every worker holds at least ``keys`` scattered keys of ``nbytes`` bytes in all."""
    def held() -> bool:
        return all(k >= keys and b >= nbytes for k, b in data_held(client).values())

    wait_until(held, timeout, lambda: f"data not on every worker: {data_held(client)}")


def expected_sums(X, n: int) -> list[float]:
    """What ``tasks.slice_sum`` gives for each of the ``n`` slices of ``X``."""
    return [tasks.slice_sum(X, i, n) for i in range(n)]


# ================================================================= scikit-learn
def svc_search(kind: str, n_jobs: int):
    """One of the SVC searches the end-to-end tests run on ``digits``: ``"randomized"``
    (8 candidates) or ``"grid"`` (6), 3 folds each."""
    from scipy.stats import loguniform
    from sklearn.model_selection import GridSearchCV, RandomizedSearchCV
    from sklearn.svm import SVC

    if kind == "randomized":
        return RandomizedSearchCV(
            SVC(), {"C": loguniform(1e-2, 1e3), "gamma": loguniform(1e-4, 1e-1), "kernel": ["rbf", "poly"]},
            n_iter=8, cv=3, random_state=0, n_jobs=n_jobs)
    assert kind == "grid", kind
    return GridSearchCV(SVC(), {"C": [0.1, 1.0, 10.0], "gamma": [1e-3, 1e-2]}, cv=3, n_jobs=n_jobs)


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


def assert_same_search(search, serial, X) -> int:
    """A fitted search equal to the serial run's: ``cv_results_`` (see above), best parameters
    and score, and predictions on ``X``; returns how many ``cv_results_`` keys were compared."""
    import numpy as np

    compared = assert_same_cv_results(search.cv_results_, serial.cv_results_)
    assert search.best_params_ == serial.best_params_
    assert search.best_score_ == serial.best_score_
    np.testing.assert_array_equal(search.predict(X), serial.predict(X))
    return compared


# ======================================================= the scheduler's state machine
HB = 1.0  # the default heartbeat interval, sent in every Welcome


class SchedulerSim:
    """A SchedulerState plus helpers; every event is followed by ``validate()`` (which checks
    the data directory too) and logged in ``log`` as (event, commands)."""

    def __init__(self, **config) -> None:
        # the scheduler's own heartbeats would be in every tick's commands: tests that are
        # about them turn them on
        self.state = SchedulerState(SchedulerConfig(**{"heartbeats": False, **config}))
        self.state.validate()
        self.log: list = []

    def __call__(self, event) -> list:
        out = self.state.handle(event)
        self.state.validate()
        self.log.append((event, out))
        return out

    def msg(self, conn: int, message: m.Message) -> list:
        return self(MessageReceived(conn, message))

    def client(self, conn: int, name: str = "laptop", user: str = "ann", admin: bool = True) -> None:
        assert self(PeerConnected(conn, f"tcp://10.0.0.{conn}:40000", CLIENT, user, admin)) == []
        assert self.msg(conn, m.RegisterClient(name, 1000 + conn, "laptop.lab")) == [
            Send(conn, m.Welcome(f"client-{conn}", HB))
        ]

    def worker(self, conn: int, name: str, nthreads: int = 1, data_address: str = "", share_domain: str = "") -> list:
        """Register a worker; returns the commands after its Welcome (e.g. Executes)."""
        assert self(PeerConnected(conn, f"tcp://10.0.1.{conn}:41000", WORKER, "root", True)) == []
        out = self.msg(conn, m.RegisterWorker(name, nthreads, 2000 + conn, f"node{conn}", 2**30, data_address,
                                              share_domain))
        # the scheduler keeps at most MAX_NAME characters of what a peer calls itself
        assert out[0] == Send(conn, m.Welcome(name[:MAX_NAME], self.state.config.heartbeat_interval))
        return out[1:]

    def leave(self, conn: int, reason: str = "gone") -> list:
        return self(PeerDisconnected(conn, reason))


def process_status(proc: psutil.Process) -> str | None:
    """The status of a process, None once it is gone."""
    try:
        return proc.status()
    except psutil.Error:
        return None
