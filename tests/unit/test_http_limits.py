"""The dashboard's pure decisions: which Host headers it answers to, the request-head deadline and
cap, and the rate of its refusal warnings (the server itself is attacked in
integration/test_hostile_http.py)."""

from __future__ import annotations

import argparse

import pytest

from jobsched.runtime.config import ConfigError, resolve
from jobsched.runtime.rate_limit import RateLimit
from jobsched.scheduler.cli import allowed_host, build_parser
from jobsched.scheduler.host_policy import HostPolicy, split_host
from jobsched.scheduler.http_front import HeadTooLarge, PendingHeads

MACHINE = ["node7", "node7.lab.example"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("header", "parsed"), [
    ("127.0.0.1:8687", ("127.0.0.1", 8687)),
    ("LocalHost.", ("localhost", None)),
    ("[::1]:8687", ("::1", 8687)),
    ("[0:0::1]", ("::1", None)),
    ("node7.lab.example:80", ("node7.lab.example", 80)),
    ("::1", None),  # IPv6 without brackets
    ("[::1", None),
    ("[node7]:80", None),
    ("a:b", None),
    ("a:99999", None),
    ("a:", None),
    (":80", None),
    ("", None),
])
def test_host_headers_are_parsed_strictly(header, parsed):
    assert split_host(header) == parsed


@pytest.mark.timeout(30)
def test_loopback_answers_to_loopback_names_on_its_port():
    policy = HostPolicy.for_bound("127.0.0.1", 8687, (), MACHINE)
    for host in ("127.0.0.1:8687", "127.0.0.1", "localhost:8687", "[::1]:8687", "LOCALHOST"):
        assert policy.allows([host]), host
    for host in ("evil.example", "evil.example:8687", "127.0.0.1:80", "node7:8687", "10.0.0.5:8687", "::1"):
        assert not policy.allows([host]), host


@pytest.mark.timeout(30)
def test_no_host_is_allowed_and_two_are_not():
    policy = HostPolicy.for_bound("127.0.0.1", 8687)
    assert policy.allows([])  # not a browser: HTTP/1.0 tools
    assert not policy.allows(["127.0.0.1:8687", "evil.example"])


@pytest.mark.timeout(30)
def test_every_interface_answers_to_the_machine_names_and_any_ip():
    policy = HostPolicy.for_bound("0.0.0.0", 8687, (), MACHINE)
    for host in ("node7:8687", "node7.lab.example", "10.0.0.5:8687", "[fe80::1]:8687", "localhost:8687"):
        assert policy.allows([host]), host
    assert not policy.allows(["evil.example:8687"])
    assert not policy.allows(["node7:9999"])


@pytest.mark.timeout(30)
def test_a_specific_address_answers_to_itself_and_the_machine_names():
    policy = HostPolicy.for_bound("10.0.0.5", 8687, (), MACHINE)
    assert policy.allows(["10.0.0.5:8687"]) and policy.allows(["node7.lab.example:8687"])
    assert not policy.allows(["10.0.0.6:8687"]) and not policy.allows(["localhost:8687"])


@pytest.mark.timeout(30)
def test_names_the_admin_allows_take_any_port():
    policy = HostPolicy.for_bound("127.0.0.1", 8687, ["Dash.Lab.Example.", "::2"], MACHINE)
    assert policy.allows(["dash.lab.example"]) and policy.allows(["dash.lab.example:443"])
    assert policy.allows(["[::2]:443"])
    assert not policy.allows(["lab.example"])
    assert "dash.lab.example" in policy.names() and "localhost" in policy.names()


@pytest.mark.timeout(30)
def test_a_star_allows_every_host_but_not_two():
    policy = HostPolicy.for_bound("127.0.0.1", 8687, ["*"])
    assert policy.allows(["evil.example"]) and policy.allows(["garbage::"])
    assert not policy.allows(["a", "b"])


@pytest.mark.timeout(30)
def test_the_option_takes_names_and_addresses_without_ports():
    for good in ("dash.example", "10.0.0.5", "::1", "[::1]", "*"):
        assert allowed_host(good) == good
    for bad in ("dash.example:80", "a b", "", "[::1]:80"):
        with pytest.raises(argparse.ArgumentTypeError):
            allowed_host(bad)


