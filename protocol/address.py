"""Addresses: ``tcp://host:port``, ``tls://host:port`` or ``host:port``."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

DEFAULT_PORT = 8686
SCHEMES = ("tcp", "tls")


@dataclass(frozen=True)
class Address:
    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)


def parse_address(text: str, default_port: int = DEFAULT_PORT) -> Address:
    """Parse an address; raises ValueError with a message naming what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"invalid scheduler address {text!r}: expected tcp://host:port")
    rest = text.strip()
    scheme = "tcp"
    if "://" in rest:
        scheme, rest = rest.split("://", 1)
        scheme = scheme.lower()
        if scheme not in SCHEMES:
            raise ValueError(f"invalid address {text!r}: scheme must be one of {', '.join(SCHEMES)}")
    rest = rest.rstrip("/")
    if rest.startswith("["):
        host, sep, tail = rest[1:].partition("]")
        if not sep:
            raise ValueError(f"invalid address {text!r}: unclosed '['")
        port_text = tail[1:] if tail.startswith(":") else ""
        if tail and not tail.startswith(":"):
            raise ValueError(f"invalid address {text!r}")
    elif rest.count(":") == 1:
        host, port_text = rest.split(":")
    else:
        host, port_text = rest, ""
        if ":" in host and not _is_ipv6(host):
            raise ValueError(f"invalid address {text!r}: write IPv6 addresses in brackets, [::1]:8686")
    if not host:
        raise ValueError(f"invalid address {text!r}: no host")
    if port_text:
        if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
            raise ValueError(f"invalid address {text!r}: port must be a number from 0 to 65535")
        port = int(port_text)
    else:
        port = default_port
    return Address(scheme, host, port)


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
