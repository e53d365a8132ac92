"""Security tests: who may connect, with what, and what they are told when refused.

Real daemons as subprocesses (their own process groups, ended by the test), a
real ``jobsched.Client``, certificates generated here with trustme.  The
multi-host test at the end runs the scheduler and two workers in network
namespaces of their own, joined by a private bridge; it skips cleanly where
``ip netns`` cannot be used.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import secrets
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import trustme
from joblib import Parallel, delayed, parallel_config
from support import (
    challenge_body,
    closed_by_peer,
    daemon_env,
    exit_status,
    frame_bytes,
    hello_body,
    is_hello,
    message_bytes,
    parse_challenge,
    private_file,
    raw_connect,
    read_frame,
    read_message,
    registered_client_socket,
    run_cli,
    send_frame,
    squares,
    wait_for_workers,
)

import jobsched
from jobsched.protocol import PREAUTH_LIMITS, FrameDecoder, FrameLimits, InitiatorHandshake, Role
from jobsched.protocol import handshake as hs_module
from jobsched.protocol import messages as m
from jobsched.protocol.address import parse_address
from jobsched.protocol.messages import PROTOCOL_VERSION

SECRET = "security-test-" + secrets.token_hex(16)


# ----------------------------------------------------------------- helpers
def listening_on(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


# -------------------------------------------------------- certificates (PKI)
class PKI:
    """A CA, a server certificate for 127.0.0.1, a client certificate, and the same from a second CA."""

    def __init__(self, directory: Path, server_identities: tuple[str, ...] = ("127.0.0.1", "localhost")) -> None:
        self.dir = directory
        ca, other = trustme.CA(), trustme.CA()
        self.ca = self._write("ca.pem", ca.cert_pem)
        self.other_ca = self._write("other-ca.pem", other.cert_pem)
        server = ca.issue_cert(*server_identities)
        self.server_cert = self._write("server.pem", server.cert_chain_pems[0])
        self.server_key = self._write("server.key", server.private_key_pem)
        client = ca.issue_cert("jobsched-client@lab")
        self.client_cert = self._write("client.pem", client.cert_chain_pems[0])
        self.client_key = self._write("client.key", client.private_key_pem)
        rogue = other.issue_cert("jobsched-client@lab")  # same name, wrong CA
        self.rogue_cert = self._write("rogue.pem", rogue.cert_chain_pems[0])
        self.rogue_key = self._write("rogue.key", rogue.private_key_pem)
        rogue_server = other.issue_cert(*server_identities)
        self.rogue_server_cert = self._write("rogue-server.pem", rogue_server.cert_chain_pems[0])
        self.rogue_server_key = self._write("rogue-server.key", rogue_server.private_key_pem)
        self._ca = ca
        # workers serve their data port to each other: their certificate names their address
        self.worker_cert, self.worker_key = self.issue("worker", "127.0.0.1")

    def issue(self, name: str, *identities: str) -> tuple[str, str]:
        cert = self._ca.issue_cert(*identities)
        return self._write(f"{name}.pem", cert.cert_chain_pems[0]), self._write(f"{name}.key", cert.private_key_pem)

    def _write(self, name: str, blob) -> str:
        path = self.dir / name
        blob.write_to_path(str(path))
        os.chmod(path, 0o600)
        return str(path)

    def scheduler_args(self) -> tuple[str, ...]:
        return ("--tls-cert", self.server_cert, "--tls-key", self.server_key, "--tls-ca-file", self.ca)

    def worker_args(self, cert: str | None = None, key: str | None = None, ca: str | None = None) -> tuple[str, ...]:
        return ("--tls-cert", cert or self.worker_cert, "--tls-key", key or self.worker_key, "--tls-ca-file", ca or self.ca)

    def client_kwargs(self) -> dict:
        return {"tls_ca_file": self.ca, "tls_cert": self.client_cert, "tls_key": self.client_key}


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_cluster(daemons, pki):
    """A scheduler with a secret and mutual TLS, and one worker that joined over tls://."""
    sched = daemons.scheduler(*pki.scheduler_args(), secret=SECRET)
    assert sched.address.startswith("tls://127.0.0.1:"), sched.address
    worker = daemons.worker(sched.address, *pki.worker_args(), name="tls-w0", nthreads=2, secret=SECRET)
    return sched, worker


# ------------------------------------------------------------------ binding
@pytest.mark.timeout(60)
@pytest.mark.parametrize("host", ["0.0.0.0", "10.213.0.1", "lab-node.invalid"])
@pytest.mark.parametrize("secret_env", [None, ""], ids=["no-secret", "empty-JOBSCHED_SECRET"])
def test_non_loopback_bind_without_secret_is_refused_before_binding(tmp_path, host, secret_env):
    # Hold the port on 127.0.0.1: a wildcard bind of the same port would fail with
    # "cannot listen" (exit 1), so exit 2 with the secret message shows the refusal
    # comes before any bind is attempted.
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        env = daemon_env()
        if secret_env is not None:
            env["JOBSCHED_SECRET"] = secret_env
        sched_file = tmp_path / "sched.json"
        status, out, err = run_cli("jobsched.scheduler", "--host", host, "--port", str(port),
                                   "--scheduler-file", str(sched_file), env=env)
    assert status == 2, (status, out, err)
    assert f"refusing to listen on {host} without a shared secret" in err
    # it says how to set one, and never suggests putting the secret on the command line
    assert "JOBSCHED_SECRET" in err and "--secret-file" in err and "JOBSCHED_SECRET_FILE" in err
    assert "cannot listen" not in err and "Traceback" not in err
    assert not sched_file.exists()


