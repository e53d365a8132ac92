"""``jobsched-worker``: the worker daemon's command line.

By default it runs a supervisor with ``--nworkers`` worker processes (one by
default) that restarts crashed ones; ``--no-nanny`` runs one worker in this process.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ..protocol.address import parse_address
from ..protocol.tls import client_context, server_context
from ..runtime.config import parse_daemon_args
from ..runtime.daemon import configure_logging, run_daemon
from ..runtime.options import add_common_options, port, positive, tls_config
from ..runtime.secret import ENV_TOKEN, ENV_TOKEN_FILE, SecretError, load_secret
from ..runtime.tokens import looks_like_token
from .daemon import WorkerDaemon, cli_status
from .memory import parse_memory_limit
from .supervisor import Supervisor, child_command


def memory_limit_option(text: str) -> str:
    """Validate now; the limit is resolved per process once --nworkers is known."""
    try:
        parse_memory_limit(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jobsched-worker",
        description="Run jobsched worker processes: they join the scheduler and run the batches they are given.",
        epilog="Every option can also be set as JOBSCHED_<OPTION> (e.g. JOBSCHED_NTHREADS) or in a TOML config "
        "file. The shared secret comes from JOBSCHED_SECRET, --secret-file or JOBSCHED_SECRET_FILE, else "
        "$XDG_CONFIG_HOME/jobsched/secret (default ~/.config/jobsched/secret); a user token never admits a worker. "
        "Exit status: 0 stopped, 1 scheduler unreachable for --death-timeout, 2 configuration error.",
    )
    p.add_argument("scheduler", nargs="?", default=None, metavar="ADDRESS",
                   help="scheduler address: tcp://host:port, tls://host:port or host:port (or JOBSCHED_SCHEDULER)")
    p.add_argument("--scheduler-file", default=None, help="read the scheduler address from this file")
    p.add_argument("--nthreads", type=positive(int), default=1, help="batches each process runs at once (default 1)")
    p.add_argument("--nworkers", type=positive(int), default=1, help="worker processes under this supervisor (default 1)")
    p.add_argument("--name", default="", help="worker name (default host-pid; with --nworkers, NAME-i); must be unique")
    p.add_argument("--memory-limit", type=memory_limit_option, default="0",
                   help="per process: bytes, 4GiB, a fraction of RAM (0.5), or auto (RAM or cgroup limit / nworkers); "
                   "above 80%% a process takes no new batches, past the limit it is restarted (default: none)")
    p.add_argument("--death-timeout", type=positive(float), default=60.0,
                   help="seconds to keep trying to reach the scheduler before exiting 1 (default 60)")
    p.add_argument("--drain-timeout", type=positive(float), default=30.0,
                   help="on SIGTERM, seconds to let running batches finish (default 30)")
    p.add_argument("--cancel-grace", type=positive(float), default=10.0,
                   help="a cancelled batch still running after this many seconds gets its process restarted (default 10)")
    p.add_argument("--data-port", type=port, default=0,
                   help="port peers fetch scattered data from, on the interface that reaches the scheduler "
                   "(default 0: a free one; with --nworkers N, processes use PORT..PORT+N-1)")
    p.add_argument("--no-nanny", action="store_true", help="run one worker in this process, without a supervisor")
    add_common_options(p)
    return p


def _child_argv(args: argparse.Namespace, index: int, memory_limit: int) -> list[str]:
    argv = [*child_command(), *([args.scheduler] if args.scheduler else []), "--no-nanny", "--nthreads", str(args.nthreads),
            "--death-timeout", str(args.death_timeout), "--drain-timeout", str(args.drain_timeout),
            "--cancel-grace", str(args.cancel_grace), "--memory-limit", str(memory_limit), "--log-level", args.log_level,
            "--data-port", str(args.data_port + index if args.data_port else 0)]
    if args.name:
        argv += ["--name", args.name if args.nworkers == 1 else f"{args.name}-{index}"]
    for option in ("scheduler_file", "secret_file", "tls_cert", "tls_key", "tls_ca_file"):
        value = getattr(args, option)
        if value:
            argv += ["--" + option.replace("_", "-"), value]
    return argv


THREAD_LIMIT_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
                     "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def limit_thread_pools(slots: int) -> None:
    """Cap BLAS/OpenMP pools so that ``slots`` tasks at once x threads <= cores, as loky does.

    Set before any task imports numpy; values already in the environment are kept, and
    children (the supervisor's worker processes) inherit them.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    for var in THREAD_LIMIT_VARS:
        os.environ.setdefault(var, str(max(cores // max(slots, 1), 1)))


def worker_secret(secret_file: str | None) -> bytes | None:
    """The cluster secret, never a user token: a token only ever opens a client connection."""
    for variable in (ENV_TOKEN, ENV_TOKEN_FILE):
        if os.environ.get(variable):
            logging.getLogger("jobsched.worker").warning(
                "%s is set, but workers never authenticate with a user token: ignoring it", variable)
    secret = load_secret(secret_file)
    if secret is not None and looks_like_token(secret):
        raise SecretError("the configured secret is a user token (NAME:SECRET): user tokens may only connect as "
                          "clients; workers need the cluster secret (JOBSCHED_SECRET, --secret-file or "
                          "JOBSCHED_SECRET_FILE)")
    return secret


def main(argv: list[str] | None = None) -> int:
    args = parse_daemon_args(build_parser(), argv, "worker")
    configure_logging(args.log_level)
    if args.scheduler is None and args.scheduler_file is None:
        print("jobsched-worker: give the scheduler address (tcp://host:port) or --scheduler-file", file=sys.stderr)
        return 2
    try:
        # with only a scheduler file, the address is read when connecting (it may not exist yet)
        address = parse_address(args.scheduler) if args.scheduler else None
        memory_limit = parse_memory_limit(args.memory_limit, int(args.nworkers))
        secret = worker_secret(args.secret_file)
        tls = tls_config(args)
        ssl = client_context(tls)  # used for tls:// addresses only
        data_ssl = server_context(tls) if tls.cert else None  # peers fetch data over TLS too
    except (ValueError, OSError, KeyError) as exc:
        print(f"jobsched-worker: {exc}", file=sys.stderr)
        return 2
    limit_thread_pools(int(args.nthreads) * (1 if args.no_nanny else int(args.nworkers)))
    if not args.no_nanny:
        argvs = [_child_argv(args, i, memory_limit) for i in range(int(args.nworkers))]
        return Supervisor(argvs, memory_limit=memory_limit, drain_timeout=float(args.drain_timeout)).run()
    daemon = WorkerDaemon(
        address, scheduler_file=args.scheduler_file, nthreads=int(args.nthreads), name=args.name, secret=secret,
        death_timeout=float(args.death_timeout), memory_limit=memory_limit, ssl=ssl, data_ssl=data_ssl,
        drain_timeout=float(args.drain_timeout), cancel_grace=float(args.cancel_grace), data_port=int(args.data_port),
        supervised=os.environ.get("JOBSCHED_SUPERVISED") == "1",
    )
    status = run_daemon(daemon.run)
    # under a supervisor, report the daemon's own status: it tells fatal from restartable
    code = status if os.environ.get("JOBSCHED_SUPERVISED") == "1" else cli_status(status)
    if daemon.in_flight:
        # threads still run user code (drain timed out, or a restart): a normal exit would wait for them
        logging.shutdown()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
