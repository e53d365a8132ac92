"""The opening exchange, both state machines driven against each other in memory."""

from __future__ import annotations

import struct

import pytest
from support import hello_body, pump_handshake

from jobsched.protocol import (
    AcceptorHandshake,
    AuthenticationError,
    HandshakeError,
    InitiatorHandshake,
    ProtocolError,
    Role,
    VersionMismatch,
)
from jobsched.protocol import handshake as hs

V = 1
BOTH = frozenset({Role.CLIENT, Role.WORKER})


def pair(ini_secret=None, acc_secret=None, role=Role.CLIENT, ini_version=V, acc_version=V, accept=BOTH):
    return InitiatorHandshake(role, ini_secret, ini_version), AcceptorHandshake(acc_secret, acc_version, accept)


# ---------------------------------------------------------------- success


@pytest.mark.parametrize("role", [Role.CLIENT, Role.WORKER])
def test_no_secret_on_either_side(role):
    ini, acc = pair(role=role)
    assert not ini.done and not acc.done
    assert pump_handshake(ini, acc) == (None, None)
    assert ini.done and acc.done
    assert acc.peer_role is role
    assert acc.failure is None


@pytest.mark.parametrize("secret", [b"s3cret", b"x" * 200, bytes(range(256))])
def test_same_secret_on_both_sides(secret):
    ini, acc = pair(secret, secret)
    assert pump_handshake(ini, acc) == (None, None)
    assert ini.done and acc.done and acc.peer_role is Role.CLIENT


def test_empty_secret_means_no_secret():
    ini, acc = pair(b"", b"")
    assert pump_handshake(ini, acc) == (None, None)
    assert ini.secret is None and acc.secret is None


def test_exchange_is_four_frames_small_enough_for_preauth_caps():
    transcript: list = []
    ini, acc = pair(b"k", b"k")
    assert pump_handshake(ini, acc, transcript) == (None, None)
    assert [d for d, _ in transcript] == ["i->a", "a->i", "i->a", "a->i"]
    assert all(len(frame) <= 4096 for _, frame in transcript)
    assert transcript[0][1].startswith(hs.MAGIC)


def test_nonces_are_fresh_each_time():
    hellos = {InitiatorHandshake(Role.CLIENT, b"k", V).hello() for _ in range(20)}
    assert len(hellos) == 20


# ---------------------------------------------------------- authentication


def test_different_secrets_fail_on_both_sides_with_clear_messages():
    ini, acc = pair(b"alpha", b"beta")
    ini_err, acc_err = pump_handshake(ini, acc)
    assert isinstance(ini_err, AuthenticationError)
    assert isinstance(acc_err, AuthenticationError)
    assert "secrets differ" in str(ini_err)
    assert "secret" in str(acc_err) and "did not verify" in str(acc_err)
    assert not ini.done and not acc.done


def test_secret_only_on_acceptor():
    ini, acc = pair(None, b"k")
    ini_err, acc_err = pump_handshake(ini, acc)
    assert isinstance(ini_err, AuthenticationError)
    assert isinstance(acc_err, AuthenticationError)
    assert "shared secret is required" in str(ini_err)
    assert "JOBSCHED_SECRET" in str(ini_err)  # tells the user how to fix it
    assert not ini.done and not acc.done


def test_secret_only_on_initiator():
    ini, acc = pair(b"k", None)
    ini_err, acc_err = pump_handshake(ini, acc)
    assert isinstance(ini_err, AuthenticationError)
    assert "does not use one" in str(ini_err)
    assert isinstance(acc_err, AuthenticationError)
    assert "you do not" in str(acc_err)
    assert not ini.done and not acc.done


def test_initiator_refuses_an_acceptor_that_cannot_prove_the_secret():
    # an impostor claiming to have a secret but sending a bogus MAC
    ini = InitiatorHandshake(Role.WORKER, b"k", V)
    ini.hello()
    fake = hs._CHALLENGE.pack(hs.MAGIC, V, hs.Status.OK, True, b"n" * hs.NONCE_SIZE, b"m" * hs.MAC_SIZE)
    with pytest.raises(AuthenticationError, match="secrets differ"):
        ini.receive(fake)
    assert ini.abort_frame is not None and ini.abort_frame[0] == hs.Status.AUTH


