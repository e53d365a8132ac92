"""Which ``Host`` headers the dashboard answers to: its defence against DNS rebinding.

A web page can rebind its own DNS name to 127.0.0.1 and then read the dashboard's
``/api/status`` as a same-origin request; the browser still sends the page's name as
``Host``, so answering only to this server's own names (and those an admin allowed)
shuts that door.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass

ALLOW_ANY_HOST = "*"


def split_host(value: str) -> tuple[str, int | None] | None:
    """``Host`` header -> (name, port or None), names lower case without a trailing dot and IP
    literals in their canonical form; None if it is not a well-formed host[:port]."""
    value = value.strip()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or not _is_ip(name, 6):
            return None
    elif value.count(":") > 1:  # an IPv6 literal must be in brackets
        return None
    else:
        name, _, port_text = value.partition(":")
        rest = ":" + port_text if ":" in value else ""
    port: int | None = None
    if rest:
        digits = rest[1:]
        if not rest.startswith(":") or not (digits.isascii() and digits.isdigit()) or int(digits) > 65535:
            return None
        port = int(digits)
    name = name.lower().rstrip(".")
    if not _HOST_NAME.fullmatch(name):
        return None
    return _canonical(name), port


_HOST_NAME = re.compile(r"[a-z0-9_.:-]+")  # names, dotted IPv4 and (from inside brackets) IPv6


def _is_ip(text: str, version: int | None = None) -> bool:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    return version is None or address.version == version


def _canonical(name: str) -> str:
    return str(ipaddress.ip_address(name)) if _is_ip(name) else name


ALL_INTERFACES = ("", "0.0.0.0", "::")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class HostPolicy:
    """Which ``Host`` headers the dashboard answers to.

    Its own names (``own``) with no port or the bound ``port``; the names an admin allowed
    (``extra``, ``--dashboard-allow-host``) with any port, since a proxy in front may use
    another one (``*`` allows every Host); with ``any_ip``, every IP literal.  An IP literal
    cannot be the product of DNS rebinding, and a request without a Host header does not
    come from a browser, so neither is an attack this check is for.
    """

    port: int
    own: frozenset[str]
    extra: frozenset[str] = frozenset()
    any_ip: bool = False

    @classmethod
    def for_bound(cls, host: str, port: int, allowed: Iterable[str] = (),
                  machine_names: Iterable[str] = ()) -> HostPolicy:
        """The policy of a server bound to ``host``:``port``: that address; with a loopback
        address, the loopback names; with a non-loopback one, ``machine_names`` (the hostname
        and FQDN) too, and with every interface, any IP literal."""
        bound = _canonical(host.lower().strip("[]").rstrip("."))
        everywhere = bound in ALL_INTERFACES
        loopback = bound == "localhost" or (_is_ip(bound) and ipaddress.ip_address(bound).is_loopback)
        own = set() if everywhere else {bound}
        if loopback or everywhere:
            own.update(LOOPBACK_NAMES)
        if not loopback:
            own.update(name.lower().rstrip(".") for name in machine_names if name)
        extra = {_canonical(name.lower().strip("[]").rstrip(".")) for name in allowed if name}
        return cls(port, frozenset(own), frozenset(extra), everywhere)

    def allows(self, values: list[str]) -> bool:
        """Whether a request with these ``Host`` header values (none, one or more) may be answered."""
        if not values:
            return True
        if len(values) > 1:
            return False
        if ALLOW_ANY_HOST in self.extra:
            return True
        parsed = split_host(values[0])
        if parsed is None:
            return False
        name, port = parsed
        if name in self.extra:
            return True
        if port is not None and port != self.port:
            return False
        return name in self.own or (self.any_ip and _is_ip(name))

    def names(self) -> str:
        """The allowed names, for a refusal's message."""
        shown = sorted(self.own | self.extra) + (["any IP address"] if self.any_ip else [])
        return ", ".join(f"[{n}]" if ":" in n else n for n in shown)


def machine_names() -> list[str]:
    return [socket.gethostname(), socket.getfqdn()]

