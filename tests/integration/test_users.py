"""Users and tokens with real daemons: the users file and its commands, token clients, refusals
that say why, SIGHUP reloads, workers that are given a token, and the private default secret
of a scheduler started without one (tried as another OS user too, with ``setpriv``).

Every daemon is a subprocess in its own process group on 127.0.0.1, ended by the test.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from support import (
    closed_by_peer,
    daemon_env,
    exit_status,
    private_file,
    raw_connect,
    read_frame,
    registered_client_socket,
    run_cli,
    send_frame,
    squares,
    wait_for_workers,
    wait_until,
    write_file,
)

import jobsched
from jobsched.protocol import PREAUTH_LIMITS, FrameDecoder, InitiatorHandshake, Role
from jobsched.protocol.aio import open_connection
from jobsched.protocol.handshake import os_user
from jobsched.protocol.messages import PROTOCOL_VERSION
from jobsched.runtime.tokens import token_user
from jobsched.runtime.users import add_user as add_user_to_file
from jobsched.runtime.users import remove_user as remove_user_from_file
from jobsched.scheduler.records import (
    CLIENT,
    WORKER,
    PeerConnected,
    UserPolicy,
    UsersChanged,
)
from jobsched.scheduler.server import SchedulerServer
from jobsched.scheduler.state import SchedulerState

SECRET = "users-test-" + os.urandom(16).hex()
pytestmark = pytest.mark.timeout(90)


# ----------------------------------------------------------------- helpers
def scheduler_cli(*args: str, env: dict[str, str] | None = None, **popen) -> tuple[int, str, str]:
    return run_cli("jobsched.scheduler", *args, env=env or daemon_env(), **popen)


def add_user(users_file: Path, name: str, *args: str) -> str:
    """``jobsched-scheduler --users-file F --add-user NAME``: the token it printed last."""
    status, out, err = scheduler_cli("--users-file", str(users_file), "--add-user", name, *args)
    assert status == 0, (out, err)
    return out.rstrip("\n").splitlines()[-1]


@pytest.fixture
def lab(daemons, tmp_path):
    """A scheduler with the cluster secret and a users file of ann and bob, one worker with the
    secret; returns (scheduler, users file, {name: token})."""
    users_file = tmp_path / "users.toml"
    tokens = {name: add_user(users_file, name) for name in ("ann", "bob")}
    sched = daemons.scheduler("--users-file", str(users_file), secret=SECRET)
    daemons.worker(sched.address, name="lab-w0", nthreads=2, secret=SECRET)
    with jobsched.Client(sched.address, secret=SECRET, timeout=10, set_as_current=False) as admin:
        wait_for_workers(admin, ["lab-w0"])
    return sched, users_file, tokens


def refusal(address: str, **credentials) -> jobsched.AuthenticationError:
    """The error a Client with these credentials gets; it must come at once, not after a timeout."""
    start = time.monotonic()
    with pytest.raises(jobsched.AuthenticationError) as info:
        jobsched.Client(address, timeout=10, set_as_current=False, **credentials)
    assert time.monotonic() - start < 5, "a refusal must be immediate"
    return info.value


# ------------------------------------------------------------ the users file
def test_add_user_prints_the_token_alone_on_the_last_line_into_a_private_file(tmp_path):
    path = tmp_path / "users.toml"
    status, out, err = scheduler_cli("--users-file", str(path), "--add-user", "ann", "--weight", "2", "--max-slots", "3",
                                     umask=0)  # the mode must not depend on the umask
    assert status == 0, err
    token = out.splitlines()[-1]
    assert token_user(token) == "ann" and token.strip() == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert token in path.read_text() and "max-slots = 3" in path.read_text()
    assert token not in err

    rotated = add_user(path, "ann")  # a new token; the weight and cap stay
    assert rotated != token and token not in path.read_text()
    assert "weight = 2.0" in path.read_text() and "max-slots = 3" in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    status, out, err = scheduler_cli("--users-file", str(path), "--remove-user", "nobody-here")
    assert status == 2 and "no user 'nobody-here'" in err and "ann" in err
    status, out, err = scheduler_cli("--users-file", str(path), "--remove-user", "ann")
    assert status == 0 and "SIGHUP" in out
    assert "ann" not in path.read_text()


@pytest.mark.parametrize(
    "args, expected",
    [
        (("--add-user", "ann"), "need --users-file"),
        (("--users-file", "{path}", "--add-user", "ann", "--remove-user", "bob"), "not both"),
        (("--users-file", "{path}", "--add-user", "not a name"), "user name"),
        (("--users-file", "{path}", "--add-user", "ann", "--weight", "-1"), "--weight"),
        (("--users-file", "{path}", "--weight", "2"), "go with --add-user"),
    ],
)
def test_user_commands_refuse_mistakes_with_status_2(tmp_path, args, expected):
    status, out, err = scheduler_cli(*(a.format(path=tmp_path / "users.toml") for a in args))
    assert status == 2, (out, err)
    assert expected in err and "Traceback" not in err


@pytest.mark.parametrize("case", ["readable-by-others", "not-toml", "missing", "bad-weight"])
def test_a_scheduler_with_an_unusable_users_file_does_not_start(tmp_path, case):
    path = tmp_path / "users.toml"
    if case == "readable-by-others":
        add_user(path, "ann")
        path.chmod(0o644)
        expected = f"chmod 600 {path}"
    elif case == "not-toml":
        private_file(path, "[users.ann\n")
        expected = "not valid TOML"
    elif case == "bad-weight":
        token = add_user(path, "ann")
        private_file(path, f'[users.ann]\ntoken = "{token}"\nweight = 0\n')
        expected = "weight must be a positive number"
    else:
        expected = "--add-user"
    env = {**daemon_env(SECRET), "JOBSCHED_USERS_FILE": str(path)}  # the variable works as the flag does
    status, out, err = scheduler_cli("--port", "0", "--scheduler-file", str(tmp_path / "s.json"), env=env)
    assert status == 2, (out, err)
    assert expected in err and str(path) in err and "Traceback" not in err
    assert not (tmp_path / "s.json").exists()


def test_the_users_file_can_be_set_in_the_toml_config(tmp_path):
    path = tmp_path / "users.toml"
    config = write_file(tmp_path / "jobsched.toml", f'[scheduler]\nusers-file = "{path}"\n')
    status, out, err = scheduler_cli("--config", config, "--print-config")
    assert status == 0, err
    assert any(line.startswith("users-file") and str(path) in line and config in line for line in out.splitlines()), out


# ----------------------------------------------------------------- tokens
def test_a_users_token_runs_a_parallel_call_however_it_is_given(lab, monkeypatch, tmp_path):
    sched, _, tokens = lab
    with jobsched.Client(sched.address, token=tokens["ann"], timeout=10) as client:
        assert client.user == "ann"
        assert squares(client, 30) == [i * i for i in range(30)]
    from joblib import Parallel, delayed, parallel_config
    from tasks import square

    with parallel_config(backend="cluster", scheduler=sched.address, token=tokens["bob"]):
        assert Parallel(n_jobs=-1)(delayed(square)(i) for i in range(10)) == [i * i for i in range(10)]
    monkeypatch.setenv("JOBSCHED_TOKEN", tokens["ann"])
    with jobsched.Client(sched.address, timeout=10, set_as_current=False) as client:
        assert client.token == tokens["ann"] and squares(client, 5) == [i * i for i in range(5)]
    monkeypatch.delenv("JOBSCHED_TOKEN")
    monkeypatch.setenv("JOBSCHED_TOKEN_FILE", private_file(tmp_path / "bob.token", tokens["bob"] + "\n"))
    with jobsched.Client(sched.address, timeout=10, set_as_current=False) as client:
        assert client.user == "bob" and squares(client, 5) == [i * i for i in range(5)]
    monkeypatch.delenv("JOBSCHED_TOKEN_FILE")
    default = Path(os.environ["XDG_CONFIG_HOME"]) / "jobsched" / "token"  # the per-test folder (conftest)
    default.parent.mkdir(parents=True)
    private_file(default, tokens["ann"])
    with jobsched.Client(sched.address, timeout=10, set_as_current=False) as client:
        assert client.user == "ann" and squares(client, 5) == [i * i for i in range(5)]
    default.chmod(0o644)
    with pytest.raises(jobsched.SecretError, match="chmod 600"):
        jobsched.Client(sched.address, timeout=10, set_as_current=False)
    assert "Traceback" not in sched.log()


def test_wrong_and_unknown_tokens_are_refused_saying_so(lab):
    sched, _, tokens = lab
    wrong = "ann:" + tokens["bob"].split(":", 1)[1]
    error = refusal(sched.address, token=wrong)
    assert "token is wrong or was rotated" in str(error) and "ann" in str(error)
    error = refusal(sched.address, token="carol:" + tokens["bob"].split(":", 1)[1])
    assert "unknown user 'carol'" in str(error)
    error = refusal(sched.address)  # nothing at all (no default files in this test's folder)
    assert "JOBSCHED_TOKEN" in str(error) and "JOBSCHED_SECRET" in str(error)
    log = sched.log()
    assert "wrong or rotated token" in log and "unknown user 'carol'" in log
    assert tokens["ann"] not in log and tokens["bob"] not in log and SECRET not in log
    with jobsched.Client(sched.address, token=tokens["bob"], timeout=10) as client:  # the others unaffected
        assert squares(client, 5) == [i * i for i in range(5)]


def test_removed_and_rotated_users_are_refused_after_sighup(lab):
    sched, users_file, tokens = lab
    sock, decoder = registered_client_socket(sched.address, token=tokens["bob"])  # bob's open connection
    try:
        status, _, err = scheduler_cli("--users-file", str(users_file), "--remove-user", "bob")
        assert status == 0, err
        new_ann = add_user(users_file, "ann")  # rotates ann's token
        # not applied before the reload: the file is the admin's draft until SIGHUP
        jobsched.Client(sched.address, token=tokens["bob"], timeout=10, set_as_current=False).close()

        sched.signal(signal.SIGHUP)
        wait_until(lambda: "reloaded the users file" in sched.log(), 10, "no reload logged")
        assert "removed or rotated: ann, bob" in sched.log()
        assert sched.proc.poll() is None  # SIGHUP does not end the scheduler
        assert "unknown user 'bob'" in str(refusal(sched.address, token=tokens["bob"]))
        assert "rotated" in str(refusal(sched.address, token=tokens["ann"]))
        with jobsched.Client(sched.address, token=new_ann, timeout=10) as client:
            assert squares(client, 8) == [i * i for i in range(8)]

        # a broken file on reload is logged, and the users loaded before stay
        users_file.write_text("[users.ann\n")
        sched.signal(signal.SIGHUP)
        wait_until(lambda: "not reloading the users" in sched.log(), 10, "no reload failure logged")
        assert "keeping the 1 users loaded before" in sched.log()
        with jobsched.Client(sched.address, token=new_ann, timeout=10, set_as_current=False) as client:
            assert client.scheduler_info()["address"] == sched.address

        assert closed_by_peer(sock, 10), "bob's open connection outlived his removal"
    finally:
        sock.close()


def test_the_server_reports_who_connected_and_every_change_of_the_users(tmp_path, monkeypatch):
    """In process: the events SchedulerServer gives its state, for a token client, the admin,
    a worker, and a reload that removes one user and rotates another's token."""
    path = str(tmp_path / "users.toml")
    ann, _ = add_user_to_file(path, "ann", weight=2.0, max_slots=3), add_user_to_file(path, "bob")
    events: list = []
    handle = SchedulerState.handle

    def recording(state: SchedulerState, event):
        events.append(event)
        return handle(state, event)

    monkeypatch.setattr(SchedulerState, "handle", recording)

    async def scenario() -> None:
        server = SchedulerServer("127.0.0.1", 0, SECRET.encode(), users_file=path)
        address = await server.start()
        port = int(address.rsplit(":", 1)[1])
        conns = [await open_connection("127.0.0.1", port, Role.CLIENT, None, token=ann),
                 await open_connection("127.0.0.1", port, Role.CLIENT, SECRET.encode(), user="lab-admin"),
                 await open_connection("127.0.0.1", port, Role.WORKER, SECRET.encode())]
        remove_user_from_file(path, "bob")
        add_user_to_file(path, "ann")  # rotated
        add_user_to_file(path, "cy")
        assert server.reload_users()
        await asyncio.sleep(0.2)
        for conn in conns:
            conn.close("done")
        await server.stop()

    asyncio.run(scenario())
    connected = [(e.role, e.user, e.admin) for e in events if isinstance(e, PeerConnected)]
    assert connected == [(CLIENT, "ann", False), (CLIENT, "lab-admin", True), (WORKER, os_user(), True)]
    changes = [e for e in events if isinstance(e, UsersChanged)]
    assert changes == [
        UsersChanged({"ann": UserPolicy(2.0, 3), "bob": UserPolicy()}, frozenset()),  # at start
        UsersChanged({"ann": UserPolicy(2.0, 3), "cy": UserPolicy()}, frozenset({"ann", "bob"})),  # the reload
    ]