@pytest.mark.timeout(30)
def test_the_option_repeats_and_comes_from_the_environment_and_config(tmp_path, monkeypatch):
    monkeypatch.delenv("JOBSCHED_DASHBOARD_ALLOW_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    args, _ = resolve(build_parser(), ["--dashboard-allow-host", "a.example", "--dashboard-allow-host", "b"],
                      "scheduler")
    assert args.dashboard_allow_host == ["a.example", "b"]
    assert resolve(build_parser(), [], "scheduler")[0].dashboard_allow_host == []
    config = tmp_path / "jobsched.toml"
    config.write_text('[scheduler]\ndashboard-allow-host = ["c.example", "d"]\n')
    args, sources = resolve(build_parser(), ["--config", str(config)], "scheduler")
    assert args.dashboard_allow_host == ["c.example", "d"] and sources["dashboard_allow_host"] == str(config)
    monkeypatch.setenv("JOBSCHED_DASHBOARD_ALLOW_HOST", "e.example,f")
    assert resolve(build_parser(), [], "scheduler")[0].dashboard_allow_host == ["e.example", "f"]
    monkeypatch.setenv("JOBSCHED_DASHBOARD_ALLOW_HOST", "e.example:80")
    with pytest.raises(ConfigError, match="--dashboard-allow-host from \\$JOBSCHED_DASHBOARD_ALLOW_HOST"):
        resolve(build_parser(), [], "scheduler")


# ------------------------------------------------------------------ request heads
@pytest.mark.timeout(30)
def test_a_head_is_handed_over_once_complete():
    heads: PendingHeads[str] = PendingHeads(capacity=4, deadline=10, max_head=100)
    assert heads.open("a", 0.0) == []
    assert heads.feed("a", b"GET / HTTP/1.1\r\nHost: x\r") is None
    assert heads.feed("a", b"\n\r") is None
    assert heads.feed("a", b"\n") == b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"  # the blank line split over feeds
    assert "a" not in heads and len(heads) == 0


@pytest.mark.timeout(30)
def test_bare_newlines_end_a_head_too():
    heads: PendingHeads[str] = PendingHeads(capacity=4, deadline=10, max_head=100)
    heads.open("a", 0.0)
    assert heads.feed("a", b"GET / HTTP/1.0\n\n") == b"GET / HTTP/1.0\n\n"


@pytest.mark.timeout(30)
def test_dripping_does_not_extend_the_deadline():
    heads: PendingHeads[str] = PendingHeads(capacity=4, deadline=10, max_head=1000)
    heads.open("drip", 0.0)
    heads.open("late", 5.0)
    now = 0.0
    while now < 9.5:  # a byte a second: the wait still ends 10 s after open
        assert heads.feed("drip", b"x") is None
        assert heads.expired(now) == []
        now += 0.5
    assert heads.next_deadline() == 10.0
    assert heads.expired(10.0) == ["drip"]
    assert heads.next_deadline() == 15.0
    assert heads.expired(14.9) == [] and heads.expired(15.0) == ["late"]
    assert heads.next_deadline() is None


@pytest.mark.timeout(30)
def test_a_new_connection_closes_the_oldest_when_full():
    heads: PendingHeads[int] = PendingHeads(capacity=3, deadline=10, max_head=100)
    assert [heads.open(i, float(i)) for i in range(3)] == [[], [], []]
    assert heads.open(3, 3.0) == [0]
    assert heads.open(4, 4.0) == [1]
    heads.drop(2)
    assert heads.open(5, 5.0) == []
    assert len(heads) == 3 and 3 in heads and 0 not in heads


@pytest.mark.timeout(30)
def test_a_head_past_the_cap_is_refused():
    heads: PendingHeads[str] = PendingHeads(capacity=4, deadline=10, max_head=20)
    heads.open("big", 0.0)
    assert heads.feed("big", b"GET / HTTP/1.1\r\n") is None
    with pytest.raises(HeadTooLarge):
        heads.feed("big", b"X-Pad: aaaaaa\r\n\r\n")
    assert "big" not in heads
    heads.open("fits", 0.0)
    assert heads.feed("fits", b"GET / HTTP/1.0\r\n\r\n") == b"GET / HTTP/1.0\r\n\r\n"  # 18 bytes


@pytest.mark.timeout(30)
def test_refusal_warnings_are_rate_limited():
    limit = RateLimit(60.0)
    assert limit.passes(0.0) == (True, 0)
    assert [limit.passes(t)[0] for t in (1.0, 30.0, 59.9)] == [False, False, False]
    assert limit.passes(60.0) == (True, 3)  # and it says how many it held back
    assert limit.passes(61.0) == (False, 0)