@pytest.mark.timeout(60)
def test_non_loopback_host_from_environment_is_refused_too(tmp_path):
    env = daemon_env()
    env["JOBSCHED_HOST"] = "0.0.0.0"
    status, _, err = run_cli("jobsched.scheduler", "--port", "0", "--scheduler-file", str(tmp_path / "s.json"), env=env)
    assert status == 2, err
    assert "refusing to listen on 0.0.0.0 without a shared secret" in err
    assert not (tmp_path / "s.json").exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("module", ["jobsched.scheduler", "jobsched.worker"])
def test_secret_cannot_be_given_on_the_command_line(module):
    # argv is visible to every user of the machine (ps, /proc/*/cmdline)
    args = ["--secret", "hunter2"] if module == "jobsched.scheduler" else ["tcp://127.0.0.1:9", "--secret", "hunter2"]
    status, _out, err = run_cli(module, *args, env=daemon_env())
    assert status == 2
    # argparse may take "--secret" as an abbreviation of --secret-file: then the value is a
    # path, never the secret itself
    assert "unrecognized arguments: --secret" in err or "cannot read secret file hunter2" in err, err


# ------------------------------------------------------------- secret files
@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o666])
def test_secret_file_accessible_by_group_or_others_is_refused_by_the_scheduler(tmp_path, mode):
    path = private_file(tmp_path / "secret", "s3cret-value-0123456789abcdef\n", mode)
    status, out, err = run_cli("jobsched.scheduler", "--port", "0", "--scheduler-file", str(tmp_path / "s.json"),
                               "--secret-file", str(path), env=daemon_env())
    assert status == 2, (status, out, err)
    assert str(path) in err and "group or others" in err
    assert f"chmod 600 {path}" in err  # names the fix
    assert f"{mode:o}" in err
    assert not (tmp_path / "s.json").exists()


@pytest.mark.timeout(60)
def test_world_readable_secret_file_is_refused_through_the_environment_and_by_worker_and_client(tmp_path):
    path = private_file(tmp_path / "secret", "s3cret-value-0123456789abcdef\n", 0o644)
    env = daemon_env()
    env["JOBSCHED_SECRET_FILE"] = str(path)
    status, _, err = run_cli("jobsched.scheduler", "--port", "0", "--scheduler-file", str(tmp_path / "s.json"), env=env)
    assert status == 2 and f"chmod 600 {path}" in err, err
    status, _, err = run_cli("jobsched.worker", "tcp://127.0.0.1:9", "--secret-file", str(path), env=daemon_env())
    assert status == 2 and f"chmod 600 {path}" in err, err
    with pytest.raises(ValueError, match="chmod 600"):
        jobsched.Client("tcp://127.0.0.1:9", secret_file=str(path), timeout=5)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", ["empty", "missing"])
def test_unusable_secret_file_is_refused_with_a_reason(tmp_path, case):
    path = tmp_path / "secret"
    if case == "empty":
        private_file(path, "\n", 0o600)
    status, _, err = run_cli("jobsched.scheduler", "--port", "0", "--secret-file", str(path), env=daemon_env())
    assert status == 2
    assert str(path) in err
    assert ("empty" in err) if case == "empty" else ("cannot read" in err)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("weak", ["hunter2", "0123456789abcde", "a" * 32], ids=["7-bytes", "15-bytes", "one-character"])
def test_a_weak_secret_stops_the_daemons_saying_how_to_make_one(tmp_path, weak):
    env = daemon_env(secret=weak)
    status, _, err = run_cli("jobsched.scheduler", "--port", "0", "--scheduler-file", str(tmp_path / "s.json"), env=env)
    assert status == 2, err
    assert "$JOBSCHED_SECRET is too weak" in err and "jobsched-scheduler --generate-secret PATH" in err, err
    assert "secrets.token_hex(32)" in err and weak not in err  # never echoes the secret
    assert not (tmp_path / "s.json").exists()
    status, _, err = run_cli("jobsched.worker", "tcp://127.0.0.1:9", env=env)
    assert status == 2 and "$JOBSCHED_SECRET is too weak" in err, err
    path = private_file(tmp_path / "weak.secret", weak + "\n", 0o600)
    config = tmp_path / "jobsched.toml"
    config.write_text(f'secret-file = "{path}"\n')
    status, _, err = run_cli("jobsched.scheduler", "--port", "0", "--config", str(config), env=daemon_env())
    assert status == 2 and f"secret file {path} is too weak" in err, err


