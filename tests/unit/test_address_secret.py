"""Addresses, the scheduler file, and where the shared secret comes from."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import private_file

from jobsched.protocol import DEFAULT_PORT, Address, is_loopback_host, parse_address
from jobsched.runtime.scheduler_file import read_scheduler_file, write_scheduler_file
from jobsched.runtime.secret import ENV_SECRET, ENV_SECRET_FILE, SecretError, load_secret, read_secret_file

# ------------------------------------------------------------------ addresses


@pytest.mark.parametrize(
    "text, expected",
    [
        ("tcp://10.0.0.5:9000", Address("tcp", "10.0.0.5", 9000)),
        ("tls://sched.lab:8686", Address("tls", "sched.lab", 8686)),
        ("TCP://Host:1", Address("tcp", "Host", 1)),
        ("10.0.0.5:9000", Address("tcp", "10.0.0.5", 9000)),
        ("sched.lab", Address("tcp", "sched.lab", DEFAULT_PORT)),
        ("tcp://sched.lab", Address("tcp", "sched.lab", DEFAULT_PORT)),
        ("[::1]:8686", Address("tcp", "::1", 8686)),
        ("tcp://[::1]:0", Address("tcp", "::1", 0)),
        ("tls://[fe80::1]", Address("tls", "fe80::1", DEFAULT_PORT)),
        ("::1", Address("tcp", "::1", DEFAULT_PORT)),
        ("  tcp://127.0.0.1:65535/  ", Address("tcp", "127.0.0.1", 65535)),
        ("localhost:80", Address("tcp", "localhost", 80)),
    ],
)
def test_parse_good_addresses(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["sched.lab:80:90", "tcp://host:1:2", "a:b:c", "tcp://1.2.3.4:80:80"])
def test_a_host_with_several_colons_must_be_an_ipv6_address(text):
    # otherwise "sched.lab:80:90" became host "sched.lab:80:90", port 8686, and failed later in DNS
    with pytest.raises(ValueError, match="invalid"):
        parse_address(text)


def test_default_port_is_8686_and_can_be_overridden():
    assert DEFAULT_PORT == 8686
    assert parse_address("host", default_port=1234).port == 1234
    assert parse_address("host:99", default_port=1234).port == 99


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "expected tcp://host:port"),
        ("   ", "expected tcp://host:port"),
        (None, "expected tcp://host:port"),
        (8686, "expected tcp://host:port"),
        ("http://host:80", "scheme must be one of tcp, tls"),
        ("udp://host:80", "scheme"),
        ("tcp://", "no host"),
        (":8686", "no host"),
        ("[]:8686", "no host"),
        ("[::1", "unclosed"),
        ("[::1]x", "invalid address"),
        ("host:65536", "port must be a number from 0 to 65535"),
        ("host:99999999999999999999", "port must be"),
        ("host:-1", "port must be"),
        ("host:http", "port must be"),
        ("host:80x", "port must be"),
        ("host: 80", "port must be"),
        ("[::1]:65536", "port must be"),
        ("tcp://host:80/path", "port must be"),
        ("host:\u00b2", "port must be"),  # str.isdigit() is True for a superscript two, int() is not
    ],
)
def test_parse_bad_addresses(text, match):
    with pytest.raises(ValueError, match=match):
        parse_address(text)


@pytest.mark.parametrize(
    "address",
    [Address("tcp", "10.1.2.3", 1), Address("tls", "::1", 8686), Address("tcp", "sched.lab", 0)],
)
def test_str_round_trips(address):
    assert parse_address(str(address)) == address


def test_ipv6_str_is_bracketed():
    assert str(Address("tcp", "::1", 8686)) == "tcp://[::1]:8686"


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=40))
def test_parse_address_raises_only_value_error(text):
    try:
        addr = parse_address(text)
    except ValueError as exc:
        assert repr(text) in str(exc)  # the message names the offending input
        return
    assert addr.scheme in ("tcp", "tls")
    assert addr.host
    assert 0 <= addr.port <= 65535


@pytest.mark.parametrize(
    "host, loopback",
    [
        ("localhost", True),
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.1", False),
        ("192.168.1.1", False),
        ("example.org", False),
        ("localhost.example.org", False),
        ("", False),
        ("[::1]", False),
    ],
)
def test_is_loopback_host(host, loopback):
    assert is_loopback_host(host) is loopback


def test_address_is_loopback_property():
    assert parse_address("tcp://127.0.0.1:1").is_loopback
    assert parse_address("[::1]:1").is_loopback
    assert not parse_address("tcp://0.0.0.0:1").is_loopback


# ------------------------------------------------------------- scheduler file


def test_scheduler_file_round_trip(tmp_path):
    path = tmp_path / "scheduler.json"
    write_scheduler_file(str(path), "tcp://10.0.0.5:8686")
    assert read_scheduler_file(str(path)) == "tcp://10.0.0.5:8686"
    data = json.loads(path.read_text())
    assert data["pid"] == os.getpid()
    assert data["address"] == "tcp://10.0.0.5:8686"


def test_scheduler_file_records_the_dashboard(tmp_path):
    path = tmp_path / "scheduler.json"
    write_scheduler_file(str(path), "tcp://h:8686", dashboard="http://h:8687/")
    assert json.loads(path.read_text())["dashboard"] == "http://h:8687/"
    assert read_scheduler_file(str(path)) == "tcp://h:8686"
    assert os.listdir(tmp_path) == ["scheduler.json"]  # no temporary left behind


def test_scheduler_file_is_replaced_atomically(tmp_path):
    path = tmp_path / "scheduler.json"
    write_scheduler_file(str(path), "tcp://a:1")
    inode_before = os.stat(path).st_ino
    with open(path) as reader:  # a reader holding the old file sees the whole old content
        write_scheduler_file(str(path), "tcp://b:2")
        assert json.load(reader)["address"] == "tcp://a:1"
    assert read_scheduler_file(str(path)) == "tcp://b:2"
    assert os.stat(path).st_ino != inode_before  # replaced by rename, not rewritten in place
    assert sorted(os.listdir(tmp_path)) == ["scheduler.json"]


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "scheduler.json"
    write_scheduler_file(str(path), "tcp://a:1")
    with pytest.raises(TypeError):
        write_scheduler_file(str(path), object())  # type: ignore[arg-type]  # not JSON serializable
    assert read_scheduler_file(str(path)) == "tcp://a:1"
    assert os.listdir(tmp_path) == ["scheduler.json"]


def test_scheduler_file_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_scheduler_file("sched.json", "tcp://c:3")
    assert read_scheduler_file(str(tmp_path / "sched.json")) == "tcp://c:3"


def test_missing_scheduler_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_scheduler_file(str(tmp_path / "nope.json"))


# ---------------------------------------------------------------------- secret


@pytest.fixture
def clean_env(monkeypatch):
    for name in (ENV_SECRET, ENV_SECRET_FILE, "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_no_secret_anywhere_is_none(clean_env):
    assert load_secret() is None


def test_explicit_secret_wins(clean_env, tmp_path):
    clean_env.setenv(ENV_SECRET, "from-env-0123456789")
    clean_env.setenv(ENV_SECRET_FILE, private_file(tmp_path / "envfile", b"from-env-file-0123456789"))
    file = private_file(tmp_path / "file", b"from-file-0123456789")
    assert load_secret(file, "explicit-0123456789") == b"explicit-0123456789"
    assert load_secret(file, b"raw\x00bytes-0123456789") == b"raw\x00bytes-0123456789"


def test_file_beats_environment(clean_env, tmp_path):
    clean_env.setenv(ENV_SECRET, "from-env-0123456789")
    clean_env.setenv(ENV_SECRET_FILE, private_file(tmp_path / "envfile", b"from-env-file-0123456789"))
    assert load_secret(private_file(tmp_path / "file", b"from-file-0123456789\n")) == b"from-file-0123456789"


def test_env_secret_beats_env_secret_file(clean_env, tmp_path):
    clean_env.setenv(ENV_SECRET, "from-env-0123456789")
    clean_env.setenv(ENV_SECRET_FILE, private_file(tmp_path / "envfile", b"from-env-file-0123456789"))
    assert load_secret() == b"from-env-0123456789"


def test_env_secret_file(clean_env, tmp_path):
    clean_env.setenv(ENV_SECRET_FILE, private_file(tmp_path / "envfile", b"  from-env-file-0123456789 \n"))
    assert load_secret() == b"from-env-file-0123456789"


def test_empty_env_secret_is_ignored(clean_env, tmp_path):
    clean_env.setenv(ENV_SECRET, "")
    assert load_secret() is None
    clean_env.setenv(ENV_SECRET_FILE, private_file(tmp_path / "envfile", b"f-0123456789abcdef"))
    assert load_secret() == b"f-0123456789abcdef"


def test_systemd_credentials_directory(clean_env, tmp_path):
    private_file(tmp_path / "jobsched-secret", b"cred-0123456789ab")
    clean_env.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert load_secret() == b"cred-0123456789ab"
    clean_env.setenv(ENV_SECRET, "env-0123456789ab")
    assert load_secret() == b"env-0123456789ab"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o700 | 0o010])
def test_group_or_world_accessible_file_is_refused(clean_env, tmp_path, mode):
    path = private_file(tmp_path / "secret", b"k", mode)
    with pytest.raises(SecretError, match="chmod 600") as info:
        load_secret(path)
    assert path in str(info.value)
    assert f"{mode:o}" in str(info.value)


def test_world_readable_env_secret_file_is_refused(clean_env, tmp_path):
    clean_env.setenv(ENV_SECRET_FILE, private_file(tmp_path / "secret", b"k", 0o644))
    with pytest.raises(SecretError, match="chmod"):
        load_secret()


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_private_file_is_accepted(clean_env, tmp_path, mode):
    assert read_secret_file(private_file(tmp_path / "secret", b"key-0123456789ab\n", mode)) == b"key-0123456789ab"


@pytest.mark.parametrize("content", [b"", b"\n", b"  \n\t "])
def test_empty_secret_file_is_refused(clean_env, tmp_path, content):
    with pytest.raises(SecretError, match="empty"):
        load_secret(private_file(tmp_path / "secret", content))


def test_missing_secret_file_is_refused(clean_env, tmp_path):
    with pytest.raises(SecretError, match="cannot read secret file"):
        load_secret(str(tmp_path / "missing"))


def test_secret_error_is_a_value_error():
    assert issubclass(SecretError, ValueError)


def test_write_new_secret_is_private_random_and_never_overwrites(clean_env, tmp_path):
    from jobsched.runtime.secret import write_new_secret

    path = tmp_path / "secret"
    write_new_secret(str(path))
    assert os.stat(path).st_mode & 0o777 == 0o600
    first = read_secret_file(str(path))
    assert len(first) >= 32
    assert load_secret(str(path)) == first
    with pytest.raises(FileExistsError):
        write_new_secret(str(path))
    assert read_secret_file(str(path)) == first  # untouched
    other = tmp_path / "other"
    write_new_secret(str(other))
    assert read_secret_file(str(other)) != first
