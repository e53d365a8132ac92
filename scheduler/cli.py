"""``jobsched-scheduler``: the scheduler daemon's command line."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import signal
import sys

from ..protocol.address import DEFAULT_PORT, is_loopback_host, parse_address
from ..protocol.tls import server_context
from ..runtime.config import parse_daemon_args
from ..runtime.daemon import configure_logging, run_daemon
from ..runtime.options import add_common_options, port, positive, tls_config
from ..runtime.scheduler_file import write_scheduler_file
from ..runtime.secret import SecretError, ensure_default_secret, load_secret, write_new_secret
from ..runtime.tokens import looks_like_token
from ..runtime.users import UsersFileError, add_user, check_max_slots, check_weight, remove_user
from .host_policy import ALLOW_ANY_HOST, split_host
from .http import StatusServer
from .server import SchedulerServer, tune_gc
from .state import SchedulerConfig

log = logging.getLogger("jobsched.scheduler")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jobsched-scheduler",
        description="Run the jobsched scheduler: workers and clients connect to it.",
        epilog="Every option can also be set as JOBSCHED_<OPTION> (e.g. JOBSCHED_PORT) or in a TOML config "
        "file. The shared secret comes from JOBSCHED_SECRET, --secret-file or JOBSCHED_SECRET_FILE, "
        "never from the command line; on 127.0.0.1 without one, the scheduler creates a private one in "
        "$XDG_CONFIG_HOME/jobsched/secret (default ~/.config/jobsched/secret). Binding a non-loopback address "
        "requires a secret. SIGHUP reloads the --users-file.",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=port, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--scheduler-file", default=None, help="write the address here (JSON) once listening")
    p.add_argument("--heartbeat-timeout", type=positive(float), default=30.0,
                   help="seconds of silence after which a worker or client is declared gone (default 30)")
    p.add_argument("--allowed-failures", type=positive(int), default=3,
                   help="workers a batch may see die before it fails with WorkerLostError (default 3)")
    p.add_argument("--no-worker-timeout", type=positive(float), default=60.0,
                   help="seconds a batch waits while no worker is connected before it fails (default 60)")
    p.add_argument("--paused-timeout", type=positive(float), default=60.0,
                   help="seconds batches wait while every worker is paused by its memory limit before "
                   "they fail (default 60)")
    p.add_argument("--usage-half-life", type=positive(float), default=3600.0,
                   help="seconds after which a user's past usage counts half when users' turns tie "
                   "(fair share; default 3600)")
    p.add_argument("--recovery-grace", type=positive(float), default=6.0,
                   help="seconds after start during which a returning client's batches wait for the workers "
                   "that may still run or hold them (default 6)")
    p.add_argument("--no-prefetch", action="store_true",
                   help="never send a busy worker a batch to hold (by default, calls whose batches run "
                   "under 20 ms get one extra batch per slot, so workers do not wait a round trip)")
    p.add_argument("--dashboard-address", type=dashboard_address, default="127.0.0.1:8687",
                   help="HOST:PORT for the dashboard, /health, /metrics and /api/status (default 127.0.0.1:8687; "
                   "'none' disables it; a busy port falls back to a free one)")
    p.add_argument("--dashboard-allow-host", metavar="NAME", action="append", type=allowed_host, default=[],
                   help="a further name the dashboard answers to in the Host header, e.g. the name of a proxy "
                   "in front of it (repeatable; in a config file a list; '*' allows any). It always answers "
                   "to the address it is bound to, loopback names when bound to loopback, and the machine's "
                   "hostname and FQDN otherwise; other Hosts get 403 (against DNS rebinding)")
    p.add_argument("--generate-secret", metavar="PATH", default=None,
                   help="write a new random secret to PATH (mode 0600) and exit")
    add_user_options(p)
    add_common_options(p)
    return p


def add_user_options(p: argparse.ArgumentParser) -> None:
    users = p.add_argument_group("users and their tokens")
    users.add_argument("--users-file", metavar="PATH", default=None,
                       help="TOML file of the users who connect with a token, their weight and max-slots "
                       "(mode 0600); reloaded on SIGHUP")
    users.add_argument("--add-user", metavar="NAME", default=None,
                       help="with --users-file: create user NAME or give them a new token (keeping their weight "
                       "and max-slots), print the token alone on the last line, and exit")
    users.add_argument("--remove-user", metavar="NAME", default=None,
                       help="with --users-file: remove user NAME and exit (SIGHUP the running scheduler to apply)")
    users.add_argument("--weight", type=_weight, default=None,
                       help="with --add-user: the user's share against other users with work queued (default 1)")
    users.add_argument("--max-slots", type=_max_slots, default=None,
                       help="with --add-user: cap on the user's running batches (default 0: none)")


def _weight(text: str) -> float:
    try:
        return check_weight(float(text), "--weight")
    except (ValueError, UsersFileError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _max_slots(text: str) -> int:
    try:
        return check_max_slots(int(text), "--max-slots")
    except (ValueError, UsersFileError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def edit_users(args: argparse.Namespace) -> int:
    """``--add-user`` / ``--remove-user``: one edit of the users file, then exit."""
    if not args.users_file:
        print("jobsched-scheduler: --add-user and --remove-user need --users-file PATH (or JOBSCHED_USERS_FILE)",
              file=sys.stderr)
        return 2
    if args.add_user and args.remove_user:
        print("jobsched-scheduler: give --add-user or --remove-user, not both", file=sys.stderr)
        return 2
    try:
        if args.remove_user:
            remove_user(args.users_file, args.remove_user)
            print(f"removed user {args.remove_user} from {args.users_file}; send the running scheduler SIGHUP "
                  "to close their connections")
            return 0
        token = add_user(args.users_file, args.add_user, args.weight, args.max_slots)
    except UsersFileError as exc:
        print(f"jobsched-scheduler: {exc}", file=sys.stderr)
        return 2
    print(f"user {args.add_user} in {args.users_file} has a new token (any earlier one stops working once the "
          "scheduler reloads the file on SIGHUP). They set it as JOBSCHED_TOKEN, or keep it in "
          "~/.config/jobsched/token (mode 0600). Their token:")
    print(token)
    return 0


DASHBOARD_OFF = ("", "none", "off")


def dashboard_address(text: str) -> str:
    """``HOST:PORT``; ``:PORT`` means every interface, as with dask; ``none`` disables."""
    if text.strip().lower() in DASHBOARD_OFF:
        return text
    try:
        parse_address("0.0.0.0" + text if text.startswith(":") else text, default_port=8687)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def allowed_host(text: str) -> str:
    """A ``--dashboard-allow-host`` value: a host name or IP address without a port, or ``*``."""
    name = text.strip()
    bracketed = name.startswith("[") or name.count(":") <= 1
    parsed = split_host(name if bracketed else f"[{name}]")  # a bare IPv6 address is fine here
    if name == ALLOW_ANY_HOST or (parsed is not None and parsed[1] is None):
        return name
    raise argparse.ArgumentTypeError(f"expected a host name or address without a port (or '*'), got {text!r}")


def _start_dashboard(server: SchedulerServer, text: str, allowed_hosts: list[str]) -> StatusServer | None:
    if text.strip().lower() in DASHBOARD_OFF:
        return None
    if text.startswith(":"):
        log.warning("dashboard on every interface (%s): it shows the cluster's state without a login", text)
        text = "0.0.0.0" + text
    address = parse_address(text, default_port=8687)
    loop = asyncio.get_running_loop()
    try:
        status = StatusServer(server, loop, address.host, address.port, allowed_hosts)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        log.info("dashboard port %d is in use; using a free port instead", address.port)
        status = StatusServer(server, loop, address.host, 0, allowed_hosts)
    status.start()
    server.dashboard = status.address
    return status


def scheduler_secret(secret_file: str | None, host: str) -> bytes | None:
    """The configured secret; on a loopback address without one, the owner's private default
    secret (created if missing), so that only this user's workers and clients get in."""
    secret = load_secret(secret_file)
    if secret is not None and looks_like_token(secret):
        raise SecretError("the configured secret is a user token (NAME:SECRET): the scheduler needs the "
                          "cluster secret; tokens belong in the users file (--users-file)")
    if secret is None and is_loopback_host(host):
        secret, path, created = ensure_default_secret()
        log.info("no secret configured: using the private secret in %s (%s, mode 0600); this user's workers, "
                 "clients and jobsched status find it there", path, "created now" if created else "already there")
    return secret


