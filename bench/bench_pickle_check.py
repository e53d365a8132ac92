"""What ``payload.pickle_check.check_pickle`` costs next to the ``pickle.loads`` it guards.

``python bench/bench_pickle_check.py [--repeat N]`` prints, per payload, the pickle stream's
size, the median times of the check and of unpickling (the stream plus its out-of-band
buffers, as a worker does), and their ratio.
"""

from __future__ import annotations

import argparse
import functools
import pickle
import statistics
import time
from collections.abc import Callable

import numpy as np
from joblib import delayed
from joblib.parallel import BatchedCalls
from sklearn.ensemble import RandomForestClassifier

from jobsched.client.scatter import ByReference, dumps_batch
from jobsched.payload.context import CallContext
from jobsched.payload.pickle_check import check_pickle
from jobsched.payload.serialize import dumps


def payloads() -> dict[str, list]:
    rng = np.random.default_rng(0)
    X = rng.random((500, 8))
    y = (X[:, 0] > 0.5).astype(int)
    context = pickle.dumps(CallContext(), protocol=5)
    batch = BatchedCalls([delayed(functools.partial(pow, 2))(i) for i in range(10)], ("threading", 1), None, None)
    batch_frames, _ = dumps_batch((batch, context), {}, 0, lambda obj, n: "key", ByReference())
    array = rng.random(10 * 2**20 // 8)
    return {
        "small joblib batch": batch_frames,
        "list of 10^5 floats": dumps([float(i) for i in range(10**5)]),
        "dict of 10^5 str: int": dumps({str(i): i for i in range(10**5)}),
        "random forest (50 trees)": dumps(RandomForestClassifier(n_estimators=50, random_state=0).fit(X, y)),
        "10 MB array, in band": dumps(array, out_of_band_min=2**40),
        "10 MB array, out of band": dumps(array),
    }


def median_us(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    print(f"{'payload':28} {'stream':>10} {'check µs':>10} {'loads µs':>10} {'ratio':>7}")
    for name, frames in payloads().items():
        stream, buffers = frames[0], frames[1:]
        check = median_us(lambda: check_pickle(stream), args.repeat)  # noqa: B023 - called before the next iteration
        loads = median_us(lambda: pickle.loads(stream, buffers=buffers), args.repeat)  # noqa: B023
        print(f"{name:28} {len(stream):10d} {check:10.1f} {loads:10.1f} {check / loads:7.3f}")


if __name__ == "__main__":
    main()
