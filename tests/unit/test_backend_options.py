"""The cluster backend's options, checked when ``parallel_config`` is made, before any
connection (the dispatch depth they set is measured on real daemons in
integration/test_pipelining.py)."""

from __future__ import annotations

import numpy as np
import pytest
from joblib import parallel_config

import jobsched  # noqa: F401  (registers the 'cluster' backend)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("bad", [0, -3, True, "bad", "n_jobs - n_jobs", "import os", None])
def test_a_bad_pre_dispatch_is_refused_when_the_config_is_made(bad):
    with pytest.raises(ValueError, match="pre_dispatch"):
        parallel_config(backend="cluster", pre_dispatch=bad)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("bad", [1.5, "high", None, True, 2**31, -(2**31) - 1])
def test_a_bad_priority_is_refused_when_the_config_is_made(bad):
    with pytest.raises(ValueError, match="priority must be an integer"):
        parallel_config(backend="cluster", priority=bad)


class RecordingClient:
    """Stands for the Client: keeps what the backend submits."""

    closed = False

    def __init__(self) -> None:
        self.submitted: list[dict] = []

    def submit_batch(self, frames, **options):
        from concurrent.futures import Future

        self.submitted.append(options)
        return Future()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("given", "sent"), [(None, 0), (5, 5), (-3, -3), (np.int64(7), 7)])
def test_every_batch_of_a_call_carries_its_priority(given, sent):
    from jobsched.client.backend import ClusterBackend

    backend = ClusterBackend(**({} if given is None else {"priority": given}))
    backend.client = client = RecordingClient()  # type: ignore[assignment]
    backend.submit(abs)
    backend.submit(abs)
    assert [options["priority"] for options in client.submitted] == [sent, sent]
    assert all(type(options["priority"]) is int for options in client.submitted)
