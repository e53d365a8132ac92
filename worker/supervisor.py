"""The supervisor ("nanny"): runs N worker processes and restarts the ones that crash.

``jobsched-worker`` runs this by default.  Each child is a ``jobsched-worker
--no-nanny`` process in the supervisor's process group (so systemd's
``KillMode=mixed`` reaches them), and exits by itself if the supervisor dies.

Policy by exit status (see daemon.py): scheduler gone for --death-timeout and
fatal configuration end the supervisor (status 1 and 2), so the service
manager decides; anything else, a signal, a crash or a restart request, is
restarted, with a growing delay if a child keeps dying quickly.  As a backstop
to the child's own check, a child whose memory passes 110% of its limit is killed.
On SIGTERM/SIGINT the children are asked to drain and given ``drain_timeout``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import psutil

from .daemon import EXIT_FATAL, EXIT_SCHEDULER_GONE, cli_status
from .memory import private_memory

log = logging.getLogger("jobsched.supervisor")

POLL_INTERVAL = 0.1
HARD_LIMIT_FACTOR = 1.1


@dataclass
class Child:
    index: int
    argv: list[str]
    proc: subprocess.Popen | None = None
    started: float = 0.0
    quick_deaths: int = 0
    restart_at: float = 0.0
    ps: psutil.Process | None = field(default=None, repr=False)


class Supervisor:
    def __init__(self, child_argvs: list[list[str]], *, memory_limit: int = 0, drain_timeout: float = 30.0) -> None:
        self.children = [Child(i, argv) for i, argv in enumerate(child_argvs)]
        self.memory_limit = memory_limit
        self.drain_timeout = drain_timeout
        self._stopping = False

    def _start(self, child: Child) -> None:
        env = dict(os.environ, JOBSCHED_PARENT_PID=str(os.getpid()), JOBSCHED_SUPERVISED="1", JOBSCHED_DAEMON="1")
        child.proc = subprocess.Popen(child.argv, env=env, stdin=subprocess.DEVNULL)
        child.started = time.monotonic()
        try:
            child.ps = psutil.Process(child.proc.pid)
        except psutil.Error:
            child.ps = None
        log.info("started worker process %d (pid %d)", child.index, child.proc.pid)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        for child in self.children:
            self._start(child)
        status = 0
        parent = os.environ.get("JOBSCHED_PARENT_PID", "")
        while not self._stopping:
            time.sleep(POLL_INTERVAL)
            if parent.isdigit() and os.getppid() != int(parent):
                log.warning("parent process %s is gone; stopping", parent)
                break
            for child in self.children:
                outcome = self._check(child)
                if outcome is not None:
                    status = outcome
                    self._stopping = True
                    break
        self._stop_all()
        return status

    def _check(self, child: Child) -> int | None:
        now = time.monotonic()
        if child.proc is None:
            if now >= child.restart_at and not self._stopping:
                self._start(child)
            return None
        code = child.proc.poll()
        if code is None:
            self._enforce_memory(child)
            return None
        if code in (EXIT_SCHEDULER_GONE, EXIT_FATAL):
            log.error("worker process %d exited with status %d; stopping", child.index, code)
            return cli_status(code)
        if code == 0:  # it was stopped on purpose (SIGTERM to it or to the whole group): leave it
            log.info("worker process %d (pid %d) stopped", child.index, child.proc.pid)
            child.proc, child.ps, child.restart_at = None, None, float("inf")
            return 0 if all(c.proc is None and c.restart_at == float("inf") for c in self.children) else None
        lived = now - child.started
        child.quick_deaths = child.quick_deaths + 1 if lived < 10 else 0
        delay = min(0.5 * 2 ** max(child.quick_deaths - 1, 0), 30.0) if child.quick_deaths else 0.0
        how = f"signal {-code}" if code < 0 else f"status {code}"
        log.warning("worker process %d (pid %d) ended with %s after %.1f s; restarting in %.1f s",
                    child.index, child.proc.pid, how, lived, delay)
        child.proc, child.ps, child.restart_at = None, None, now + delay
        return None

    def _enforce_memory(self, child: Child) -> None:
        if not self.memory_limit or child.ps is None:
            return
        try:
            rss = private_memory(child.ps)
        except psutil.Error:
            return
        if rss > HARD_LIMIT_FACTOR * self.memory_limit and child.proc is not None:
            log.error("worker process %d uses %.0f MiB, past its limit of %.0f MiB; killing it",
                      child.index, rss / 2**20, self.memory_limit / 2**20)
            child.proc.kill()

    def _on_signal(self, signum: int, _frame) -> None:
        self._stopping = True

    def _stop_all(self) -> None:
        running = [c.proc for c in self.children if c.proc is not None and c.proc.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.drain_timeout + 5
        for proc in running:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def child_command() -> list[str]:
    return [sys.executable, "-m", "jobsched.worker"]
