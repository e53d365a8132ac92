"""Operations against the real CLIs and daemons: the configuration a daemon prints and refuses,
``jobsched status`` and the progress bar (configuration precedence itself is in
unit/test_config.py)."""

from __future__ import annotations

import json
import subprocess

import pytest
from joblib import Parallel, delayed, parallel_config
from support import BIN_DIR, RunningCluster, daemon_env, write_file
from tasks import square


def run(args: list[str], env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(60)
def test_print_config_of_the_real_cli_shows_values_and_sources(tmp_path):
    env = daemon_env()
    env["HOME"] = str(tmp_path / "home")
    user = write_file(tmp_path / "home" / ".config" / "jobsched" / "jobsched.toml", "[scheduler]\nheartbeat-timeout = 7\n")
    env["JOBSCHED_ALLOWED_FAILURES"] = "5"
    result = run([str(BIN_DIR / "jobsched-scheduler"), "--port", "9000", "--print-config"], env)
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert "7.0" in lines["heartbeat-timeout"] and user in lines["heartbeat-timeout"]
    assert "5" in lines["allowed-failures"] and "$JOBSCHED_ALLOWED_FAILURES" in lines["allowed-failures"]
    assert "9000" in lines["port"] and "command line" in lines["port"]
    assert "default" in lines["host"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("argv, env_extra, fragment", [
    (["--port", "70000"], {}, "--port"),
    ([], {"JOBSCHED_PORT": "eighty"}, "--port from $JOBSCHED_PORT"),
    ([], {"JOBSCHED_HEARTBEAT_TIMEOUT": "-3"}, "--heartbeat-timeout from $JOBSCHED_HEARTBEAT_TIMEOUT"),
])
def test_bad_values_stop_the_daemon_at_start_naming_the_option(tmp_path, argv, env_extra, fragment):
    env = {**daemon_env(), "HOME": str(tmp_path), **env_extra}
    result = run([str(BIN_DIR / "jobsched-scheduler"), *argv], env)
    assert result.returncode == 2
    assert fragment in result.stderr


@pytest.mark.timeout(120)
def test_status_command_prints_the_cluster(cluster: RunningCluster):
    env = {**daemon_env(), "HOME": "/nonexistent"}
    with parallel_config(backend="cluster", scheduler=cluster.client):
        assert Parallel(n_jobs=-1)(delayed(square)(i) for i in range(20)) == [i * i for i in range(20)]
    table = run([str(BIN_DIR / "jobsched"), "status", cluster.address], env)
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split()[:4] == ["WORKER", "HOST", "STATUS", "SLOTS"]
    assert any(row.startswith("w0 ") for row in rows) and any(row.startswith("w1 ") for row in rows)
    assert f"scheduler {cluster.address}: 2 workers" in table.stdout
    as_json = run([str(BIN_DIR / "jobsched"), "status", cluster.address, "--json"], env)
    info = json.loads(as_json.stdout)
    assert sorted(w["name"] for w in info["workers"].values()) == ["w0", "w1"]
    assert sum(w["completed"] for w in info["workers"].values()) >= 1
    assert info["counters"]["done:ok"] >= 1


@pytest.mark.timeout(60)
def test_status_command_without_a_scheduler_fails_in_one_line(tmp_path):
    env = {**daemon_env(), "HOME": str(tmp_path)}
    result = run([str(BIN_DIR / "jobsched"), "status", "tcp://127.0.0.1:9", "--timeout", "3"], env)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("jobsched: cannot reach the scheduler at tcp://127.0.0.1:9")
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(120)
def test_progress_bar_counts_the_calls_tasks(cluster: RunningCluster, capsys):
    pytest.importorskip("tqdm")
    with parallel_config(backend="cluster", scheduler=cluster.client, progress=True):
        result = Parallel(n_jobs=-1, batch_size=1)(delayed(square)(i) for i in range(40))
    assert result == [i * i for i in range(40)]
    err = capsys.readouterr().err
    assert "jobsched" in err and "40/40" in err and "task" in err
    with parallel_config(backend="cluster", scheduler=cluster.client):  # off by default
        Parallel(n_jobs=-1, batch_size=1)(delayed(square)(i) for i in range(40))
    assert "jobsched" not in capsys.readouterr().err
