"""Integration tests: real ``jobsched-scheduler`` and ``jobsched-worker`` subprocesses on 127.0.0.1."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import struct
import subprocess
import time

import msgpack
import psutil
import pytest
import tasks
from joblib import Parallel, delayed, parallel_config
from support import (
    BIN_DIR,
    RunningCluster,
    authenticated_socket,
    closed_by_peer,
    daemon_env,
    message_bytes,
    raw_connect,
    run_in_thread,
    send_frame,
    squares,
    start_cluster,
    wait_for_mark,
    wait_for_workers,
    wait_until,
)

import jobsched
from jobsched.protocol import PREAUTH_LIMITS
from jobsched.protocol import messages as m
from jobsched.protocol.address import parse_address


# ------------------------------------------------------------------- CLIs
@pytest.mark.parametrize(
    "program, options",
    [
        ("jobsched-scheduler", ["--host", "--port", "--scheduler-file", "--secret-file", "--allowed-failures"]),
        ("jobsched-worker", ["--nthreads", "--name", "--scheduler-file", "--secret-file", "--death-timeout"]),
    ],
)
def test_cli_help(program, options):
    exe = BIN_DIR / program
    assert exe.exists(), f"console script {program} not installed in {BIN_DIR}"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=30,
                         env=daemon_env(), stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: {program}")
    for option in options:
        assert option in out.stdout
    assert "JOBSCHED_SECRET" in out.stdout  # where the secret comes from


def test_scheduler_binds_loopback_by_default(daemons):
    sched = daemons.scheduler()  # no --host
    assert parse_address(sched.address).host == "127.0.0.1"
    listening = [c for c in psutil.Process(sched.pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening, "the scheduler has no listening socket"
    assert {c.laddr.ip for c in listening} == {"127.0.0.1"}  # the scheduler port and the dashboard's
    assert parse_address(sched.address).port in {c.laddr.port for c in listening}


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1"])
def test_scheduler_refuses_non_loopback_host_without_secret(daemons, host):
    sched = daemons.scheduler("--host", host, wait=False)
    assert sched.wait_exit(20) == 2
    log = sched.log()
    assert f"refusing to listen on {host} without a shared secret" in log
    assert "JOBSCHED_SECRET" in log
    assert "Traceback" not in log


def test_scheduler_refuses_secret_file_readable_by_others(daemons, tmp_path):
    secret_file = tmp_path / "secret"
    secret_file.write_text("s3cret-0123456789abcdef")
    secret_file.chmod(0o644)
    sched = daemons.scheduler("--secret-file", str(secret_file), wait=False)
    assert sched.wait_exit(20) == 2
    assert f"chmod 600 {secret_file}" in sched.log()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_scheduler_exits_cleanly_on_signal(daemons, tmp_path, sig):
    sched = daemons.scheduler()
    scheduler_file = next(tmp_path.glob("scheduler-*.json"))
    with jobsched.Client(sched.address, timeout=10) as client:
        assert client.scheduler_info()["address"] == sched.address
        os.kill(sched.pid, sig)
        assert sched.wait_exit(15) == 0
    assert not scheduler_file.exists(), "the scheduler file outlives the scheduler"
    assert "Traceback" not in sched.log()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_worker_exits_cleanly_on_signal(daemons, sig):
    sched = daemons.scheduler()
    w = daemons.worker(sched.address, name="leaving")
    with jobsched.Client(sched.address, timeout=10) as client:
        wait_for_workers(client, ["leaving"])
        os.kill(w.pid, sig)
        assert w.wait_exit(15) == 0
        wait_until(lambda: not client.scheduler_info()["workers"], 10, "the scheduler still lists the worker")
    assert "Traceback" not in w.log()
    assert sched.proc.poll() is None  # the scheduler is unaffected


# ---------------------------------------------------------------- secrets
@pytest.mark.parametrize("worker_secret", ["wrong-secret-0123456789abcdef", None], ids=["wrong", "missing"])
def test_worker_with_wrong_secret_exits_nonzero(daemons, worker_secret):
    sched = daemons.scheduler(secret="right-secret-0123456789abcdef")
    w = daemons.worker(sched.address, secret=worker_secret)
    rc = w.wait_exit(15)  # a wrong secret is fatal: no endless retries
    assert rc != 0
    log = w.log()
    assert "secret" in log
    assert "cannot join the scheduler" in log
    assert "Traceback" not in log
    assert "refused" in sched.log()
    assert sched.proc.poll() is None


@pytest.mark.parametrize("client_secret", ["wrong-secret-0123456789abcdef", None], ids=["wrong", "missing"])
def test_client_with_wrong_secret_gets_authentication_error(daemons, monkeypatch, client_secret):
    monkeypatch.delenv("JOBSCHED_SECRET", raising=False)
    monkeypatch.delenv("JOBSCHED_SECRET_FILE", raising=False)
    sched = daemons.scheduler(secret="right-secret-0123456789abcdef")
    start = time.monotonic()
    with pytest.raises(jobsched.AuthenticationError, match="secret"):
        jobsched.Client(sched.address, secret=client_secret, timeout=10)
    assert time.monotonic() - start < 5, "the refusal should be immediate, not a timeout"
    assert sched.proc.poll() is None


def test_secured_cluster_runs_work(daemons, tmp_path):
    secret_file = tmp_path / "secret"
    secret_file.write_text("right-secret-0123456789abcdef\n")
    secret_file.chmod(0o600)
    sched = daemons.scheduler("--secret-file", str(secret_file))
    w = daemons.worker(sched.address, "--secret-file", str(secret_file), name="secure", nthreads=2)
    with jobsched.Client(sched.address, secret="right-secret-0123456789abcdef", timeout=10) as client:
        wait_for_workers(client, ["secure"])
    # the backend opens its own Client from an address and a secret
    with parallel_config(backend="cluster", scheduler=sched.address, secret="right-secret-0123456789abcdef"):
        pids = Parallel(n_jobs=-1)(delayed(tasks.getpid)() for _ in range(4))
    assert os.getpid() not in pids
    assert set(pids) <= w.process_tree()


# -------------------------------------------------------- hostile clients
def test_garbage_bytes_close_that_connection_only(cluster: RunningCluster):
    sock = raw_connect(cluster.address)
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert closed_by_peer(sock, 10), "the scheduler kept a connection that sent garbage"
    finally:
        sock.close()
    assert squares(cluster.client) == [i * i for i in range(20)]
    assert "closing connection from" in cluster.scheduler.log()


def test_bad_hello_frame_closes_that_connection_only(cluster: RunningCluster):
    sock = raw_connect(cluster.address)
    try:
        send_frame(sock, b"not a jobsched hello")
        assert closed_by_peer(sock, 10)
    finally:
        sock.close()
    assert squares(cluster.client) == [i * i for i in range(20)]


@pytest.mark.parametrize("body_length, buffers", [(2**32 - 1, 0), (PREAUTH_LIMITS.max_body + 1, 0), (10, 1)])
def test_oversized_frame_header_closes_that_connection_only(cluster: RunningCluster, body_length, buffers):
    sock = raw_connect(cluster.address)
    try:
        sock.sendall(struct.pack("!IH", body_length, buffers))
        assert closed_by_peer(sock, 10), "an oversized frame header was not refused"
    finally:
        sock.close()
    assert squares(cluster.client) == [i * i for i in range(20)]
    assert "FrameTooLarge" in cluster.scheduler.log()


@pytest.mark.parametrize(
    "body",
    [b"\xc1", msgpack.packb(["no-such-op", 1, 2]), msgpack.packb({"op": "submit"}), b"\x92\xa4open"],
    ids=["invalid-msgpack", "unknown-op", "not-a-list", "truncated"],
)
def test_malformed_message_after_handshake_closes_that_connection_only(cluster: RunningCluster, body):
    sock, _ = authenticated_socket(cluster.address)
    try:
        send_frame(sock, body)
        assert closed_by_peer(sock, 10), "a malformed message did not close the connection"
    finally:
        sock.close()
    assert squares(cluster.client) == [i * i for i in range(20)]


def test_message_before_registration_closes_that_connection_only(cluster: RunningCluster):
    sock, _ = authenticated_socket(cluster.address)
    try:
        sock.sendall(message_bytes(m.Heartbeat(0)))
        assert closed_by_peer(sock, 10)
    finally:
        sock.close()
    assert squares(cluster.client) == [i * i for i in range(20)]
    assert "expected a registration" in cluster.scheduler.log()


@pytest.mark.timeout(60)
def test_silent_connection_is_dropped_after_handshake_deadline(cluster: RunningCluster):
    sock = raw_connect(cluster.address)
    start = time.monotonic()
    try:
        # the scheduler goes on serving others while the silent peer holds its socket
        assert squares(cluster.client, 50) == [i * i for i in range(50)]
        assert closed_by_peer(sock, 20), "a silent connection was never dropped"
        elapsed = time.monotonic() - start
    finally:
        sock.close()
    assert 8 <= elapsed <= 20, elapsed  # the handshake deadline is 10 s
    assert "no handshake within" in cluster.scheduler.log()
    assert squares(cluster.client) == [i * i for i in range(20)]


# ---------------------------------------------------- scheduler_info, placement
def test_scheduler_info_lists_workers(cluster: RunningCluster, marks):
    info = cluster.client.scheduler_info()
    assert info["address"] == cluster.address
    workers = info["workers"]
    assert len(workers) == 2
    by_name = {w["name"]: (key, w) for key, w in workers.items()}
    assert set(by_name) == {"w0", "w1"}
    for daemon in cluster.workers:
        key, w = by_name[daemon.name]
        assert key == w["address"]
        assert parse_address(w["address"]).host == "127.0.0.1"
        assert w["nthreads"] == 1
        assert w["running"] == 0
        assert w["pid"] in daemon.process_tree()
        assert w["host"] == socket.gethostname()

    # 'running' counts the batches running there now
    def one_long_task():
        with parallel_config(backend="cluster", scheduler=cluster.client):
            return Parallel(n_jobs=-1)([delayed(tasks.mark_and_sleep)(str(marks), 2.0)])

    pool, future = run_in_thread(one_long_task)
    with pool:
        pid = wait_for_mark(marks)
        running = {w["pid"]: w["running"] for w in cluster.client.scheduler_info()["workers"].values()}
        assert running == {pid: 1, **{p: 0 for p in cluster.task_pids() - {pid}}}
        assert future.result(30) == [pid]
    wait_until(lambda: all(w["running"] == 0 for w in cluster.client.scheduler_info()["workers"].values()),
               10, "running did not drop back to 0")


def test_tasks_run_in_worker_processes(cluster: RunningCluster):
    with parallel_config(backend="cluster"):  # the current Client: the fixture's
        pids = Parallel(n_jobs=-1, batch_size=1)(delayed(tasks.getpid)(0.2) for _ in range(8))
    assert os.getpid() not in pids
    assert set(pids) == cluster.task_pids()  # both workers took part
    assert {cluster.worker_of(pid).name for pid in pids} == {"w0", "w1"}


def test_single_slot_cluster_runs_tasks_on_the_worker(daemons):
    # one worker with one thread: n_jobs=-1 means its one slot, and the work still goes there
    sched = daemons.scheduler()
    w = daemons.worker(sched.address, name="only")
    with jobsched.Client(sched.address, timeout=10) as client:
        wait_for_workers(client, ["only"])
        with parallel_config(backend="cluster"):
            pids = Parallel(n_jobs=-1)(delayed(tasks.getpid)() for _ in range(4))
    assert os.getpid() not in pids, "the tasks ran in the caller, not on the cluster"
    assert set(pids) <= w.process_tree()


def test_n_jobs_minus_one_means_every_worker_slot(daemons):
    sched = daemons.scheduler()
    daemons.worker(sched.address, name="two", nthreads=2)
    daemons.worker(sched.address, name="one", nthreads=1)
    with jobsched.Client(sched.address, timeout=10) as client:
        wait_for_workers(client, ["two", "one"])
        with parallel_config(backend="cluster", scheduler=client):
            from joblib import effective_n_jobs

            assert effective_n_jobs(-1) == 3
            assert effective_n_jobs(-2) == 2
            results = Parallel(n_jobs=-1, batch_size=1)(delayed(tasks.interval)(0.5) for _ in range(3))
    # three slots: the three sleeps overlap
    latest_start = max(start for _, start, _ in results)
    earliest_end = min(end for _, _, end in results)
    assert latest_start < earliest_end, results


def test_parallel_config_with_scheduler_address(cluster: RunningCluster):
    with parallel_config(backend="cluster", scheduler=cluster.address):
        assert Parallel(n_jobs=2)(delayed(tasks.square)(i) for i in range(100)) == [i * i for i in range(100)]


# ------------------------------------------------------------------ errors
def test_task_error_is_reraised_with_type_message_and_remote_traceback(cluster: RunningCluster):
    with parallel_config(backend="cluster", scheduler=cluster.client):
        with pytest.raises(ValueError, match="^bad value 42$") as info:
            Parallel(n_jobs=-1)(delayed(tasks.raise_value_error)("bad value 42") for _ in range(1))
    cause = info.value.__cause__
    assert cause is not None, "the remote traceback is not attached"
    text = str(cause)
    assert "Traceback (most recent call last)" in text
    assert "raise_value_error" in text
    assert "tasks.py" in text
    assert "ValueError: bad value 42" in text


def test_exception_with_keyword_only_constructor_keeps_its_type(cluster: RunningCluster):
    with parallel_config(backend="cluster", scheduler=cluster.client):
        with pytest.raises(tasks.KeywordOnlyError, match="task failed with code 7") as info:
            Parallel(n_jobs=-1)(delayed(tasks.raise_keyword_only)(7) for _ in range(1))
    assert type(info.value) is tasks.KeywordOnlyError
    assert info.value.code == 7
    assert "raise_keyword_only" in str(info.value.__cause__)


def test_unpicklable_exception_arrives_as_remote_error(cluster: RunningCluster):
    with parallel_config(backend="cluster", scheduler=cluster.client):
        with pytest.raises(jobsched.RemoteError) as info:
            Parallel(n_jobs=-1)(delayed(tasks.raise_unpicklable)("holding a lock") for _ in range(1))
    error = info.value
    assert error.type_name == "tasks.UnpicklableError"
    assert error.message == "holding a lock"
    assert "raise_unpicklable" in error.remote_traceback
    assert "raise_unpicklable" in str(error.__cause__)


def test_error_aborts_the_call_and_drops_its_queued_batches(cluster: RunningCluster):
    items = [delayed(tasks.raise_value_error)("early")] + [delayed(tasks.sleep_and_return)(0.5, i) for i in range(40)]
    start = time.monotonic()
    with parallel_config(backend="cluster", scheduler=cluster.client):
        with pytest.raises(ValueError, match="early"):
            Parallel(n_jobs=-1, batch_size=1, pre_dispatch="all")(items)
    assert time.monotonic() - start < 5, "the call waited for its remaining batches"
    # the queued batches were dropped: the scheduler is idle again within a few sleeps
    wait_until(lambda: cluster.client.scheduler_info()["tasks"] == 0, 5, "queued batches were not dropped")
    assert squares(cluster.client) == [i * i for i in range(20)]


# ------------------------------------------------------ generators, timeout
def test_return_as_generator(cluster: RunningCluster):
    with parallel_config(backend="cluster", scheduler=cluster.client):
        gen = Parallel(n_jobs=-1, return_as="generator")(delayed(tasks.square)(i) for i in range(200))
        assert not isinstance(gen, list)
        assert list(gen) == [i * i for i in range(200)]


def test_return_as_generator_unordered(cluster: RunningCluster):
    with parallel_config(backend="cluster", scheduler=cluster.client):
        gen = Parallel(n_jobs=-1, return_as="generator_unordered")(delayed(tasks.square)(i) for i in range(200))
        assert sorted(gen) == [i * i for i in range(200)]
        # completion order: the fast task comes out before the slow one submitted first
        gen = Parallel(n_jobs=2, batch_size=1, return_as="generator_unordered")(
            [delayed(tasks.sleep_and_return)(1.5, "slow"), delayed(tasks.sleep_and_return)(0.0, "fast")]
        )
        assert list(gen) == ["fast", "slow"]


# joblib's own notice when a generator is closed early
@pytest.mark.filterwarnings("ignore:.*still being processed by the workers have been cancelled:UserWarning")
def test_dropped_generator_cancels_the_rest(cluster: RunningCluster):
    with parallel_config(backend="cluster", scheduler=cluster.client):
        gen = Parallel(n_jobs=-1, batch_size=1, return_as="generator")(
            delayed(tasks.sleep_and_return)(0.3, i) for i in range(40)
        )
        assert next(gen) == 0
        gen.close()
    wait_until(lambda: cluster.client.scheduler_info()["tasks"] == 0, 5, "the dropped call kept its batches")
    assert squares(cluster.client) == [i * i for i in range(20)]


def test_timeout_raises_and_cluster_stays_usable(cluster: RunningCluster):
    start = time.monotonic()
    with parallel_config(backend="cluster", scheduler=cluster.client):
        with pytest.raises(multiprocessing.TimeoutError):  # what joblib raises for every backend
            Parallel(n_jobs=-1, timeout=0.5)(delayed(tasks.sleep_and_return)(2.0, i) for i in range(4))
    assert time.monotonic() - start < 2.0
    # the slots free up once the running sleeps end; the next call works
    assert squares(cluster.client) == [i * i for i in range(20)]
    wait_until(lambda: cluster.client.scheduler_info()["tasks"] == 0, 10, "timed-out batches linger")


def test_nested_parallel_inside_a_task(cluster: RunningCluster):
    with parallel_config(backend="cluster", scheduler=cluster.client):
        results = Parallel(n_jobs=-1)(delayed(tasks.nested_sum)(n) for n in (10, 20, 30, 40))
    assert [total for _, total in results] == [sum(i * i for i in range(n)) for n in (10, 20, 30, 40)]
    assert {pid for pid, _ in results} <= cluster.task_pids()


# ---------------------------------------------------------------- failures
@pytest.mark.timeout(60)
def test_killed_worker_batch_is_requeued(cluster: RunningCluster, marks):
    def call():
        with parallel_config(backend="cluster", scheduler=cluster.client):
            return Parallel(n_jobs=-1)([delayed(tasks.slow_first_attempt)(str(marks), 60.0)])

    pool, future = run_in_thread(call)
    with pool:
        victim_pid = wait_for_mark(marks)
        victim = cluster.worker_of(victim_pid)
        [survivor] = [w for w in cluster.workers if w is not victim]
        victim.kill()  # SIGKILL its process group mid-task
        [result] = future.result(30)
        assert result in survivor.process_tree()
    attempts = sorted(int(p.name.split("-")[1]) for p in marks.glob("started-*"))
    assert attempts == sorted([victim_pid, result])  # exactly one retry
    assert [w["name"] for w in cluster.client.scheduler_info()["workers"].values()] == [survivor.name]


@pytest.mark.timeout(60)
def test_worker_with_stopped_heartbeat_is_declared_dead(daemons, marks):
    running = start_cluster(daemons, scheduler_args=("--heartbeat-timeout", "2"))
    with running.client as client:
        def call():
            with parallel_config(backend="cluster", scheduler=client):
                return Parallel(n_jobs=-1)([delayed(tasks.slow_first_attempt)(str(marks), 30.0)])

        pool, future = run_in_thread(call)
        with pool:
            frozen = running.worker_of(wait_for_mark(marks))
            [other] = [w for w in running.workers if w is not frozen]
            frozen.signal(signal.SIGSTOP)  # alive, socket open, but silent
            try:
                [result] = future.result(20)
                assert result in other.process_tree()
                names = [w["name"] for w in client.scheduler_info()["workers"].values()]
                assert names == [other.name]
            finally:
                frozen.kill()  # SIGKILL ends it even while stopped
    assert "no heartbeat" in running.scheduler.log()


@pytest.mark.timeout(60)
def test_task_that_kills_its_worker_fails_with_worker_lost_error(daemons, marks):
    running = start_cluster(daemons, scheduler_args=("--allowed-failures", "2"))
    with running.client as client:
        start = time.monotonic()
        with parallel_config(backend="cluster", scheduler=client):
            with pytest.raises(jobsched.WorkerLostError, match="crash_worker") as info:
                Parallel(n_jobs=-1)([delayed(tasks.crash_worker)(str(marks))])
        assert time.monotonic() - start < 20
        assert "giving up after 2" in str(info.value)
        # one worker process died per attempt, and it stopped at --allowed-failures
        attempts = [int(p.name.split("-")[1]) for p in marks.glob("started-*")]
        assert len(attempts) == 2 and len(set(attempts)) == 2, attempts
        # the scheduler survives: a fresh worker (and any restarted one) picks up new work
        fresh = daemons.worker(running.address, name="fresh")
        wait_for_workers(client, ["fresh"])
        with parallel_config(backend="cluster", scheduler=client):
            pids = Parallel(n_jobs=2)(delayed(tasks.getpid)() for _ in range(3))
        assert os.getpid() not in pids
        alive = {pid for d in [*running.workers, fresh] for pid in d.process_tree()}
        assert set(pids) <= alive
        assert not set(pids) & set(attempts)


def test_no_worker_fails_within_wait_for_workers_timeout(scheduler):
    address, proc = scheduler()
    start = time.monotonic()
    with parallel_config(backend="cluster", scheduler=address, wait_for_workers_timeout=2):
        with pytest.raises(jobsched.NoWorkersError, match="no worker"):
            Parallel(n_jobs=-1)(delayed(tasks.square)(i) for i in range(4))
    assert 1.5 <= time.monotonic() - start < 10
    assert proc.poll() is None


def test_no_worker_fails_after_scheduler_no_worker_timeout(scheduler):
    # with a positive n_jobs nothing waits client side: the scheduler fails the queued batches
    address, _ = scheduler("--no-worker-timeout", "2")
    with jobsched.Client(address, timeout=10) as client:
        start = time.monotonic()
        with parallel_config(backend="cluster", scheduler=client):
            with pytest.raises(jobsched.NoWorkersError, match="no worker"):
                Parallel(n_jobs=2)(delayed(tasks.square)(i) for i in range(4))
        assert 1.5 <= time.monotonic() - start < 10
        assert client.scheduler_info()["tasks"] == 0


def test_work_waits_for_a_late_worker(daemons):
    sched = daemons.scheduler()
    with jobsched.Client(sched.address, timeout=10) as client:
        def call():
            # a positive n_jobs: the batches wait in the scheduler's queue for a worker
            with parallel_config(backend="cluster", scheduler=client):
                return Parallel(n_jobs=2)(delayed(tasks.getpid)() for _ in range(3))

        pool, future = run_in_thread(call)
        with pool:
            time.sleep(1.0)
            assert not future.done()
            late = daemons.worker(sched.address, name="late")
            pids = future.result(30)
            assert len(pids) == 3 and set(pids) <= late.process_tree()


@pytest.mark.timeout(60)
def test_scheduler_killed_mid_call_fails_promptly(cluster: RunningCluster, marks):
    def call():
        with parallel_config(backend="cluster", scheduler=cluster.client):
            return Parallel(n_jobs=-1)(delayed(tasks.mark_and_sleep)(str(marks), 30.0) for _ in range(2))

    # calls wait for a lost scheduler up to the client's reconnect_timeout, then fail
    cluster.client.reconnect_timeout = 2.0
    pool, future = run_in_thread(call)
    with pool:
        wait_for_mark(marks)
        cluster.scheduler.kill()
        killed = time.monotonic()
        with pytest.raises(jobsched.SchedulerUnreachableError, match="could not reconnect for 2 s"):
            future.result(20)
        assert time.monotonic() - killed < 5
    # later calls fail at once too, rather than hang
    with parallel_config(backend="cluster", scheduler=cluster.client):
        with pytest.raises(jobsched.SchedulerUnreachableError):
            Parallel(n_jobs=2)(delayed(tasks.square)(i) for i in range(2))
    for w in cluster.workers:
        w.kill()  # they are still running the 30 s sleeps
