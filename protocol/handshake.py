"""The opening exchange, as two small sans-IO state machines.

It runs before any msgpack is decoded, over frames capped at a few KiB, and
checks the magic, the protocol version, the initiator's role and credential, and
(when the acceptor has credentials) runs a mutual HMAC challenge-response::

    initiator -> acceptor   HELLO      magic, version, role, credential, nonce_i, user
    acceptor  -> initiator  CHALLENGE  magic, version, status, credential, nonce_a,
                                       mac_a = HMAC(key, "acceptor" | ctx) | reason
    initiator -> acceptor   PROOF      status, mac_i = HMAC(key, "initiator" | ctx) | reason
    acceptor  -> initiator  VERDICT    status | reason

The credential is one of three kinds.  ``NONE``: the initiator has nothing, which
only an acceptor without any credentials takes (a one-person library use, as
before).  ``SECRET``: the cluster secret is the key; its holder is the admin, and
may name any user (the OS user name by default).  ``TOKEN``: a user's token
``NAME:SECRET`` is the key, the hello names the user, and the acceptor looks the
token up by that name; a token only ever opens a client connection.

``ctx`` binds the version, the initiator's role, the credential kind, the user
name and both fresh nonces, so a proof can be neither replayed (new nonces every
time), nor reflected back (the two directions use different labels), nor moved to
another role, credential kind or user.  Each side proves itself, so neither talks
to an impostor.  MACs are compared in constant time.
"""

from __future__ import annotations

import enum
import getpass
import hashlib
import hmac
import os
import struct
from collections.abc import Callable

from .errors import AuthenticationError, HandshakeError, VersionMismatch

MAGIC = b"JOBSCHD\x00"
NONCE_SIZE = 32
MAC_SIZE = hashlib.sha256().digest_size
MAX_USER_BYTES = 128  # a user name in the hello, UTF-8: the whole hello stays far below the pre-auth cap

_HELLO = struct.Struct(f"!8sHBB{NONCE_SIZE}sB")  # then the user name, as many bytes as the last field says
_CHALLENGE = struct.Struct(f"!8sHBB{NONCE_SIZE}s{MAC_SIZE}s")
_PROOF = struct.Struct(f"!B{MAC_SIZE}s")
_VERDICT = struct.Struct("!B")

UserLookup = Callable[[str], bytes | None]  # a user's token by name, None for an unknown user

SECRET_HINT = "set JOBSCHED_SECRET or JOBSCHED_SECRET_FILE (or --secret-file)"
TOKEN_ROLE_REFUSAL = "user tokens may only connect as clients; workers need the cluster secret"


class Role(enum.IntEnum):
    CLIENT = 1
    WORKER = 2
    PEER = 3  # worker-to-worker data connection


class Credential(enum.IntEnum):
    NONE = 0
    SECRET = 1  # the cluster secret: workers, and the admin
    TOKEN = 2  # one user's token: a client of that user


class Status(enum.IntEnum):
    OK = 0
    VERSION = 1
    AUTH = 2
    ROLE = 3


_NO_MAC = bytes(MAC_SIZE)


def _mac(key: bytes, label: bytes, version: int, role: int, credential: int, user: bytes, nonce_i: bytes,
         nonce_a: bytes) -> bytes:
    ctx = b"jobsched-%s|%d|%d|%d|%d|" % (label, version, role, credential, len(user)) + user + nonce_i + nonce_a
    return hmac.new(key, ctx, hashlib.sha256).digest()


def _reason(data: bytes) -> str:
    return data.decode("utf-8", "replace")[:500]


def _error(status: int, reason: str) -> HandshakeError:
    if status == Status.VERSION:
        return VersionMismatch(reason)
    if status == Status.AUTH:
        return AuthenticationError(reason)
    return HandshakeError(reason)


