"""The opening exchange with user tokens: who is let in, as whom, and what a refusal says.

Both state machines are driven against each other in memory (``pump`` from
test_handshake.py); attacks are replayed or tampered frames.
"""

from __future__ import annotations

import getpass

import pytest
from support import hello_body, pump_handshake

from jobsched.protocol import AcceptorHandshake, AuthenticationError, Credential, HandshakeError, InitiatorHandshake, Role
from jobsched.protocol import handshake as hs
from jobsched.runtime.tokens import new_token

V = 1
BOTH = frozenset({Role.CLIENT, Role.WORKER})
SECRET = b"the-cluster-secret"


@pytest.fixture
def users() -> dict[str, str]:
    """The scheduler's users and their tokens: the lookup reads it at every hello."""
    return {"ann": new_token("ann"), "bob": new_token("bob")}


def acceptor(users: dict[str, str] | None, secret: bytes | None = SECRET, accept=BOTH) -> AcceptorHandshake:
    lookup = None if users is None else (lambda name: users[name].encode() if name in users else None)
    return AcceptorHandshake(secret, V, accept, lookup)


def with_token(token: str, role: Role = Role.CLIENT) -> InitiatorHandshake:
    return InitiatorHandshake(role, None, V, token=token)


# ---------------------------------------------------------------- accepted
def test_a_users_token_opens_a_client_connection_as_that_user(users):
    ini, acc = with_token(users["ann"]), acceptor(users)
    assert pump_handshake(ini, acc) == (None, None)
    assert ini.done and acc.done
    assert (acc.peer_role, acc.peer_user, acc.peer_admin, acc.peer_credential) == (
        Role.CLIENT, "ann", False, Credential.TOKEN)


def test_the_cluster_secret_is_the_admin_acting_as_the_os_user(users):
    ini, acc = InitiatorHandshake(Role.CLIENT, SECRET, V), acceptor(users)
    assert pump_handshake(ini, acc) == (None, None)
    assert (acc.peer_user, acc.peer_admin, acc.peer_credential) == (getpass.getuser(), True, Credential.SECRET)


def test_the_secret_holder_may_name_the_user_it_acts_as(users):
    ini, acc = InitiatorHandshake(Role.CLIENT, SECRET, V, user="lab-admin"), acceptor(users)
    assert pump_handshake(ini, acc) == (None, None)
    assert (acc.peer_user, acc.peer_admin) == ("lab-admin", True)


def test_a_worker_with_the_secret_is_accepted_where_users_are_configured(users):
    ini, acc = InitiatorHandshake(Role.WORKER, SECRET, V), acceptor(users)
    assert pump_handshake(ini, acc) == (None, None)
    assert acc.peer_role is Role.WORKER and acc.peer_admin


def test_without_credentials_anywhere_everyone_is_the_admin():
    ini, acc = InitiatorHandshake(Role.CLIENT, None, V, user="ann"), AcceptorHandshake(None, V, BOTH)
    assert pump_handshake(ini, acc) == (None, None)
    assert (acc.peer_user, acc.peer_admin, acc.peer_credential) == ("ann", True, Credential.NONE)


def test_a_token_exchange_fits_the_preauth_caps(users):
    name = "x" * 64
    users[name] = new_token(name)
    transcript: list = []
    assert pump_handshake(with_token(users[name]), acceptor(users), transcript) == (None, None)
    assert all(len(frame) <= 4096 for _, frame in transcript)
    assert users[name].encode() not in b"".join(frame for _, frame in transcript)  # the token never travels


# ---------------------------------------------------------------- refused
def test_a_wrong_token_is_refused_saying_so_on_both_sides(users):
    wrong = "ann:" + new_token("ann").split(":")[1]
    ini, acc = with_token(wrong), acceptor(users)
    ini_err, acc_err = pump_handshake(ini, acc)
    assert isinstance(ini_err, AuthenticationError) and isinstance(acc_err, AuthenticationError)
    assert "token is wrong or was rotated" in str(ini_err) and "ann" in str(ini_err)
    assert "wrong or rotated token" in str(acc_err)
    assert not ini.done and not acc.done


def test_a_rotated_token_is_refused_from_the_next_connection_on(users):
    old = users["ann"]
    assert pump_handshake(with_token(old), acceptor(users)) == (None, None)
    users["ann"] = new_token("ann")  # what a SIGHUP reload does: the lookup sees it at the next hello
    ini_err, _ = pump_handshake(with_token(old), acceptor(users))
    assert isinstance(ini_err, AuthenticationError) and "rotated" in str(ini_err)
    assert pump_handshake(with_token(users["ann"]), acceptor(users)) == (None, None)


