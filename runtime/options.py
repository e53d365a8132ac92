"""Command-line option helpers shared by the daemons: value checks and common option groups.

Environment variables and config files are applied by ``config.resolve``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from ..protocol.tls import TLSConfig


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
    group.add_argument("--tls-cert", default=None, help="certificate chain (PEM)")
    group.add_argument("--tls-key", default=None, help="private key (PEM), if not in --tls-cert")
    group.add_argument("--tls-ca-file", default=None,
                       help="CA bundle to verify peers; on the scheduler it makes TLS mutual")


def tls_config(args: argparse.Namespace) -> TLSConfig:
    return TLSConfig(args.tls_cert, args.tls_key, args.tls_ca_file)


def add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--secret-file", default=None, help="file holding the shared secret (mode 0600)")
    add_tls_options(parser)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--config", default=None, metavar="PATH",
                        help="TOML config file, read after /etc/jobsched/jobsched.toml and ~/.config/jobsched/jobsched.toml")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective configuration and where each value came from, then exit")
