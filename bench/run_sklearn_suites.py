"""Run scikit-learn's own model_selection test modules with every joblib call on
jobsched's ``'cluster'`` backend (n_jobs=-1), and the same on ``'loky'`` (and
``'sequential'``, the reference: what ``n_jobs=1`` shows); compare.

    python bench/run_sklearn_suites.py [--timeout 300] [--backends cluster loky sequential] [-k EXPR]

Each backend runs in its own ``pytest`` subprocess (its own process group,
ended by group id if the whole run overruns), with ``-p sklearn_cluster_plugin``
from ``tests/``, ``-q``, no ``-x`` and a per-test timeout (pytest-timeout).
Outcomes come from the JUnit XML report.  The script prints pass/fail counts per
backend, then every test that fails on ``'cluster'`` but passes on another
backend (and the reverse), with the first line of its error.  Logs and reports go to ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS_DIR = ROOT / "tests"
MODULES = ("test_search.py", "test_validation.py")


def sklearn_dir() -> Path:
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        sys.exit("scikit-learn is not installed in this environment")
    return Path(spec.origin).parent


def run_suite(backend: str, out: Path, timeout: int, total_timeout: float, keyword: str | None) -> Path:
    """Run the modules on ``backend``; returns the JUnit XML path."""
    sk = sklearn_dir()
    files = [str(sk / "model_selection" / "tests" / name) for name in MODULES]
    report = out / f"{backend}.xml"
    log = out / f"{backend}.log"
    argv = [
        sys.executable, "-m", "pytest", *files,
        "-p", "sklearn_cluster_plugin", "--joblib-backend", backend,
        "-q", f"--timeout={timeout}", "-p", "no:cacheprovider",
        # scikit-learn's conftest.py (global_random_seed, ...) sits in the package: keep it in reach,
        # and keep any pytest configuration of the current directory out
        "-c", os.devnull, "--rootdir", str(sk), "--confcutdir", str(sk),
        f"--junitxml={report}", "-o", "junit_family=xunit2",
    ]
    if keyword:
        argv += ["-k", keyword]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("JOBSCHED_SUITE_BACKEND", None)
    workdir = Path(tempfile.mkdtemp(prefix=f"sklearn-{backend}-", dir=out))
    start = time.monotonic()
    print(f"[{backend}] running {len(files)} modules, log in {log}", flush=True)
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(total_timeout)
        except subprocess.TimeoutExpired:
            print(f"[{backend}] overran {total_timeout:.0f} s: ending its process group", flush=True)
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        finally:
            # anything the run left behind in its group (an embedded cluster's daemons have their own)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    print(f"[{backend}] exit status {proc.returncode} after {time.monotonic() - start:.0f} s", flush=True)
    return report


def outcomes(report: Path) -> dict[str, tuple[str, str]]:
    """test id -> (outcome, first line of its message)."""
    if not report.exists():
        return {}
    results: dict[str, tuple[str, str]] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "error"
                message = (child.get("message") or child.text or "").strip().splitlines()[0:1]
                message = message[0] if message else ""
                break
            if child.tag == "skipped":
                outcome = "xfailed" if (child.get("type") or "").endswith("xfail") else "skipped"
        results[test_id] = (outcome, message)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", default=["cluster", "loky", "sequential"],
                        help="backends to run (default: cluster loky sequential); failures are compared to 'cluster'")
    parser.add_argument("--timeout", type=int, default=300, help="per test, seconds (default 300)")
    parser.add_argument("--total-timeout", type=float, default=3 * 3600, help="per backend run, seconds")
    parser.add_argument("-k", dest="keyword", default=None, help="pytest -k expression")
    parser.add_argument("--out", type=Path, default=None, help="directory for logs and reports")
    parser.add_argument("--report-only", action="store_true", help="compare the reports already in --out")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="sklearn-suites-"))
    out.mkdir(parents=True, exist_ok=True)

    results: dict[str, dict[str, tuple[str, str]]] = {}
    for backend in args.backends:
        report = out / f"{backend}.xml" if args.report_only else run_suite(
            backend, out, args.timeout, args.total_timeout, args.keyword)
        results[backend] = outcomes(report)

    print()
    for backend, found in results.items():
        counts = Counter(outcome for outcome, _ in found.values())
        print(f"{backend:>8}: {len(found)} tests: " + ", ".join(f"{counts[k]} {k}" for k in
              ("passed", "failed", "error", "skipped", "xfailed") if counts[k]))
    cluster = results.get("cluster")
    for other, found in results.items():
        if cluster is None or other == "cluster":
            continue
        only = sorted(t for t, (o, _) in cluster.items() if o in ("failed", "error") and found.get(t, ("",))[0] == "passed")
        print(f"\nfailing on 'cluster', passing on {other!r}: {len(only)}")
        for test_id in only:
            print(f"  {test_id}\n      {cluster[test_id][1][:300]}")
        reverse = sorted(t for t, (o, _) in found.items() if o in ("failed", "error") and cluster.get(t, ("",))[0] == "passed")
        print(f"\nfailing on {other!r}, passing on 'cluster': {len(reverse)}")
        for test_id in reverse:
            print(f"  {test_id}\n      {found[test_id][1][:300]}")
    print(f"\nlogs and JUnit reports: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
