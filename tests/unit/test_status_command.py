"""``jobsched status``'s table (``format_status``) and ``jobsched cancel``'s output and exit
status, with the Client replaced: no scheduler, no sockets.  The real command against real
daemons is in integration/test_operations.py."""

from __future__ import annotations

import json
import re

import pytest

from jobsched.client import cli
from jobsched.client.errors import CancelRefusedError, SchedulerUnreachableError


def status_info(**extra: object) -> dict:
    """What a scheduler's info() holds, as far as the table reads it."""
    worker = {"name": "w0", "host": "node1", "status": "running", "running": 1, "nthreads": 2, "memory": 50 << 20,
              "memory_limit": 0, "data_keys": 0, "data_bytes": 0, "completed": 12}
    return {"address": "tcp://10.0.0.1:8686", "workers": {"tcp://10.0.0.2:9000": worker}, "running": 1, "slots": 2,
            "queued": 7, "clients": 3, "data_keys": 0, **extra}


USERS = {
    "bob": {"running": 1, "queued": 2, "calls": 1, "share": 0.5, "usage_hour": 750.0, "usage": 700.0,
            "weight": 1.0, "max_slots": 0},
    "(others)": {"running": 1, "queued": 5, "calls": 4, "share": 0.5, "usage_hour": 7200.0, "usage": 9000.0,
                 "weight": 0.0, "max_slots": 0},
    "alice": {"running": 0, "queued": 0, "calls": 0, "share": 0.0, "usage_hour": 42.0, "usage": 40.0,
              "weight": 2.0, "max_slots": 4},
}
CALLS = [
    {"id": "c-3f2a", "user": "bob", "client": "laptop-1234", "running": 1, "queued": 2, "priority": 5},
    {"id": "c-77b0", "user": "bob", "client": "node7-99", "running": 0, "queued": 0, "priority": -1},
]


