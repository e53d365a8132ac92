"""Command-line option helpers shared by the daemons: ``JOBSCHED_*`` defaults and value checks."""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable

from .tls import TLSConfig


def env_default(option: str, default: Any) -> Any:
    """The value of ``JOBSCHED_<OPTION>`` if set, else ``default`` (argparse still type-checks it)."""
    return os.environ.get(f"JOBSCHED_{option.upper().replace('-', '_')}", default)


def port(text: str) -> int:
    text = str(text)
    if not (text.isascii() and text.isdigit()) or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"port must be a number from 0 to 65535, got {text!r}")
    return int(text)


def positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    return parse


def add_tls_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("TLS (for tls:// addresses)")
    group.add_argument("--tls-cert", default=env_default("TLS_CERT", None), help="certificate chain (PEM)")
    group.add_argument("--tls-key", default=env_default("TLS_KEY", None), help="private key (PEM), if not in --tls-cert")
    group.add_argument("--tls-ca-file", default=env_default("TLS_CA_FILE", None),
                       help="CA bundle to verify peers; on the scheduler it makes TLS mutual")


def tls_config(args: argparse.Namespace) -> TLSConfig:
    return TLSConfig(args.tls_cert, args.tls_key, args.tls_ca_file)
