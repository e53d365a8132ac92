"""The client's side of cancelling, against a scripted scheduler on 127.0.0.1 that speaks the
real protocol (handshake, framing, messages) but decides nothing: ``Client.cancel`` and
``jobsched cancel`` with what a scheduler replies (cancelled, refused, no answer), a
``Parallel`` whose batches come back cancelled (as a list and as a generator), and the
``priority`` a call's batches carry.  The scheduler's own rules (who may cancel what, what is
cancelled) are tested with real daemons in test_shared_lab.py.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from joblib import Parallel, delayed, parallel_config
from support import BIN_DIR, daemon_env
from tasks import square

import jobsched
from jobsched.protocol import Role
from jobsched.protocol import messages as m
from jobsched.protocol.aio import Connection, start_server
from jobsched.worker.executor import run_batch

SECRET = "cancel-tests-secret-0123456789abcdef"
REASON = "cancelled by root (admin)"


class ScriptedScheduler:
    """Welcomes clients, shows one worker of two slots, and answers the rest with ``script``:
    ``script(message)`` returns the replies to send (``None``: none).  Runs its own loop in a thread."""

    def __init__(self, script: Callable[[m.Message], list[m.Message] | None]) -> None:
        self.script = script
        self.received: list[m.Message] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="scripted-scheduler", daemon=True)
        self.server: asyncio.AbstractServer | None = None
        self.address = ""

    def __enter__(self) -> ScriptedScheduler:
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            start_server("127.0.0.1", 0, SECRET.encode(), frozenset({Role.CLIENT}), self._on_connection), self.loop
        ).result(10)
        self.address = f"tcp://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self.server is not None
            self.server.close()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def _on_connection(self, conn: Connection) -> None:
        conn.set_handlers(self._on_message, lambda _c, _reason: None)

    def _on_message(self, conn: Connection, message: m.Message) -> None:
        self.received.append(message)
        match message:
            case m.RegisterClient():
                replies: list[m.Message] | None = [m.Welcome("client-1", 1.0)]
            case m.Heartbeat():
                replies = [m.Heartbeat()]
            case m.InfoRequest():
                worker = {"name": "w0", "address": "tcp://10.9.9.9:1", "host": "elsewhere", "nthreads": 2, "running": 0}
                replies = [m.InfoReply(message.request_id, {"workers": {"tcp://10.9.9.9:1": worker}})]
            case _:
                replies = self.script(message)
        for reply in replies or ():
            conn.send(reply)

    def of_type(self, kind: type[m.Message]) -> list:
        return [message for message in self.received if isinstance(message, kind)]


def cancel_replies(message: m.Message) -> list[m.Message] | None:
    """The admin's answers: call ``c-1`` and user ``bob`` exist; anything else does not."""
    if isinstance(message, m.CancelRequest):
        if message.call == "c-1":
            return [m.CancelReply(message.request_id, 1)]
        if message.user == "bob":
            return [m.CancelReply(message.request_id, 3)]
        if message.user == "carol":
            return [m.CancelReply(message.request_id, error="only the admin may cancel another user's work")]
        return [m.CancelReply(message.request_id, error=f"no call {message.call!r} is known")]
    return None


@pytest.fixture
def scheduler() -> Iterator[ScriptedScheduler]:
    with ScriptedScheduler(cancel_replies) as fake:
        yield fake


@pytest.mark.timeout(60)
def test_cancel_returns_the_count_or_raises_the_schedulers_reason(scheduler: ScriptedScheduler):
    with jobsched.Client(scheduler.address, secret=SECRET, timeout=10, set_as_current=False) as client:
        assert client.cancel(call="c-1") == 1
        assert client.cancel(user="bob") == 3
        with pytest.raises(jobsched.CancelRefusedError, match="refused to cancel: only the admin may cancel"):
            client.cancel(user="carol")
        with pytest.raises(jobsched.CancelRefusedError, match="no call 'c-9' is known"):
            client.cancel(call="c-9")
        with pytest.raises(ValueError, match="exactly one of call= .* or user="):
            client.cancel(call="c-1", user="bob")
        with pytest.raises(ValueError, match="exactly one"):
            client.cancel()
        assert client.scheduler_info()["workers"]  # the connection is still in use after a refusal
    requests = scheduler.of_type(m.CancelRequest)
    assert [(r.call, r.user) for r in requests] == [("c-1", ""), ("", "bob"), ("", "carol"), ("c-9", "")]