# ---------------------------------------------------------------- workers
def test_a_worker_given_a_user_token_does_not_join(lab, daemons, tmp_path):
    sched, _, tokens = lab
    # as its secret: refused before it connects, a configuration error
    env = {**daemon_env(tokens["ann"])}
    worker = daemons.worker(sched.address, "--death-timeout", "10", name="token-as-secret", env=env)
    assert exit_status(worker, 20, "a worker with a token as its secret kept running") == 2
    assert "user tokens may only connect as clients; workers need the cluster secret" in worker.log()
    # as JOBSCHED_TOKEN, without a secret: the token is ignored, and the scheduler refuses it
    other_home = tmp_path / "other-config"
    other_home.mkdir()
    env = {**daemon_env(), "JOBSCHED_TOKEN": tokens["ann"], "XDG_CONFIG_HOME": str(other_home)}
    worker = daemons.worker(sched.address, "--death-timeout", "10", name="token-in-env", env=env)
    assert exit_status(worker, 20, "a worker with only a token kept running") == 2
    log = worker.log()
    assert "JOBSCHED_TOKEN is set, but workers never authenticate with a user token" in log
    assert "a shared secret is required" in log and "Traceback" not in log
    with jobsched.Client(sched.address, secret=SECRET, timeout=10, set_as_current=False) as admin:
        workers = list(admin.scheduler_info()["workers"].values())
    assert [w["name"] for w in workers] == ["lab-w0"]
    data_ports = [c.laddr.port for c in psutil.Process(workers[0]["pid"]).net_connections(kind="tcp")
                  if c.status == psutil.CONN_LISTEN]
    # a raw worker hello with a token, at the scheduler, and a peer's at the worker's data port:
    # refused in the handshake, whatever a program does
    for address, role in [(sched.address, Role.WORKER), *((f"tcp://127.0.0.1:{p}", Role.PEER) for p in data_ports)]:
        sock = raw_connect(address)
        try:
            initiator = InitiatorHandshake(role, None, PROTOCOL_VERSION, token=tokens["ann"])
            send_frame(sock, initiator.hello())
            with pytest.raises(jobsched.AuthenticationError, match="user tokens may only connect as clients"):
                initiator.receive(read_frame(sock, FrameDecoder(PREAUTH_LIMITS)).body)
            assert closed_by_peer(sock, 5)
        finally:
            sock.close()
    assert data_ports, "the worker has no data port to try"