def test_replayed_proof_fails_against_a_fresh_acceptor():
    transcript: list = []
    ini, acc = pair(b"k", b"k")
    assert pump_handshake(ini, acc, transcript) == (None, None)
    hello, proof = transcript[0][1], transcript[2][1]

    fresh = AcceptorHandshake(b"k", V, BOTH)
    challenge = fresh.receive(hello)  # the recorded hello is accepted: it carries no proof yet
    assert challenge[10] == hs.Status.OK
    verdict = fresh.receive(proof)
    assert verdict[0] == hs.Status.AUTH
    assert isinstance(fresh.failure, AuthenticationError)
    assert not fresh.done
    with pytest.raises(AuthenticationError):
        fresh.receive(proof)  # stays failed


def test_reflecting_the_acceptors_own_mac_back_as_proof_fails():
    acc = AcceptorHandshake(b"k", V, BOTH)
    attacker_nonce = b"\x01" * hs.NONCE_SIZE
    challenge = acc.receive(hello_body(V, Role.CLIENT, hs.Credential.SECRET, attacker_nonce))
    _, _, status, has_secret, _nonce_a, mac_a = hs._CHALLENGE.unpack_from(challenge)
    assert status == hs.Status.OK and has_secret
    verdict = acc.receive(hs._PROOF.pack(hs.Status.OK, mac_a))
    assert verdict[0] == hs.Status.AUTH
    assert isinstance(acc.failure, AuthenticationError)
    assert not acc.done


def test_zero_mac_does_not_pass_when_a_secret_is_set():
    acc = AcceptorHandshake(b"k", V, BOTH)
    acc.receive(hello_body(V, Role.CLIENT, hs.Credential.SECRET, b"\x02" * hs.NONCE_SIZE))
    assert acc.receive(hs._PROOF.pack(hs.Status.OK, bytes(hs.MAC_SIZE)))[0] == hs.Status.AUTH
    assert not acc.done


def test_initiator_lying_about_having_a_secret_still_needs_the_mac():
    acc = AcceptorHandshake(b"k", V, BOTH)
    acc.receive(hello_body(V, Role.WORKER, hs.Credential.SECRET, b"\x03" * hs.NONCE_SIZE))
    verdict = acc.receive(hs._PROOF.pack(hs.Status.OK, b"\x00" * hs.MAC_SIZE) + b"trailing")
    assert verdict[0] == hs.Status.AUTH
    assert isinstance(acc.failure, AuthenticationError)


def test_truncated_proof_is_refused():
    acc = AcceptorHandshake(b"k", V, BOTH)
    acc.receive(InitiatorHandshake(Role.CLIENT, b"k", V).hello())
    assert acc.receive(b"\x00" * 5)[0] == hs.Status.AUTH
    assert isinstance(acc.failure, AuthenticationError)


def test_mac_depends_on_role_version_credential_and_user():
    def mac(label=b"initiator", version=V, role=Role.CLIENT, credential=hs.Credential.SECRET, user=b"ann"):
        return hs._mac(b"k", label, version, role, credential, user, b"a" * 32, b"b" * 32)

    base = mac()
    assert mac(role=Role.WORKER) != base
    assert mac(version=V + 1) != base
    assert mac(label=b"acceptor") != base
    assert mac(credential=hs.Credential.TOKEN) != base
    assert mac(user=b"bob") != base
    assert mac(user=b"an") != base and mac(user=b"ann|") != base  # the name is length-prefixed


# ------------------------------------------------------------ version, role


def test_version_mismatch_on_both_sides():
    ini, acc = pair(ini_version=2, acc_version=1)
    ini_err, acc_err = pump_handshake(ini, acc)
    assert isinstance(ini_err, VersionMismatch)
    assert isinstance(acc_err, VersionMismatch)
    assert "1" in str(ini_err) and "2" in str(ini_err)
    assert "1" in str(acc_err) and "2" in str(acc_err)


def test_version_mismatch_is_reported_before_authentication():
    ini, acc = pair(b"a", b"b", ini_version=3, acc_version=1)
    ini_err, acc_err = pump_handshake(ini, acc)
    assert isinstance(ini_err, VersionMismatch) and isinstance(acc_err, VersionMismatch)


def test_acceptor_answering_ok_with_another_version_is_refused():
    ini = InitiatorHandshake(Role.CLIENT, None, 1)
    ini.hello()
    challenge = hs._CHALLENGE.pack(hs.MAGIC, 9, hs.Status.OK, False, b"n" * hs.NONCE_SIZE, bytes(hs.MAC_SIZE))
    with pytest.raises(VersionMismatch, match="9"):
        ini.receive(challenge)


