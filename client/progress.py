"""A tqdm progress bar for a joblib call on the cluster: batches done, running and queued."""

from __future__ import annotations

import threading
from typing import Any

REFRESH_INTERVAL = 1.0


class CallProgress:
    """Counts the call's batches; a background thread shows the cluster's running/queued counts."""

    def __init__(self, client: Any, description: str = "jobsched") -> None:
        from tqdm.auto import tqdm  # optional dependency: pip install "jobsched[progress]"

        self.client = client
        self.bar = tqdm(total=0, unit="batch", desc=description, dynamic_ncols=True)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh, name="jobsched-progress", daemon=True)
        self._thread.start()

    def submitted(self) -> None:
        with self._lock:
            self.bar.total += 1  # shown at the next update: no redraw per submission

    def finished(self, _future: Any = None) -> None:
        with self._lock:
            self.bar.update(1)

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_INTERVAL):
            try:
                info = self.client.scheduler_info()
            except Exception:  # noqa: BLE001 - the bar is cosmetic; the call reports real errors
                continue
            with self._lock:
                self.bar.set_postfix(running=info["running"], queued=info["queued"], refresh=True)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self.bar.close()
