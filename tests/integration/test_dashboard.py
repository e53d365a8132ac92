"""The scheduler's HTTP side against real daemons, and the dashboard page in headless Chromium.

A module-scoped cluster (a scheduler with its dashboard on a free port, a
two-process worker, a three-thread worker with a memory limit, and a worker
that is SIGKILLed so the page has a death to show) runs a joblib job in a
background thread while the tests read ``/health``, ``/metrics`` and
``/api/status`` with urllib and load ``/`` in Debian's ``chromium --headless``
(``--dump-dom`` to check what the page's JavaScript rendered, ``--screenshot``
for a person to look at; its path is printed, see ``pytest -s``, and copied to
``$JOBSCHED_DASHBOARD_SCREENSHOT`` when that is set).  Two more browser tests
serve the page next to a fake ``/api/status`` to check the rendering of
crafted data (escaping, bars, badges, throughput) and the "scheduler down"
banner.  The browser tests skip when no chromium binary is installed.  The page's
own file is checked in unit/test_dashboard_page.py.

Every daemon and every browser runs in its own session and is ended with
``os.killpg`` on its process group, never by name.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import tasks
from joblib import Parallel, delayed, parallel_config
from support import DaemonPool, Status, http_get, wait_for_workers

import jobsched

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")
BROWSER_TIMEOUT = 60.0
WINDOW = (1400, 900)
# workers: "dash-a" runs two processes (dash-a-0, dash-a-1) of 2 threads, "dash-b" one of 3
NAMES = ["dash-a-0", "dash-a-1", "dash-b"]
SLOTS = 2 + 2 + 3


# ----------------------------------------------------------------------------- the cluster
class Job:
    """A joblib job run over and over in a thread until stopped; keeps its first exception."""

    def __init__(self, client: jobsched.Client, ref) -> None:
        self.client, self.ref = client, ref
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.calls = 0
        self.thread = threading.Thread(target=self._run, name="dashboard-job", daemon=True)

    def _run(self) -> None:
        try:
            with parallel_config(backend="cluster", scheduler=self.client):
                while not self.stop.is_set():
                    work = [delayed(tasks.sleep_and_return)(0.05, i) for i in range(120)]
                    work.append(delayed(np.size)(self.ref))  # a task that reads the scattered array
                    out = Parallel(n_jobs=-1, batch_size=1)(work)
                    assert out[:120] == list(range(120)) and out[120] == 500_000
                    self.calls += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the fixture's teardown
            self.error = exc

    def join(self) -> None:
        self.stop.set()
        self.thread.join(60)


class Live:
    def __init__(self, address: str, dashboard: str, job: Job, pool: DaemonPool) -> None:
        self.address, self.dashboard, self.job, self.pool = address, dashboard, job, pool
        self.status = Status(dashboard).get

    def wait(self, what: str, predicate: Callable[[dict], bool], timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if predicate(status):
                return status
            if time.monotonic() > deadline:
                job_error = "" if self.job is None or self.job.error is None else f"\nthe job failed: {self.job.error!r}"
                raise AssertionError(f"timed out waiting for {what}: {json.dumps(status)[:2000]}{job_error}\n"
                                     f"{self.pool.report()}")
            time.sleep(0.1)


@pytest.fixture(scope="module")
def live(tmp_path_factory, request) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("dashboard-cluster")
    pool = DaemonPool(tmp)
    failed_before = request.session.testsfailed
    client = job = None
    try:
        sched = pool.scheduler("--dashboard-address", "127.0.0.1:0")
        address, dashboard = sched.address, sched.info["dashboard"]
        assert dashboard.startswith("http://127.0.0.1:"), sched.info
        pool.worker(address, "--nworkers", "2", name="dash-a", nthreads=2)
        pool.worker(address, "--memory-limit", "1GiB", name="dash-b", nthreads=3)
        doomed = pool.worker(address, "--no-nanny", name="dash-doomed")
        # not the "current" client: the autouse fixture closes those after every test
        client = jobsched.Client(address, timeout=10, set_as_current=False)
        wait_for_workers(client, [*NAMES, "dash-doomed"])
        live = Live(address, dashboard, None, pool)  # type: ignore[arg-type]

        doomed.kill()  # SIGKILL: a worker death for the events list
        live.wait("the worker-died event", lambda s: any(e["kind"] == "worker-died" for e in s["events"]))
        with pytest.raises(ValueError, match="dashboard boom"):  # a batch error for the events list
            with parallel_config(backend="cluster", scheduler=client):
                Parallel()(delayed(tasks.raise_value_error)("dashboard boom") for _ in range(2))

        ref = client.scatter(np.zeros(500_000), broadcast=True)  # 4 MB of held data on every worker
        live.job = job = Job(client, ref)
        job.thread.start()
        live.wait("batches running and done", lambda s: s["running"] > 0 and s["counters"].get("done:ok", 0) > 20)
        # a broadcast reaches every worker; under load a stalled peer fetch falls back to the
        # owner's copy after FETCH_TIMEOUT (120 s), so allow for that path too
        live.wait("held data", lambda s: all(w["data_keys"] > 0 for w in s["workers"].values()), timeout=150)
        yield live
        job.join()
        assert not job.thread.is_alive(), "the background job did not stop"
        assert job.error is None, f"the background job failed: {job.error!r}"
    finally:
        if job is not None:
            job.join()
        if client is not None:
            client.close()
        pool.close()
        if request.session.testsfailed > failed_before:
            print(pool.report())


# ------------------------------------------------------------------------------ HTTP
@pytest.mark.timeout(240)
def test_health_metrics_and_status_endpoints(live: Live) -> None:
    code, ctype, body = http_get(live.dashboard + "/health")
    assert (code, body) == (200, "ok\n") and ctype.startswith("text/plain")

    code, ctype, body = http_get(live.dashboard + "/metrics")
    assert code == 200 and ctype.startswith("text/plain"), ctype
    metrics = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            metrics[name] = float(value)
    assert metrics["jobsched_workers"] == len(NAMES)
    assert metrics["jobsched_slots"] == SLOTS
    assert metrics['jobsched_batches_done_total{status="ok"}'] > 0
    assert metrics['jobsched_batches_done_total{status="error"}'] >= 1
    assert metrics["jobsched_worker_deaths_total"] >= 1
    assert metrics["jobsched_data_keys"] >= 1 and metrics["jobsched_data_bytes"] >= 4_000_000 * len(NAMES)
    assert "jobsched_scheduling_latency_seconds_bucket" in body

    code, ctype, body = http_get(live.dashboard + "/api/status")
    assert code == 200 and ctype == "application/json"
    status = json.loads(body)
    assert status["address"] == live.address and status["dashboard"] == live.dashboard
    assert abs(status["time"] - time.time()) < 60
    workers = {w["name"]: w for w in status["workers"].values()}
    assert sorted(workers) == NAMES and status["slots"] == SLOTS
    assert {w["nthreads"] for w in workers.values()} == {2, 3}
    assert workers["dash-b"]["memory_limit"] == 1 << 30 and workers["dash-a-0"]["memory_limit"] == 0
    assert all(w["status"] == "running" and w["pid"] > 0 for w in workers.values())
    assert status["clients"] >= 1 and status["counters"]["done:ok"] > 0
    kinds = {e["kind"] for e in status["events"]}
    assert {"worker-joined", "worker-died", "batch-error", "client-connected"} <= kinds
    assert all(status["time"] - 600 < e["time"] <= status["time"] + 1 for e in status["events"])

    code, _, body = http_get(live.dashboard + "/no-such-page")
    assert code == 404
    code, ctype, body = http_get(live.dashboard + "/")
    assert code == 200 and ctype.startswith("text/html") and "api/status" in body


# --------------------------------------------------------------------------- browser
def chromium(tmp: Path, url: str, *mode: str, budget_ms: int = 5000) -> str:
    """Run headless Chromium on ``url`` (``--dump-dom`` or ``--screenshot=PATH``) and return its stdout.

    ``--virtual-time-budget`` lets the page's timers (the 1 s polling) run for that much
    virtual time before the DOM is dumped or the screenshot taken.
    """
    profile = tmp / f"chromium-profile-{time.monotonic_ns()}"
    argv = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
        "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-extensions", "--no-proxy-server",
        "--hide-scrollbars", "--mute-audio", f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
        f"--virtual-time-budget={budget_ms}", *mode, url,
    ]
    home = tmp / "chromium-home"  # its crash-report database and caches go here, not in ~/.config
    env = dict(os.environ, HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), XDG_CACHE_HOME=str(home / ".cache"))
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, cwd=tmp, env=env)
    try:
        out, err = proc.communicate(timeout=BROWSER_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"chromium did not finish within {BROWSER_TIMEOUT} s:\n{err.decode(errors='replace')}") from None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # helpers (zygote, GPU, crashpad) left in its group
        except ProcessLookupError:
            pass
        shutil.rmtree(profile, ignore_errors=True)
    assert proc.returncode == 0, f"chromium exited with {proc.returncode}:\n{err.decode(errors='replace')}"
    return out.decode(errors="replace")


def dump_dom(tmp: Path, url: str, budget_ms: int = 5000) -> str:
    """The DOM after the page's scripts ran, without the <script> itself (its source holds markup)."""
    return re.sub(r"<script\b.*?</script>", "", chromium(tmp, url, "--dump-dom", budget_ms=budget_ms), flags=re.S)


