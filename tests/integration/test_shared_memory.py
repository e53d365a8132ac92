"""Scattered data held once per machine in shared memory, with real daemons.

Worker processes of one machine (``--nworkers``) map one read-only copy in
``/dev/shm`` instead of each holding its own.  When the client is on another
machine (simulated here: its shared memory is switched off), the first worker to
receive the bytes writes the segment and its siblings map it.  Whatever goes
wrong with a segment, the data still arrives, as bytes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
from joblib import Parallel, delayed, parallel_config
from support import (
    MB,
    daemon_env,
    dashboard_of,
    expected_sums,
    lo_bytes,
    shm_segments,
    start_cluster,
    wait_for_workers,
    wait_until,
)
from tasks import slice_sum

import jobsched
from jobsched.client import client as client_module
from jobsched.payload import shm

pytestmark = pytest.mark.skipif(not shm.share_domain(), reason="no usable /dev/shm here")

N_TASKS = 32


def slow_sum(X, i: int, n: int) -> float:
    time.sleep(0.05)
    return slice_sum(X, i, n)


@pytest.fixture
def remote_client(monkeypatch):
    """This process acts as a client on another machine: it shares no memory with the workers."""
    monkeypatch.setattr(shm, "_domain", "")


def start_supervised(daemons, nworkers: int = 2):
    """A scheduler and one worker daemon running ``nworkers`` processes; a Client."""
    sched = daemons.scheduler("--dashboard-address", "127.0.0.1:0")
    supervisor = daemons.worker(sched.address, "--nworkers", str(nworkers), name="box")
    client = jobsched.Client(sched.address, timeout=10)
    wait_for_workers(client, [f"box-{i}" for i in range(nworkers)])
    return client, supervisor, dashboard_of(sched)


def worker_processes(client: jobsched.Client) -> dict[str, psutil.Process]:
    return {w["name"]: psutil.Process(w["pid"]) for w in client.scheduler_info()["workers"].values()}


def mapped_segments(process: psutil.Process) -> set[str]:
    return {os.path.basename(m.path) for m in process.memory_maps(grouped=True) if "/dev/shm/jobsched-" in m.path}


def segment_creators(client: jobsched.Client) -> list[psutil.Process]:
    """Worker processes that created a segment: they have a resource tracker child."""
    return [p for p in worker_processes(client).values()
            if any("resource_tracker" in " ".join(c.cmdline()) for c in p.children())]


@pytest.mark.timeout(300)
def test_sibling_processes_map_the_copy_the_first_one_received(daemons, big, remote_client):
    client, _, status = start_supervised(daemons)
    try:
        procs = worker_processes(client)
        private_before = {name: p.memory_info().rss - p.memory_info().shared for name, p in procs.items()}
        sched_before, lo_before = status.bytes_moved(), lo_bytes()
        with parallel_config(backend="cluster", scheduler=client):
            results = Parallel(n_jobs=-1, batch_size=1)(
                delayed(slice_sum)(big, i, N_TASKS) for i in range(N_TASKS))
            mapped = {name: mapped_segments(p) for name, p in procs.items()}
            private_after = {name: p.memory_info().rss - p.memory_info().shared for name, p in procs.items()}
            segments = shm_segments()
        sched_moved, lo_moved = status.bytes_moved() - sched_before, lo_bytes() - lo_before
        print(f"scheduler {sched_moved / MB:.0f} MB, loopback {lo_moved / MB:.0f} MB, mapped {mapped}, "
              f"private growth {[(private_after[n] - private_before[n]) / MB for n in procs]} MB")

        assert results == expected_sums(big, N_TASKS)
        # the bytes came once from the client, through the scheduler to one process; not peer to peer
        assert 2 * big.nbytes <= sched_moved <= 2 * big.nbytes + 20 * MB
        assert lo_moved <= 2 * big.nbytes + 40 * MB, f"{lo_moved / MB:.0f} MB crossed loopback"
        # both processes map the same segment, and neither holds a private copy
        (name,) = set.union(*mapped.values())
        assert all(names == {name} for names in mapped.values()), mapped
        assert segments.get(name, 0) >= big.nbytes
        for worker in procs:
            assert private_after[worker] - private_before[worker] < 100 * MB, (worker, private_after, private_before)
        wait_until(lambda: name not in shm_segments(), 30, "the segment outlived the context")
    finally:
        client.close()


@pytest.mark.timeout(300)
def test_a_segment_that_cannot_be_mapped_falls_back_to_bytes(daemons, big, monkeypatch):
    """The client's segment vanishes before the workers map it: they get the bytes instead."""

    class VanishingSegment(shm.SharedSegment):
        def __init__(self, frames):
            super().__init__(frames)
            self.unlink()

    monkeypatch.setattr(client_module, "SharedSegment", VanishingSegment)
    cluster = start_cluster(daemons, scheduler_args=("--dashboard-address", "127.0.0.1:0"))
    try:
        status = dashboard_of(cluster.scheduler)
        before = status.bytes_moved()
        with parallel_config(backend="cluster", scheduler=cluster.client):
            results = Parallel(n_jobs=-1, batch_size=1)(delayed(slice_sum)(big, i, 16) for i in range(16))
        assert results == expected_sums(big, 16)
        assert status.bytes_moved() - before >= 2 * big.nbytes, "the bytes should have gone through the scheduler"
        assert "asking for a copy" in "".join(w.log() for w in cluster.workers)
    finally:
        cluster.client.close()


