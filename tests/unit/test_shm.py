"""payload/shm.py on its own, in this process: segment layout, creation, mapping, refusal of
bad references, cleanup by unlink (other processes, and the resource tracker when the creator
is killed, are in integration/test_shm_processes.py)."""

from __future__ import annotations

import errno
import os
import stat
import threading
import uuid

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import shm_path

from jobsched.payload import shm
from jobsched.payload.serialize import dumps, loads_readonly
from jobsched.payload.shm import (
    ALIGNMENT,
    MAX_FRAMES,
    SHARE_MIN,
    SHM_DIR,
    SharedSegment,
    attach,
    layout,
    share_domain,
    valid_reference,
    worth_sharing,
)

pytestmark = [
    pytest.mark.skipif(not os.path.isdir(SHM_DIR), reason=f"no {SHM_DIR} here"),
    pytest.mark.timeout(60),
]


def fresh_name() -> str:
    return f"jobsched-{os.getpid()}-{uuid.uuid4().hex}"


@pytest.fixture
def segments():
    """Make SharedSegments through ``segments(frames)``; every one is unlinked afterwards."""
    made: list[SharedSegment] = []

    def make(frames) -> SharedSegment:
        segment = SharedSegment(frames)
        made.append(segment)
        return segment

    try:
        yield make
    finally:
        for segment in made:
            segment.unlink()


@pytest.fixture
def stray_paths():
    """Paths under /dev/shm a test plants by hand (symlinks, directories, FIFOs, files)."""
    paths: list[str] = []
    try:
        yield paths
    finally:
        for path in paths:
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    os.rmdir(path)
                else:
                    os.unlink(path)
            except FileNotFoundError:
                pass


# ------------------------------------------------------------------ layout


def test_layout_examples():
    assert layout([]) == ([], 1)  # never a zero-byte mapping
    assert layout([0]) == ([0], 1)
    assert layout([1]) == ([0], 64)
    assert layout([64]) == ([0], 64)
    assert layout([65, 1, 0, 128]) == ([0, 128, 192, 192], 320)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=2**40), max_size=50))