def test_an_unknown_or_removed_user_is_refused_saying_so(users):
    token = users.pop("bob")
    ini, acc = with_token(token), acceptor(users)
    ini_err, acc_err = pump_handshake(ini, acc)
    assert isinstance(ini_err, AuthenticationError) and isinstance(acc_err, AuthenticationError)
    assert "unknown user 'bob'" in str(ini_err) and "removed" in str(ini_err)
    assert not acc.done


@pytest.mark.parametrize("role", [Role.WORKER, Role.PEER])
def test_a_token_never_opens_a_worker_or_peer_connection(users, role):
    ini = with_token(users["ann"], role)
    acc = acceptor(users, accept=frozenset({Role.CLIENT, Role.WORKER, Role.PEER}))
    ini_err, acc_err = pump_handshake(ini, acc)
    assert isinstance(ini_err, AuthenticationError)
    assert "user tokens may only connect as clients; workers need the cluster secret" in str(ini_err)
    assert not acc.done


def test_a_worker_data_port_refuses_tokens_even_without_a_secret():
    # an acceptor with no credentials at all (a worker started without a secret) still refuses them
    ini = with_token(new_token("ann"), Role.PEER)
    acc = AcceptorHandshake(None, V, frozenset({Role.PEER}))
    ini_err, _ = pump_handshake(ini, acc)
    assert "may only connect as clients" in str(ini_err)
    assert not acc.done


def test_a_token_where_no_users_file_is_configured_is_refused(users):
    ini_err, acc_err = pump_handshake(with_token(users["ann"]), acceptor(None))
    assert isinstance(ini_err, AuthenticationError)
    assert "user tokens are not accepted here" in str(ini_err)


def test_no_credentials_where_users_are_configured_is_refused_naming_both_ways_in(users):
    ini_err, acc_err = pump_handshake(InitiatorHandshake(Role.CLIENT, None, V), acceptor(users))
    assert isinstance(ini_err, AuthenticationError) and isinstance(acc_err, AuthenticationError)
    assert "JOBSCHED_TOKEN" in str(ini_err) and "JOBSCHED_SECRET" in str(ini_err)
    worker_err, _ = pump_handshake(InitiatorHandshake(Role.WORKER, None, V), acceptor(users))
    assert "shared secret is required" in str(worker_err) and "TOKEN" not in str(worker_err)


def test_the_secret_where_only_users_are_configured_is_refused(users):
    ini_err, _ = pump_handshake(InitiatorHandshake(Role.CLIENT, SECRET, V), acceptor(users, secret=None))
    assert "no cluster secret is configured here" in str(ini_err)


def test_a_token_holder_refuses_an_acceptor_without_credentials():
    ini, acc = with_token(new_token("ann")), AcceptorHandshake(None, V, BOTH)
    ini_err, acc_err = pump_handshake(ini, acc)
    assert isinstance(ini_err, AuthenticationError) and "does not use one" in str(ini_err)
    assert isinstance(acc_err, AuthenticationError) and not acc.done


def test_an_impostor_acceptor_cannot_prove_a_token(users):
    ini = with_token(users["ann"])
    ini.hello()
    fake = hs._CHALLENGE.pack(hs.MAGIC, V, hs.Status.OK, Credential.TOKEN, b"n" * hs.NONCE_SIZE, b"m" * hs.MAC_SIZE)
    with pytest.raises(AuthenticationError, match="wrong or was rotated"):
        ini.receive(fake)
    assert ini.abort_frame is not None and ini.abort_frame[1:1 + hs.MAC_SIZE] == bytes(hs.MAC_SIZE)


# ---------------------------------------------------------------- attacks
def test_a_captured_token_proof_cannot_be_replayed(users):
    transcript: list = []
    assert pump_handshake(with_token(users["ann"]), acceptor(users), transcript) == (None, None)
    hello, proof = transcript[0][1], transcript[2][1]
    fresh = acceptor(users)
    assert fresh.receive(hello)[10] == hs.Status.OK  # the recorded hello carries no proof yet
    verdict = fresh.receive(proof)
    assert verdict[0] == hs.Status.AUTH
    assert isinstance(fresh.failure, AuthenticationError) and not fresh.done


