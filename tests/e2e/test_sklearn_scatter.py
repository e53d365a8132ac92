"""End to end with scattered data: scikit-learn searches given their training set with
``parallel_config(scatter=[X, y])`` give the serial results, over TCP and through shared
memory (``data_cluster``, tests/conftest.py).  The scattering itself is tested in
integration/test_scatter.py."""

from __future__ import annotations

import pytest
from joblib import parallel_config
from support import assert_same_search, batches_completed, svc_search, wait_data_freed, wait_held_everywhere

sklearn = pytest.importorskip("sklearn")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["randomized", "grid"])
def test_search_with_scatter_matches_the_serial_run(data_cluster, digits, kind):
    cluster, _ = data_cluster
    X, y = digits
    serial = svc_search(kind, 1).fit(X, y)
    before = batches_completed(cluster.client)
    with parallel_config(backend="cluster", scheduler=cluster.client, scatter=[X, y]):
        wait_held_everywhere(cluster.client, 2, X.nbytes)
        search = svc_search(kind, -1).fit(X, y)
    assert_same_search(search, serial, X)
    assert batches_completed(cluster.client) > before, "the fits did not run on the cluster"
    wait_data_freed(cluster.client)