@pytest.mark.timeout(60)
def test_a_cancel_request_nobody_answers_fails_after_the_clients_timeout():
    with ScriptedScheduler(lambda _message: None) as silent:
        with jobsched.Client(silent.address, secret=SECRET, timeout=1.5, set_as_current=False) as client:
            start = time.monotonic()
            with pytest.raises(jobsched.SchedulerUnreachableError, match="did not answer within 1.5 s"):
                client.cancel(call="c-1")
            assert time.monotonic() - start < 5


def cli(address: str, *args: str) -> subprocess.CompletedProcess:
    env = daemon_env(secret=SECRET)
    return subprocess.run([str(BIN_DIR / "jobsched"), "cancel", *args, "--scheduler", address, "--timeout", "10"],
                          env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.timeout(120)
def test_the_cancel_command_prints_the_count_or_the_refusal(scheduler: ScriptedScheduler):
    done = cli(scheduler.address, "--user", "bob")
    assert (done.returncode, done.stdout, done.stderr) == (0, "cancelled 3 calls\n", "")
    done = cli(scheduler.address, "c-1")
    assert (done.returncode, done.stdout) == (0, "cancelled 1 call\n")
    refused = cli(scheduler.address, "--user", "carol")
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr == (f"jobsched: the scheduler at {scheduler.address} refused to cancel: "
                              "only the admin may cancel another user's work\n")
    usage = cli(scheduler.address)
    assert usage.returncode == 2 and "either one CALL" in usage.stderr


def cancel_every_batch(message: m.Message) -> list[m.Message] | None:
    """Someone cancelled the call: each of its batches ends cancelled, with the reason."""
    if isinstance(message, m.SubmitBatch):
        return [m.BatchDone(message.batch_id, m.CANCELLED, "", REASON)]
    return None


@pytest.mark.timeout(60)
@pytest.mark.parametrize("return_as", ["list", "generator", "generator_unordered"])
def test_a_call_cancelled_on_the_scheduler_raises_call_cancelled_error(return_as: str):
    with ScriptedScheduler(cancel_every_batch) as fake:
        with jobsched.Client(fake.address, secret=SECRET, timeout=10, set_as_current=False) as client:
            with parallel_config(backend="cluster", scheduler=client, priority=4):
                with pytest.raises(jobsched.CallCancelledError, match=r"^cancelled by root \(admin\)$"):
                    out = Parallel(n_jobs=-1, batch_size=1, return_as=return_as)(
                        delayed(square)(i) for i in range(50))
                    list(out)
                # the client still serves the next call, on another call id
                fake.script = lambda message: [_run(message)] if isinstance(message, m.SubmitBatch) else None
                assert Parallel(n_jobs=-1, batch_size=1)(delayed(square)(i) for i in range(4)) == [0, 1, 4, 9]
    submitted = fake.of_type(m.SubmitBatch)
    assert submitted and {s.priority for s in submitted} == {4}
    cancelled_call = submitted[0].call_id
    # joblib stops at the error: far fewer than the 50 batches reach the scheduler, and it
    # hears that the caller ended the call
    assert sum(s.call_id == cancelled_call for s in submitted) < 50
    assert cancelled_call in {c.call_id for c in fake.of_type(m.CancelCall)}


def _run(message: m.SubmitBatch) -> m.BatchDone:
    """Run the batch here, as a worker would."""
    status, frames, _duration = run_batch(message.frames)
    return m.BatchDone(message.batch_id, status, "w0", "", tuple(frames))
