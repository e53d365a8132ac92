#!/usr/bin/env python
"""CPU time per task, summed over every process of a backend: robust to a busy machine.

Wall-clock figures on a shared 2-core machine are noisy; the CPU a call costs is
not (much).  For each backend this starts 2 single-thread workers, warms up,
then for each workload reads ``psutil`` CPU times (user + system) of this
process and of all its descendants (loky's workers; jobsched's scheduler and
worker daemons) before and after the call, and prints the difference per task.

    python bench/bench_cpu_per_task.py                           # loky and cluster, 3 rounds
    python bench/bench_cpu_per_task.py --only cluster --rounds 5
    python bench/bench_cpu_per_task.py --profile-wait 20         # time to attach py-spy to each process

Figures: the median over the rounds of CPU ms per task, overall and per process
(``client`` is this process, the others are named by their command line).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # the task module, for us and (through PYTHONPATH) for the workers
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, os.environ.get("PYTHONPATH")) if p)

import _tasks  # noqa: E402
import psutil  # noqa: E402
from joblib import Parallel, delayed, parallel_config  # noqa: E402

N_WORKERS = 2
WORKLOADS = {  # name -> (number of tasks, Parallel keyword arguments)
    "tiny_bs1": (2_000, {"batch_size": 1}),
    "tiny_auto": (20_000, {}),
}


def _role(proc: psutil.Process) -> str:
    """A short name for one process of the backend."""
    if proc.pid == os.getpid():
        return "client"
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return f"pid {proc.pid}"
    for role in ("jobsched.scheduler", "jobsched.worker", "loky"):
        if role in cmd:
            return f"{role.rsplit('.', 1)[-1]} {proc.pid}"
    return f"other {proc.pid}"


def cpu_snapshot() -> dict[str, float]:
    """CPU seconds (user + system) of this process and every live descendant, by role."""
    me = psutil.Process()
    out: dict[str, float] = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        out[_role(proc)] = times.user + times.system
    return out


def measure(n: int, kwargs: dict) -> tuple[float, dict[str, float]]:
    """Run one call; returns (wall seconds, CPU seconds per process)."""
    before = cpu_snapshot()
    t0 = time.perf_counter()
    out = Parallel(**kwargs)(delayed(_tasks.tiny)(i) for i in range(n))
    wall = time.perf_counter() - t0
    after = cpu_snapshot()
    assert out == [i * i for i in range(n)], "wrong results"
    return wall, {role: after[role] - before.get(role, 0.0) for role in after}


def run_backend(name: str, rounds: int, profile_wait: float) -> dict[str, list]:
    client = None
    if name == "cluster":
        import jobsched
        client = jobsched.Client(n_workers=N_WORKERS)
        config = parallel_config(backend="cluster")
    else:
        config = parallel_config(backend="loky", n_jobs=N_WORKERS)
    results: dict[str, list] = {w: [] for w in WORKLOADS}
    try:
        with config:
            for n, kwargs in WORKLOADS.values():  # warm-up: pools started, modules imported
                measure(n // 10, kwargs)
            if profile_wait:
                print(f"{name}: pids {cpu_snapshot()}; attach a profiler now", file=sys.stderr)
                time.sleep(profile_wait)
            for _ in range(rounds):
                for workload, (n, kwargs) in WORKLOADS.items():
                    results[workload].append(measure(n, kwargs))
    finally:
        if client is not None:
            client.close()
        else:
            from joblib.externals.loky import reusable_executor
            if reusable_executor._executor is not None:
                reusable_executor._executor.terminate(kill_workers=False)
    return results


def report(name: str, results: dict[str, list]) -> None:
    for workload, runs in results.items():
        n = WORKLOADS[workload][0]
        wall = statistics.median(r[0] for r in runs)
        total = statistics.median(sum(r[1].values()) for r in runs)
        # processes of one kind summed (both workers); idle helpers (loky's resource tracker) left out
        roles = sorted({role.split()[0] for _, cpu in runs for role, seconds in cpu.items() if seconds > 0})
        parts = ", ".join(f"{role} {statistics.median(_sum_by_round(runs, role)) / n * 1e3:.3f}" for role in roles)
        print(f"{name:8s} {workload:10s} wall {wall / n * 1e3:.3f} ms/task  CPU {total / n * 1e3:.3f} ms/task  ({parts})")


def _sum_by_round(runs: list, role: str) -> list[float]:
    return [sum(s for r, s in cpu.items() if r.split()[0] == role) for _, cpu in runs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="loky,cluster", help="comma-separated backends: loky, cluster")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile-wait", type=float, default=0.0, help="seconds to wait after warm-up (attach py-spy)")
    args = parser.parse_args()
    for name in args.only.split(","):
        report(name, run_backend(name, args.rounds, args.profile_wait))


if __name__ == "__main__":
    main()