@pytest.mark.timeout(60)
def test_generate_secret_writes_mode_0600_regardless_of_umask_and_never_overwrites(tmp_path, daemons):
    path = tmp_path / "cluster.secret"
    # umask 0 would leave a plainly created file world-readable: the mode must not depend on it
    status, out, err = run_cli("jobsched.scheduler", "--generate-secret", str(path), env=daemon_env(), umask=0)
    assert status == 0, err
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.getuid()
    secret = path.read_text().strip()
    assert len(secret) >= 32 and secret.isprintable()
    assert secret not in out + err  # not echoed where logs would keep it

    other = tmp_path / "other.secret"
    assert run_cli("jobsched.scheduler", "--generate-secret", str(other), env=daemon_env())[0] == 0
    assert other.read_text().strip() != secret  # random, not a constant

    # never overwrites: the existing secret and its mode are untouched
    os.chmod(path, 0o400)
    status, out, err = run_cli("jobsched.scheduler", "--generate-secret", str(path), env=daemon_env())
    assert status == 2
    assert "exists" in err and str(path) in err
    assert path.read_text().strip() == secret
    assert stat.S_IMODE(path.stat().st_mode) == 0o400
    os.chmod(path, 0o600)

    # a planted symlink is not followed: its target is not created
    target = tmp_path / "planted-target"
    link = tmp_path / "planted-link"
    link.symlink_to(target)
    status, _, err = run_cli("jobsched.scheduler", "--generate-secret", str(link), env=daemon_env())
    assert status == 2, err
    assert not target.exists()

    # the generated file is usable as it is: a scheduler and a client that read it agree
    sched = daemons.scheduler("--secret-file", str(path), secret=None)
    with jobsched.Client(sched.address, secret_file=str(path), timeout=10) as client:
        assert client.scheduler_info()["address"] == sched.address
    with pytest.raises(jobsched.AuthenticationError):
        jobsched.Client(sched.address, secret="not-" + secret, timeout=10)


