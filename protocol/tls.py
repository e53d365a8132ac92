"""TLS contexts for ``tls://`` addresses: TLS 1.2 at least, mutual when a CA is given.

The shared secret keeps strangers out; TLS on top stops an on-path attacker from
reading or altering the traffic.  Certificates are checked against the CA and
the scheduler's host name (put its IP address in the certificate's SAN when
workers connect by address).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass


@dataclass(frozen=True)
class TLSConfig:
    cert: str | None = None  # our certificate chain (PEM)
    key: str | None = None  # its private key (PEM); defaults to inside ``cert``
    ca_file: str | None = None  # CA bundle to verify the peer; a server with one requires client certs

    @property
    def configured(self) -> bool:
        return bool(self.cert or self.ca_file)


def server_context(config: TLSConfig) -> ssl.SSLContext:
    if not config.cert:
        raise ValueError("TLS on the scheduler needs --tls-cert (and --tls-key unless the key is in the same file)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(config.cert, config.key)
    if config.ca_file:
        ctx.load_verify_locations(config.ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: clients and workers show a certificate
    return ctx


def client_context(config: TLSConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the server's certificate and name
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if config.ca_file:
        ctx.load_verify_locations(config.ca_file)
    else:
        ctx.load_default_certs()
    if config.cert:
        ctx.load_cert_chain(config.cert, config.key)
    return ctx