@pytest.mark.timeout(300)
def test_killing_the_process_that_created_the_segment_mid_call(daemons, big, remote_client):
    client, supervisor, _ = start_supervised(daemons)
    try:
        expected = expected_sums(big, 48)
        with parallel_config(backend="cluster", scheduler=client):
            outcome = Parallel(n_jobs=-1, batch_size=1, return_as="generator")(
                delayed(slow_sum)(big, i, 48) for i in range(48))
            results = [next(outcome) for _ in range(4)]
            (creator,) = segment_creators(client)
            creator.send_signal(signal.SIGKILL)
            results += list(outcome)
        assert results == expected
        # its resource tracker unlinked its segment; the survivors unlinked theirs at the context's end
        wait_until(lambda: not shm_segments_of(supervisor), 30, lambda: f"segments left: {shm_segments()}")
    finally:
        client.close()


def ended(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def shm_segments_of(supervisor) -> set[str]:
    """Segments mapped by any process of the supervisor's tree."""
    found: set[str] = set()
    for pid in supervisor.process_tree():
        try:
            found |= mapped_segments(psutil.Process(pid))
        except psutil.Error:
            pass
    return found & set(shm_segments())


CLIENT_SCRIPT = textwrap.dedent("""
    import sys, time
    import numpy as np
    import jobsched
    client = jobsched.Client(sys.argv[1], timeout=10)
    ref = client.scatter(np.ones(4_000_000), broadcast=True)
    while not client._segments or not all(w.done() for w in client._segments.values()):
        time.sleep(0.05)
    print(*(w.result().name for w in client._segments.values()), flush=True)
    time.sleep(600)
""")


@pytest.mark.timeout(120)
def test_a_killed_client_leaves_no_segment_behind(daemons, tmp_path):
    sched = daemons.scheduler()
    worker = daemons.worker(sched.address, name="w0")
    probe = jobsched.Client(sched.address, timeout=10)
    try:
        wait_for_workers(probe, ["w0"])
    finally:
        probe.close()
    script = tmp_path / "scatter_and_wait.py"
    script.write_text(CLIENT_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), sched.address], stdout=subprocess.PIPE, text=True,
                            env={**daemon_env(), "JOBSCHED_SHARED_MEMORY": "1"}, start_new_session=True)
    try:
        names = proc.stdout.readline().split()
        assert names and all(name in shm_segments() for name in names), (names, worker.log())
        proc.kill()  # the client alone, as a crash would: its resource tracker lives on and cleans up
        proc.wait(10)
        wait_until(lambda: not set(names) & set(shm_segments()), 20, "the dead client's segment is still there")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the tracker, had it not ended
        proc.wait(10)
        proc.stdout.close()


@pytest.mark.timeout(120)
def test_segments_of_workers_killed_with_their_tracker_are_swept_when_the_cluster_closes(big, remote_client):
    """SIGKILL to a worker's whole process group takes its resource tracker along, so nothing
    unlinks its segment then; closing the embedded cluster sweeps it."""
    cluster = jobsched.LocalCluster(n_workers=2)
    try:
        with jobsched.Client(cluster) as client, parallel_config(backend="cluster", scheduler=client):
            results = Parallel(n_jobs=-1, batch_size=1)(delayed(slice_sum)(big, i, 8) for i in range(8))
            assert results == expected_sums(big, 8)
            pids = {w["pid"] for w in client.scheduler_info()["workers"].values()}
            written = {name for name in shm_segments() if int(name.split("-")[1]) in pids}
            assert written, "a worker should have shared what it received with its sibling"
            for proc in cluster.processes:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            for proc in cluster.processes:
                proc.wait(10)
            wait_until(lambda: all(map(ended, pids)), 20, "the killed workers did not end")
        assert written & set(shm_segments()), "the segment should have outlived its killed creator"
    finally:
        cluster.close()
    assert not written & set(shm_segments()), "closing the cluster did not sweep the dead workers' segments"
