"""Dispatch depth: a call with a fixed ``batch_size`` keeps more batches dispatched than
joblib's ``2 * n_jobs`` (the backend's ``pre_dispatch``), so short batches wait on the
cluster instead of for a round trip; auto-batched calls and an explicit ``pre_dispatch``
keep joblib's depth.  Real daemons: the depth is read from the scheduler's count of
batches it holds (queued or running) while the call runs.  A bad ``pre_dispatch`` is
refused in unit/test_backend_options.py."""

from __future__ import annotations

import threading
import time

import pytest
import tasks
from joblib import Parallel, delayed, parallel_config
from support import RunningCluster, start_cluster

SLOTS = 2  # the cluster fixture: two workers of one thread


def most_batches_held(cluster: RunningCluster, run_call) -> tuple[int, list]:
    """Run ``run_call()`` while sampling the scheduler; (most batches it held at once, output)."""
    most = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal most
        while not done.is_set():
            most = max(most, cluster.client.scheduler_info()["tasks"])
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        out = run_call()
    finally:
        done.set()
        sampler.join(timeout=30)
    return most, out


def sleepers(n: int = 24, seconds: float = 0.2) -> list:
    return [delayed(tasks.sleep_and_return)(seconds, i) for i in range(n)]


@pytest.mark.timeout(60)
def test_a_fixed_batch_size_call_keeps_eight_batches_per_slot_dispatched(cluster: RunningCluster):
    with parallel_config(backend="cluster"):
        most, out = most_batches_held(cluster, lambda: Parallel(n_jobs=-1, batch_size=1)(sleepers()))
    assert out == list(range(24))
    assert most == 8 * SLOTS


@pytest.mark.timeout(60)
def test_the_backend_depth_can_be_set(cluster: RunningCluster):
    with parallel_config(backend="cluster", pre_dispatch="3 * n_jobs"):
        most, out = most_batches_held(cluster, lambda: Parallel(n_jobs=-1, batch_size=1)(sleepers()))
    assert out == list(range(24))
    assert most == 3 * SLOTS


@pytest.mark.timeout(60)
@pytest.mark.parametrize("parallel_kwargs, depth", [
    ({}, 2 * SLOTS),  # auto batching: joblib's depth, so its batch timing is not skewed by queueing
    ({"batch_size": 1, "pre_dispatch": 3}, 3),  # the caller's own choice
    ({"batch_size": 1, "pre_dispatch": "1.5*n_jobs"}, 3),
])
def test_auto_batching_and_an_explicit_pre_dispatch_keep_their_depth(cluster: RunningCluster, parallel_kwargs, depth):
    with parallel_config(backend="cluster"):
        most, out = most_batches_held(cluster, lambda: Parallel(n_jobs=-1, **parallel_kwargs)(sleepers()))
    assert out == list(range(24))
    assert most == depth


@pytest.mark.timeout(60)
def test_an_explicit_n_jobs_still_caps_the_batches_running(daemons):
    """Deeper dispatch queues more on the scheduler, yet n_jobs=2 of 4 slots runs 2 at a time."""
    four_slots = start_cluster(daemons, n_workers=2, nthreads=2)
    try:
        with parallel_config(backend="cluster"):
            out = Parallel(n_jobs=2, batch_size=1)(delayed(tasks.interval)(0.05) for _ in range(16))
    finally:
        four_slots.client.close()
    spans = [(start, end) for _pid, start, end in out]
    most_at_once = max(sum(1 for s, e in spans if s <= start < e) for start, _ in spans)
    assert most_at_once == 2


@pytest.mark.timeout(120)
@pytest.mark.parametrize("return_as", ["list", "generator", "generator_unordered"])
def test_deep_pipelines_lose_duplicate_and_reorder_nothing(cluster: RunningCluster, return_as):
    n = 3000
    with parallel_config(backend="cluster"):
        out = list(Parallel(n_jobs=-1, batch_size=1, return_as=return_as)(delayed(tasks.square)(i) for i in range(n)))
    expected = [i * i for i in range(n)]
    assert (sorted(out) if return_as == "generator_unordered" else out) == expected


@pytest.mark.timeout(60)
@pytest.mark.parametrize("good", ["all", 5, "4 * n_jobs", "n_jobs"])
def test_every_form_joblib_accepts_works(cluster: RunningCluster, good):
    with parallel_config(backend="cluster", pre_dispatch=good):
        assert Parallel(n_jobs=-1, batch_size=1)(delayed(tasks.square)(i) for i in range(50)) == [i * i for i in range(50)]