def os_user() -> str:
    """The name of the user running this process: the user a cluster-secret holder acts as."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no passwd entry (a container's arbitrary uid)
        return f"uid{os.getuid()}"


def token_user(token: bytes) -> str:
    """The user a token ``NAME:SECRET`` names (only the split; runtime/users.py checks the format)."""
    name, colon, rest = token.partition(b":")
    if not colon or not name or not rest:
        raise ValueError("a user token has the form NAME:SECRET (as printed by jobsched-scheduler --add-user)")
    return name.decode("utf-8", "replace")


def _check_user(user: str) -> bytes:
    raw = user.encode("utf-8")
    if not raw or len(raw) > MAX_USER_BYTES or not user.isprintable():
        raise ValueError(f"a user name must be 1 to {MAX_USER_BYTES} bytes of printable UTF-8, not {user!r}")
    return raw


class InitiatorHandshake:
    """The connecting side.  ``hello()``, then ``receive()`` each frame body it gets.

    With ``token`` it proves that user's token, else with ``secret`` the cluster secret
    (acting as ``user``, by default the OS user name), else nothing.
    """

    def __init__(self, role: Role, secret: bytes | None, version: int, peer_name: str = "scheduler", *,
                 token: str | bytes | None = None, user: str | None = None) -> None:
        self.role = role
        self.secret = secret or None
        self.version = version
        self.peer_name = peer_name
        key: bytes | None
        if token:
            key = token.encode() if isinstance(token, str) else bytes(token)
            named = token_user(key)
            if user is not None and user != named:
                raise ValueError(f"the token is user {named!r}'s, not {user!r}'s")
            self.credential, self.user = Credential.TOKEN, named
        elif self.secret is not None:
            key, self.credential, self.user = self.secret, Credential.SECRET, user or os_user()
        else:
            key, self.credential, self.user = None, Credential.NONE, user or os_user()
        self._key = key
        self._user = _check_user(self.user)
        self._nonce = os.urandom(NONCE_SIZE)
        self._stage = "hello"
        self.abort_frame: bytes | None = None

    @property
    def done(self) -> bool:
        return self._stage == "done"

    def hello(self) -> bytes:
        assert self._stage == "hello"
        self._stage = "challenge"
        return _HELLO.pack(MAGIC, self.version, self.role, self.credential, self._nonce, len(self._user)) + self._user

    def _what(self) -> str:
        return "a shared secret" if self.credential == Credential.SECRET else f"user {self.user}'s token"

    def _abort(self, reason: str) -> bytes:
        return _PROOF.pack(Status.AUTH, _NO_MAC) + reason.encode()

    def receive(self, body: bytes) -> bytes | None:
        """Feed the acceptor's next frame; returns bytes to send back, if any.

        Raises a HandshakeError subclass naming the cause when the exchange fails.
        After a failure ``abort_frame`` (if set) should be sent before closing.
        """
        self.abort_frame = None
        if self._stage == "challenge":
            if len(body) < _CHALLENGE.size or body[:8] != MAGIC:
                raise HandshakeError(
                    f"the {self.peer_name} did not answer with the jobsched handshake (wrong port or not jobsched?)"
                )
            magic, version, status, credential, nonce_a, mac_a = _CHALLENGE.unpack_from(body)
            reason = _reason(body[_CHALLENGE.size :])
            if status != Status.OK:
                raise _error(status, f"the {self.peer_name} refused the connection: {reason}")
            if version != self.version:
                raise VersionMismatch(f"the {self.peer_name} speaks protocol version {version}, we speak {self.version}")
            if self._key is None:
                # the acceptor accepted a hello without credentials: it has none either
                self._stage = "verdict"
                return _PROOF.pack(Status.OK, _NO_MAC)
            if credential == Credential.NONE:
                message = f"we have {self._what()} but the {self.peer_name} does not use one; refusing to trust it"
                self.abort_frame = self._abort("the peer has credentials configured and you do not")
                raise AuthenticationError(message)
            if credential != self.credential:
                self.abort_frame = self._abort("you answered with another kind of credential than we sent")
                raise AuthenticationError(f"the {self.peer_name} answered with another kind of credential than ours")
            expected = _mac(self._key, b"acceptor", self.version, self.role, self.credential, self._user,
                            self._nonce, nonce_a)
            if not hmac.compare_digest(expected, mac_a):
                if self.credential == Credential.TOKEN:
                    self.abort_frame = self._abort(
                        f"user {self.user}'s token did not match the users file: a wrong or rotated token")
                    raise AuthenticationError(
                        f"the {self.peer_name} does not know this token of user {self.user}: the token is wrong or "
                        "was rotated (ask the admin for the current one)")
                self.abort_frame = self._abort("your proof of the shared secret did not verify: the secrets differ")
                raise AuthenticationError(f"the {self.peer_name}'s proof of the shared secret did not verify: the secrets differ")
            self._stage = "verdict"
            return _PROOF.pack(Status.OK, _mac(self._key, b"initiator", self.version, self.role, self.credential,
                                               self._user, self._nonce, nonce_a))
        if self._stage == "verdict":
            if len(body) < _VERDICT.size:
                raise HandshakeError("truncated handshake verdict")
            (status,) = _VERDICT.unpack_from(body)
            if status != Status.OK:
                raise _error(status, f"the {self.peer_name} refused the connection: {_reason(body[1:])}")
            self._stage = "done"
            return None
        raise HandshakeError(f"unexpected handshake frame at stage {self._stage}")


class AcceptorHandshake:
    """The listening side.  ``receive()`` each frame; send what it returns.

    ``secret`` is the cluster secret; ``users`` looks a user's token up by name (called
    for each hello, so a reloaded users file applies to the next connection).  With
    neither, anyone is accepted, as the admin.  After ``done``: ``peer_role``,
    ``peer_user`` (the name the hello gave, proved by a token or vouched for by the
    secret) and ``peer_admin`` (it proved the cluster secret, or there is nothing to prove).

    After a refusal ``receive`` returns the refusal frame and raises on the next call;
    check ``failure`` to know whether to close after sending.
    """

    def __init__(self, secret: bytes | None, version: int, accept_roles: frozenset[Role],
                 users: UserLookup | None = None) -> None:
        self.secret = secret or None
        self.users = users
        self.version = version
        self.accept_roles = accept_roles
        self._nonce = os.urandom(NONCE_SIZE)
        self._stage = "hello"
        self._key: bytes | None = None
        self.peer_role: Role | None = None
        self.peer_credential: Credential | None = None
        self.peer_user = ""
        self.peer_admin = False
        self.failure: HandshakeError | None = None

    @property
    def done(self) -> bool:
        return self._stage == "done"

    @property
    def open(self) -> bool:
        """No credentials here: every peer is accepted (and is the admin)."""
        return self.secret is None and self.users is None

    def _refuse_challenge(self, status: Status, reason: str) -> bytes:
        self.failure = _error(status, reason)
        self._stage = "failed"
        kind = Credential.NONE if self.open else Credential.SECRET
        return _CHALLENGE.pack(MAGIC, self.version, status, kind, bytes(NONCE_SIZE), _NO_MAC) + reason.encode()

    def _refuse_verdict(self, status: Status, reason: str, reply: str) -> bytes:
        self.failure = _error(status, reason)
        self._stage = "failed"
        return _VERDICT.pack(status) + reply.encode()

    def _credentials_required(self) -> str:
        if self.users is not None and self.peer_role == Role.CLIENT:
            return ("a user token or the cluster secret is required: set JOBSCHED_TOKEN or JOBSCHED_TOKEN_FILE "
                    f"(a user), or, for the admin, {SECRET_HINT}")
        return f"a shared secret is required: {SECRET_HINT}"

    def _key_for(self, credential: Credential, user: str) -> bytes | str:
        """The key the peer must prove, or the reason it is refused."""
        if credential == Credential.TOKEN:
            if self.peer_role != Role.CLIENT:
                return TOKEN_ROLE_REFUSAL
            if self.users is None:
                return "user tokens are not accepted here (no users file is configured); connect with the cluster secret"
            token = self.users(user)
            if token is None:
                return f"unknown user {user!r}: not in the scheduler's users file (never added, or removed)"
            return token
        if credential == Credential.SECRET:
            if self.secret is None:
                return "no cluster secret is configured here: connect with a user token (JOBSCHED_TOKEN)"
            return self.secret
        return self._credentials_required()

    def receive(self, body: bytes) -> bytes:
        if self._stage == "hello":
            return self._hello(body)
        if self._stage == "proof":
            return self._proof(body)
        raise self.failure or HandshakeError(f"unexpected handshake frame at stage {self._stage}")

    def _hello(self, body: bytes) -> bytes:
        if len(body) < _HELLO.size or body[:8] != MAGIC or len(body) != _HELLO.size + body[_HELLO.size - 1]:
            self.failure = HandshakeError("peer did not open with the jobsched handshake")
            self._stage = "failed"
            raise self.failure
        _, version, role, credential, nonce_i, _ = _HELLO.unpack_from(body)
        raw_user = body[_HELLO.size :]
        if version != self.version:
            return self._refuse_challenge(
                Status.VERSION, f"protocol version mismatch: this side speaks {self.version}, the peer speaks {version}"
            )
        try:
            self.peer_role = Role(role)
        except ValueError:
            return self._refuse_challenge(Status.ROLE, f"unknown peer role {role}")
        if self.peer_role not in self.accept_roles:
            return self._refuse_challenge(Status.ROLE, f"role {self.peer_role.name.lower()} is not accepted here")
        try:
            self.peer_credential = Credential(credential)
        except ValueError:
            return self._refuse_challenge(Status.AUTH, f"unknown credential kind {credential}")
        try:
            user = raw_user.decode("utf-8")
            _check_user(user)
        except ValueError:
            return self._refuse_challenge(Status.AUTH, f"the user name must be 1 to {MAX_USER_BYTES} bytes of printable UTF-8")
        self.peer_user = user
        self._nonce_i = nonce_i
        self._user = raw_user
        if self.peer_credential == Credential.TOKEN and self.peer_role != Role.CLIENT:
            return self._refuse_challenge(Status.AUTH, TOKEN_ROLE_REFUSAL)  # even where nothing is checked
        if self.open:
            # nothing to prove: our answer says so, and an initiator that has credentials refuses us
            self._stage = "proof"
            return _CHALLENGE.pack(MAGIC, self.version, Status.OK, Credential.NONE, self._nonce, _NO_MAC)
        key = self._key_for(self.peer_credential, user)
        if isinstance(key, str):
            return self._refuse_challenge(Status.AUTH, key)
        self._key = key
        mac = _mac(key, b"acceptor", version, role, credential, raw_user, nonce_i, self._nonce)
        self._stage = "proof"
        return _CHALLENGE.pack(MAGIC, self.version, Status.OK, credential, self._nonce, mac)

    def _proof(self, body: bytes) -> bytes:
        if len(body) < _PROOF.size:
            return self._refuse_verdict(Status.AUTH, "truncated proof", "truncated proof")
        status, mac_i = _PROOF.unpack_from(body)
        if status != Status.OK:
            self.failure = _error(status, f"the peer refused us: {_reason(body[_PROOF.size:])}")
            self._stage = "failed"
            raise self.failure
        if self._key is not None:
            assert self.peer_role is not None and self.peer_credential is not None  # set with the hello
            expected = _mac(self._key, b"initiator", self.version, self.peer_role, self.peer_credential, self._user,
                            self._nonce_i, self._nonce)
            if not hmac.compare_digest(expected, mac_i):
                if self.peer_credential == Credential.TOKEN:
                    return self._refuse_verdict(
                        Status.AUTH,
                        f"user {self.peer_user}'s proof of their token did not verify (a wrong or rotated token)",
                        f"your token for user {self.peer_user} did not verify: it is wrong or was rotated",
                    )
                return self._refuse_verdict(
                    Status.AUTH,
                    "the peer's proof of the shared secret did not verify",
                    "your proof of the shared secret did not verify: the secrets differ",
                )
        self.peer_admin = self.open or self.peer_credential == Credential.SECRET
        self._stage = "done"
        return _VERDICT.pack(Status.OK)
