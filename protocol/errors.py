"""jobsched's error root, and the protocol's errors beneath it.

Every error jobsched itself raises derives from ``JobschedError`` (it lives here,
in the bottom layer, so every package can derive from it); those a user may
already catch by a builtin keep that base too (``ValueError`` for bad
configuration, ``RuntimeError`` and ``ConnectionError`` for the cluster's).
"""

from __future__ import annotations


class JobschedError(Exception):
    """The root of every error jobsched raises (tasks' own exceptions travel as they are)."""


class ProtocolError(JobschedError):
    """The peer sent something we cannot accept; the connection must be closed."""


class FrameTooLarge(ProtocolError):
    """A frame header announced more bytes than the configured caps allow."""


class MalformedMessage(ProtocolError):
    """A frame decoded, but its body is not a valid message of a known op."""


class HandshakeError(ProtocolError):
    """The opening exchange failed: wrong magic, version or secret, or a rejection."""


class AuthenticationError(HandshakeError):
    """The peer does not know the shared secret (or we do not know theirs)."""


class VersionMismatch(HandshakeError):
    """Both sides speak jobsched, but different protocol versions."""


class TLSError(HandshakeError):
    """The TLS layer failed: bad or untrusted certificate, or the peer does not speak TLS."""
