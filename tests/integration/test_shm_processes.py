"""payload/shm.py across processes: another process of this user computes the same share
domain, the resource tracker unlinks the segment of a killed creator, and the sweep removes
the segments of creators that exited (in-process behaviour is in unit/test_shm.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from support import daemon_env, shm_path

from jobsched.payload import shm
from jobsched.payload.shm import SHM_DIR, attach, share_domain, sweep_stale_segments

pytestmark = [
    pytest.mark.skipif(not os.path.isdir(SHM_DIR), reason=f"no {SHM_DIR} here"),
    pytest.mark.timeout(60),
]


def test_share_domain_is_the_same_in_another_process_of_this_user(monkeypatch):
    monkeypatch.setattr(shm, "_domain", None)
    monkeypatch.delenv("JOBSCHED_SHARED_MEMORY", raising=False)
    env = daemon_env()  # this jobsched, and no JOBSCHED_SHARED_MEMORY
    out = subprocess.run(
        [sys.executable, "-c", "from jobsched.payload.shm import share_domain; print(share_domain())"],
        capture_output=True, text=True, timeout=30, env=env, check=True,
    )
    assert out.stdout.strip() == share_domain() != ""


# ------------------------------------------------------------------ creator killed


CREATOR = textwrap.dedent(
    """
    import time
    from jobsched.payload.shm import SharedSegment
    segment = SharedSegment([b"x" * 4096, b"y" * 10])
    print(segment.name, flush=True)
    time.sleep(120)
    """
)


@pytest.mark.timeout(60)
def test_resource_tracker_unlinks_the_segment_of_a_killed_creator(tmp_path):
    stderr = open(tmp_path / "stderr", "wb")  # a file: the creator's tracker outlives it and keeps it open
    proc = subprocess.Popen([sys.executable, "-c", CREATOR], stdout=subprocess.PIPE, stderr=stderr, env=daemon_env())
    name = ""
    try:
        name = proc.stdout.readline().decode().strip()
        assert is_segment_name(name), (name, (tmp_path / "stderr").read_text())
        path = shm_path(name)
        assert os.path.exists(path)
        assert len(attach(name, [4096, 10])[0]) == 4096
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
        deadline = time.monotonic() + 10
        while os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(path), "the resource tracker did not unlink the killed creator's segment"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        proc.stdout.close()
        stderr.close()
        if is_segment_name(name):
            try:
                os.unlink(shm_path(name))
            except FileNotFoundError:
                pass


def is_segment_name(name: str) -> bool:
    return bool(shm.NAME_PATTERN.fullmatch(name))


@pytest.mark.timeout(60)
def test_sweep_removes_segments_of_exited_creators_only(tmp_path):
    """A creator killed together with its resource tracker leaves its segment: the sweep
    that runs when a worker starts removes it, and leaves live processes' segments alone."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    stale = Path(SHM_DIR) / f"jobsched-{dead_pid}-{uuid.uuid4().hex}"
    live = Path(SHM_DIR) / f"jobsched-{os.getpid()}-{uuid.uuid4().hex}"
    unrelated = Path(SHM_DIR) / f"jobsched-other-{uuid.uuid4().hex}"
    try:
        for path in (stale, live, unrelated):
            path.write_bytes(b"x")
        assert sweep_stale_segments() >= 1
        assert not stale.exists()
        assert live.exists() and unrelated.exists()
    finally:
        for path in (stale, live, unrelated):
            path.unlink(missing_ok=True)