class _TextOf(HTMLParser):
    """Collects the text inside the element with a given id (nested elements included)."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self, element_id: str) -> None:
        super().__init__()
        self.element_id, self.depth, self.found, self.parts = element_id, 0, False, []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if self.depth:
            self.depth += tag not in self.VOID
        elif ("id", self.element_id) in attrs and not self.found:
            self.found, self.depth = True, 1

    def handle_endtag(self, tag: str) -> None:
        if self.depth:
            self.depth -= 1

    def handle_data(self, data: str) -> None:
        if self.depth:
            self.parts.append(data)


def text_of(dom: str, element_id: str) -> str:
    """The text inside the element with this id, whitespace collapsed."""
    parser = _TextOf(element_id)
    parser.feed(dom)
    parser.close()
    assert parser.found, f"no element #{element_id} in the DOM"
    return " ".join(" ".join(parser.parts).split())


def worker_rows(dom: str) -> dict[str, str]:
    """name -> the row's HTML for every row of the workers table."""
    return {html.unescape(m.group(1)): m.group(2)
            for m in re.finditer(r'<tr data-worker="([^"]*)">(.*?)</tr>', dom, re.S)}


def user_rows(dom: str) -> dict[str, list[str]]:
    """user -> the text of each cell of the row, for every row of the users table."""
    rows = {}
    for match in re.finditer(r'<tr data-user="([^"]*)">(.*?)</tr>', dom, re.S):
        cells = re.findall(r"<td[^>]*>(.*?)</td>", match.group(2), re.S)
        rows[html.unescape(match.group(1))] = [html.unescape(" ".join(re.sub(r"<[^>]+>", " ", c).split())) for c in cells]
    return rows


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


