"""The cluster backend's options, checked when ``parallel_config`` is made, before any
connection (the dispatch depth they set is measured on real daemons in
integration/test_pipelining.py)."""

from __future__ import annotations

import pytest
from joblib import parallel_config

import jobsched  # noqa: F401  (registers the 'cluster' backend)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("bad", [0, -3, True, "bad", "n_jobs - n_jobs", "import os", None])
def test_a_bad_pre_dispatch_is_refused_when_the_config_is_made(bad):
    with pytest.raises(ValueError, match="pre_dispatch"):
        parallel_config(backend="cluster", pre_dispatch=bad)
