"""Weak secrets are refused wherever they come from (the environment, a file, the argument, a
users file's token), with a message saying how to make a strong one; the generators
jobsched itself uses pass the rule by far."""

from __future__ import annotations

import secrets

import pytest
from support import private_file

from jobsched.runtime.secret import (
    ENV_SECRET,
    ENV_SECRET_FILE,
    MIN_DISTINCT_BYTES,
    MIN_SECRET_BYTES,
    SecretError,
    ensure_default_secret,
    load_credentials,
    load_secret,
    weakness,
    write_new_secret,
)
from jobsched.runtime.tokens import new_token
from jobsched.runtime.users import UsersFileError, read_users


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in (ENV_SECRET, ENV_SECRET_FILE, "CREDENTIALS_DIRECTORY", "JOBSCHED_TOKEN", "JOBSCHED_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    return monkeypatch


@pytest.mark.timeout(30)
@pytest.mark.parametrize("secret", [b"", b"hunter2", b"s3cret", b"right-secret", b"0123456789abcde"])
def test_shorter_than_16_bytes_is_weak(secret):
    assert len(secret) < MIN_SECRET_BYTES
    assert f"{len(secret)} bytes long" in (weakness(secret) or "")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("secret", [b"a" * 64, b"ab" * 16, b"abcdefg" * 5, b"\x00\x01" * 100])
def test_too_few_different_bytes_is_weak(secret):
    assert len(secret) >= MIN_SECRET_BYTES and len(set(secret)) < MIN_DISTINCT_BYTES
    assert "different characters" in (weakness(secret) or "")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("secret", [b"0123456789abcdef", b"abcdefgh" * 2, bytes(range(256))])
def test_sixteen_bytes_of_eight_different_values_pass(secret):
    assert weakness(secret) is None


@pytest.mark.timeout(30)
def test_what_jobsched_generates_is_strong(clean_env, tmp_path):
    write_new_secret(str(tmp_path / "generated"))
    assert load_secret(str(tmp_path / "generated")) is not None
    secret, _, created = ensure_default_secret()
    assert created and weakness(secret) is None
    for _ in range(200):  # random draws: never near the bound
        assert weakness(secrets.token_hex(32).encode()) is None  # the embedded cluster's
        assert weakness(secrets.token_urlsafe(48).encode()) is None
        assert weakness(new_token("ann").partition(":")[2].encode()) is None


def expect_weak(where: str):
    return pytest.raises(SecretError, match=rf"{where} is too weak: .*jobsched-scheduler --generate-secret PATH"
                                            r".*secrets\.token_hex\(32\)")


@pytest.mark.timeout(30)
def test_every_source_is_checked(clean_env, tmp_path):
    with expect_weak("the secret given"):
        load_secret(secret="short")
    with expect_weak("the secret given"):
        load_credentials(secret="a" * 40)
    path = private_file(tmp_path / "short", "s3cret\n")  # the newline does not count
    with expect_weak(f"secret file {path}"):
        load_secret(path)
    clean_env.setenv(ENV_SECRET_FILE, path)
    with expect_weak(rf"\${ENV_SECRET_FILE} \({path}\)"):
        load_secret()
    clean_env.setenv(ENV_SECRET, "hunter2")
    with expect_weak(rf"\${ENV_SECRET}"):
        load_secret()
    with expect_weak(rf"\${ENV_SECRET}"):
        load_credentials()
    clean_env.delenv(ENV_SECRET)
    clean_env.delenv(ENV_SECRET_FILE)
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    private_file(credentials / "jobsched-secret", "0123456789abcde\n")  # 15 bytes
    clean_env.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    with expect_weak(f"secret file {credentials / 'jobsched-secret'}"):
        load_secret()


@pytest.mark.timeout(30)
def test_the_default_secret_file_is_checked_too(clean_env, tmp_path):
    folder = tmp_path / "xdg" / "jobsched"
    folder.mkdir(parents=True)
    private_file(folder / "secret", "password\n")
    with expect_weak(f"secret file {folder / 'secret'}"):
        load_secret()


@pytest.mark.timeout(30)
def test_a_hand_written_token_in_the_users_file_is_held_to_the_rule(tmp_path):
    weak = private_file(tmp_path / "users.toml", f'[users.ann]\ntoken = "ann:{"ab" * 20}"\n')
    with pytest.raises(UsersFileError, match=r"\[users.ann\] token is too weak: it uses only 2 different .*--add-user ann"):
        read_users(weak)
    strong = private_file(tmp_path / "users2.toml", f'[users.ann]\ntoken = "{new_token("ann")}"\n')
    assert list(read_users(strong)) == ["ann"]