def rows_after(text: str, header: str) -> list[list[str]]:
    """The rows (split on runs of spaces) of the table whose header starts with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 1:]:
        if not line:
            break
        rows.append(re.split(r" {2,}", line))
    return rows


@pytest.mark.timeout(30)
def test_the_users_and_calls_tables_follow_the_workers_table():
    text = cli.format_status(status_info(users=USERS, calls=CALLS, viewer={"user": "bob", "admin": False}))
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["WORKER", "HOST", "STATUS", "SLOTS"]
    users_at = next(i for i, line in enumerate(lines) if line.startswith("USER "))
    calls_at = next(i for i, line in enumerate(lines) if line.startswith("CALL "))
    assert 0 < users_at < calls_at
    assert lines[users_at].split() == ["USER", "RUNNING", "QUEUED", "CALLS", "SHARE", "USAGE", "1H"]
    # by name, the aggregate of everyone else last; share as a percentage, usage as slot-time
    assert rows_after(text, "USER ") == [
        ["alice", "0", "0", "0", "0.0%", "42 slot-s"],
        ["bob", "1", "2", "1", "50.0%", "12.5 slot-min"],
        ["(others)", "1", "5", "4", "50.0%", "2.0 slot-h"],
    ]
    assert lines[calls_at].split() == ["CALL", "USER", "CLIENT", "RUNNING", "QUEUED", "PRIORITY"]
    assert rows_after(text, "CALL ") == [
        ["c-3f2a", "bob", "laptop-1234", "1", "2", "5"],
        ["c-77b0", "bob", "node7-99", "0", "0", "-1"],
    ]
    assert lines[-1] == ("scheduler tcp://10.0.0.1:8686: 1 workers, 1/2 slots busy, 7 batches queued, 3 clients, "
                         "0 data keys (seen as bob)")


@pytest.mark.timeout(30)
def test_columns_stay_aligned_with_long_names():
    users = {"a-very-long-user-name": dict(USERS["bob"]), "x": dict(USERS["alice"])}
    lines = cli.format_status(status_info(users=users)).splitlines()
    table = lines[lines.index("") + 1:]
    header, first, second = table[:3]
    for column in ("RUNNING", "SHARE", "USAGE 1H"):
        at = header.index(column)
        assert first[at - 1] == " " and first[at] != " " and second[at - 1] == " " and second[at] != " "


@pytest.mark.timeout(30)
def test_a_scheduler_without_users_or_calls_gets_the_old_table():
    text = cli.format_status(status_info())
    assert "USER" not in text and "CALL" not in text and "seen as" not in text
    assert text.splitlines()[-1].startswith("scheduler tcp://10.0.0.1:8686: 1 workers")
    empty = cli.format_status(status_info(users={}, calls=[], viewer={"user": "root", "admin": True}))
    assert "USER" not in empty and "CALL" not in empty and empty.endswith("(seen as root, admin)")


class FakeClient:
    """Stands for the Client a command makes; records the calls."""

    def __init__(self, info: dict | None = None, cancelled: int = 0, error: Exception | None = None) -> None:
        self.info, self.cancelled, self.error = info, cancelled, error
        self.cancels: list[tuple[str | None, str | None]] = []

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def scheduler_info(self) -> dict:
        if self.error is not None:
            raise self.error
        assert self.info is not None
        return self.info

    def cancel(self, call: str | None = None, user: str | None = None) -> int:
        self.cancels.append((call, user))
        if self.error is not None:
            raise self.error
        return self.cancelled


@pytest.fixture
def fake_client(monkeypatch):
    made: list[tuple[object, FakeClient]] = []

    def install(client: FakeClient) -> list[tuple[object, FakeClient]]:
        def connect(args):
            made.append((args, client))
            return client

        monkeypatch.setattr(cli, "_client", connect)
        return made

    return install


@pytest.mark.timeout(30)
def test_status_json_holds_users_calls_and_viewer_unchanged(fake_client, capsys):
    info = status_info(users=USERS, calls=CALLS, viewer={"user": "bob", "admin": False})
    fake_client(FakeClient(info))
    assert cli.main(["status", "tcp://10.0.0.1:8686", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == info


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("argv", "expected", "address"), [
    (["cancel", "c-3f2a"], ("c-3f2a", None), "tcp://127.0.0.1:8686"),
    (["cancel", "--user", "bob", "--scheduler", "tcp://10.0.0.1:8686"], (None, "bob"), "tcp://10.0.0.1:8686"),
])
def test_cancel_prints_how_many_calls_it_cancelled(fake_client, capsys, argv, expected, address):
    made = fake_client(client := FakeClient(cancelled=1))
    assert cli.main(argv) == 0
    assert client.cancels == [expected]
    assert capsys.readouterr().out == "cancelled 1 call\n"
    assert cli._address(made[0][0]) == address  # type: ignore[arg-type]


@pytest.mark.timeout(30)
def test_cancel_counts_in_plural(fake_client, capsys):
    fake_client(FakeClient(cancelled=3))
    assert cli.main(["cancel", "--user", "bob"]) == 0
    assert capsys.readouterr().out == "cancelled 3 calls\n"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("error", [
    CancelRefusedError("the scheduler at tcp://127.0.0.1:8686 refused to cancel: "
                       "only the admin may cancel another user's work"),
    SchedulerUnreachableError("cannot reach the scheduler at tcp://127.0.0.1:8686: connection refused"),
])
def test_a_refused_or_failed_cancel_says_why_in_one_line_and_exits_1(fake_client, capsys, error):
    fake_client(FakeClient(error=error))
    assert cli.main(["cancel", "c-1"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"jobsched: {error}\n"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("argv", [["cancel"], ["cancel", "c-1", "--user", "bob"]])
def test_cancel_needs_exactly_one_call_or_user(fake_client, capsys, argv):
    made = fake_client(FakeClient())
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "either one CALL" in capsys.readouterr().err
    assert made == []  # refused before connecting
