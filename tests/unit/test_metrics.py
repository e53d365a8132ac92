"""``/metrics``' collector on a fake admin-view ``info()``: the cluster-wide series, and one
series per user with a ``user`` label (the endpoint itself is read from a real scheduler in
integration/test_dashboard.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from jobsched.scheduler.http import StatusCollector


def admin_info(**extra: object) -> dict:
    return {
        "workers": {"tcp://10.0.0.2:9000": {"data_bytes": 10, "memory": 100}}, "clients": 2, "slots": 4,
        "running": 3, "queued": 9, "data_keys": 1, "bytes_received": 5, "bytes_sent": 6,
        "counters": {"submitted": 20, "done:ok": 8}, **extra,
    }


USERS = {
    "alice": {"running": 2, "queued": 1, "calls": 1, "share": 2 / 3, "usage_hour": 900.0, "usage": 850.5,
              "weight": 1.0, "max_slots": 0},
    "bob": {"running": 1, "queued": 8, "calls": 3, "share": 1 / 3, "usage_hour": 0.0, "usage": 12.0,
            "weight": 2.0, "max_slots": 2},
}


def scrape(info: dict) -> dict[str, dict[tuple, float]]:
    """metric sample name -> {labels as sorted items: value}, as Prometheus would read them."""
    registry = CollectorRegistry()
    registry.register(StatusCollector(SimpleNamespace(snapshot=lambda: info)))  # type: ignore[arg-type]
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


@pytest.mark.timeout(30)
def test_each_user_has_its_own_series():
    samples = scrape(admin_info(users=USERS))
    assert samples["jobsched_user_running_batches"] == {(("user", "alice"),): 2, (("user", "bob"),): 1}
    assert samples["jobsched_user_queued_batches"] == {(("user", "alice"),): 1, (("user", "bob"),): 8}
    assert samples["jobsched_user_share"][(("user", "alice"),)] == pytest.approx(2 / 3)
    assert samples["jobsched_user_usage_hour_seconds"] == {(("user", "alice"),): 900.0, (("user", "bob"),): 0.0}
    assert samples["jobsched_user_usage_seconds"] == {(("user", "alice"),): 850.5, (("user", "bob"),): 12.0}
    assert samples["jobsched_slots_busy"] == {(): 3}  # the cluster-wide series are still there


@pytest.mark.timeout(30)
def test_the_aggregate_of_other_users_is_not_a_user():
    samples = scrape(admin_info(users={**USERS, "(others)": dict(USERS["bob"], weight=0.0)}))
    assert {labels for labels in samples["jobsched_user_running_batches"]} == {(("user", "alice"),), (("user", "bob"),)}


@pytest.mark.timeout(30)
def test_a_state_without_users_scrapes_without_user_series():
    samples = scrape(admin_info())
    assert not any(name.startswith("jobsched_user_") for name in samples)
    assert samples["jobsched_workers"] == {(): 1}
