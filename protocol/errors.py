"""The protocol's error hierarchy: every failure the wire can produce is one of these."""

from __future__ import annotations


class ProtocolError(Exception):
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
