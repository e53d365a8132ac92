"""A real Jupyter kernel (ipykernel, driven by nbclient) runs a notebook as a user would:
the first cell creates ``client = jobsched.Client()`` (an embedded cluster), later cells run
``Parallel`` and a ``GridSearchCV(verbose=3)``.  Each cell's outputs must hold exactly its
own tasks' lines, in task order; warnings name the cell; progress ends at ``N/N`` tasks; the
Client cell renders HTML with the dashboard link.  The notebook runs once per module; the
kernel and the cluster's daemons are ended and checked gone."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

CELLS = {
    "client": "import warnings\nimport jobsched\nclient = jobsched.Client(n_workers=2)\nclient",
    "define": (
        "from joblib import Parallel, delayed, parallel_config\n"
        "def noisy(i):\n"
        "    print(f'task {i}')\n"
        "    warnings.warn(f'careful {i}')\n"
        "    return i\n"
        "def quiet_then_loud(i):\n"
        "    print(f'second {i}')\n"
        "    return -i"
    ),
    "parallel": (
        "with parallel_config(backend='cluster'):\n"
        "    result = Parallel(n_jobs=-1, batch_size=1)(delayed(noisy)(i) for i in range(6))\n"
        "print('result', result)"
    ),
    "second": (
        "with parallel_config(backend='cluster'):\n"
        "    Parallel(n_jobs=-1)(delayed(quiet_then_loud)(i) for i in range(5))"
    ),
    "search": (
        "from sklearn.datasets import load_iris\n"
        "from sklearn.linear_model import LogisticRegression\n"
        "from sklearn.model_selection import GridSearchCV\n"
        "X, y = load_iris(return_X_y=True)\n"
        "search = GridSearchCV(LogisticRegression(max_iter=500), {'C': [0.1, 1.0, 10.0, 100.0]}, cv=3, verbose=3, n_jobs=-1)\n"
        "with parallel_config(backend='cluster'):\n"
        "    search.fit(X, y)"
    ),
    "progress_widget": (
        "with parallel_config(backend='cluster', progress=True):\n"
        "    Parallel(n_jobs=-1)(delayed(abs)(i) for i in range(40))"
    ),
    "progress_text": (
        "import sys\n"
        "sys.modules['ipywidgets'] = None  # as if ipywidgets were not installed\n"
        "with parallel_config(backend='cluster', progress=True):\n"
        "    Parallel(n_jobs=-1, batch_size=1)(delayed(abs)(i) for i in range(30))"
    ),
    "pids": "import os\nprint('PIDS', os.getpid(), *[p.pid for p in client.cluster.processes])",
    "close": "client.close()",
}


def _kernel_env(tmp: Path) -> str:
    """A kernelspec that runs this very interpreter (the test's venv), installed under ``tmp``."""
    subprocess.run([sys.executable, "-m", "ipykernel", "install", "--prefix", str(tmp), "--name", "jobsched-test"],
                   check=True, capture_output=True, timeout=60)
    return str(tmp / "share" / "jupyter")


def _text(outputs: list) -> tuple[str, str]:
    out = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream" and o.get("name") == "stdout")
    err = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream" and o.get("name") == "stderr")
    return out, err


def _gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.1)
    return alive


@pytest.fixture(scope="module")
def executed(tmp_path_factory, monkeypatch_module):
    tmp = tmp_path_factory.mktemp("kernel")
    monkeypatch_module.setenv("JUPYTER_PATH", _kernel_env(tmp))
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source, metadata={"name": name}) for name, source in CELLS.items()]
    client = nbclient.NotebookClient(nb, kernel_name="jobsched-test", timeout=180, allow_errors=False,
                                     store_widget_state=True, resources={"metadata": {"path": str(tmp)}})
    pids: list[int] = []
    try:
        client.execute()
    finally:
        for cell in nb.cells:
            for line in _text(cell.get("outputs", []))[0].splitlines():
                if line.startswith("PIDS "):
                    pids = [int(p) for p in line.split()[1:]]
    left = _gone(pids, 30)
    for pid in left:  # not expected: end what the notebook left, then fail below
        psutil.Process(pid).kill()
    assert not left, f"processes left after the kernel shut down: {left}"
    assert len(pids) == 3  # the kernel, the scheduler, the worker supervisor
    return {cell.metadata["name"]: cell for cell in nb.cells}, nb


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.mark.timeout(600)
def test_client_cell_renders_html_with_the_dashboard_link(executed):
    cells, _ = executed
    [result] = [o for o in cells["client"].outputs if o["output_type"] == "execute_result"]
    page = result["data"]["text/html"]
    link = re.search(r'<a href="(http://127\.0\.0\.1:\d+)', page)
    assert link, page
    assert "Workers" in page and "Slots" in page and "Memory" in page and "Data held" in page
    print("NOTEBOOK client html:", len(page), "chars, dashboard", link.group(1))
    assert result["data"]["text/plain"].startswith("<jobsched.Client tcp://127.0.0.1:")


@pytest.mark.timeout(600)
def test_each_cell_holds_its_own_tasks_output_in_task_order(executed):
    cells, _ = executed
    out, err = _text(cells["parallel"].outputs)
    assert out.splitlines() == [f"task {i}" for i in range(6)] + ["result [0, 1, 2, 3, 4, 5]"]
    careful = re.findall(r"^(\S+):(\d+): UserWarning: careful (\d)$", err, re.MULTILINE)
    assert [int(c[2]) for c in careful] == list(range(6)), err
    # the location a local run shows: the cell that defined the function, and the warn's line
    assert all(re.fullmatch(r".*ipykernel_\d+/\w+\.py", c[0]) and c[1] == "4" for c in careful), careful
    assert "<dynamic-code>" not in err
    second_out, second_err = _text(cells["second"].outputs)
    assert second_out.splitlines() == [f"second {i}" for i in range(5)]
    assert second_err == ""
    for name in ("client", "define", "search", "progress_widget", "progress_text", "close"):
        text = "".join(_text(cells[name].outputs))
        assert not re.search(r"(task|second) \d", text), (name, text)


@pytest.mark.timeout(600)
def test_grid_search_verbose_prints_its_12_fit_lines_in_its_cell(executed):
    cells, _ = executed
    out, _err = _text(cells["search"].outputs)
    assert "Fitting 3 folds for each of 4 candidates, totalling 12 fits" in out
    fits = [line for line in out.splitlines() if line.startswith("[CV ") and " END " in line]
    assert len(fits) == 12, out
    assert sorted(re.search(r"C=([\d.]+)", line).group(1) for line in fits) == sorted(["0.1", "1.0", "10.0", "100.0"] * 3)
    print("NOTEBOOK grid search fit lines:", len(fits))


@pytest.mark.timeout(600)
def test_progress_ends_at_n_of_n_tasks_as_a_widget_and_as_text(executed):
    cells, nb = executed
    widget_outputs = cells["progress_widget"].outputs
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in widget_outputs)
    states = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    texts = [s["state"].get("value", "") for s in states.values() if s.get("model_name") == "HTMLModel"]
    assert any("40/40" in str(t) for t in texts), texts
    _, err = _text(widget_outputs)
    assert "IProgress" not in err

    _, text_err = _text(cells["progress_text"].outputs)
    assert "IProgress" not in text_err
    last = text_err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("jobsched: 100%") and "30/30" in last, text_err
    print("NOTEBOOK text progress last line:", last)
