"""The opening exchange, as two small sans-IO state machines.

It runs before any msgpack is decoded, over frames capped at a few KiB, and
checks the magic, the protocol version and (when a secret is configured) a
mutual HMAC challenge-response::

    initiator -> acceptor   HELLO      magic, version, role, has-secret, nonce_i
    acceptor  -> initiator  CHALLENGE  magic, version, status, has-secret, nonce_a,
                                       mac_a = HMAC(secret, "acceptor" | ctx) | reason
    initiator -> acceptor   PROOF      status, mac_i = HMAC(secret, "initiator" | ctx) | reason
    acceptor  -> initiator  VERDICT    status | reason

``ctx`` binds the version, the initiator's role and both fresh nonces, so a
proof can be neither replayed (new nonces every time) nor reflected back (the
two directions use different labels).  Each side proves itself, so neither
talks to an impostor.  MACs are compared in constant time.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import struct

from .errors import AuthenticationError, HandshakeError, VersionMismatch

MAGIC = b"JOBSCHD\x00"
NONCE_SIZE = 32
MAC_SIZE = hashlib.sha256().digest_size

_HELLO = struct.Struct(f"!8sHBB{NONCE_SIZE}s")
_CHALLENGE = struct.Struct(f"!8sHBB{NONCE_SIZE}s{MAC_SIZE}s")
_PROOF = struct.Struct(f"!B{MAC_SIZE}s")
_VERDICT = struct.Struct("!B")


class Role(enum.IntEnum):
    CLIENT = 1
    WORKER = 2
    PEER = 3  # worker-to-worker data connection


class Status(enum.IntEnum):
    OK = 0
    VERSION = 1
    AUTH = 2
    ROLE = 3


_NO_MAC = bytes(MAC_SIZE)


def _mac(secret: bytes, label: bytes, version: int, role: int, nonce_i: bytes, nonce_a: bytes) -> bytes:
    ctx = b"jobsched-%s|%d|%d|" % (label, version, role) + nonce_i + nonce_a
    return hmac.new(secret, ctx, hashlib.sha256).digest()


def _reason(data: bytes) -> str:
    return data.decode("utf-8", "replace")[:500]


def _error(status: int, reason: str) -> HandshakeError:
    if status == Status.VERSION:
        return VersionMismatch(reason)
    if status == Status.AUTH:
        return AuthenticationError(reason)
    return HandshakeError(reason)


class InitiatorHandshake:
    """The connecting side.  ``hello()``, then ``receive()`` each frame body it gets."""

    def __init__(self, role: Role, secret: bytes | None, version: int, peer_name: str = "scheduler") -> None:
        self.role = role
        self.secret = secret or None
        self.version = version
        self.peer_name = peer_name
        self._nonce = os.urandom(NONCE_SIZE)
        self._stage = "hello"

    @property
    def done(self) -> bool:
        return self._stage == "done"

    def hello(self) -> bytes:
        assert self._stage == "hello"
        self._stage = "challenge"
        return _HELLO.pack(MAGIC, self.version, self.role, self.secret is not None, self._nonce)

    def receive(self, body: bytes) -> bytes | None:
        """Feed the acceptor's next frame; returns bytes to send back, if any.

        Raises a HandshakeError subclass naming the cause when the exchange fails.
        After a failure ``abort_frame`` (if set) should be sent before closing.
        """
        self.abort_frame: bytes | None = None
        if self._stage == "challenge":
            if len(body) < _CHALLENGE.size or body[:8] != MAGIC:
                raise HandshakeError(
                    f"the {self.peer_name} did not answer with the jobsched handshake (wrong port or not jobsched?)"
                )
            magic, version, status, has_secret, nonce_a, mac_a = _CHALLENGE.unpack_from(body)
            reason = _reason(body[_CHALLENGE.size :])
            if status != Status.OK:
                raise _error(status, f"the {self.peer_name} refused the connection: {reason}")
            if version != self.version:
                raise VersionMismatch(f"the {self.peer_name} speaks protocol version {version}, we speak {self.version}")
            if self.secret is None:
                # acceptor accepted a secret-less hello: it has no secret either
                self._stage = "verdict"
                return _PROOF.pack(Status.OK, _NO_MAC)
            if not has_secret:
                message = f"we have a shared secret but the {self.peer_name} does not use one; refusing to trust it"
                self.abort_frame = _PROOF.pack(Status.AUTH, _NO_MAC) + b"the peer has a shared secret configured and you do not"
                raise AuthenticationError(message)
            expected = _mac(self.secret, b"acceptor", self.version, self.role, self._nonce, nonce_a)
            if not hmac.compare_digest(expected, mac_a):
                self.abort_frame = (
                    _PROOF.pack(Status.AUTH, _NO_MAC) + b"your proof of the shared secret did not verify: the secrets differ"
                )
                raise AuthenticationError(f"the {self.peer_name}'s proof of the shared secret did not verify: the secrets differ")
            self._stage = "verdict"
            return _PROOF.pack(Status.OK, _mac(self.secret, b"initiator", self.version, self.role, self._nonce, nonce_a))
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

    After a refusal ``receive`` returns the refusal frame and raises on the next call;
    check ``failure`` to know whether to close after sending.
    """

    def __init__(self, secret: bytes | None, version: int, accept_roles: frozenset[Role]) -> None:
        self.secret = secret or None
        self.version = version
        self.accept_roles = accept_roles
        self._nonce = os.urandom(NONCE_SIZE)
        self._stage = "hello"
        self.peer_role: Role | None = None
        self.failure: HandshakeError | None = None

    @property
    def done(self) -> bool:
        return self._stage == "done"

    def _refuse_challenge(self, status: Status, reason: str) -> bytes:
        self.failure = _error(status, reason)
        self._stage = "failed"
        return _CHALLENGE.pack(MAGIC, self.version, status, self.secret is not None, bytes(NONCE_SIZE), _NO_MAC) + reason.encode()

    def _refuse_verdict(self, status: Status, reason: str, reply: str) -> bytes:
        self.failure = _error(status, reason)
        self._stage = "failed"
        return _VERDICT.pack(status) + reply.encode()

    def receive(self, body: bytes) -> bytes:
        if self._stage == "hello":
            if len(body) != _HELLO.size or body[:8] != MAGIC:
                self.failure = HandshakeError("peer did not open with the jobsched handshake")
                self._stage = "failed"
                raise self.failure
            _, version, role, has_secret, nonce_i = _HELLO.unpack(body)
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
            if self.secret is not None and not has_secret:
                return self._refuse_challenge(
                    Status.AUTH,
                    "a shared secret is required: set JOBSCHED_SECRET or JOBSCHED_SECRET_FILE (or --secret-file)",
                )
            self._nonce_i = nonce_i
            mac = _NO_MAC if self.secret is None else _mac(self.secret, b"acceptor", version, role, nonce_i, self._nonce)
            self._stage = "proof"
            return _CHALLENGE.pack(MAGIC, self.version, Status.OK, self.secret is not None, self._nonce, mac)
        if self._stage == "proof":
            if len(body) < _PROOF.size:
                return self._refuse_verdict(Status.AUTH, "truncated proof", "truncated proof")
            status, mac_i = _PROOF.unpack_from(body)
            if status != Status.OK:
                self.failure = _error(status, f"the peer refused us: {_reason(body[_PROOF.size:])}")
                self._stage = "failed"
                raise self.failure
            if self.secret is not None:
                assert self.peer_role is not None  # set with the hello, before the proof stage
                expected = _mac(self.secret, b"initiator", self.version, self.peer_role, self._nonce_i, self._nonce)
                if not hmac.compare_digest(expected, mac_i):
                    return self._refuse_verdict(
                        Status.AUTH,
                        "the peer's proof of the shared secret did not verify",
                        "your proof of the shared secret did not verify: the secrets differ",
                    )
            self._stage = "done"
            return _VERDICT.pack(Status.OK)
        raise self.failure or HandshakeError(f"unexpected handshake frame at stage {self._stage}")