# ------------------------------------------------------- private by default
NOBODY_CLIENT = textwrap.dedent(
    """
    import json, sys
    import jobsched
    address, owner_secret = sys.argv[1:3]
    outcome = {}
    try:
        open(owner_secret).read()
        outcome["read"] = "read the owner's secret"
    except OSError as exc:
        outcome["read"] = f"{type(exc).__name__}: {exc}"
    for name, kwargs in {"nothing": {}, "owner's secret file": {"secret_file": owner_secret}}.items():
        try:
            jobsched.Client(address, timeout=5, set_as_current=False, **kwargs).close()
            outcome[name] = "connected"
        except Exception as exc:
            outcome[name] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(outcome))
    """
)


@pytest.fixture
def shared_config_home() -> Iterator[Path]:
    """An ``XDG_CONFIG_HOME`` that other users may traverse (pytest's own folders are private
    already): only the modes jobsched gives its folder and secret keep them out."""
    path = Path(tempfile.mkdtemp(prefix="jobsched-xdg-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _as_nobody(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups", *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=env, cwd="/", stdin=subprocess.DEVNULL,
                          check=False)


def _nobody_unavailable(env: dict[str, str]) -> str | None:
    """None if this interpreter can run jobsched as the user nobody, else why not."""
    if os.geteuid() != 0:
        return "switching to the user nobody needs root"
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is not installed"
    try:
        probe = _as_nobody(sys.executable, "-c", "import jobsched", env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"setpriv failed: {exc}"
    if probe.returncode != 0:
        return (f"the user nobody cannot run {sys.executable} with jobsched (e.g. an interpreter under a private "
                f"home): {probe.stderr.strip()[-300:]}")
    return None


def test_a_scheduler_without_a_secret_admits_its_owner_only(daemons, monkeypatch, tmp_path, shared_config_home):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(shared_config_home))
    env = daemon_env()  # no JOBSCHED_* at all; this XDG_CONFIG_HOME
    assert "JOBSCHED_SECRET" not in env and env["XDG_CONFIG_HOME"] == str(shared_config_home)
    sched = daemons.scheduler(env=env)
    secret_file = shared_config_home / "jobsched" / "secret"
    assert f"using the private secret in {secret_file} (created now" in sched.log()
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(secret_file.parent.stat().st_mode) == 0o700
    assert secret_file.stat().st_uid == os.getuid()

    # the owner: a worker, a client and jobsched status with nothing set
    daemons.worker(sched.address, name="owner-w0", env=env)
    with jobsched.Client(sched.address, timeout=10) as client:
        wait_for_workers(client, ["owner-w0"])
        assert squares(client, 10) == [i * i for i in range(10)]
    status, out, err = run_cli("jobsched.client.cli", "status", sched.address, env=env)
    assert status == 0 and "owner-w0" in out, err

    # the same user without the file (another machine, another config folder) is refused
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.setenv("XDG_CONFIG_HOME", str(other))
    assert "shared secret is required" in str(refusal(sched.address))

    # another OS user: cannot read the secret, and is refused without it
    nobody_env = {**env, "XDG_CONFIG_HOME": str(other), "HOME": "/nonexistent"}
    why_not = _nobody_unavailable(nobody_env)
    if why_not:
        # the files' modes are what keep other users out: check them, and skip only the live attempt
        assert not secret_file.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO)
        pytest.skip(f"trying a client as the user nobody: {why_not}")
    cat = _as_nobody("cat", str(secret_file), env=nobody_env)
    assert cat.returncode != 0 and "Permission denied" in cat.stderr
    result = _as_nobody(sys.executable, "-c", NOBODY_CLIENT, sched.address, str(secret_file), env=nobody_env)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["read"].startswith("PermissionError"), outcome
    assert outcome["nothing"].startswith("AuthenticationError") and "shared secret is required" in outcome["nothing"]
    assert outcome["owner's secret file"].startswith("SecretError") and "Permission denied" in outcome["owner's secret file"]
    print(f"\nas the user nobody: {outcome}")
    assert sched.proc.poll() is None