def test_role_not_accepted():
    ini, acc = pair(role=Role.PEER, accept=BOTH)
    ini_err, acc_err = pump_handshake(ini, acc)
    assert type(ini_err) is HandshakeError
    assert type(acc_err) is HandshakeError
    assert "role peer is not accepted" in str(ini_err)
    assert acc.peer_role is Role.PEER and not acc.done


def test_unknown_role_number():
    acc = AcceptorHandshake(None, V, BOTH)
    reply = acc.receive(hello_body(V, 99, hs.Credential.NONE))
    assert reply[10] == hs.Status.ROLE
    assert "unknown peer role 99" in str(acc.failure)
    with pytest.raises(HandshakeError):
        acc.receive(b"anything")


# ----------------------------------------------------------------- garbage


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,  # a TLS ClientHello
        hs.MAGIC,  # right magic, too short
        hello_body(V, Role.CLIENT, hs.Credential.NONE) + b"x",  # longer than its user name says
        hello_body(V, Role.CLIENT, hs.Credential.NONE)[:-1],  # shorter
        hello_body(V, Role.CLIENT, hs.Credential.NONE)[: hs._HELLO.size - 1],  # no user name length
        b"NOTJOBS\x00" + b"\x00" * (hs._HELLO.size - 8),  # right length, wrong magic
    ],
)
def test_garbage_hello_is_refused(garbage):
    acc = AcceptorHandshake(b"k", V, BOTH)
    with pytest.raises(HandshakeError, match="jobsched handshake") as info:
        acc.receive(garbage)
    assert acc.failure is info.value
    assert not acc.done
    with pytest.raises(HandshakeError):
        acc.receive(InitiatorHandshake(Role.CLIENT, b"k", V).hello())  # stays failed


@pytest.mark.parametrize("garbage", [b"", b"HTTP/1.1 400 Bad Request\r\n\r\n", b"\x00" * 200])
def test_initiator_refuses_a_garbage_challenge(garbage):
    ini = InitiatorHandshake(Role.CLIENT, None, V, peer_name="scheduler")
    ini.hello()
    with pytest.raises(HandshakeError, match="wrong port or not jobsched"):
        ini.receive(garbage)
    assert not ini.done


def test_initiator_refuses_a_truncated_verdict():
    ini, acc = pair()
    challenge = acc.receive(ini.hello())
    assert ini.receive(challenge) is not None
    with pytest.raises(HandshakeError, match="truncated"):
        ini.receive(b"")


def test_frames_after_completion_are_protocol_errors():
    ini, acc = pair(b"k", b"k")
    assert pump_handshake(ini, acc) == (None, None)
    with pytest.raises(HandshakeError):
        acc.receive(b"\x00")
    with pytest.raises(HandshakeError):
        ini.receive(b"\x00")


def test_refusal_reason_is_capped():
    ini = InitiatorHandshake(Role.CLIENT, None, V)
    ini.hello()
    refusal = hs._CHALLENGE.pack(hs.MAGIC, V, hs.Status.ROLE, False, bytes(hs.NONCE_SIZE), bytes(hs.MAC_SIZE)) + b"x" * 10_000
    with pytest.raises(HandshakeError) as info:
        ini.receive(refusal)
    assert len(str(info.value)) < 700


def test_error_hierarchy():
    assert issubclass(AuthenticationError, HandshakeError)
    assert issubclass(VersionMismatch, HandshakeError)
    assert issubclass(HandshakeError, ProtocolError)


def test_peer_name_appears_in_initiator_errors():
    ini = InitiatorHandshake(Role.PEER, b"a", V, peer_name="worker w7")
    acc = AcceptorHandshake(b"b", V, frozenset({Role.PEER}))
    ini_err, _ = pump_handshake(ini, acc)
    assert "worker w7" in str(ini_err)


def test_hello_layout():
    ini = InitiatorHandshake(Role.WORKER, b"k", 7, user="zoë")
    hello = ini.hello()
    magic, version, role, credential, nonce, length = hs._HELLO.unpack_from(hello)
    assert (magic, version, role, credential, len(nonce)) == (hs.MAGIC, 7, Role.WORKER, hs.Credential.SECRET, hs.NONCE_SIZE)
    assert hello[hs._HELLO.size:] == "zoë".encode() and length == len("zoë".encode())
    assert struct.calcsize("!8sHBB32sB") == hs._HELLO.size