@needs_chromium
@pytest.mark.timeout(180)
def test_dashboard_in_headless_chromium(live: Live, tmp_path: Path) -> None:
    for _attempt in range(4):  # busy slots are a moment's view: a poll between batches may see none
        dom = dump_dom(tmp_path, live.dashboard + "/")
        if 'class="down"' not in dom and text_of(dom, "slots-busy") not in ("0", "–"):
            break
    assert 'class="down"' not in dom, "the page could not reach /api/status"
    assert text_of(dom, "address") == live.address
    assert text_of(dom, "n-workers") == str(len(NAMES))
    assert text_of(dom, "slots-total") == str(SLOTS)
    assert 0 < int(text_of(dom, "slots-busy")) <= SLOTS
    assert int(text_of(dom, "done").replace(",", "")) > 0
    # under virtual time the page polls every few real milliseconds: too soon for a rate (>= 0.9 s)
    assert re.fullmatch(r"\d+(\.\d+)?|–", text_of(dom, "rate"))
    assert text_of(dom, "deaths") == "1" and text_of(dom, "clients") != "0"
    assert text_of(dom, "data-bytes").endswith("MiB")

    rows = worker_rows(dom)
    assert sorted(rows) == NAMES
    assert all('class="badge b-running"' in row for row in rows.values())
    assert re.search(r"\d / 3</span>", rows["dash-b"]) and "/ 1.00 GiB" in rows["dash-b"]
    assert "no limit" in rows["dash-a-0"] and re.search(r"\d / 2</span>", rows["dash-a-1"])
    assert all(re.search(r"MiB <span class=\"small\">· 1 key", row) for row in rows.values())
    # the users table is on the page; it has rows once the scheduler reports users
    assert 'id="users-panel"' in dom
    status = live.status()
    if status.get("users"):
        assert set(user_rows(dom)) >= {name for name in status["users"] if status["users"][name]["calls"]}

    events = text_of(dom, "events")
    assert "dash-doomed" in events and "worker died" in events and "batch error" in events
    assert re.match(r"\d+ errors? · 1 death · last \d+$", text_of(dom, "events-meta"))
    assert re.search(r'<li class="hot"[^>]*>.*?worker died', dom), "the worker death is not highlighted"

    shot = tmp_path / "dashboard.png"
    chromium(tmp_path, live.dashboard + "/", f"--screenshot={shot}", budget_ms=30_000)
    assert png_size(shot) == WINDOW and shot.stat().st_size > 20_000
    print(f"\ndashboard screenshot: {shot}")
    if os.environ.get("JOBSCHED_DASHBOARD_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["JOBSCHED_DASHBOARD_SCREENSHOT"])


# ------------------------------------------------------- the page against a fake scheduler
class FakeScheduler:
    """Serves the real dashboard.html and a scripted /api/status on 127.0.0.1."""

    def __init__(self, status: Callable[[int], dict | None]) -> None:
        self.status = status  # request number -> the JSON to return, or None for a 503
        self.requests = 0
        page = resources.files("jobsched.scheduler").joinpath("dashboard.html").read_bytes()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.path.split("?")[0] == "/api/status":
                    fake.requests += 1
                    data = fake.status(fake.requests)
                    body, code, ctype = (json.dumps(data).encode(), 200, "application/json") if data is not None \
                        else (b"unavailable\n", 503, "text/plain")
                else:
                    body, code, ctype = page, 200, "text/html; charset=utf-8"
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeScheduler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


EVIL = '<img src=x onerror="document.title=\'pwned\'">'


def crafted_status(n: int) -> dict:
    """A scheduler whose clock advances 1 s and whose counters 30 ok + 1 error per request."""
    t0 = 1_700_000_000.0
    workers = [
        dict(name="big", host="node1", pid=11, nthreads=8, running=6, completed=1200, memory=990 << 20,
             memory_limit=1 << 30, status="paused", data_keys=2, data_bytes=3 << 20),
        dict(name="small", host="node2", pid=12, nthreads=1, running=0, completed=7, memory=0,
             memory_limit=0, status="retiring", data_keys=0, data_bytes=0),
        dict(name=EVIL, host="node3", pid=13, nthreads=40, running=10, completed=1, memory=5 << 30,
             memory_limit=0, status="running", data_keys=0, data_bytes=0),
    ]
    return {
        "address": "tcp://10.0.0.1:8686", "dashboard": "", "time": t0 + n,
        "workers": {f"tcp://10.0.0.{i}:9000": dict(w, address=f"tcp://10.0.0.{i}:9000") for i, w in enumerate(workers)},
        "clients": 2, "queued": 1234, "tasks": 1250, "running": 16, "slots": 49, "data_keys": 2, "stale_results": 0,
        "counters": {"submitted": 5000, "done:ok": 100 + 30 * n, "done:error": n, "worker_deaths": 1, "requeued": 3,
                     "workers_joined": 4},
        "events": [
            {"time": t0 - 95, "kind": "worker-joined", "text": "big (8 threads, node1 pid 11)"},
            {"time": t0 - 30, "kind": "worker-died", "text": "gone with 2 batches running: heartbeat timeout"},
            {"time": t0 - 5, "kind": "batch-error", "text": EVIL},
            {"time": t0, "kind": "batch-lost", "text": "batch 7 lost on 3 workers"},
        ],
        "bytes_received": 5 << 20, "bytes_sent": 1536,
        "users": {
            "bob": {"running": 10, "queued": 1000, "calls": 3, "share": 0.625, "usage_hour": 750.0, "usage": 700.0,
                    "weight": 1.0, "max_slots": 0},
            EVIL: {"running": 6, "queued": 234, "calls": 1, "share": 0.375, "usage_hour": 7200.0, "usage": 9000.0,
                   "weight": 2.0, "max_slots": 8},
            "(others)": {"running": 0, "queued": 0, "calls": 0, "share": 0.0, "usage_hour": 0.0, "usage": 0.0,
                         "weight": 0.0, "max_slots": 0},
            "alice": {"running": 0, "queued": 0, "calls": 0, "share": 0.0, "usage_hour": 42.0, "usage": 40.0,
                      "weight": 1.0, "max_slots": 0},
        },
    }


@needs_chromium
@pytest.mark.timeout(120)
def test_dashboard_renders_crafted_status(tmp_path: Path) -> None:
    with FakeScheduler(crafted_status) as fake:
        dom = dump_dom(tmp_path, fake.url)
    assert fake.requests >= 3, "the page stopped polling"
    assert "<img" not in dom and "pwned" not in dom.split("</title>")[0], "a worker name was not escaped"
    assert text_of(dom, "slots-busy") == "16" and text_of(dom, "slots-total") == "49"
    assert text_of(dom, "queued") == "1,234"
    assert text_of(dom, "rate") == "31.0"  # (30 ok + 1 error) per second of scheduler time
    done = int(text_of(dom, "done").replace(",", ""))
    assert done > 100 and (done - 100) % 30 == 0 and "errors" in text_of(dom, "done-sub")
    assert text_of(dom, "data-bytes") == "3.00 MiB" and text_of(dom, "data-sub") == "2 keys"
    assert "5.00 MiB" in text_of(dom, "net") and "1.50 KiB" in text_of(dom, "net")
    assert text_of(dom, "deaths") == "1" and "3 batches requeued" in text_of(dom, "deaths-sub")
    rows = worker_rows(dom)
    assert sorted(rows) == sorted(["big", "small", EVIL])
    assert "b-paused" in rows["big"] and "b-retiring" in rows["small"] and "b-running" in rows[EVIL]
    assert '<div class="bar bad">' in rows["big"] and "990 MiB" in rows["big"] and "1.00 GiB" in rows["big"]
    assert rows["big"].count('<i class="on">') == 6 and rows["big"].count("<i class") == 8
    assert "no limit" in rows["small"] and "5.00 GiB" in rows[EVIL] and "10 / 40" in rows[EVIL]
    assert len(re.findall(r'<li class="hot"', dom)) == 2 and len(re.findall(r'<li class="warm"', dom)) == 1
    assert text_of(dom, "events-meta") == "1 error · 1 death · 1 lost · last 4"
    users = user_rows(dom)
    assert sorted(users) == sorted(["alice", "bob", EVIL, "(others)"])  # escaped like the worker names
    assert list(users).index("alice") < list(users).index("bob") and list(users)[-1] == "(others)"  # by name
    assert users["bob"] == ["bob", "10", "1,000", "3", "62.5%", "12.5 slot-min"]
    assert users[EVIL][4:] == ["37.5%", "2.0 slot-h"] and users["alice"][4:] == ["0.0%", "42 slot-s"]
    assert re.search(r'id="users-panel"(?![^>]*hidden)', dom) and text_of(dom, "users-meta") == "3 users"
    events = text_of(dom, "events")
    assert events.index("batch lost") < events.index("worker died") < events.index("worker joined")  # newest first


@needs_chromium
@pytest.mark.timeout(120)
def test_a_scheduler_without_users_leaves_the_users_table_hidden(tmp_path: Path) -> None:
    def without_users(n: int) -> dict:
        status = crafted_status(n)
        del status["users"]
        return status

    with FakeScheduler(without_users) as fake:
        dom = dump_dom(tmp_path, fake.url)
    assert 'class="down"' not in dom and text_of(dom, "slots-busy") == "16"  # the rest still renders
    assert re.search(r'id="users-panel"[^>]*hidden', dom) and user_rows(dom) == {}


@needs_chromium
@pytest.mark.timeout(120)
def test_dashboard_shows_a_banner_and_keeps_retrying_when_the_scheduler_is_down(tmp_path: Path) -> None:
    with FakeScheduler(lambda n: crafted_status(n) if n <= 2 else None) as fake:
        dom = dump_dom(tmp_path, fake.url, budget_ms=6000)
    assert fake.requests >= 5, "the page gave up polling after the scheduler went away"
    assert re.search(r'<body class="down">', dom)
    assert "Cannot reach the scheduler (HTTP 503)" in text_of(dom, "banner")
    assert "disconnected" in text_of(dom, "updated")
    assert "big" in worker_rows(dom), "the last known state should stay on screen"
