"""Which credential a client, a worker or a scheduler uses (runtime/secret.py): arguments, then
the environment, then the default files in ``$XDG_CONFIG_HOME/jobsched``; tokens before the
secret at each level; the private default secret a scheduler creates."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from support import private_file

from jobsched.runtime import secret as secret_module
from jobsched.runtime.secret import (
    ENV_SECRET,
    ENV_SECRET_FILE,
    ENV_TOKEN,
    ENV_TOKEN_FILE,
    SecretError,
    config_dir,
    default_secret_path,
    default_token_path,
    ensure_default_secret,
    load_credentials,
    load_secret,
    load_token,
)
from jobsched.runtime.tokens import new_token
from jobsched.worker.cli import worker_secret

ANN, BOB = new_token("ann"), new_token("bob")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """No credentials in the environment; ``XDG_CONFIG_HOME`` an empty folder of this test."""
    for name in (ENV_SECRET, ENV_SECRET_FILE, ENV_TOKEN, ENV_TOKEN_FILE, "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config))
    return config / "jobsched"


def test_the_config_folder_follows_xdg(home, monkeypatch, tmp_path):
    assert config_dir() == str(home)
    assert default_secret_path() == str(home / "secret") and default_token_path() == str(home / "token")
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/path")  # the XDG spec: ignored
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert config_dir() == str(tmp_path / "h" / ".config" / "jobsched")
    monkeypatch.delenv("XDG_CONFIG_HOME")
    assert config_dir() == str(tmp_path / "h" / ".config" / "jobsched")


def test_nothing_anywhere(home):
    assert load_credentials() == (None, None)
    assert load_secret() is None and load_token() is None


def test_the_default_secret_file_is_the_last_fallback(home, monkeypatch, tmp_path):
    home.mkdir(parents=True)
    private_file(home / "secret", "default-secret-0123456789\n")
    assert load_secret() == b"default-secret-0123456789"
    assert load_credentials() == (b"default-secret-0123456789", None)
    monkeypatch.setenv(ENV_SECRET, "from-env-0123456789")
    assert load_secret() == b"from-env-0123456789"


def test_a_default_secret_file_others_can_read_is_refused(home):
    home.mkdir(parents=True)
    private_file(home / "secret", "s", 0o644)
    with pytest.raises(SecretError, match="chmod 600"):
        load_secret()


def test_explicit_arguments_come_first(home, monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_TOKEN, BOB)
    monkeypatch.setenv(ENV_SECRET, "env-secret-0123456789")
    assert load_credentials(token=ANN) == (None, ANN)
    assert load_credentials(token_file=private_file(tmp_path / "t", ANN + "\n")) == (None, ANN)
    assert load_credentials(secret="explicit-0123456789") == (b"explicit-0123456789", None)  # beats the environment's token
    assert load_credentials(secret_file=private_file(tmp_path / "s", "from-file-0123456789")) == (b"from-file-0123456789", None)
    with pytest.raises(SecretError, match="not both"):
        load_credentials(secret="x", token=ANN)


def test_then_the_environment_a_token_before_the_secret(home, monkeypatch, tmp_path):
    home.mkdir(parents=True)
    private_file(home / "token", BOB)
    private_file(home / "secret", "default-secret-0123456789")
    monkeypatch.setenv(ENV_SECRET, "env-secret-0123456789")
    assert load_credentials() == (b"env-secret-0123456789", None)  # the environment beats the default files
    monkeypatch.setenv(ENV_TOKEN_FILE, private_file(tmp_path / "t", ANN))
    assert load_credentials() == (None, ANN)
    monkeypatch.setenv(ENV_TOKEN, BOB)
    assert load_credentials() == (None, BOB)  # JOBSCHED_TOKEN before JOBSCHED_TOKEN_FILE


def test_then_the_default_files_the_token_before_the_secret(home):
    home.mkdir(parents=True)
    private_file(home / "secret", "default-secret-0123456789")
    assert load_credentials() == (b"default-secret-0123456789", None)
    private_file(home / "token", ANN + "\n")
    assert load_credentials() == (None, ANN)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_token_file_others_can_read_is_refused(home, monkeypatch, tmp_path, mode):
    path = private_file(tmp_path / "token", ANN, mode)
    monkeypatch.setenv(ENV_TOKEN_FILE, path)
    with pytest.raises(SecretError, match=f"token file {path} is accessible by group or others") as info:
        load_credentials()
    assert "chmod 600" in str(info.value)
    monkeypatch.delenv(ENV_TOKEN_FILE)
    home.mkdir(parents=True)
    private_file(home / "token", ANN, mode)
    with pytest.raises(SecretError, match="chmod 600"):
        load_credentials()


@pytest.mark.parametrize("bad", ["hunter2", "ann", "ann:", "ann:short"])
def test_something_that_is_not_a_token_is_refused_saying_what_one_looks_like(home, monkeypatch, tmp_path, bad):
    with pytest.raises(SecretError, match="NAME:SECRET"):
        load_credentials(token=bad)
    monkeypatch.setenv(ENV_TOKEN, bad)
    with pytest.raises(SecretError, match=f"\\${ENV_TOKEN} does not hold a user token"):
        load_credentials()


def test_ensure_default_secret_creates_a_private_folder_and_file_once(home):
    old = os.umask(0)
    try:
        secret, path, created = ensure_default_secret()
    finally:
        os.umask(old)
    assert created and path == str(home / "secret")
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(secret) >= 32
    assert ensure_default_secret() == (secret, path, False)  # kept: every daemon of this user agrees
    assert load_secret() == secret


def test_ensure_default_secret_explains_a_failure(home, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(secret_module.os, "makedirs", refuse)
    with pytest.raises(SecretError, match="cannot create the default secret file .*Permission denied"):
        ensure_default_secret()


def test_a_worker_ignores_tokens_and_refuses_a_token_as_its_secret(home, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv(ENV_TOKEN, ANN)
    assert worker_secret(None) is None
    assert "never authenticate with a user token" in caplog.text
    monkeypatch.setenv(ENV_SECRET, "cluster-secret-0123456789")
    assert worker_secret(None) == b"cluster-secret-0123456789"
    monkeypatch.setenv(ENV_SECRET, ANN)
    with pytest.raises(SecretError, match="user tokens may only connect as clients; workers need the cluster secret"):
        worker_secret(None)
    with pytest.raises(SecretError, match="is a user token"):
        worker_secret(private_file(tmp_path / "s", ANN))
