"""``jobsched-worker``: the worker daemon's command line."""

from __future__ import annotations

import argparse
import os
import sys

from ..protocol.address import parse_address, read_scheduler_file
from ..protocol.aio import configure_logging, run_daemon
from ..protocol.options import add_tls_options, env_default, positive, tls_config
from ..protocol.secret import load_secret
from ..protocol.tls import client_context
from .daemon import WorkerDaemon


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jobsched-worker",
        description="Run a jobsched worker: it joins the scheduler and runs the batches it is given.",
        epilog="The shared secret comes from JOBSCHED_SECRET, --secret-file or JOBSCHED_SECRET_FILE.",
    )
    p.add_argument("address", nargs="?", default=env_default("SCHEDULER", None),
                   help="scheduler address: tcp://host:port or host:port (or JOBSCHED_SCHEDULER)")
    p.add_argument("--scheduler-file", default=env_default("SCHEDULER_FILE", None), help="read the scheduler address from this file")
    p.add_argument("--nthreads", type=positive(int), default=env_default("NTHREADS", 1), help="batches run at once (default 1)")
    p.add_argument("--name", default=env_default("NAME", ""), help="worker name (default host-pid); must be unique")
    p.add_argument("--secret-file", default=None, help="file holding the shared secret (mode 0600)")
    p.add_argument("--death-timeout", type=positive(float), default=env_default("DEATH_TIMEOUT", 60.0),
                   help="seconds to keep trying to reach the scheduler before exiting 1 (default 60)")
    add_tls_options(p)
    p.add_argument("--log-level", default=env_default("LOG_LEVEL", "INFO"), choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    if args.address is None and args.scheduler_file is None:
        parser.error("give the scheduler address (tcp://host:port) or --scheduler-file")
    try:
        address = parse_address(args.address or read_scheduler_file(args.scheduler_file))
        secret = load_secret(args.secret_file)
        ssl = client_context(tls_config(args)) if address.scheme == "tls" else None
    except (ValueError, OSError, KeyError) as exc:
        print(f"jobsched-worker: {exc}", file=sys.stderr)
        return 2
    daemon = WorkerDaemon(
        address, nthreads=int(args.nthreads), name=args.name, secret=secret,
        death_timeout=float(args.death_timeout), ssl=ssl,
    )
    return run_daemon(daemon.run)


if __name__ == "__main__":
    sys.exit(main())
