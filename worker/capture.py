"""Capture what a task prints, warns and logs, so the caller can replay it.

Installed once per worker process: ``sys.stdout``/``sys.stderr`` become proxies
that write to the capturing thread's buffer (other threads write through), the
warnings machinery reports every warning (the *caller's* filters decide on
replay), and a root logging handler records the capturing thread's log records.
Each captured item is an event tuple made of plain strings and numbers, so a
caller can always unpickle it even without the task's modules:

    ("stdout", text) | ("stderr", text)
    ("warning", category_module, category_qualname, message, filename, lineno)
    ("log", logger_name, levelno, message, pathname, lineno, func_name)
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

DEFAULT_OUTPUT_CAP = 1 << 20  # bytes of stdout+stderr kept per batch


@dataclass
class CaptureOptions:
    output: bool = True
    warnings: bool = True
    log_level: int | None = logging.WARNING  # None: logs are not forwarded
    output_cap: int = DEFAULT_OUTPUT_CAP


@dataclass
class _Capture:
    options: CaptureOptions
    events: list = field(default_factory=list)
    output_bytes: int = 0
    truncated: bool = False


_local = threading.local()
_installed = False
_install_lock = threading.Lock()


def _current() -> _Capture | None:
    return getattr(_local, "capture", None)


class _StreamProxy:
    """Stands in for sys.stdout/sys.stderr: the capturing thread's writes are recorded."""

    def __init__(self, name: str, real) -> None:
        self._name = name
        self._real = real

    def write(self, text: str) -> int:
        capture = _current()
        if capture is None or not capture.options.output:
            return self._real.write(text)
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        encoded = text.encode("utf-8", "surrogateescape")
        room = capture.options.output_cap - capture.output_bytes
        if len(encoded) > room:
            kept = encoded[: max(room, 0)].decode("utf-8", "ignore")  # never split a character
            capture.output_bytes = capture.options.output_cap
            if not capture.truncated:
                capture.truncated = True
                note = f"\n[jobsched: task output truncated at {capture.options.output_cap} bytes]\n"
                self._append(capture, kept)
                capture.events.append(("stderr", note))
            return len(text)
        capture.output_bytes += len(encoded)
        self._append(capture, text)
        return len(text)

    def _append(self, capture: _Capture, kept: str) -> None:
        if not kept:
            return
        events = capture.events
        if events and events[-1][0] == self._name:
            events[-1] = (self._name, events[-1][1] + kept)  # merge consecutive writes
        else:
            events.append((self._name, kept))

    def flush(self) -> None:
        if _current() is None:
            self._real.flush()

    def __getattr__(self, name: str):
        return getattr(self._real, name)


class _LogCollector(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        capture = _current()
        if capture is None or capture.options.log_level is None or record.levelno < capture.options.log_level:
            return
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
        except Exception:  # noqa: BLE001 - a broken %-format must not fail the task
            message = str(record.msg)
        capture.events.append(("log", record.name, record.levelno, message, record.pathname, record.lineno, record.funcName))


def _showwarning(message, category, filename, lineno, file=None, line=None) -> None:
    capture = _current()
    if capture is None or not capture.options.warnings:
        return _original_showwarning(message, category, filename, lineno, file, line)
    capture.events.append(("warning", category.__module__, category.__qualname__, str(message), filename, lineno))


_original_showwarning = warnings.showwarning


def install() -> None:
    """Install the proxies and hooks in this process (idempotent)."""
    global _installed, _original_showwarning
    with _install_lock:
        if _installed:
            return
        _installed = True
        sys.stdout = _StreamProxy("stdout", sys.stdout)
        sys.stderr = _StreamProxy("stderr", sys.stderr)
        _original_showwarning = warnings.showwarning
        warnings.showwarning = _showwarning
        # every occurrence reaches the hook; the caller's filters and registry decide what shows
        warnings.simplefilter("always")
        logging.getLogger().addHandler(_LogCollector())


@contextlib.contextmanager
def capturing(options: CaptureOptions) -> Iterator[list]:
    """Record this thread's output, warnings and logs into the yielded event list."""
    install()
    capture = _Capture(options)
    if options.log_level is not None:
        root = logging.getLogger()
        if root.getEffectiveLevel() > options.log_level:
            root.setLevel(options.log_level)
    _local.capture = capture
    try:
        yield capture.events
    finally:
        _local.capture = None
