#!/usr/bin/env python
"""Every benchmark of issue 7, one after the other, with one command:

1. ``bench_backends.py --all``: loky, dask and cluster side by side, with ratios and targets;
2. ``bench_scale.py``: the scheduler at 10 to 1,000 workers and 10^5 to 10^6 queued
   batches (the scale curve);
3. ``bench_startup.py``: the embedded cluster's start-up, and a worker joining;
4. ``bench_cpu_per_task.py``: CPU per task summed over every process, loky and cluster.

    python bench/run_all.py            # about 15 minutes on 2 cores
    python bench/run_all.py --quick    # smoke run: small sizes, one round

Each runs in its own process, so none inherits another's memory or threads; the
exit status is the first non-zero one.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def steps(quick: bool) -> list[list[str]]:
    return [
        ["bench_backends.py", "--all", *(["--quick", "--quiet-wait", "5"] if quick else [])],
        ["bench_scale.py", *(["--quick"] if quick else [])],
        ["bench_startup.py", "--repeat", "1" if quick else "5"],
        ["bench_cpu_per_task.py", "--rounds", "1" if quick else "3"],
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes and one round everywhere")
    args = parser.parse_args()
    status = 0
    for script, *options in steps(args.quick):
        command = [sys.executable, str(HERE / script), *options]
        print(f"\n===== {' '.join([script, *options])}", flush=True)
        started = time.perf_counter()
        code = subprocess.run(command, check=False).returncode
        print(f"===== {script}: exit {code} after {time.perf_counter() - started:.0f} s", flush=True)
        status = status or code
    return status


if __name__ == "__main__":
    sys.exit(main())