def main(argv: list[str] | None = None) -> int:
    args = parse_daemon_args(build_parser(), argv, "scheduler")
    configure_logging(args.log_level)
    if args.generate_secret:
        try:
            write_new_secret(args.generate_secret)
        except FileExistsError:
            print(f"jobsched-scheduler: {args.generate_secret} exists; not overwriting it", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"jobsched-scheduler: cannot write {args.generate_secret}: {exc.strerror}", file=sys.stderr)
            return 2
        print(f"wrote a new secret to {args.generate_secret} (mode 0600)")
        return 0
    if args.add_user or args.remove_user:
        return edit_users(args)
    if args.weight is not None or args.max_slots is not None:
        print("jobsched-scheduler: --weight and --max-slots go with --add-user NAME", file=sys.stderr)
        return 2
    try:
        secret = scheduler_secret(args.secret_file, args.host)
        tls = tls_config(args)
        ssl = server_context(tls) if tls.configured else None
    except (SecretError, ValueError, OSError) as exc:
        print(f"jobsched-scheduler: {exc}", file=sys.stderr)
        return 2
    if not is_loopback_host(args.host) and secret is None:
        print(
            f"jobsched-scheduler: refusing to listen on {args.host} without a shared secret: anyone who can "
            "reach the port could run code on every worker. Set JOBSCHED_SECRET or JOBSCHED_SECRET_FILE "
            "(or pass --secret-file PATH with a file of mode 0600).",
            file=sys.stderr,
        )
        return 2
    if not is_loopback_host(args.host) and ssl is None:
        log.warning("listening on %s without TLS: traffic can be read on the network", args.host)
    config = SchedulerConfig(
        heartbeat_timeout=float(args.heartbeat_timeout),
        max_deaths=int(args.allowed_failures),
        no_worker_timeout=float(args.no_worker_timeout),
        paused_timeout=float(args.paused_timeout),
        recovery_grace=float(args.recovery_grace),
        usage_half_life=float(args.usage_half_life),
        prefetch=not args.no_prefetch,
    )

    try:
        server = SchedulerServer(args.host, int(args.port), secret, config, ssl=ssl, users_file=args.users_file)
    except UsersFileError as exc:
        print(f"jobsched-scheduler: {exc}", file=sys.stderr)
        return 2
    if args.users_file:
        log.info("users file %s: %d users; SIGHUP reloads it", args.users_file, len(server.users))

    async def serve(stop: asyncio.Event) -> int:
        tune_gc()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, server.reload_users)  # before listening: SIGHUP would end us
        try:
            address = await server.start()
        except OSError as exc:
            log.error("cannot listen on %s:%s: %s", args.host, args.port, exc.strerror or exc)
            return 1
        status = _start_dashboard(server, args.dashboard_address, args.dashboard_allow_host)
        if args.scheduler_file:
            write_scheduler_file(args.scheduler_file, address, dashboard=status.address if status else "")
        try:
            await stop.wait()
        finally:
            log.info("shutting down")
            loop.remove_signal_handler(signal.SIGHUP)
            if status is not None:
                status.stop()
            await server.stop()
            if args.scheduler_file:
                try:
                    os.unlink(args.scheduler_file)
                except OSError:
                    pass
        return 0

    return run_daemon(serve)


if __name__ == "__main__":
    sys.exit(main())
