"""End to end: scikit-learn searches under ``parallel_config(backend="cluster")`` give the serial results."""

from __future__ import annotations

import os

import numpy as np
import pytest
from joblib import parallel_config
from support import RunningCluster, assert_same_search, batches_completed, svc_search

from jobsched.client import backend as backend_module
from jobsched.client import current_client

sklearn = pytest.importorskip("sklearn")
from sklearn.ensemble import RandomForestClassifier  # noqa: E402
from sklearn.model_selection import RandomizedSearchCV, cross_val_score  # noqa: E402
from sklearn.svm import SVC  # noqa: E402


@pytest.fixture(scope="module")
def serial_search(digits):
    X, y = digits
    with parallel_config(backend="sequential"):
        return svc_search("randomized", n_jobs=1).fit(X, y)


def check_search(digits, serial_search) -> RandomizedSearchCV:
    X, y = digits
    search = svc_search("randomized", n_jobs=-1).fit(X, y)
    # params, param_*, split*_test_score, mean/std/rank_test_score
    assert assert_same_search(search, serial_search, X) >= 10
    return search


@pytest.mark.timeout(180)
def test_randomized_search_on_two_worker_daemons(cluster: RunningCluster, digits, serial_search):
    with parallel_config(backend="cluster"):  # the current Client: the fixture's
        check_search(digits, serial_search)
    # the fits ran on the cluster, on both workers: 8 candidates x 3 folds plus the refit
    workers = cluster.client.scheduler_info()["workers"].values()
    assert all(w["completed"] > 0 for w in workers), list(workers)


@pytest.mark.timeout(180)
def test_randomized_search_on_embedded_default(digits, serial_search):
    # no Client is current, so the backend starts an embedded LocalCluster and owns it
    assert current_client() is None
    with parallel_config(backend="cluster"):
        check_search(digits, serial_search)
    embedded = backend_module._shared_clients.get((None, None, None))
    assert embedded is not None and embedded.cluster is not None, "no embedded local cluster was started"
    assert batches_completed(embedded) > 0
    processes = list(embedded.cluster.processes)
    assert processes and all(p.poll() is None for p in processes)
    assert os.getpid() not in {w["pid"] for w in embedded.scheduler_info()["workers"].values()}
    embedded.close()
    # closing the owning Client ends the embedded daemons
    assert all(p.poll() is not None for p in processes)


@pytest.mark.timeout(120)
def test_cross_val_score_matches_serial(cluster: RunningCluster, digits):
    X, y = digits
    serial = cross_val_score(SVC(gamma=0.001), X, y, cv=5, n_jobs=1)
    before = batches_completed(cluster.client)
    with parallel_config(backend="cluster"):
        distributed = cross_val_score(SVC(gamma=0.001), X, y, cv=5, n_jobs=-1)
    np.testing.assert_array_equal(distributed, serial)
    assert batches_completed(cluster.client) > before


def forest_on(cluster: RunningCluster, digits, **config) -> tuple[RandomForestClassifier, int]:
    """Fit a forest (scikit-learn's ``prefer="threads"`` loop); returns it and how many
    batches the cluster ran for it."""
    X, y = digits
    before = batches_completed(cluster.client)
    with parallel_config(backend="cluster", **config):
        forest = RandomForestClassifier(n_estimators=40, random_state=0, n_jobs=-1).fit(X, y)
    return forest, batches_completed(cluster.client) - before


def assert_same_forest(forest: RandomForestClassifier, digits) -> None:
    X, y = digits
    serial = RandomForestClassifier(n_estimators=40, random_state=0, n_jobs=1).fit(X, y)
    np.testing.assert_array_equal(forest.predict(X), serial.predict(X))
    np.testing.assert_array_equal(forest.predict_proba(X), serial.predict_proba(X))


@pytest.mark.timeout(120)
def test_thread_preferring_forest_runs_in_the_caller_when_the_workers_are_local(cluster: RunningCluster, digits):
    forest, ran = forest_on(cluster, digits)
    assert ran == 0, "every worker is on this machine: the trees should be built in the caller's threads"
    assert_same_forest(forest, digits)


@pytest.mark.timeout(120)
def test_random_forest_on_the_cluster_matches_serial(cluster: RunningCluster, digits):
    forest, ran = forest_on(cluster, digits, local_threads=False)
    assert ran > 0, "the trees were not built on the cluster"
    assert_same_forest(forest, digits)


@pytest.mark.timeout(120)
def test_thread_preferring_forest_is_shipped_to_workers_on_other_machines(cluster: RunningCluster, digits, monkeypatch):
    monkeypatch.setattr(backend_module.socket, "gethostname", lambda: "a-laptop-elsewhere")
    forest, ran = forest_on(cluster, digits)
    assert ran > 0, "the workers are on another machine: the trees should be built there"
    assert_same_forest(forest, digits)
