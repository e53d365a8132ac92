"""Host-shared copies of scattered data: POSIX shared memory segments in ``/dev/shm``.

Processes that can open each other's segments (same kernel, same ``/dev/shm``,
same user: see :func:`share_domain`) exchange a segment's name instead of its
bytes.  The creator writes the pickled frames once; every other process of
that domain maps them read-only, so an array is held once per machine however
many worker processes use it.

A segment is written with ``write`` (a full ``/dev/shm`` is then an error,
not the SIGBUS a write through a mapping would raise) and registered with
multiprocessing's resource tracker, the way ``multiprocessing.shared_memory``
does: if its creator dies, the tracker unlinks it.  Unlinking only removes the
name; processes that mapped the segment keep their mapping until they drop it,
so a creator may unlink while peers still use the data.  Readers map it
read-only (``SharedMemory(name)`` would map it read-write).

The tracker itself can die with its creator (a service manager killing the
whole control group): a segment's name carries its creator's pid, and
:func:`sweep_stale_segments`, run when a worker starts, removes those of
processes that no longer exist.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import socket
import stat
import uuid
from collections.abc import Sequence
from multiprocessing import resource_tracker

from ..protocol.framing import Buffer
from ..protocol.messages import frames_nbytes

SHM_DIR = "/dev/shm"
NAME_PATTERN = re.compile(r"jobsched-([0-9]{1,10})-[0-9a-f]{32}")  # creator's pid, random part
ALIGNMENT = 64  # each frame starts on a cache line, as numpy prefers for its arrays
MAX_FRAMES = 1024
SHARE_MIN = 2**20  # smaller data is cheaper to send than to put in a segment of its own

_domain: str | None = None


def share_domain() -> str:
    """An identity shared by exactly the processes that can map each other's segments.

    The kernel (boot id), the ``/dev/shm`` mount (its device number), the user
    (segments are created ``0600``) and the pid namespace (names carry pids).  Empty when shared memory is unavailable
    here or disabled with ``JOBSCHED_SHARED_MEMORY=0``: an empty domain matches nobody.
    """
    global _domain
    if _domain is None:
        _domain = _compute_domain()
    return _domain


def _compute_domain() -> str:
    if os.environ.get("JOBSCHED_SHARED_MEMORY", "1").strip().lower() in ("0", "false", "no", "off"):
        return ""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip()
        device = os.stat(SHM_DIR).st_dev
        pid_namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""
    identity = f"{boot_id}:{device}:{os.getuid()}:{pid_namespace}:{socket.gethostname()}"
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


def worth_sharing(frames: Sequence[Buffer]) -> bool:
    return frames_nbytes(frames) >= SHARE_MIN


def layout(sizes: Sequence[int]) -> tuple[list[int], int]:
    """Offsets of frames of ``sizes`` in a segment, and the segment's size."""
    offsets, end = [], 0
    for size in sizes:
        offsets.append(end)
        end += -(-size // ALIGNMENT) * ALIGNMENT
    return offsets, max(end, 1)


class SharedSegment:
    """A segment holding ``frames``, created and owned by this process until :meth:`unlink`."""

    def __init__(self, frames: Sequence[Buffer]) -> None:
        views = [memoryview(f).cast("B") for f in frames]
        self.sizes = [v.nbytes for v in views]
        offsets, total = layout(self.sizes)
        self.name = f"jobsched-{os.getpid()}-{uuid.uuid4().hex}"
        path = os.path.join(SHM_DIR, self.name)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
        self._linked = True
        resource_tracker.register(self._tracker_name, "shared_memory")
        try:
            os.ftruncate(fd, total)
            for view, offset in zip(views, offsets, strict=True):
                while view:
                    written = os.pwrite(fd, view, offset)
                    view, offset = view[written:], offset + written
        except BaseException:
            self.unlink()
            raise
        finally:
            os.close(fd)

    @property
    def _tracker_name(self) -> str:
        return "/" + self.name  # as shm_open and the tracker's shm_unlink spell it

    def unlink(self) -> None:
        if self._linked:
            self._linked = False
            try:
                os.unlink(os.path.join(SHM_DIR, self.name))
            except FileNotFoundError:
                pass
            resource_tracker.unregister(self._tracker_name, "shared_memory")


def valid_reference(name: str, sizes: Sequence[int]) -> bool:
    """Could ``name`` and ``sizes`` describe a segment of ours?  (Peers send them.)"""
    return (bool(NAME_PATTERN.fullmatch(name)) and 0 < len(sizes) <= MAX_FRAMES
            and all(type(s) is int and 0 <= s < 2**48 for s in sizes))


def attach(name: str, sizes: Sequence[int]) -> tuple[memoryview, ...]:
    """Map segment ``name`` read-only; returns its frames.  Raises ValueError or OSError
    when the name or sizes are invalid or the segment is not one of ours."""
    if not valid_reference(name, sizes):
        raise ValueError(f"invalid shared segment reference {name[:60]!r} ({len(sizes)} frames)")
    offsets, total = layout(sizes)
    # O_NONBLOCK: a FIFO planted under the name must not block us before fstat refuses it
    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            raise ValueError(f"shared segment {name} is not a file of this user")
        if info.st_size != total:
            raise ValueError(f"shared segment {name} has {info.st_size} bytes, expected {total}")
        mapping = mmap.mmap(fd, total, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    whole = memoryview(mapping)
    return tuple(whole[offset:offset + size] for offset, size in zip(offsets, sizes, strict=True))


def sweep_stale_segments() -> int:
    """Unlink this user's segments whose creator has exited; returns how many."""
    removed = 0
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    for name in names:
        match = NAME_PATTERN.fullmatch(name)
        if match is None or _alive(int(match.group(1))):
            continue
        path = os.path.join(SHM_DIR, name)
        try:
            if os.lstat(path).st_uid == os.getuid():
                os.unlink(path)
                removed += 1
        except OSError:
            pass  # gone already, or not ours to remove
    return removed


def _alive(pid: int) -> bool:
    """Could process ``pid`` still use its segments?  (A zombie cannot.)"""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]  # the name, in (), may hold anything
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")