# ------------------------------------------------------------ wrong secrets
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "scheduler_secret, client_secret, expected",
    [
        (SECRET, "wrong-" + SECRET, "secret"),
        (SECRET, None, "JOBSCHED_SECRET"),
        (None, SECRET, "secret"),
    ],
    ids=["wrong-secret", "client-without-secret", "scheduler-without-secret"],
)
def test_client_with_mismatched_secret_gets_authentication_error_naming_the_secret(
    daemons, monkeypatch, scheduler_secret, client_secret, expected
):
    for var in ("JOBSCHED_SECRET", "JOBSCHED_SECRET_FILE", "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(var, raising=False)
    sched = daemons.scheduler(secret=scheduler_secret)
    start = time.monotonic()
    with pytest.raises(jobsched.AuthenticationError) as info:
        jobsched.Client(sched.address, secret=client_secret, timeout=10)
    assert time.monotonic() - start < 5, "a wrong secret must fail fast, not time out"
    assert expected in str(info.value)
    assert sched.proc.poll() is None
    assert "Traceback" not in sched.log()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("worker_secret", ["wrong-" + SECRET, None], ids=["wrong-secret", "no-secret"])
def test_worker_with_wrong_secret_exits_nonzero_saying_so(daemons, worker_secret):
    sched = daemons.scheduler(secret=SECRET)
    worker = daemons.worker(sched.address, "--death-timeout", "30", name="badsecret", secret=worker_secret)
    status = exit_status(worker, 20, "a worker with a wrong secret kept running")
    assert status != 0
    log = worker.log()
    assert "secret" in log, log
    assert "Traceback" not in log
    with jobsched.Client(sched.address, secret=SECRET, timeout=10) as client:
        assert client.scheduler_info()["workers"] == {}


# -------------------------------------------------------------- handshake
@pytest.mark.timeout(60)
def test_protocol_version_mismatch_is_named_on_both_sides(daemons):
    sched = daemons.scheduler(secret=SECRET)
    sock = raw_connect(sched.address)
    try:
        hs = InitiatorHandshake(Role.CLIENT, SECRET.encode(), PROTOCOL_VERSION + 1)
        send_frame(sock, hs.hello())
        with pytest.raises(jobsched.VersionMismatch) as info:
            hs.receive(read_frame(sock, FrameDecoder(PREAUTH_LIMITS)).body)
        assert f"this side speaks {PROTOCOL_VERSION}, the peer speaks {PROTOCOL_VERSION + 1}" in str(info.value)
        assert closed_by_peer(sock, 5)
    finally:
        sock.close()
    assert "protocol version mismatch" in sched.log()


@pytest.mark.timeout(60)
def test_recorded_handshake_cannot_be_replayed_or_reflected(daemons):
    sched = daemons.scheduler(secret=SECRET)
    # record the initiator's side of a genuine, successful exchange
    sock = raw_connect(sched.address)
    hs = InitiatorHandshake(Role.CLIENT, SECRET.encode(), PROTOCOL_VERSION)
    decoder = FrameDecoder(PREAUTH_LIMITS)
    hello = hs.hello()
    send_frame(sock, hello)
    proof = hs.receive(read_frame(sock, decoder).body)
    send_frame(sock, proof)
    assert hs.receive(read_frame(sock, decoder).body) is None and hs.done
    sock.close()

    # replay it verbatim: the scheduler's fresh nonce makes the old proof worthless
    for _ in range(3):
        sock = raw_connect(sched.address)
        try:
            decoder = FrameDecoder(PREAUTH_LIMITS)
            send_frame(sock, hello)
            _, status, _, _, _ = parse_challenge(read_frame(sock, decoder).body)
            assert status == 0  # the hello itself is fine...
            send_frame(sock, proof)
            verdict = read_frame(sock, decoder).body
            assert verdict[0] == hs_module.Status.AUTH  # ...the replayed proof is not
            assert b"did not verify" in verdict
            assert closed_by_peer(sock, 5)
        finally:
            sock.close()

    # reflection: hand the scheduler its own proof back
    sock = raw_connect(sched.address)
    try:
        decoder = FrameDecoder(PREAUTH_LIMITS)
        send_frame(sock, hello_body())
        _, status, _, mac_a, _ = parse_challenge(read_frame(sock, decoder).body)
        assert status == 0 and mac_a != bytes(hs_module.MAC_SIZE)
        send_frame(sock, bytes([0]) + mac_a)
        assert read_frame(sock, decoder).body[0] == hs_module.Status.AUTH
        assert closed_by_peer(sock, 5)
    finally:
        sock.close()
    assert sched.proc.poll() is None


@pytest.mark.timeout(60)
def test_scheduler_relays_payloads_without_unpickling_them(daemons, tmp_path):
    """The scheduler moves opaque bytes; only a worker unpickles, and only from an authenticated peer."""
    marker = tmp_path / "unpickled-here"

    class Bomb:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    payload = pickle.dumps(Bomb(), protocol=5)
    sched = daemons.scheduler(secret=SECRET)  # no worker yet: only the scheduler holds the batch
    sock, decoder = registered_client_socket(sched.address, SECRET.encode())
    try:
        sock.sendall(message_bytes(m.SubmitBatch(1, 1, "bomb", 0, (payload,))))
        time.sleep(1.5)
        assert not marker.exists(), "the scheduler unpickled a batch"
        assert sched.proc.poll() is None
        # positive control: a worker does unpickle it, proving the payload was live
        daemons.worker(sched.address, name="w-bomb", secret=SECRET)
        done = read_message(sock, decoder, timeout=30)
        assert type(done) is m.BatchDone and done.batch_id == 1
        assert marker.is_dir()
        assert done.status == m.ERROR  # the payload was not a (batch, context) pair
    finally:
        sock.close()


# ------------------------------------------------------ a fake scheduler
class FakeScheduler:
    """A listener on 127.0.0.1 that does not know the secret and misbehaves in one way."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.received: list[bytes] = []
        self._handlers: list[threading.Thread] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            handler = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            handler.start()
            self._handlers.append(handler)

    def _challenge(self, version: int = PROTOCOL_VERSION, has_secret: int = 1) -> bytes:
        return frame_bytes(challenge_body(version, credential=has_secret))

    def _handle(self, conn: socket.socket) -> None:
        received = bytearray()
        conn.settimeout(0.2)

        def pump(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end and not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                received.extend(data)

        try:
            pump(0.3)  # the hello
            b = self.behaviour
            if b == "hangs-up":
                pass
            elif b == "random-bytes":
                conn.sendall(os.urandom(3000))
            elif b == "100-GB-length-prefix":
                conn.sendall(struct.pack("!IHQ", 4, 1, 100 * 10**9) + b"JOBS")
            elif b == "forged-challenge":
                conn.sendall(self._challenge())
            elif b == "secretless-challenge":  # a downgrade: "I use no secret, trust me"
                conn.sendall(self._challenge(has_secret=0))
            elif b == "other-version":
                conn.sendall(self._challenge(version=PROTOCOL_VERSION + 1))
            elif b == "slow-drip":
                for byte in self._challenge():
                    if self._stop.is_set():
                        break
                    conn.sendall(bytes([byte]))
                    time.sleep(0.5)
            pump(30 if b in ("silent", "forged-challenge", "secretless-challenge") else 1)
        except OSError:
            pass
        finally:
            self.received.append(bytes(received))
            conn.close()

    def close(self) -> None:
        """Stop serving; afterwards ``received`` holds what every connection sent."""
        self._stop.set()
        self.listener.close()
        self._thread.join(5)
        for handler in self._handlers:
            handler.join(5)


@pytest.fixture
def fake_scheduler(request):
    fake = FakeScheduler(request.param)
    try:
        yield fake
    finally:
        fake.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "fake_scheduler, error, expected",
    [
        ("silent", jobsched.SchedulerUnreachableError, "time|handshake"),
        ("hangs-up", jobsched.SchedulerUnreachableError, "closed the connection during the handshake"),
        ("random-bytes", jobsched.SchedulerUnreachableError, "not be a jobsched daemon"),
        ("100-GB-length-prefix", jobsched.SchedulerUnreachableError, "not be a jobsched daemon"),
        ("forged-challenge", jobsched.AuthenticationError, "secret"),
        ("secretless-challenge", jobsched.AuthenticationError, "does not use one"),
        ("other-version", jobsched.VersionMismatch, "version"),
        ("slow-drip", jobsched.SchedulerUnreachableError, "time|handshake"),
    ],
    indirect=["fake_scheduler"],
)
def test_client_facing_a_fake_scheduler_gets_a_clear_error_and_reveals_no_proof(fake_scheduler, error, expected):
    start = time.monotonic()
    with pytest.raises(error) as info:
        jobsched.Client(fake_scheduler.address, secret=SECRET, timeout=3)
    elapsed = time.monotonic() - start
    assert elapsed < 8, f"took {elapsed:.1f} s against a {fake_scheduler.behaviour} scheduler"
    message = str(info.value)
    assert re.search(expected, message, re.IGNORECASE), f"unclear error: {message!r}"
    fake_scheduler.close()
    sent = b"".join(fake_scheduler.received)
    frames = FrameDecoder(FrameLimits()).feed(sent)
    assert frames and is_hello(frames[0].body)  # its hello
    for f in frames[1:]:
        # never a proof of the secret to a peer that has not proven itself: at most a refusal, with no MAC
        assert f.body[0] != hs_module.Status.OK or f.body[1:1 + hs_module.MAC_SIZE] == bytes(hs_module.MAC_SIZE), f.body


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "fake_scheduler, expected",
    [("forged-challenge", "secret"), ("random-bytes", "jobsched daemon")],
    indirect=["fake_scheduler"],
)
def test_worker_facing_a_fake_scheduler_exits_nonzero_naming_the_cause(daemons, fake_scheduler, expected):
    worker = daemons.worker(fake_scheduler.address, "--death-timeout", "3", name="w-fake", secret=SECRET)
    status = exit_status(worker, 30, "worker kept running against a fake scheduler")
    assert status != 0
    assert expected in worker.log(), worker.log()
    assert "Traceback" not in worker.log()


# ------------------------------------------------------------------- TLS
@pytest.mark.timeout(90)
def test_mutual_tls_with_secret_runs_a_real_joblib_call_end_to_end(tls_cluster, pki):
    sched, worker = tls_cluster
    with jobsched.Client(sched.address, secret=SECRET, timeout=10, **pki.client_kwargs()) as client:
        workers = wait_for_workers(client, ["tls-w0"])
        assert workers["tls-w0"]["nthreads"] == 2
        assert squares(client, 24) == [i * i for i in range(24)]
        # large arrays travel as out-of-band buffers: through TLS too
        arrays = [np.arange(200_000, dtype=np.float64) * k for k in range(4)]
        with parallel_config(backend="cluster", scheduler=client):
            sums = Parallel(n_jobs=2)(delayed(np.sum)(a) for a in arrays)
        assert sums == [float(a.sum()) for a in arrays]
    assert sched.proc.poll() is None and worker.proc.poll() is None
    # the listening port speaks TLS only: a plaintext jobsched hello gets no jobsched answer
    sock = raw_connect(sched.address.replace("tls://", "tcp://"))
    try:
        send_frame(sock, hello_body())
        sock.settimeout(5)
        try:
            reply = sock.recv(65536)
        except ConnectionResetError:
            reply = b""
        assert hs_module.MAGIC not in reply
    finally:
        sock.close()


def _scattered_column_sums(client: jobsched.Client, X: np.ndarray, timeout: float) -> tuple[list, dict]:
    """Column sums of a scattered ``X`` on the cluster (both workers take part); returns the
    results and the scheduler's view of the workers while the data is held.  Fails on a hang."""

    def col_sum(data, j):  # shipped by value
        time.sleep(0.05)
        return float(data[:, j].sum())

    outcome: dict = {}

    def run() -> None:
        try:
            with parallel_config(backend="cluster", scheduler=client, scatter=[X]):
                outcome["result"] = Parallel(n_jobs=2, batch_size=1)(delayed(col_sum)(X, j) for j in range(12))
                outcome["workers"] = {w["name"]: w for w in client.scheduler_info()["workers"].values()}
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise AssertionError(f"a joblib call with scattered data hung for {timeout:.0f} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"], outcome["workers"]


@pytest.mark.timeout(90)
def test_scattered_data_moves_between_workers_over_mutual_tls(daemons, pki):
    sched = daemons.scheduler(*pki.scheduler_args(), secret=SECRET)
    for i in range(2):
        daemons.worker(sched.address, *pki.worker_args(), name=f"tls-p{i}", secret=SECRET)
    X = np.random.default_rng(0).random((4000, 80))  # 2.5 MB: it travels once, then worker to worker
    with jobsched.Client(sched.address, secret=SECRET, timeout=10, **pki.client_kwargs()) as client:
        wait_for_workers(client, ["tls-p0", "tls-p1"])
        result, workers = _scattered_column_sums(client, X, timeout=40)
    assert result == [float(X[:, j].sum()) for j in range(12)]
    assert all(workers[f"tls-p{i}"]["data_keys"] >= 1 for i in range(2)), workers


@pytest.mark.timeout(90)
def test_peer_fetch_refused_by_tls_verification_does_not_hang_the_call(daemons, pki):
    """Workers whose certificates do not name their address cannot verify each other's data
    port.  The call must still end (fetching through the owner instead, or with a clear
    error), never hang."""
    sched = daemons.scheduler(*pki.scheduler_args(), secret=SECRET)
    workers = [daemons.worker(sched.address, *pki.worker_args(pki.client_cert, pki.client_key), name=f"tls-q{i}",
                              secret=SECRET) for i in range(2)]
    X = np.random.default_rng(1).random((4000, 80))
    with jobsched.Client(sched.address, secret=SECRET, timeout=10, **pki.client_kwargs()) as client:
        wait_for_workers(client, ["tls-q0", "tls-q1"])
        try:
            result, _ = _scattered_column_sums(client, X, timeout=30)
        except jobsched.ClusterError as exc:  # a clear error is acceptable too
            assert "certificate" in str(exc) or "TLS" in str(exc), str(exc)
        else:
            assert result == [float(X[:, j].sum()) for j in range(12)]
    for w in workers:
        assert "Task exception was never retrieved" not in w.log(), w.log()


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "case",
    ["no-client-certificate", "certificate-from-another-ca", "server-not-trusted", "tcp-to-tls-scheduler"],
)
def test_tls_refusals_are_clear_errors_not_hangs(tls_cluster, pki, case):
    sched, worker = tls_cluster
    address = sched.address
    if case == "no-client-certificate":
        kwargs, expected = {"tls_ca_file": pki.ca}, "certificate"
    elif case == "certificate-from-another-ca":
        kwargs, expected = {"tls_ca_file": pki.ca, "tls_cert": pki.rogue_cert, "tls_key": pki.rogue_key}, "certificate"
    elif case == "server-not-trusted":
        kwargs = {"tls_ca_file": pki.other_ca, "tls_cert": pki.client_cert, "tls_key": pki.client_key}
        expected = "CERTIFICATE_VERIFY_FAILED"
    else:
        address, kwargs, expected = address.replace("tls://", "tcp://"), {}, "tls://"
    start = time.monotonic()
    with pytest.raises((jobsched.HandshakeError, jobsched.SchedulerUnreachableError)) as info:
        jobsched.Client(address, secret=SECRET, timeout=10, **kwargs)
    elapsed = time.monotonic() - start
    assert elapsed < 8, f"refusal took {elapsed:.1f} s: it must fail at once, not time out"
    message = str(info.value)
    assert expected in message, message
    assert "Traceback" not in message
    # the refused peer hurt nobody: the scheduler still serves the right certificate
    with jobsched.Client(sched.address, secret=SECRET, timeout=10, **pki.client_kwargs()) as client:
        wait_for_workers(client, ["tls-w0"])
        assert squares(client, 6) == [i * i for i in range(6)]
    assert sched.proc.poll() is None and worker.proc.poll() is None


