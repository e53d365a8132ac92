"""jobsched wire protocol: framing, messages, handshake (sans-IO), plus asyncio glue in ``aio``."""

from .address import DEFAULT_PORT, Address, is_loopback_host, parse_address
from .errors import (
    AuthenticationError,
    FrameTooLarge,
    HandshakeError,
    JobschedError,
    MalformedMessage,
    ProtocolError,
    TLSError,
    VersionMismatch,
)
from .framing import PREAUTH_LIMITS, Frame, FrameDecoder, FrameLimits, encode_frame
from .handshake import AcceptorHandshake, Credential, InitiatorHandshake, Role
from .messages import PROTOCOL_VERSION, Message, decode, encode

__all__ = [
    "DEFAULT_PORT", "Address", "is_loopback_host", "parse_address",
    "AuthenticationError", "FrameTooLarge", "HandshakeError", "JobschedError", "MalformedMessage",
    "ProtocolError", "TLSError", "VersionMismatch",
    "PREAUTH_LIMITS", "Frame", "FrameDecoder", "FrameLimits", "encode_frame",
    "AcceptorHandshake", "Credential", "InitiatorHandshake", "Role",
    "PROTOCOL_VERSION", "Message", "decode", "encode",
]
