"""``jobsched``: user commands (``demo``, ``status``/``info``, ``cancel``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .client import Client


def _demo(args: argparse.Namespace) -> int:
    try:
        import numpy as np
        from scipy.stats import loguniform
        from sklearn.datasets import load_digits
        from sklearn.model_selection import RandomizedSearchCV
        from sklearn.svm import SVC
    except ImportError as exc:
        print(f"jobsched demo needs scikit-learn: pip install scikit-learn ({exc})", file=sys.stderr)
        return 2
    from joblib import parallel_config

    from .client import Client

    X, y = load_digits(return_X_y=True)
    params = {"C": loguniform(1e-2, 1e3), "gamma": loguniform(1e-4, 1e-1)}

    def search() -> RandomizedSearchCV:
        return RandomizedSearchCV(SVC(), params, n_iter=args.n_iter, cv=5, random_state=0, n_jobs=-1)

    start = time.perf_counter()
    serial = RandomizedSearchCV(SVC(), params, n_iter=args.n_iter, cv=5, random_state=0).fit(X, y)
    serial_time = time.perf_counter() - start

    with Client(args.scheduler, n_workers=args.workers) as client:
        workers = client.scheduler_info()["workers"]
        slots = sum(w["nthreads"] for w in workers.values())
        start = time.perf_counter()
        with parallel_config(backend="cluster"):
            cluster = search().fit(X, y)
        cluster_time = time.perf_counter() - start
    same = all(
        np.array_equal(np.asarray(serial.cv_results_[k]), np.asarray(cluster.cv_results_[k]))
        for k in serial.cv_results_ if not k.endswith("_time")
    )
    where = args.scheduler or "an embedded local cluster"
    print(f"RandomizedSearchCV(SVC) on digits: {args.n_iter} candidates x 5 folds on {where} "
          f"({len(workers)} workers, {slots} slots)")
    print(f"best parameters: {cluster.best_params_}  best score: {cluster.best_score_:.4f}")
    print(f"serial: {serial_time:.2f} s   cluster: {cluster_time:.2f} s   speed-up: {serial_time / cluster_time:.2f}x")
    print(f"cv_results_ identical to the serial run: {same}")
    return 0 if same else 1


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    """Left-aligned columns, two spaces apart; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]


def _slot_time(seconds: float) -> str:
    """Slot-seconds for people: ``45 slot-s``, ``12.5 slot-min``, ``3.2 slot-h``."""
    if seconds < 60:
        return f"{seconds:.0f} slot-s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} slot-min"
    return f"{seconds / 3600:.1f} slot-h"


def _users_table(users: dict) -> list[str]:
    # "(others)" (everyone else, summed, in a non-admin's view) comes last
    rows = [("USER", "RUNNING", "QUEUED", "CALLS", "SHARE", "USAGE 1H")]
    for name in sorted(users, key=lambda n: (n == "(others)", n)):
        user = users[name]
        rows.append((
            name, str(user.get("running", 0)), str(user.get("queued", 0)), str(user.get("calls", 0)),
            f"{100 * user.get('share', 0.0):.1f}%", _slot_time(user.get("usage_hour", 0.0)),
        ))
    return _table(rows)


def _calls_table(calls: list) -> list[str]:
    rows = [("CALL", "USER", "CLIENT", "RUNNING", "QUEUED", "PRIORITY")]
    rows.extend(
        (str(c["id"]), c.get("user", ""), c.get("client", ""), str(c.get("running", 0)), str(c.get("queued", 0)),
         str(c.get("priority", 0)))
        for c in calls
    )
    return _table(rows)


def format_status(info: dict) -> str:
    """A table of the cluster for people: one row per worker; then one per user and one per
    call this viewer may see (left out when empty, or from a scheduler that does not send
    them); then the totals."""
    rows = [("WORKER", "HOST", "STATUS", "SLOTS", "MEMORY", "DATA", "DONE")]
    for worker in sorted(info["workers"].values(), key=lambda w: w["name"]):
        limit = f" / {_human_bytes(worker['memory_limit'])}" if worker.get("memory_limit") else ""
        rows.append((
            worker["name"], worker["host"], worker.get("status", "running"),
            f"{worker['running']}/{worker['nthreads']}", _human_bytes(worker["memory"]) + limit,
            f"{worker.get('data_keys', 0)} keys, {_human_bytes(worker.get('data_bytes', 0))}", str(worker.get("completed", 0)),
        ))
    lines = _table(rows)
    if info.get("users"):
        lines += ["", *_users_table(info["users"])]
    if info.get("calls"):
        lines += ["", *_calls_table(info["calls"])]
    lines.append("")
    viewer = info.get("viewer")
    seen_as = f" (seen as {viewer['user']}{', admin' if viewer.get('admin') else ''})" if viewer else ""
    lines.append(
        f"scheduler {info['address']}: {len(info['workers'])} workers, {info.get('running', 0)}/{info.get('slots', 0)} "
        f"slots busy, {info['queued']} batches queued, {info['clients']} clients, {info.get('data_keys', 0)} data keys"
        + seen_as
    )
    return "\n".join(lines)