@pytest.mark.timeout(60)
def test_tls_client_to_a_plaintext_scheduler_gets_a_clear_error(daemons, pki):
    sched = daemons.scheduler(secret=SECRET)
    address = sched.address.replace("tcp://", "tls://")
    start = time.monotonic()
    with pytest.raises((jobsched.HandshakeError, jobsched.SchedulerUnreachableError)) as info:
        jobsched.Client(address, secret=SECRET, timeout=10, **pki.client_kwargs())
    assert time.monotonic() - start < 8
    assert "TLS" in str(info.value) or "tls" in str(info.value), str(info.value)
    assert sched.proc.poll() is None


@pytest.mark.timeout(90)
@pytest.mark.parametrize("case", ["certificate-from-another-ca", "server-not-trusted", "no-secret"])
def test_worker_refused_by_a_tls_scheduler_exits_nonzero_naming_the_cause(daemons, pki, case):
    sched = daemons.scheduler(*pki.scheduler_args(), secret=SECRET)
    secret = SECRET
    if case == "certificate-from-another-ca":
        args, expected = pki.worker_args(cert=pki.rogue_cert, key=pki.rogue_key), "certificate"
    elif case == "server-not-trusted":
        args, expected = pki.worker_args(ca=pki.other_ca), "CERTIFICATE_VERIFY_FAILED"
    else:
        args, expected, secret = pki.worker_args(), "secret", None
    worker = daemons.worker(sched.address, *args, "--death-timeout", "3", name=f"refused-{case}", secret=secret)
    status = exit_status(worker, 30, "refused worker kept running")
    assert status != 0
    assert expected in worker.log(), worker.log()
    assert sched.proc.poll() is None


