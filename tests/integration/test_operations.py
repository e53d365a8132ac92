"""Operations: configuration precedence (files, environment, flags), ``jobsched status`` and
the progress bar, against real daemons where a daemon is involved."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import RunningCluster, daemon_env
from joblib import Parallel, delayed, parallel_config
from jobsched.runtime import config
from jobsched.worker.cli import build_parser as worker_parser
from tasks import square

BIN = Path(sys.executable).parent


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


@pytest.fixture
def config_files(tmp_path, monkeypatch):
    """Point the two system-wide config locations at files of this test."""
    system = tmp_path / "etc" / "jobsched.toml"
    user = tmp_path / "home" / ".config" / "jobsched" / "jobsched.toml"
    monkeypatch.setattr(config, "SYSTEM_FILES", (str(system), str(user)))
    for name in list(os.environ):
        if name.startswith("JOBSCHED_"):
            monkeypatch.delenv(name)
    return system, user


def test_each_layer_overrides_the_one_below(config_files, tmp_path, monkeypatch):
    system, user = config_files
    write(system, "[worker]\nnthreads = 2\nnworkers = 2\ndeath-timeout = 11\ndrain-timeout = 12\ncancel-grace = 13\n")
    write(user, "[worker]\nnworkers = 3\ndeath-timeout = 21\ndrain-timeout = 22\ncancel-grace = 23\n")
    extra = write(tmp_path / "extra.toml", "log-level = \"WARNING\"\n[worker]\ndeath-timeout = 31\ndrain-timeout = 32\n")
    monkeypatch.setenv("JOBSCHED_DRAIN_TIMEOUT", "42")
    args, sources = config.resolve(worker_parser(), ["tcp://h:1", "--config", extra, "--cancel-grace", "53"], "worker")
    assert (args.nthreads, sources["nthreads"]) == (2, str(system))
    assert (args.nworkers, sources["nworkers"]) == (3, str(user))
    assert (args.death_timeout, sources["death_timeout"]) == (31.0, extra)
    assert (args.drain_timeout, sources["drain_timeout"]) == (42.0, "$JOBSCHED_DRAIN_TIMEOUT")
    assert (args.cancel_grace, sources["cancel_grace"]) == (53.0, "command line")
    assert (args.log_level, sources["log_level"]) == ("WARNING", extra)
    assert (args.memory_limit, sources["memory_limit"]) == ("0", "default")


def test_the_other_daemons_section_is_not_applied(config_files):
    system, _ = config_files
    write(system, "[scheduler]\nport = 9999\n[worker]\nnthreads = 4\n")
    args, sources = config.resolve(worker_parser(), ["tcp://h:1"], "worker")
    assert args.nthreads == 4 and "port" not in sources


@pytest.mark.parametrize("text, fragment", [
    ("[worker]\nbogus = 1\n", "unknown option [worker] 'bogus'"),
    ("nthreads = 2\n", "unknown top-level option 'nthreads'"),
    ("[worker]\nnthreads = 0\n", "--nthreads from"),
    ("[worker]\nmemory-limit = \"plenty\"\n", "invalid memory limit 'plenty'"),
    ("[worker\n", "not valid TOML"),
])
def test_bad_config_names_the_option_and_the_file(config_files, text, fragment):
    system, _ = config_files
    write(system, text)
    with pytest.raises(config.ConfigError) as info:
        config.resolve(worker_parser(), ["tcp://h:1"], "worker")
    assert fragment in str(info.value) and str(system) in str(info.value)


def run(args: list[str], env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(60)
def test_print_config_of_the_real_cli_shows_values_and_sources(tmp_path):
    env = daemon_env()
    env["HOME"] = str(tmp_path / "home")
    user = write(tmp_path / "home" / ".config" / "jobsched" / "jobsched.toml", "[scheduler]\nheartbeat-timeout = 7\n")
    env["JOBSCHED_ALLOWED_FAILURES"] = "5"
    result = run([str(BIN / "jobsched-scheduler"), "--port", "9000", "--print-config"], env)
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
    result = run([str(BIN / "jobsched-scheduler"), *argv], env)
    assert result.returncode == 2
    assert fragment in result.stderr


@pytest.mark.timeout(120)
def test_status_command_prints_the_cluster(cluster: RunningCluster):
    env = {**daemon_env(), "HOME": "/nonexistent"}
    with parallel_config(backend="cluster", scheduler=cluster.client):
        assert Parallel(n_jobs=-1)(delayed(square)(i) for i in range(20)) == [i * i for i in range(20)]
    table = run([str(BIN / "jobsched"), "status", cluster.address], env)
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split()[:4] == ["WORKER", "HOST", "STATUS", "SLOTS"]
    assert any(row.startswith("w0 ") for row in rows) and any(row.startswith("w1 ") for row in rows)
    assert f"scheduler {cluster.address}: 2 workers" in table.stdout
    as_json = run([str(BIN / "jobsched"), "status", cluster.address, "--json"], env)
    info = json.loads(as_json.stdout)
    assert sorted(w["name"] for w in info["workers"].values()) == ["w0", "w1"]
    assert sum(w["completed"] for w in info["workers"].values()) >= 1
    assert info["counters"]["done:ok"] >= 1


@pytest.mark.timeout(60)
def test_status_command_without_a_scheduler_fails_in_one_line(tmp_path):
    env = {**daemon_env(), "HOME": str(tmp_path)}
    result = run([str(BIN / "jobsched"), "status", "tcp://127.0.0.1:9", "--timeout", "3"], env)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("jobsched: cannot reach the scheduler at tcp://127.0.0.1:9")
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(120)
def test_progress_bar_counts_the_calls_batches(cluster: RunningCluster, capsys):
    pytest.importorskip("tqdm")
    with parallel_config(backend="cluster", scheduler=cluster.client, progress=True):
        result = Parallel(n_jobs=-1, batch_size=1)(delayed(square)(i) for i in range(40))
    assert result == [i * i for i in range(40)]
    err = capsys.readouterr().err
    assert "jobsched" in err and "40/40" in err and "batch" in err
    with parallel_config(backend="cluster", scheduler=cluster.client):  # off by default
        Parallel(n_jobs=-1, batch_size=1)(delayed(square)(i) for i in range(40))
    assert "jobsched" not in capsys.readouterr().err