def _address(args: argparse.Namespace) -> str | None:
    address = getattr(args, "address", None) or args.scheduler
    return address if address or args.scheduler_file else "tcp://127.0.0.1:8686"


def _client(args: argparse.Namespace) -> Client:
    """A Client for a command: credentials as every Client finds them (the environment, the
    default secret file), unless given here; no embedded cluster, never the current Client."""
    from .client import Client

    return Client(
        _address(args), scheduler_file=args.scheduler_file, timeout=args.timeout, set_as_current=False,
        secret_file=args.secret_file, tls_ca_file=args.tls_ca_file, tls_cert=args.tls_cert, tls_key=args.tls_key,
    )


def _status(args: argparse.Namespace) -> int:
    try:
        with _client(args) as client:
            info = client.scheduler_info()
    except Exception as exc:  # noqa: BLE001 - one clear line for any failure to connect
        print(f"jobsched: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(info, indent=2, sort_keys=True) if args.json else format_status(info))
    return 0


def _cancel(args: argparse.Namespace) -> int:
    if (args.call is None) == (args.user is None):
        args.parser.error("name either one CALL (its id in `jobsched status`) or --user NAME")
    try:
        with _client(args) as client:
            cancelled = client.cancel(call=args.call, user=args.user)
    except Exception as exc:  # noqa: BLE001 - one clear line: refused (CancelRefusedError), or no connection
        print(f"jobsched: {exc}", file=sys.stderr)
        return 1
    print(f"cancelled {cancelled} call{'' if cancelled == 1 else 's'}")
    return 0


def _connection_options() -> argparse.ArgumentParser:
    """The options every command that talks to a running scheduler takes."""
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("connection")
    group.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="scheduler address (default tcp://127.0.0.1:8686)")
    group.add_argument("--scheduler-file", default=None, metavar="PATH")
    group.add_argument("--secret-file", default=None, metavar="PATH",
                       help="the cluster secret (default: $JOBSCHED_SECRET, $JOBSCHED_SECRET_FILE, then the default file)")
    group.add_argument("--tls-ca-file", default=None, metavar="PATH")
    group.add_argument("--tls-cert", default=None, metavar="PATH")
    group.add_argument("--tls-key", default=None, metavar="PATH")
    group.add_argument("--timeout", type=float, default=10.0, metavar="S", help="seconds to connect and to wait for an answer")
    return options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobsched", description="jobsched: joblib on a cluster of lab machines")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a randomized SVC search on digits, serial vs cluster")
    demo.add_argument("--scheduler", default=None, help="scheduler address (default: an embedded local cluster)")
    demo.add_argument("--workers", type=int, default=None, help="local workers (default: one per core)")
    demo.add_argument("--n-iter", type=int, default=20, help="parameter candidates (default 20)")
    demo.set_defaults(run=_demo)
    connection = _connection_options()
    for name in ("status", "info"):
        status = sub.add_parser(name, parents=[connection],
                                help="show the cluster: workers, slots busy, memory, data held, users, calls, queue")
        status.add_argument("address", nargs="?", default=None, metavar="ADDRESS",
                            help="scheduler address (default tcp://127.0.0.1:8686)")
        status.add_argument("--json", action="store_true", help="print the scheduler's full view as JSON")
        status.set_defaults(run=_status)
    cancel = sub.add_parser(
        "cancel", parents=[connection], help="cancel a call, or every call of a user (another user's: admin only)",
        description="Cancel one call (its id in `jobsched status`) or every call of a user. Their callers' "
                    "Parallel raises CallCancelledError. Cancelling another user's work needs the admin "
                    "credential (the cluster secret).",
    )
    cancel.add_argument("call", nargs="?", default=None, metavar="CALL", help="a call id, as `jobsched status` lists it")
    cancel.add_argument("--user", default=None, metavar="NAME", help="cancel every call of this user")
    cancel.set_defaults(run=_cancel, parser=cancel)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
