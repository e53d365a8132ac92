"""Start-up benchmark: embedded local cluster ready to run, and a worker's first batch.

- ``Client()`` with an embedded LocalCluster of 2 workers, until a first task has run;
- a worker joining a running scheduler, from process start to its first batch's result.

Run: ``python bench/bench_startup.py [--repeat 5]``; prints medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from joblib import Parallel, delayed, parallel_config

import jobsched


def local_cluster_ready() -> float:
    start = time.perf_counter()
    with jobsched.Client(n_workers=2) as client:
        with parallel_config(backend="cluster", scheduler=client):
            Parallel()(delayed(abs)(-1) for _ in range(2))
        return time.perf_counter() - start


def worker_first_batch() -> float:
    with jobsched.LocalCluster(n_workers=0) as cluster, jobsched.Client(cluster) as client:
        env = dict(os.environ, JOBSCHED_SECRET=cluster.secret)
        start = time.perf_counter()
        worker = subprocess.Popen(
            [sys.executable, "-m", "jobsched.worker", cluster.address, "--no-nanny", "--log-level", "WARNING"],
            env=env, start_new_session=True,
        )
        try:
            with parallel_config(backend="cluster", scheduler=client):
                Parallel(n_jobs=1 + 1)(delayed(abs)(-1) for _ in range(1))
            return time.perf_counter() - start
        finally:
            worker.terminate()
            worker.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    ready = statistics.median(local_cluster_ready() for _ in range(args.repeat))
    joined = statistics.median(worker_first_batch() for _ in range(args.repeat))
    print(f"embedded local cluster (2 workers) ready and first call done: {ready:.2f} s (target < 2 s)")
    print(f"worker process start to first batch result:                  {joined:.2f} s (target < 0.5 s)")


if __name__ == "__main__":
    main()