# -------------------------------------------------------------- multi-host
class Namespaces:
    """Network namespaces of this test only, joined by a bridge inside the first one."""

    def __init__(self, tag: str, count: int, subnet: str) -> None:
        self.names = [f"jobsched-{tag}-{i}" for i in range(count)]
        self.subnet = subnet
        self.created: list[str] = []

    @staticmethod
    def ip(*args: str) -> None:
        result = subprocess.run(["ip", *args], check=False, capture_output=True, text=True, timeout=20)
        if result.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")

    def address(self, index: int) -> str:
        return f"{self.subnet}.{index + 1}"

    def setup(self) -> None:
        for name in self.names:
            self.ip("netns", "add", name)
            self.created.append(name)
            self.ip("-n", name, "link", "set", "lo", "up")
        hub = self.names[0]
        self.ip("-n", hub, "link", "add", "jsbr0", "type", "bridge")
        self.ip("-n", hub, "addr", "add", f"{self.address(0)}/24", "dev", "jsbr0")
        self.ip("-n", hub, "link", "set", "jsbr0", "up")
        for i, name in enumerate(self.names[1:], start=1):
            # the veth pair is created inside the namespaces: nothing appears in the host's
            self.ip("-n", hub, "link", "add", f"jsp{i}", "type", "veth", "peer", "name", "jsv0", "netns", name)
            self.ip("-n", hub, "link", "set", f"jsp{i}", "master", "jsbr0")
            self.ip("-n", hub, "link", "set", f"jsp{i}", "up")
            self.ip("-n", name, "addr", "add", f"{self.address(i)}/24", "dev", "jsv0")
            self.ip("-n", name, "link", "set", "jsv0", "up")

    def teardown(self) -> None:
        for name in reversed(self.created):
            try:
                self.ip("netns", "del", name)
            except RuntimeError:
                pass
        self.created = []


