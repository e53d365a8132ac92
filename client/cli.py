"""``jobsched``: user commands (``demo``, ``info``)."""

from __future__ import annotations

import argparse
import json
import sys
import time


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


def format_status(info: dict) -> str:
    """A table of the cluster for people: one row per worker, then the totals."""
    rows = [("WORKER", "HOST", "STATUS", "SLOTS", "MEMORY", "DATA", "DONE")]
    for worker in sorted(info["workers"].values(), key=lambda w: w["name"]):
        limit = f" / {_human_bytes(worker['memory_limit'])}" if worker.get("memory_limit") else ""
        rows.append((
            worker["name"], worker["host"], worker.get("status", "running"),
            f"{worker['running']}/{worker['nthreads']}", _human_bytes(worker["memory"]) + limit,
            f"{worker.get('data_keys', 0)} keys, {_human_bytes(worker.get('data_bytes', 0))}", str(worker.get("completed", 0)),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.append("")
    lines.append(
        f"scheduler {info['address']}: {len(info['workers'])} workers, {info.get('running', 0)}/{info.get('slots', 0)} "
        f"slots busy, {info['queued']} batches queued, {info['clients']} clients, {info.get('data_keys', 0)} data keys"
    )
    return "\n".join(lines)


def _status(args: argparse.Namespace) -> int:
    from .client import Client

    address = args.scheduler if args.scheduler or args.scheduler_file else "tcp://127.0.0.1:8686"
    try:
        with Client(address, scheduler_file=args.scheduler_file, timeout=args.timeout, set_as_current=False) as client:
            info = client.scheduler_info()
    except Exception as exc:  # noqa: BLE001 - one clear line for any failure to connect
        print(f"jobsched: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(info, indent=2, sort_keys=True) if args.json else format_status(info))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobsched", description="jobsched: joblib on a cluster of lab machines")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a randomized SVC search on digits, serial vs cluster")
    demo.add_argument("--scheduler", default=None, help="scheduler address (default: an embedded local cluster)")
    demo.add_argument("--workers", type=int, default=None, help="local workers (default: one per core)")
    demo.add_argument("--n-iter", type=int, default=20, help="parameter candidates (default 20)")
    demo.set_defaults(run=_demo)
    for name in ("status", "info"):
        status = sub.add_parser(name, help="show the cluster: workers, slots busy, memory, data held, queue")
        status.add_argument("scheduler", nargs="?", default=None, help="scheduler address (default tcp://127.0.0.1:8686)")
        status.add_argument("--scheduler-file", default=None)
        status.add_argument("--json", action="store_true", help="print the scheduler's full view as JSON")
        status.add_argument("--timeout", type=float, default=10.0)
        status.set_defaults(run=_status)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
