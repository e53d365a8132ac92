"""Configuration precedence: defaults, the system and user files, ``--config``, the
environment and flags, as ``jobsched.runtime.config.resolve`` layers them (the real CLIs'
``--print-config`` and refusals are in integration/test_operations.py)."""

from __future__ import annotations

import os

import pytest
from support import write_file

from jobsched.runtime import config
from jobsched.worker.cli import build_parser as worker_parser


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
    write_file(system, "[worker]\nnthreads = 2\nnworkers = 2\ndeath-timeout = 11\ndrain-timeout = 12\ncancel-grace = 13\n")
    write_file(user, "[worker]\nnworkers = 3\ndeath-timeout = 21\ndrain-timeout = 22\ncancel-grace = 23\n")
    extra = write_file(tmp_path / "extra.toml", "log-level = \"WARNING\"\n[worker]\ndeath-timeout = 31\ndrain-timeout = 32\n")
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
    write_file(system, "[scheduler]\nport = 9999\n[worker]\nnthreads = 4\n")
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
    write_file(system, text)
    with pytest.raises(config.ConfigError) as info:
        config.resolve(worker_parser(), ["tcp://h:1"], "worker")
    assert fragment in str(info.value) and str(system) in str(info.value)