def test_reflecting_the_acceptors_token_mac_back_fails(users):
    acc = acceptor(users)
    challenge = acc.receive(hello_body(V, Role.CLIENT, Credential.TOKEN, b"\x05" * hs.NONCE_SIZE, b"ann"))
    _, _, status, credential, _nonce, mac_a = hs._CHALLENGE.unpack_from(challenge)
    assert status == hs.Status.OK and credential == Credential.TOKEN
    assert acc.receive(hs._PROOF.pack(hs.Status.OK, mac_a))[0] == hs.Status.AUTH
    assert not acc.done


def _relay(ini: InitiatorHandshake, acc: AcceptorHandshake, tamper) -> tuple[bytes, HandshakeError | None]:
    """A man in the middle rewrites the hello with ``tamper``; returns the acceptor's verdict on
    the initiator's proof (forced out of it, if the initiator already refused) and the initiator's error."""
    challenge = acc.receive(tamper(ini.hello()))
    try:
        proof = ini.receive(challenge)
        error = None
    except HandshakeError as exc:
        error = exc
        # the attacker cannot make a proof: it sends what the initiator would have
        proof = hs._PROOF.pack(hs.Status.OK, hs._mac(b"?", b"initiator", V, Role.CLIENT, 0, b"", b"", b""))
    assert proof is not None
    return acc.receive(proof), error


def _set_user(hello: bytes, user: bytes) -> bytes:
    return hello[: hs._HELLO.size - 1] + bytes([len(user)]) + user


def test_rewriting_the_user_name_in_the_hello_fails_on_both_sides(users):
    ini, acc = with_token(users["ann"]), acceptor(users)
    verdict, error = _relay(ini, acc, lambda hello: _set_user(hello, b"bob"))
    assert isinstance(error, AuthenticationError)  # the acceptor proved bob's token, not ann's
    assert verdict[0] == hs.Status.AUTH and not acc.done


def test_rewriting_the_admins_user_name_is_detected(users):
    ini, acc = InitiatorHandshake(Role.CLIENT, SECRET, V, user="ann"), acceptor(users)
    verdict, error = _relay(ini, acc, lambda hello: _set_user(hello, b"mallory"))
    assert isinstance(error, AuthenticationError)
    assert verdict[0] == hs.Status.AUTH and not acc.done


def test_rewriting_the_credential_kind_fails_even_when_keys_coincide():
    # a contrived users file whose token for "ann" doubles as the cluster secret: the kind is
    # still bound into every MAC, so a token exchange cannot pass for the admin's
    token = new_token("ann")
    acc = AcceptorHandshake(token.encode(), V, BOTH, lambda name: token.encode() if name == "ann" else None)
    ini = with_token(token)

    def to_secret(hello: bytes) -> bytes:
        return hello[:11] + bytes([Credential.SECRET]) + hello[12:]

    verdict, error = _relay(ini, acc, to_secret)
    assert isinstance(error, AuthenticationError)
    assert verdict[0] == hs.Status.AUTH and not acc.done and not acc.peer_admin


def test_rewriting_the_role_fails(users):
    ini, acc = InitiatorHandshake(Role.CLIENT, SECRET, V), acceptor(users)
    verdict, error = _relay(ini, acc, lambda hello: hello[:10] + bytes([Role.WORKER]) + hello[11:])
    assert isinstance(error, AuthenticationError)
    assert verdict[0] == hs.Status.AUTH and not acc.done


# ------------------------------------------------------------ user names
@pytest.mark.parametrize(
    "user, why",
    [(b"", "empty"), (b"\xff\xfe", "not UTF-8"), (b"ann\nINFO forged log line", "a control character"),
     (b"x" * (hs.MAX_USER_BYTES + 1), "too long")],
)
def test_a_bad_user_name_in_the_hello_is_refused(users, user, why):
    acc = acceptor(users)
    reply = acc.receive(hello_body(V, Role.CLIENT, Credential.SECRET, user=user))
    assert reply[10] == hs.Status.AUTH, why
    assert "user name" in str(acc.failure)


def test_an_unusable_name_or_token_is_refused_before_connecting():
    with pytest.raises(ValueError, match="user name"):
        InitiatorHandshake(Role.CLIENT, SECRET, V, user="x" * (hs.MAX_USER_BYTES + 1))
    with pytest.raises(ValueError, match="NAME:SECRET"):
        InitiatorHandshake(Role.CLIENT, None, V, token="no-colon-here")
    with pytest.raises(ValueError, match="ann"):
        InitiatorHandshake(Role.CLIENT, None, V, token=new_token("ann"), user="bob")


def test_unknown_credential_kind_is_refused(users):
    acc = acceptor(users)
    assert acc.receive(hello_body(V, Role.CLIENT, 7))[10] == hs.Status.AUTH
    assert "unknown credential kind 7" in str(acc.failure)