def _netns_available() -> str | None:
    """None if this process can create network namespaces, else why not."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"jobsched-probe-{os.getpid()}"
    result = subprocess.run(["ip", "netns", "add", probe], check=False, capture_output=True, text=True, timeout=20)
    if result.returncode != 0:
        return f"ip netns add failed: {result.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=False, capture_output=True, timeout=20)
    return None


NETNS_CLIENT = textwrap.dedent(
    """
    import faulthandler, json, sys
    faulthandler.dump_traceback_later(60, exit=True)  # a hang shows where, in the client's log
    import numpy as np
    from joblib import parallel_config
    from sklearn.datasets import make_classification
    from sklearn.model_selection import GridSearchCV
    from sklearn.tree import DecisionTreeClassifier
    import jobsched

    address, secret_file, ca, cert, key = sys.argv[1:6]
    X, y = make_classification(n_samples=400, n_features=12, n_informative=6, random_state=0)
    grid = {"max_depth": [2, 3, 4, 6, None], "min_samples_leaf": [1, 4, 16]}
    serial = GridSearchCV(DecisionTreeClassifier(random_state=0), grid, cv=4, n_jobs=1).fit(X, y)
    with jobsched.Client(address, secret_file=secret_file, tls_ca_file=ca, tls_cert=cert, tls_key=key,
                         timeout=20) as client:
        client.wait_for_workers(2, timeout=30)
        with parallel_config(backend="cluster", scheduler=client):
            cluster = GridSearchCV(DecisionTreeClassifier(random_state=0), grid, cv=4, n_jobs=-1).fit(X, y)
        info = client.scheduler_info()
        # a training set scattered once: the workers pass it to each other over their data ports
        Xb, yb = make_classification(n_samples=4000, n_features=80, random_state=1)  # 2.5 MB
        small = {"max_depth": [2, 4, 8]}
        with parallel_config(backend="cluster", scheduler=client, scatter=[Xb, yb]):
            scattered = GridSearchCV(DecisionTreeClassifier(random_state=0), small, cv=4, n_jobs=-1).fit(Xb, yb)
            held = client.scheduler_info()
    serial_b = GridSearchCV(DecisionTreeClassifier(random_state=0), small, cv=4, n_jobs=1).fit(Xb, yb)
    print(json.dumps({
        "serial": serial.cv_results_["mean_test_score"].tolist(),
        "cluster": cluster.cv_results_["mean_test_score"].tolist(),
        "serial_best": repr(serial.best_params_),
        "cluster_best": repr(cluster.best_params_),
        "address": info["address"],
        "workers": list(info["workers"].values()),
        "scattered": scattered.cv_results_["mean_test_score"].tolist(),
        "scattered_serial": serial_b.cv_results_["mean_test_score"].tolist(),
        "held": list(held["workers"].values()),
    }))
    """
)

NETNS_INTRUDER = textwrap.dedent(
    """
    import json, sys
    import jobsched
    address, secret_file, ca, cert, key = sys.argv[1:6]
    outcomes = {}
    attempts = {
        "no-secret": dict(tls_ca_file=ca, tls_cert=cert, tls_key=key),
        "no-certificate": dict(secret_file=secret_file, tls_ca_file=ca),
        "plaintext": dict(secret_file=secret_file),
    }
    for name, kwargs in attempts.items():
        target = address.replace("tls://", "tcp://") if name == "plaintext" else address
        try:
            jobsched.Client(target, timeout=10, **kwargs).close()
            outcomes[name] = "connected"
        except Exception as exc:
            outcomes[name] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(outcomes))
    """
)


@pytest.mark.timeout(180)
def test_multi_host_scheduler_and_workers_in_separate_network_namespaces(tmp_path):
    why_not = _netns_available()
    if why_not:
        pytest.skip(why_not)
    pid = os.getpid()
    ns = Namespaces(str(pid), 3, subnet=f"10.213.{pid % 200 + 20}")
    sched_host = ns.address(0)
    pki = PKI(tmp_path, server_identities=(sched_host,))
    secret_file = private_file(tmp_path / "cluster.secret", secrets.token_urlsafe(32) + "\n", 0o600)
    env = daemon_env()
    procs: list[subprocess.Popen] = []
    logs: dict[str, Path] = {}

    def spawn(name: str, namespace: str, *argv: str, stdout=None) -> subprocess.Popen:
        logs[name] = tmp_path / f"{name}.log"
        with open(logs[name], "wb") as log:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", namespace, sys.executable, *argv], stdin=subprocess.DEVNULL,
                stdout=stdout or log, stderr=log if stdout else subprocess.STDOUT, env=env, cwd=tmp_path,
                start_new_session=True,
            )
        procs.append(proc)
        return proc

    def wait_for_file(path: Path, proc: subprocess.Popen, name: str) -> str:
        deadline = time.monotonic() + 30
        while not path.exists():
            assert proc.poll() is None, f"{name} exited:\n{logs[name].read_text()}"
            assert time.monotonic() < deadline, f"{name} did not start:\n{logs[name].read_text()}"
            time.sleep(0.05)
        return json.loads(path.read_text())["address"]

    def report() -> str:
        return "\n".join(f"----- {n} -----\n{p.read_text(errors='replace')}" for n, p in logs.items() if p.exists())

    try:
        ns.setup()
        # a non-loopback bind without TLS is allowed with a secret, with a warning
        plain_file = tmp_path / "plain.json"
        plain = spawn("plain-scheduler", ns.names[0], "-m", "jobsched.scheduler", "--host", sched_host, "--port", "0",
                      "--scheduler-file", str(plain_file), "--secret-file", str(secret_file))
        assert wait_for_file(plain_file, plain, "plain-scheduler").startswith(f"tcp://{sched_host}:")
        os.killpg(plain.pid, signal.SIGTERM)
        plain.wait(10)
        assert "without TLS" in logs["plain-scheduler"].read_text()

        sched_file = tmp_path / "sched.json"
        sched = spawn("scheduler", ns.names[0], "-m", "jobsched.scheduler", "--host", sched_host, "--port", "0",
                      "--scheduler-file", str(sched_file), "--secret-file", str(secret_file), *pki.scheduler_args())
        address = wait_for_file(sched_file, sched, "scheduler")
        assert address.startswith(f"tls://{sched_host}:"), address
        assert "without TLS" not in logs["scheduler"].read_text()
        workers = [
            spawn(f"worker{i}", ns.names[i], "-m", "jobsched.worker", address, "--name", f"ns-w{i}", "--nthreads", "1",
                  "--secret-file", str(secret_file), "--death-timeout", "30",
                  *pki.worker_args(*pki.issue(f"ns-w{i}", ns.address(i))))
            for i in (1, 2)
        ]
        # the client runs in the scheduler's namespace (the host's own has no route to it)
        out_path = tmp_path / "client.out"
        with open(out_path, "wb") as out:
            client = spawn("client", ns.names[0], "-c", NETNS_CLIENT, address, str(secret_file), pki.ca,
                           pki.client_cert, pki.client_key, stdout=out)
            try:
                client.wait(90)
            except subprocess.TimeoutExpired:
                raise AssertionError("the client's search hung:\n" + report()) from None
        assert client.returncode == 0, report() + out_path.read_text()
        result = json.loads(out_path.read_text().strip().splitlines()[-1])
        assert result["cluster"] == result["serial"]  # exactly, fold by fold averaged
        assert result["cluster_best"] == result["serial_best"]
        assert result["address"] == address
        by_name = {w["name"]: w for w in result["workers"]}
        assert set(by_name) == {"ns-w1", "ns-w2"}
        for i in (1, 2):
            w = by_name[f"ns-w{i}"]
            # each worker reached the scheduler from its own namespace's address
            assert parse_address(w["address"]).host == ns.address(i), w
            assert w["completed"] >= 1, f"worker ns-w{i} ran nothing: {result['workers']}"
        # the scattered training set reached both workers (one of them from the other, over
        # its TLS data port across the bridge), and the search matches the serial one
        assert result["scattered"] == result["scattered_serial"]
        held = {w["name"]: w for w in result["held"]}
        assert all(held[f"ns-w{i}"]["data_keys"] >= 1 for i in (1, 2)), result["held"]
        for i in (1, 2):
            log = logs[f"worker{i}"].read_text()
            assert "cannot reach peer" not in log and "failed" not in log, log
        # strangers on the same network are refused, with a reason
        out_path = tmp_path / "intruder.out"
        with open(out_path, "wb") as out:
            intruder = spawn("intruder", ns.names[1], "-c", NETNS_INTRUDER, address, str(secret_file), pki.ca,
                             pki.client_cert, pki.client_key, stdout=out)
            intruder.wait(60)
        outcomes = json.loads(out_path.read_text().strip().splitlines()[-1])
        assert outcomes["no-secret"].startswith("AuthenticationError") and "JOBSCHED_SECRET" in outcomes["no-secret"], outcomes
        assert "certificate" in outcomes["no-certificate"], outcomes
        assert "tls://" in outcomes["plaintext"], outcomes
        print(f"\nmulti-host: scheduler {address} in {ns.names[0]}, workers in {ns.names[1:]}: "
              f"{len(result['cluster'])} candidates x 4 folds, identical to serial; refusals: {outcomes}")
        assert sched.poll() is None and all(w.poll() is None for w in workers), report()
    finally:
        for proc in procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        ns.teardown()
    listed = subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True, timeout=20).stdout
    assert not any(name in listed for name in ns.names), listed
