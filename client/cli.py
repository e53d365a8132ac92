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


def _info(args: argparse.Namespace) -> int:
    from .client import Client

    address = args.scheduler if args.scheduler or args.scheduler_file else "tcp://127.0.0.1:8686"
    with Client(address, scheduler_file=args.scheduler_file) as client:
        print(json.dumps(client.scheduler_info(), indent=2, sort_keys=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobsched", description="jobsched: joblib on a cluster of lab machines")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a randomized SVC search on digits, serial vs cluster")
    demo.add_argument("--scheduler", default=None, help="scheduler address (default: an embedded local cluster)")
    demo.add_argument("--workers", type=int, default=None, help="local workers (default: one per core)")
    demo.add_argument("--n-iter", type=int, default=20, help="parameter candidates (default 20)")
    demo.set_defaults(run=_demo)
    info = sub.add_parser("info", help="print the scheduler's view of the cluster as JSON")
    info.add_argument("scheduler", nargs="?", default=None, help="scheduler address (default tcp://127.0.0.1:8686)")
    info.add_argument("--scheduler-file", default=None)
    info.set_defaults(run=_info)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
