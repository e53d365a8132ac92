"""A tqdm progress bar for a joblib call on the cluster: tasks done, the cluster's running/queued.

In a Jupyter kernel with ipywidgets installed it is tqdm's notebook widget; elsewhere (a
terminal, or a kernel without ipywidgets, where tqdm.auto would warn "IProgress not found")
a plain text bar.  Batches report from the Client's I/O thread; the bar is drawn by a thread
of its own that runs in the caller's context, so a text bar lands in the caller's cell.
"""

from __future__ import annotations

import contextvars
import sys
import threading
from typing import Any

DRAW_INTERVAL = 0.2  # seconds between redraws of the counts
INFO_EVERY = 5  # redraws between two asks of the scheduler for its running/queued counts
TEXT_COLUMNS = 80  # width of a text bar where the output is not a terminal (a notebook, a log)


def in_jupyter_kernel() -> bool:
    """Is this code running in a Jupyter (ipykernel) kernel?"""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and hasattr(shell, "kernel")


def bar_kind(in_kernel: bool, has_widgets: bool) -> str:
    """``"notebook"`` (tqdm's widget) or ``"text"``."""
    return "notebook" if in_kernel and has_widgets else "text"


def _has_widgets() -> bool:
    try:
        import ipywidgets  # noqa: F401  (tqdm's notebook bar needs it)
    except ImportError:
        return False
    return True


def _bar_class(kind: str) -> Any:
    if kind == "notebook":
        from tqdm.notebook import tqdm as notebook_tqdm

        return notebook_tqdm
    from tqdm.std import tqdm as text_tqdm  # optional dependency: pip install "jobsched[progress]"

    return text_tqdm


def bar_options(kind: str, stream_is_terminal: bool) -> dict[str, Any]:
    """tqdm's keyword arguments for a bar of ``kind``."""
    options: dict[str, Any] = {"unit": "task"}
    if kind == "text":
        options.update({"dynamic_ncols": True} if stream_is_terminal else {"ncols": TEXT_COLUMNS})
    return options


class CallProgress:
    """Counts the call's tasks; a background thread draws them with the cluster's counts."""

    def __init__(self, client: Any, description: str = "jobsched") -> None:
        in_kernel = in_jupyter_kernel()
        kind = bar_kind(in_kernel, in_kernel and _has_widgets())  # ipywidgets is imported only in a kernel
        terminal = bool(getattr(sys.stderr, "isatty", lambda: False)())
        self.client = client
        self.bar = _bar_class(kind)(total=0, desc=description, **bar_options(kind, terminal))  # shown in the caller's cell
        self._lock = threading.Lock()
        self._total = 0
        self._done = 0
        self._closed = False
        self._stop = threading.Event()
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._draw_forever,), name="jobsched-progress",
                                        daemon=True)
        self._thread.start()

    def submitted(self, n_tasks: int = 1) -> None:
        with self._lock:
            self._total += n_tasks

    def finished(self, n_tasks: int = 1, _future: Any = None) -> None:
        with self._lock:
            self._done += n_tasks

    def _draw_forever(self) -> None:
        ticks = 0
        while not self._stop.wait(DRAW_INTERVAL):
            ticks += 1
            postfix = self._cluster_counts() if ticks % INFO_EVERY == 1 else None
            with self._lock:
                if not self._closed:
                    self._draw(postfix)

    def _cluster_counts(self) -> dict[str, int] | None:
        try:
            info = self.client.scheduler_info()
        except Exception:  # noqa: BLE001 - the bar is cosmetic; the call reports real errors
            return None
        return {"running": info["running"], "queued": info["queued"]}

    def _draw(self, postfix: dict[str, int] | None = None) -> None:
        """Under the lock."""
        if postfix is not None:
            self.bar.set_postfix(postfix, refresh=False)
        if (self.bar.n, self.bar.total) != (self._done, self._total) or postfix is not None:
            if self.bar.total != self._total:
                _widget_total(self.bar, self._total)
            self.bar.total = self._total
            self.bar.n = self._done
            self.bar.refresh()

    def close(self) -> None:
        """Draw the final count (``N/N`` once every task is done) and close the bar."""
        self._stop.set()
        with self._lock:
            self._closed = True
            self._draw()
            self.bar.close()


def _widget_total(bar: Any, total: int) -> None:
    """A notebook bar's widget keeps its own maximum: set it as tqdm's ``reset(total)`` does."""
    container = getattr(bar, "container", None)
    if container is not None:
        widget = container.children[1]
        widget.max = total
        widget.bar_style = ""
        widget.layout.width = None  # the bar shown before the first total was a stub
