"""The pure parts behind the notebook behaviour (tests/e2e/test_notebook.py runs a real kernel):
replay order, the progress bar's kind, the HTML card, code pickled with its file name."""

from __future__ import annotations

import cloudpickle
import pytest

from jobsched.client import html_repr
from jobsched.client.progress import bar_kind, bar_options
from jobsched.client.replay import ReplayOrder
from jobsched.client.scatter import ByReference, dumps_batch


@pytest.mark.timeout(10)
def test_ordered_calls_replay_in_submission_order_whatever_the_arrival_order():
    order = ReplayOrder(ordered=True)
    for token in "abcd":
        order.submitted(token)
    assert order.arrived("c", ["C"]) == []
    assert order.arrived("b", ["B"]) == []
    assert order.arrived("a", ["A"]) == [["A"], ["B"], ["C"]]
    assert order.settled("a") == []  # already replayed
    assert order.arrived("d", ["D"]) == [["D"]]


@pytest.mark.timeout(10)
def test_a_batch_settled_without_events_does_not_hold_back_later_ones():
    order = ReplayOrder(ordered=True)
    for token in "abc":
        order.submitted(token)
    assert order.arrived("b", ["B"]) == []
    assert order.settled("a") == [["B"]]  # a was lost or cancelled: nothing of its own
    assert order.arrived("c", []) == []


@pytest.mark.timeout(10)
def test_flush_gives_what_is_held_back_and_unordered_calls_replay_at_once():
    order = ReplayOrder(ordered=True)
    for token in "abc":
        order.submitted(token)
    order.arrived("c", ["C"])
    order.arrived("b", ["B"])
    assert order.flush() == [["B"], ["C"]]
    assert order.flush() == []
    unordered = ReplayOrder(ordered=False)
    unordered.submitted("a")
    assert unordered.arrived("b", ["B"]) == [["B"]]


@pytest.mark.timeout(10)
def test_progress_is_a_widget_only_in_a_kernel_with_ipywidgets():
    assert bar_kind(in_kernel=True, has_widgets=True) == "notebook"
    assert bar_kind(in_kernel=True, has_widgets=False) == "text"
    assert bar_kind(in_kernel=False, has_widgets=True) == "text"
    assert bar_options("text", stream_is_terminal=False)["ncols"] > 0
    assert bar_options("notebook", stream_is_terminal=False) == {"unit": "task"}


INFO = {
    "running": 1, "queued": 3,
    "workers": {
        "tcp://127.0.0.1:1": {"name": "w<1>", "address": "tcp://127.0.0.1:1", "nthreads": 2, "running": 1,
                              "memory": 3 << 20, "memory_limit": 8 << 30, "data_keys": 2, "data_bytes": 5 << 20},
        "tcp://127.0.0.1:2": {"name": "w2", "address": "tcp://127.0.0.1:2", "nthreads": 1, "running": 0,
                              "memory": 1 << 20, "memory_limit": 0, "data_keys": 0, "data_bytes": 0},
    },
}


@pytest.mark.timeout(10)
def test_the_html_card_shows_address_dashboard_workers_slots_memory_and_data():
    page = html_repr.html("Client", "tcp://127.0.0.1:9", "http://127.0.0.1:8687", INFO)
    assert '<a href="http://127.0.0.1:8687"' in page and "tcp://127.0.0.1:9" in page
    assert "<td style=\"text-align:left\">2</td>" in page  # workers
    assert "3 (1 running, 3 queued)" in page and "4.0 MiB of 8.0 GiB" in page and "2 keys, 5.0 MiB" in page
    assert "w&lt;1&gt;" in page  # names come from peers: escaped
    assert html_repr.one_line("Client", "tcp://127.0.0.1:9", INFO, "open") == \
        "<jobsched.Client tcp://127.0.0.1:9: 2 workers, 3 slots, open>"
    assert "not connected" in html_repr.html("Client", "tcp://x:1", "", None)


@pytest.mark.timeout(10)
def test_a_batch_keeps_its_functions_file_name():
    # a closure is pickled by value, as a function defined in a notebook cell is
    def task():
        return 1

    frames, _ = dumps_batch(task, {}, 0, lambda *a: "", ByReference())
    assert cloudpickle.loads(frames[0]).__code__.co_filename == __file__