def test_layout_offsets_are_aligned_and_frames_fit_without_overlap(sizes):
    offsets, total = layout(sizes)
    assert len(offsets) == len(sizes)
    rounded = [-(-s // ALIGNMENT) * ALIGNMENT for s in sizes]
    assert total == max(sum(rounded), 1)
    if sum(rounded):
        assert total % ALIGNMENT == 0
    position = 0
    for offset, size in zip(offsets, sizes, strict=True):
        assert offset % ALIGNMENT == 0
        assert offset == position  # packed: no gap beyond the alignment padding
        assert offset + size <= total
        position = offset + -(-size // ALIGNMENT) * ALIGNMENT
        assert position - (offset + size) < ALIGNMENT  # padding under one cache line
    assert position <= total


# ------------------------------------------------------------------ segments


def test_segment_round_trips_numpy_frames_read_only(segments):
    obj = {
        "ints": np.arange(10_000, dtype=np.int64),
        "matrix": np.linspace(0, 1, 3 * 7, dtype=np.float32).reshape(3, 7),
        "odd": np.arange(13, dtype=np.uint8),  # a frame that needs padding
        "empty": np.zeros(0),
        "text": "not an array",
    }
    frames = dumps(obj, out_of_band_min=0)
    assert len(frames) > 1, "the arrays should travel out of band"
    segment = segments(frames)
    assert segment.name.startswith("jobsched-") and valid_reference(segment.name, segment.sizes)
    assert segment.sizes == [memoryview(f).nbytes for f in frames]

    mapped = attach(segment.name, segment.sizes)
    assert [bytes(f) for f in mapped] == [bytes(memoryview(f).cast("B")) for f in frames]
    assert all(f.readonly for f in mapped)
    with pytest.raises(TypeError):
        mapped[1][0] = 1

    back = loads_readonly(mapped)
    assert back.keys() == obj.keys() and back["text"] == "not an array"
    for key in ("ints", "matrix", "odd", "empty"):
        assert back[key].dtype == obj[key].dtype and back[key].shape == obj[key].shape
        np.testing.assert_array_equal(back[key], obj[key])
        assert not back[key].flags.writeable
    with pytest.raises(ValueError):
        back["ints"][0] = 99
    # zero copy: the big array is a view into the mapping
    assert any(np.shares_memory(back["ints"], np.frombuffer(f, dtype=np.uint8)) for f in mapped[1:] if f.nbytes)


def test_segment_file_is_private_to_us_and_laid_out(segments):
    old_umask = os.umask(0)  # even a permissive umask must not widen the mode
    try:
        segment = segments([b"a" * 100, b"b" * 3])
    finally:
        os.umask(old_umask)
    info = os.lstat(shm_path(segment.name))
    assert stat.S_ISREG(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == os.getuid()
    offsets, total = layout(segment.sizes)
    assert info.st_size == total == 192
    with open(shm_path(segment.name), "rb") as f:
        content = f.read()
    assert content[offsets[0]:offsets[0] + 100] == b"a" * 100
    assert content[100:128] == bytes(28)
    assert content[offsets[1]:offsets[1] + 3] == b"bbb"


def test_each_segment_gets_a_new_name(segments):
    names = {segments([b"x"]).name for _ in range(5)}
    assert len(names) == 5


def test_unlink_removes_the_file_twice_is_harmless_and_mappings_survive():
    segment = SharedSegment([b"hello" * 100, bytes(range(256))])
    try:
        path = shm_path(segment.name)
        assert os.path.exists(path)
        mapped = attach(segment.name, segment.sizes)
        segment.unlink()
        assert not os.path.exists(path)
        segment.unlink()  # harmless
        assert not os.path.exists(path)
        # a mapping made before the unlink keeps the data
        assert bytes(mapped[0]) == b"hello" * 100
        assert bytes(mapped[1]) == bytes(range(256))
        # but nobody can attach any more
        with pytest.raises(FileNotFoundError):
            attach(segment.name, segment.sizes)
    finally:
        segment.unlink()


def test_unlink_of_a_segment_someone_else_removed_is_harmless():
    segment = SharedSegment([b"x"])
    os.unlink(shm_path(segment.name))
    segment.unlink()
    segment.unlink()


# ------------------------------------------------------------------ attach refuses


@pytest.mark.parametrize(
    "name",
    [
        "",
        "../x",
        "jobsched-../../etc/passwd",
        "../jobsched-" + "a" * 32,
        "/dev/shm/jobsched-" + "a" * 32,
        "jobsched-" + "A" * 32,  # uppercase hex
        "jobsched-" + "a" * 31 + "A",
        "jobsched-" + "a" * 31,  # too short
        "jobsched-" + "a" * 33,  # too long
        "jobsched-" + "a" * 32 + "\n",
        "jobsched-" + "a" * 32 + "/",
        "jobsched-" + "g" * 32,  # not hex
        "JOBSCHED-" + "a" * 32,
        "other-" + "a" * 32,
        "psm_" + "a" * 32,
        "jobsched_" + "a" * 32,
        "jobsched-" + "a" * 16 + "\x00" + "a" * 15,
    ],
)
def test_attach_refuses_bad_names(name):
    assert not valid_reference(name, [1])
    with pytest.raises(ValueError, match="invalid shared segment reference"):
        attach(name, [1])


def test_attach_refuses_bad_names_even_when_the_target_exists(segments):
    segment = segments([b"x" * 10])
    # spellings that would reach an existing segment's file through the path
    for name in (segment.name + "/.", "./" + segment.name, segment.name.upper()):
        with pytest.raises(ValueError):
            attach(name, segment.sizes)


@pytest.mark.parametrize(
    "sizes",
    [
        [],
        [1] * (MAX_FRAMES + 1),
        [-1],
        [1, -64],
        [2**48],
        [1.0],
        ["1"],
        [None],
        [True],  # a bool is not a frame size
        [1, 2.5],
    ],
    ids=["empty", "too-many", "negative", "negative-2nd", "huge", "float", "str", "none", "bool", "float-2nd"],
)
def test_attach_refuses_bad_sizes(sizes, segments):
    segment = segments([b"x" * 10])
    assert not valid_reference(segment.name, sizes)
    with pytest.raises(ValueError, match="invalid shared segment reference"):
        attach(segment.name, sizes)


def test_valid_reference_limits():
    name = fresh_name()
    assert valid_reference(name, [0])
    assert valid_reference(name, [0] * MAX_FRAMES)
    assert valid_reference(name, [2**48 - 1])
    assert valid_reference(name, (5, 6))  # any sequence


def test_attach_refuses_a_size_mismatch(segments):
    segment = segments([b"x" * 100])  # 128 bytes on file
    with pytest.raises(ValueError, match="has 128 bytes, expected 256"):
        attach(segment.name, [200])
    with pytest.raises(ValueError, match="has 128 bytes, expected 64"):
        attach(segment.name, [64])
    with pytest.raises(ValueError, match="expected 192"):
        attach(segment.name, [100, 1])
    # sizes that lay out to the same file size are not distinguishable; the right ones work
    assert bytes(attach(segment.name, [100])[0]) == b"x" * 100


def test_attach_of_a_missing_segment_is_an_os_error():
    with pytest.raises(FileNotFoundError):
        attach(fresh_name(), [1])


def test_attach_does_not_follow_a_symlink(segments, stray_paths):
    segment = segments([b"secret" * 10])
    link = fresh_name()
    stray_paths.append(shm_path(link))
    os.symlink(shm_path(segment.name), shm_path(link))
    assert valid_reference(link, segment.sizes)
    with pytest.raises(OSError) as info:
        attach(link, segment.sizes)
    assert info.value.errno == errno.ELOOP
    # a dangling symlink too
    dangling = fresh_name()
    stray_paths.append(shm_path(dangling))
    os.symlink("/etc/passwd", shm_path(dangling))
    with pytest.raises(OSError) as info:
        attach(dangling, [1])
    assert info.value.errno == errno.ELOOP


def test_attach_refuses_a_directory(stray_paths):
    name = fresh_name()
    stray_paths.append(shm_path(name))
    os.mkdir(shm_path(name), 0o700)
    with pytest.raises(ValueError, match="is not a file of this user"):
        attach(name, [1])


@pytest.mark.timeout(30)
def test_attach_refuses_a_fifo_without_blocking(stray_paths):
    name = fresh_name()
    path = shm_path(name)
    stray_paths.append(path)
    os.mkfifo(path, 0o600)
    outcome: list = []

    def run() -> None:
        try:
            attach(name, [1])
            outcome.append("mapped")
        except BaseException as exc:  # noqa: BLE001
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(3)
    blocked = thread.is_alive()
    if blocked:  # release it: opening the write end lets the reader's open return
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        try:
            thread.join(5)
        finally:
            os.close(fd)
    assert not thread.is_alive()
    assert not blocked, "attach() blocked on a FIFO"
    assert len(outcome) == 1 and isinstance(outcome[0], ValueError)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user")
def test_attach_refuses_a_file_of_another_user(segments):
    segment = segments([b"x" * 10])
    os.chown(shm_path(segment.name), 65534, 65534)
    with pytest.raises(ValueError, match="is not a file of this user"):
        attach(segment.name, segment.sizes)


# ------------------------------------------------------------------ policy


def test_worth_sharing_threshold():
    assert not worth_sharing([])
    assert not worth_sharing([b""])
    assert not worth_sharing([bytes(SHARE_MIN - 1)])
    assert worth_sharing([bytes(SHARE_MIN)])
    assert worth_sharing([bytes(SHARE_MIN // 2), bytes(SHARE_MIN // 2)])  # frames add up
    assert not worth_sharing([bytes(SHARE_MIN // 2), bytes(SHARE_MIN // 2 - 1)])
    # bytes, not items: an array of SHARE_MIN / 8 float64s is exactly the threshold
    assert worth_sharing([np.zeros(SHARE_MIN // 8)])
    assert not worth_sharing([np.zeros(SHARE_MIN // 8 - 1)])
    assert worth_sharing([memoryview(np.zeros((SHARE_MIN // 64, 8)))])


def test_share_domain_is_stable_and_cached(monkeypatch):
    monkeypatch.delenv("JOBSCHED_SHARED_MEMORY", raising=False)
    monkeypatch.setattr(shm, "_domain", None)
    first = share_domain()
    assert first == share_domain() == shm._compute_domain()
    assert len(first) == 32 and all(c in "0123456789abcdef" for c in first)
    # cached: a later change of the environment does not move this process to another domain
    monkeypatch.setenv("JOBSCHED_SHARED_MEMORY", "0")
    assert share_domain() == first


@pytest.mark.parametrize("value", ["0", "false", "no", "off", " OFF ", "False"])
def test_share_domain_is_empty_when_disabled(monkeypatch, value):
    monkeypatch.setattr(shm, "_domain", None)
    monkeypatch.setenv("JOBSCHED_SHARED_MEMORY", value)
    assert share_domain() == ""
    assert share_domain() == ""


@pytest.mark.parametrize("value", ["1", "yes", "on", ""])
def test_share_domain_is_set_when_enabled(monkeypatch, value):
    monkeypatch.setattr(shm, "_domain", None)
    monkeypatch.setenv("JOBSCHED_SHARED_MEMORY", value)
    assert len(share_domain()) == 32
