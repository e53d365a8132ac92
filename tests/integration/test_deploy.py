"""The deployment files in deploy/: systemd units, the SLURM script, the container files.

What is checked:

- every command line they contain (ExecStart=, the sbatch script's daemon invocations,
  compose ``command:``, the Dockerfile's CMD) is one the daemons' real parsers accept, with
  the settings the deployment gives them (environment file, compose ``environment:``)
  resolved through ``jobsched.runtime.config.resolve`` like the daemons do; and no secret
  is ever passed on a command line or set in an environment file;
- the units pass ``systemd-analyze verify`` (on copies whose ExecStart= points at this
  venv's real console scripts; skipped where systemd-analyze is missing or cannot run) and
  their settings fit the daemons (credential name, drain time vs TimeoutStopSec, ...);
- the sbatch script parses (``bash -n``) and really runs: with stand-ins for srun and
  scontrol it starts a real scheduler and worker on 127.0.0.1 through the scheduler file,
  runs a joblib call from a user script, and cleans up; and the scheduler-file handshake it
  relies on is tested on its own with the installed console scripts;
- compose.yaml (with PyYAML, else skipped) wires the secret as a compose secret.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import psutil
import pytest
from joblib import Parallel, delayed, parallel_config
from support import BIN_DIR

import jobsched
from jobsched.protocol.address import is_loopback_host, parse_address
from jobsched.runtime import config as config_module
from jobsched.runtime.secret import load_secret
from jobsched.scheduler import cli as scheduler_cli
from jobsched.worker import cli as worker_cli
from jobsched.worker.memory import parse_memory_limit

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SYSTEMD = DEPLOY / "systemd"
SCHEDULER_UNIT = SYSTEMD / "jobsched-scheduler.service"
WORKER_UNIT = SYSTEMD / "jobsched-worker@.service"
ENV_FILE = SYSTEMD / "jobsched.env"
SYSUSERS = SYSTEMD / "jobsched.conf"
SBATCH = DEPLOY / "slurm" / "jobsched.sbatch"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
DOCKERIGNORE = DEPLOY / "docker" / "Dockerfile.dockerignore"
COMPOSE = DEPLOY / "docker" / "compose.yaml"
UNIT_VENV_BIN = "/opt/jobsched/venv/bin/"
CLIS = {"jobsched-scheduler": (scheduler_cli, "scheduler"), "jobsched-worker": (worker_cli, "worker")}
INSTANCES = ("1", "gpu")  # template instances: an index and a name
SUPERVISOR_EXTRA_STOP = 5.0  # the supervisor waits --drain-timeout + 5 s for its processes
SECRET = "deploy-test-secret-0123456789abcdef"


# ----------------------------------------------------------------------------- helpers
def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values in order]}} (continuation lines joined)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    logical = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not logical and (not stripped or stripped[0] in "#;"):
            continue
        if stripped.endswith("\\"):
            logical += stripped[:-1] + " "
            continue
        line, logical = logical + stripped, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}: {line!r} before any [section]"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not KEY=VALUE: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(unit: dict, section: str, key: str) -> str:
    values = unit.get(section, {}).get(key, [])
    assert values, f"[{section}] {key}= is missing"
    return values[-1]


def read_env_file(path: Path) -> dict[str, str]:
    """systemd EnvironmentFile= syntax (KEY=VALUE lines, # comments, optional quotes)."""
    env: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), f"{path}:{number}: not KEY=VALUE: {raw!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key] = value
    return env


def unit_environment(unit: dict) -> dict[str, str]:
    """Environment= assignments of a unit (each value is a space-separated list of K=V)."""
    env: dict[str, str] = {}
    for value in unit.get("Service", {}).get("Environment", []):
        for item in shlex.split(value):
            key, _, val = item.partition("=")
            env[key] = val
    return env


def timespan(text: str) -> float:
    """Seconds in a systemd/compose time span: 45, 45s, 1min 30s, 1m30s, 500ms, 2h."""
    units = {"": 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text.strip())
    assert parts and "".join(n + u for n, u in parts) == re.sub(r"\s+", "", text), f"bad time span {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def expand_specifiers(text: str, instance: str) -> str:
    """Replace the systemd specifiers our units use; an unexpected one fails the test."""
    values = {"i": instance, "I": instance, "l": "labpc07", "H": "labpc07.lab.example", "%": "%",
              "n": f"jobsched-worker@{instance}.service", "p": "jobsched-worker"}

    def replace(match: re.Match) -> str:
        assert match.group(1) in values, f"unexpected specifier %{match.group(1)} in {text!r}"
        return values[match.group(1)]

    return re.sub(r"%(.)", replace, text)


def exec_argv(line: str, env: dict[str, str], instance: str = "1") -> list[str]:
    """ExecStart= value -> argv: prefixes dropped, specifiers and $VAR / ${VAR} expanded."""
    line = line.lstrip("-@:+!")
    line = expand_specifiers(line, instance)
    line = re.sub(r"\$\{(\w+)\}", lambda m: shlex.quote(env.get(m.group(1), "")), line)
    line = re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), ""), line)  # $VAR splits into words
    return shlex.split(line)


@contextmanager
def daemon_environment(env: dict[str, str]) -> Iterator[None]:
    """os.environ as a daemon given ``env`` would see it: no inherited JOBSCHED_* and no
    system or user config file, so only the deployment's own settings count."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("JOBSCHED_") and k != "CREDENTIALS_DIRECTORY"}
    clean.update(env)
    with mock.patch.dict(os.environ, clean, clear=True), mock.patch.object(config_module, "SYSTEM_FILES", ()):
        yield


def check_command(argv: list[str], env: dict[str, str] | None = None, *, where: str):
    """Check one daemon command line against the real CLI; returns (kind, resolved options).

    ``build_parser().parse_args(argv)`` must not exit, the settings in ``env`` must be
    valid for it (``config.resolve``, as the daemon itself does), and no secret may be on
    the command line."""
    assert argv, f"{where}: empty command"
    program = Path(argv[0]).name
    assert program in CLIS, f"{where}: {argv[0]!r} is not a jobsched daemon"
    module, section = CLIS[program]
    args = argv[1:]
    for i, arg in enumerate(args):
        assert "JOBSCHED_SECRET=" not in arg, f"{where}: a secret on the command line: {argv}"
        if arg.startswith("--secret"):
            # argparse accepts any unambiguous prefix, so "--secret X" would mean --secret-file X
            assert arg == "--secret-file" or arg.startswith("--secret-file="), f"{where}: {arg!r} on the command line"
            value = arg.partition("=")[2] if "=" in arg else (args[i + 1] if i + 1 < len(args) else "")
            assert value.startswith("/"), f"{where}: --secret-file takes a path, got {value!r}"
    try:
        module.build_parser().parse_args(args)
    except SystemExit as exc:  # argparse has printed why to stderr (shown by pytest)
        pytest.fail(f"{where}: {program} rejects {args} (exit {exc.code})")
    with daemon_environment(env or {}):
        try:
            resolved, _sources = config_module.resolve(module.build_parser(), args, section)
        except config_module.ConfigError as exc:
            pytest.fail(f"{where}: {program} {args}: {exc}")
        except SystemExit as exc:
            pytest.fail(f"{where}: {program} rejects {args} (exit {exc.code})")
    if section == "worker":
        assert resolved.scheduler or resolved.scheduler_file, f"{where}: the worker has no scheduler address"
        if resolved.scheduler:
            parse_address(resolved.scheduler)
        parse_memory_limit(resolved.memory_limit, int(resolved.nworkers))
    return section, resolved


def unit_commands(path: Path, instance: str = "1") -> list[tuple[str, list[str], dict[str, str]]]:
    """(key, argv, environment) of every Exec*= line of a unit, with the env files applied."""
    unit = read_unit(path)
    env = read_env_file(ENV_FILE)
    env.update(unit_environment(unit))
    commands = []
    for key, values in unit["Service"].items():
        if key.startswith("Exec"):
            for value in values:
                commands.append((key, exec_argv(value, env, instance), env))
    return commands


def daemon_options() -> set[str]:
    """Every JOBSCHED_<OPTION> variable one of the daemons reads."""
    names = set()
    for module, _section in CLIS.values():
        for action in module.build_parser()._actions:  # noqa: SLF001
            if action.dest not in ("help", "print_config"):
                names.add(config_module.env_name(action.dest))
    return names


def console_scripts() -> set[str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return set(tomllib.load(f)["project"]["scripts"])


def kill_group(proc: subprocess.Popen) -> None:
    """End a process group we started: SIGTERM, up to 10 s for the leader to exit (a worker
    supervisor drains its processes first), then SIGKILL for whatever is left; reap the leader."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBSCHED_") and k != "CREDENTIALS_DIRECTORY"}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def require_console_scripts() -> None:
    for name in CLIS:
        if not os.access(BIN_DIR / name, os.X_OK):
            pytest.skip(f"{BIN_DIR / name} is not installed (install the project with pip)")


# ---------------------------------------------------------------------- systemd units
def test_env_file_sets_only_daemon_options_and_no_secret():
    env = read_env_file(ENV_FILE)
    known = daemon_options()
    for key in env:
        assert key not in ("JOBSCHED_SECRET", "JOBSCHED_SECRET_FILE"), f"{key} in {ENV_FILE.name}: use LoadCredential="
        if key.startswith("JOBSCHED_"):
            assert key in known, f"{ENV_FILE.name}: {key} is no option of jobsched-scheduler or jobsched-worker"
    assert "JOBSCHED_SCHEDULER" in env and "JOBSCHED_HOST" in env


@pytest.mark.parametrize("instance", INSTANCES)
def test_unit_command_lines_are_accepted(instance):
    seen = set()
    scripts = console_scripts()
    for path in (SCHEDULER_UNIT, WORKER_UNIT):
        unit = read_unit(path)
        commands = unit_commands(path, instance)
        assert [k for k, _, _ in commands].count("ExecStart") == 1, f"{path.name}: one ExecStart="
        for key, argv, env in commands:
            where = f"{path.name} {key}="
            assert argv[0].startswith(UNIT_VENV_BIN), f"{where} should run the venv's console script"
            assert Path(argv[0]).name in scripts, f"{where}: {argv[0]} is no console script of the project"
            section, args = check_command(argv, env, where=where)
            seen.add(section)
            if section == "scheduler":
                # a non-loopback address needs the secret: the unit must hand it over
                if not is_loopback_host(args.host):
                    assert unit["Service"].get("LoadCredential"), f"{where}: binds {args.host} without a secret"
            else:
                assert instance in args.name, f"{where}: worker name {args.name!r} ignores the instance"
    assert seen == {"scheduler", "worker"}


def test_unit_settings():
    env = read_env_file(ENV_FILE)
    users = set()
    for path in (SCHEDULER_UNIT, WORKER_UNIT):
        unit = read_unit(path)
        service = unit["Service"]
        where = path.name
        users.add(one(unit, "Service", "User"))
        assert "/etc/jobsched/jobsched.env" in service.get("EnvironmentFile", []), where
        assert one(unit, "Service", "Restart") == "always", where
        assert timespan(one(unit, "Service", "RestartSec")) >= 1, where
        assert timespan(one(unit, "Unit", "StartLimitIntervalSec")) > 0, f"{where}: StartLimitIntervalSec in [Unit]"
        assert int(one(unit, "Unit", "StartLimitBurst")) >= 3, where
        assert one(unit, "Service", "KillMode") == "mixed", where
        assert one(unit, "Service", "NoNewPrivileges") == "yes", where
        assert one(unit, "Service", "ProtectSystem") == "strict", where
        assert one(unit, "Service", "PrivateTmp") == "yes", where
        assert one(unit, "Service", "ProtectHome") in ("yes", "read-only", "tmpfs"), where
        assert one(unit, "Install", "WantedBy") == "multi-user.target", where
        for key in unit_environment(unit):
            assert key not in ("JOBSCHED_SECRET", "JOBSCHED_SECRET_FILE"), f"{where}: Environment={key}"
        credentials = service.get("LoadCredential", [])
        assert credentials == ["jobsched-secret:/etc/jobsched/secret"], f"{where}: LoadCredential= {credentials}"
    assert users == {"jobsched"}

    worker = read_unit(WORKER_UNIT)
    # stopping lets the supervisor drain its processes: TimeoutStopSec covers drain + its 5 s + margin
    with daemon_environment(env):
        args, _ = config_module.resolve(worker_cli.build_parser(), [], "worker")
    stop = timespan(one(worker, "Service", "TimeoutStopSec"))
    assert stop >= float(args.drain_timeout) + SUPERVISOR_EXTRA_STOP + 5, (
        f"TimeoutStopSec={stop} s leaves no room for --drain-timeout {args.drain_timeout} s")
    # the example memory cap that --memory-limit auto divides between the processes
    assert one(worker, "Service", "MemoryMax")
    assert args.memory_limit == "auto"
    assert one(worker, "Service", "OOMPolicy") == "continue"
    # ProtectHome=yes would hide users' data under /home from the tasks
    assert one(worker, "Service", "ProtectHome") == "read-only"


def test_credential_name_is_the_one_jobsched_reads(tmp_path):
    name, _, source = read_unit(SCHEDULER_UNIT)["Service"]["LoadCredential"][0].partition(":")
    assert source.startswith("/etc/jobsched/")
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / name).write_text(SECRET + "\n")
    (credentials / name).chmod(0o400)  # what systemd gives the service
    with daemon_environment({"CREDENTIALS_DIRECTORY": str(credentials)}):
        assert load_secret() == SECRET.encode()


def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed")
    return exe


def _units_for_systemd(tmp_path: Path) -> Path:
    """Copies of the units whose ExecStart= runs this venv's real console scripts (verify
    checks that the binary exists and is executable)."""
    require_console_scripts()
    out = tmp_path / "units"
    out.mkdir()
    for path in (SCHEDULER_UNIT, WORKER_UNIT):
        text = path.read_text()
        assert UNIT_VENV_BIN in text
        (out / path.name).write_text(text.replace(UNIT_VENV_BIN, str(BIN_DIR) + "/"))
    return out


def test_systemd_analyze_verify(tmp_path):
    exe = _systemd_analyze()
    probe = tmp_path / "probe" / "jobsched-probe.service"
    probe.parent.mkdir()
    probe.write_text("[Unit]\nDescription=probe\n[Service]\nExecStart=/bin/true\n")
    try:
        ran = subprocess.run([exe, "verify", "--man=no", str(probe)], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"systemd-analyze cannot run here: {exc}")
    if ran.returncode != 0:
        pytest.skip(f"systemd-analyze verify does not work here: {ran.stderr.strip()[:500]}")

    units = _units_for_systemd(tmp_path)
    targets = [str(units / SCHEDULER_UNIT.name), *(str(units / f"jobsched-worker@{i}.service") for i in INSTANCES)]
    ran = subprocess.run([exe, "verify", "--man=no", *targets], capture_output=True, text=True, timeout=60)
    ours = [line for line in (ran.stdout + ran.stderr).splitlines() if str(units) in line or "jobsched" in line]
    assert ran.returncode == 0 and not ours, f"systemd-analyze verify:\n{ran.stdout}{ran.stderr}"


def test_systemd_analyze_security_exposure(tmp_path):
    """The hardening is there: systemd's own exposure score (0 best, 10 worst)."""
    exe = _systemd_analyze()
    units = _units_for_systemd(tmp_path)
    limits = {SCHEDULER_UNIT.name: 3.0, "jobsched-worker@1.service": 5.0}  # workers run user code
    for name, limit in limits.items():
        try:
            ran = subprocess.run([exe, "security", "--offline=true", "--no-pager", str(units / name)],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"systemd-analyze security cannot run here: {exc}")
        match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", ran.stdout)
        if match is None:
            pytest.skip(f"systemd-analyze security --offline is not supported here: {ran.stderr.strip()[:300]}")
        assert float(match.group(1)) <= limit, f"{name}: exposure {match.group(1)} > {limit}\n{ran.stdout}"


def test_sysusers_file_creates_the_unit_user(tmp_path):
    exe = shutil.which("systemd-sysusers")
    if exe is None:
        pytest.skip("systemd-sysusers is not installed")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    ran = subprocess.run([exe, f"--root={root}", str(SYSUSERS)], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    users = {line.split(":")[0]: line.split(":") for line in (root / "etc" / "passwd").read_text().splitlines()}
    user = one(read_unit(WORKER_UNIT), "Service", "User")
    assert user in users, f"{SYSUSERS.name} does not create {user!r}"
    assert users[user][5] == "/var/lib/jobsched"
    assert users[user][6].endswith("nologin")


# ----------------------------------------------------------------------------- SLURM
SBATCH_SAMPLES = {
    "SECRET_FILE": "/shared/jobsched/slurm-42/secret",
    "SCHED_FILE": "/shared/jobsched/slurm-42/scheduler.json",
    "SCHED_HOST": "node001",
    "SCHED_PORT": "0",
    "HEAD_NODE": "node001",
    "NNODES": "2",
    "CPUS": "8",
    "NWORKERS": "8",
    "NTHREADS": "1",
    "MEMORY_LIMIT": "3686MiB",
}


def sbatch_commands() -> list[tuple[int, list[str]]]:
    """(line number, argv) of every daemon invocation in the sbatch script, with the
    script's variables replaced by sample values (an unknown variable fails the test)."""
    commands = []
    logical, start = "", 0
    for number, raw in enumerate(SBATCH.read_text().splitlines(), 1):
        if not logical:
            start = number
        if raw.rstrip().endswith("\\"):
            logical += raw.rstrip()[:-1] + " "
            continue
        line, logical = (logical + raw).strip(), ""
        if line.startswith("#") or not re.search(r"(^|\s)jobsched-(scheduler|worker)\s", line + " "):
            continue

        def sample(match: re.Match, start: int = start) -> str:
            name = match.group(1) or match.group(2)
            assert name in SBATCH_SAMPLES, f"jobsched.sbatch:{start}: no sample value for ${name}"
            return SBATCH_SAMPLES[name]

        line = re.sub(r"\$\{(\w+)\}|\$(\w+)", sample, line)
        words = shlex.split(line)
        if words and words[-1] == "&":
            words.pop()
        index = next(i for i, w in enumerate(words) if Path(w).name in CLIS)
        commands.append((start, words[index:]))
    return commands


def test_sbatch_syntax():
    bash = shutil.which("bash")
    assert bash, "bash is needed for the sbatch script"
    ran = subprocess.run([bash, "-n", str(SBATCH)], capture_output=True, text=True, timeout=30)
    assert ran.returncode == 0, ran.stderr
    assert SBATCH.read_text().startswith("#!/bin/bash\n")
    assert re.search(r"^#SBATCH --nodes=", SBATCH.read_text(), re.M)
    shellcheck = shutil.which("shellcheck")
    if shellcheck:  # optional: a finer lint where it is installed
        ran = subprocess.run([shellcheck, "--shell=bash", str(SBATCH)], capture_output=True, text=True, timeout=60)
        assert ran.returncode == 0, ran.stdout + ran.stderr


def test_sbatch_command_lines_are_accepted():
    commands = sbatch_commands()
    kinds = []
    for line, argv in commands:
        section, args = check_command(argv, where=f"jobsched.sbatch:{line}")
        if section == "scheduler" and args.generate_secret:
            kinds.append("generate-secret")
            continue
        assert args.scheduler_file == SBATCH_SAMPLES["SCHED_FILE"], f"jobsched.sbatch:{line}: no --scheduler-file"
        kinds.append(section)
    assert sorted(kinds) == ["generate-secret", "scheduler", "worker"]


FAKE_SRUN = '''#!{python}
"""srun stand-in: drops srun's options, records the command, runs it on this machine."""
import json, os, sys
argv = sys.argv[1:]
options = []
while argv and argv[0].startswith("-"):
    options.append(argv.pop(0))
secret = ""
try:
    with open(os.environ.get("JOBSCHED_SECRET_FILE", "")) as f:
        secret = f.read().strip()
except OSError:
    pass
record = {{
    "options": options, "argv": argv, "pid": os.getpid(),
    "secret_in_argv": bool(secret) and any(secret in a for a in argv),
    "secret_in_env": "JOBSCHED_SECRET" in os.environ,
    "secret_file": os.environ.get("JOBSCHED_SECRET_FILE"),
}}
with open(os.environ["FAKE_SRUN_LOG"], "a") as f:
    f.write(json.dumps(record) + "\\n")
os.execvp(argv[0], argv)
'''

FAKE_SCONTROL = """#!/bin/sh
[ "$1" = show ] && [ "$2" = hostnames ] && { echo 127.0.0.1; exit 0; }
echo "scontrol stand-in: unsupported: $*" >&2
exit 1
"""

USER_SCRIPT = """
import os
import sys

from joblib import Parallel, delayed, parallel_config

import jobsched

client = jobsched.Client(scheduler_file=os.environ["JOBSCHED_SCHEDULER_FILE"], timeout=20)
with parallel_config(backend="cluster"):
    squares = Parallel(n_jobs=-1)(delayed(pow)(i, 2) for i in range(20))
    pids = set(Parallel(n_jobs=-1)(delayed(os.getpid)() for _ in range(8)))
assert squares == [i * i for i in range(20)], squares
# it ran on the job's workers, not on an embedded local cluster
assert pids <= {w["pid"] for w in client.scheduler_info()["workers"].values()}, pids
print("RESULT", sum(squares), len(client.scheduler_info()["workers"]), sys.argv[1:], flush=True)
client.close()
sys.exit(7)
"""


def run_sbatch(tmp_path: Path, **settings: str) -> tuple[int, str, list[dict], Path]:
    """Run the sbatch script for real on one 'node' (127.0.0.1): srun and scontrol are
    stand-ins, the scheduler, worker, secret and scheduler file are real.
    Returns (exit status, output, the srun stand-in's records, the job's shared directory)."""
    require_console_scripts()
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text(FAKE_SRUN.format(python=sys.executable))
    (fake_bin / "scontrol").write_text(FAKE_SCONTROL)
    for tool in ("srun", "scontrol"):
        (fake_bin / tool).chmod(0o755)
    (tmp_path / "home").mkdir()
    script = tmp_path / "user_script.py"
    script.write_text(USER_SCRIPT)
    shared = tmp_path / "shared"
    log = tmp_path / "srun.jsonl"
    env = clean_env(
        PATH=os.pathsep.join([str(fake_bin), str(BIN_DIR), os.environ.get("PATH", "/usr/bin:/bin")]),
        HOME=str(tmp_path / "home"),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="127.0.0.1",
        SLURM_JOB_NUM_NODES="1",
        SLURM_CPUS_PER_TASK="2",  # two worker processes: with a single slot joblib runs in the caller
        JOBSCHED_SHARED_DIR=str(shared),
        JOBSCHED_WAIT_WORKERS="30",
        JOBSCHED_DASHBOARD_ADDRESS="127.0.0.1:0",  # a free port: several test runs may share a machine
        JOBSCHED_SECRET="must-not-be-used",  # from the submitting shell: the script drops it
        FAKE_SRUN_LOG=str(log),
        **settings,
    )
    proc = subprocess.Popen(["bash", str(SBATCH), str(script), "--alpha", "1"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=90)
    finally:
        kill_group(proc)
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc.returncode, output, records, shared / f"slurm-{env['SLURM_JOB_ID']}"


def assert_job_cleaned_up(records: list[dict], job_dir: Path) -> None:
    assert not job_dir.exists(), "the job's directory (secret, scheduler file) outlived the job"
    for record in records:  # every daemon the script started has ended
        assert not psutil.pid_exists(record["pid"]) or psutil.Process(record["pid"]).status() == psutil.STATUS_ZOMBIE


def test_sbatch_runs_a_joblib_call_through_the_scheduler_file(tmp_path):
    status, output, records, job_dir = run_sbatch(tmp_path)
    assert status == 7, output  # the user script's own exit status is the job's
    assert "RESULT 2470 2 ['--alpha', '1']" in output, output
    assert "2 of 2 worker processes joined" in output, output

    assert [Path(r["argv"][0]).name for r in records] == ["jobsched-scheduler", "jobsched-worker"], records
    for record in records:
        where = f"srun {' '.join(record['options'])}"
        assert "--overlap" in record["options"], f"{where}: steps must share the allocation"
        assert not record["secret_in_argv"] and not record["secret_in_env"], record
        assert record["secret_file"] == str(job_dir / "secret"), record
        section, args = check_command(record["argv"], where=where)
        assert args.scheduler_file == str(job_dir / "scheduler.json")
        if section == "scheduler":
            assert args.host == "127.0.0.1" and args.port == 0
    assert_job_cleaned_up(records, job_dir)


def test_sbatch_fails_fast_and_cleans_up_when_the_workers_cannot_start(tmp_path):
    status, output, records, job_dir = run_sbatch(tmp_path, JOBSCHED_MEMORY_LIMIT="plenty")
    assert status != 0, output
    assert "the workers' step ended" in output, output
    assert "RESULT" not in output, output
    assert_job_cleaned_up(records, job_dir)


def test_scheduler_file_handshake_with_console_scripts(tmp_path):
    """What the sbatch script relies on: the scheduler writes its address to the file once it
    listens (port 0: a free one), a worker and a Client find it there, and the file is gone
    once the scheduler stops."""
    require_console_scripts()
    path = tmp_path / "scheduler.json"
    env = clean_env(JOBSCHED_SECRET=SECRET, JOBSCHED_DASHBOARD_ADDRESS="none", HOME=str(tmp_path))
    procs: list[subprocess.Popen] = []

    def spawn(*argv: str) -> subprocess.Popen:
        with open(tmp_path / f"{Path(argv[0]).name}.log", "wb") as log:
            procs.append(subprocess.Popen(argv, env=env, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
        return procs[-1]

    def logs() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in sorted(tmp_path.glob("*.log")))

    try:
        scheduler = spawn(str(BIN_DIR / "jobsched-scheduler"), "--host", "127.0.0.1", "--port", "0",
                          "--scheduler-file", str(path))
        deadline = time.monotonic() + 30
        while not path.exists():
            assert scheduler.poll() is None, logs()
            assert time.monotonic() < deadline, f"no scheduler file after 30 s\n{logs()}"
            time.sleep(0.05)
        info = json.loads(path.read_text())
        address = parse_address(info["address"])
        assert address.host == "127.0.0.1" and address.port > 0, info

        # two processes: with a single slot joblib would run the batches in this process
        spawn(str(BIN_DIR / "jobsched-worker"), "--scheduler-file", str(path), "--name", "deploy-test",
              "--nworkers", "2", "--death-timeout", "20")
        with jobsched.Client(scheduler_file=str(path), secret=SECRET, timeout=20) as client:
            client.wait_for_workers(2, timeout=30)
            workers = list(client.scheduler_info()["workers"].values())
            assert sorted(w["name"] for w in workers) == ["deploy-test-0", "deploy-test-1"], workers
            with parallel_config(backend="cluster", scheduler=client):
                assert Parallel(n_jobs=-1)(delayed(pow)(i, 3) for i in range(10)) == [i**3 for i in range(10)]
                pids = set(Parallel(n_jobs=-1)(delayed(os.getpid)() for _ in range(8)))
            assert pids and pids <= {w["pid"] for w in workers}, "the batches did not run on the workers"

        os.killpg(scheduler.pid, signal.SIGTERM)
        assert scheduler.wait(20) == 0, logs()
        assert not path.exists(), "the scheduler left its file behind"
    finally:
        for proc in reversed(procs):
            kill_group(proc)


# ------------------------------------------------------------------------ containers
def dockerfile_instructions() -> list[tuple[str, str]]:
    instructions, logical = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not logical and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            logical += stripped[:-1] + " "
            continue
        line, logical = logical + stripped, ""
        word, _, rest = line.partition(" ")
        instructions.append((word.upper(), rest.strip()))
    return instructions


def test_dockerfile():
    instructions = dockerfile_instructions()
    cmds = [rest for word, rest in instructions if word == "CMD"]
    assert len(cmds) == 1 and not [r for w, r in instructions if w == "ENTRYPOINT"]
    argv = json.loads(cmds[0])  # exec form: the daemon is PID 1's child under --init, no shell
    section, args = check_command(argv, {"JOBSCHED_SECRET_FILE": "/run/secrets/jobsched-secret"}, where="Dockerfile CMD")
    assert section == "scheduler" and args.host == "0.0.0.0"
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert "pip install /src" in runs, "install the project from the repository with pip"
    assert ("COPY", ". /src") in instructions
    users = [rest for word, rest in instructions if word == "USER"]
    assert users and users[-1] not in ("root", "0"), "the daemons must not run as root"
    for word, rest in instructions:
        if word in ("ENV", "ARG", "LABEL"):
            assert "SECRET" not in rest.upper(), f"{word} {rest}: no secret in the image"
    exposed = {p for word, rest in instructions if word == "EXPOSE" for p in rest.split()}
    assert {"8686", "8687"} <= exposed


def test_dockerignore_keeps_the_package_and_drops_the_secret():
    from fnmatch import fnmatch

    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def ignored(name: str) -> bool:
        return any(fnmatch(name, p) or fnmatch(name, p.removeprefix("**/")) for p in patterns)

    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)
    needed = {"pyproject.toml", project["project"]["readme"], "__init__.py",
              *project["tool"]["setuptools"]["package-dir"].values()}
    for name in needed - {"."}:
        assert not ignored(name), f"{DOCKERIGNORE.name} drops {name}, which pip install needs"
    for name in (".git", "jobsched-secret", "deploy/docker/jobsched-secret", ".ci-venv"):
        assert ignored(name), f"{DOCKERIGNORE.name} should keep {name} out of the build context"
    gitignore = (DEPLOY / "docker" / ".gitignore").read_text().split()
    assert "jobsched-secret" in gitignore


def test_compose_wires_the_secret():
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load(COMPOSE.read_text())
    secrets = compose["secrets"]
    assert list(secrets) == ["jobsched-secret"]
    assert secrets["jobsched-secret"]["file"] == "./jobsched-secret"
    services = compose["services"]
    schedulers = {name: s for name, s in services.items() if "jobsched-scheduler" in s["command"][0]}
    workers = {name: s for name, s in services.items() if "jobsched-worker" in s["command"][0]}
    assert len(schedulers) == 1 and len(workers) >= 2 and len(services) == len(schedulers) + len(workers)
    (sched_name, sched), = schedulers.items()
    names = set()
    scheduler_port = None
    for name, service in sorted(services.items(), key=lambda item: item[0] not in schedulers):
        where = f"compose.yaml {name}"
        # the secret: a compose secret at /run/secrets/<name>, named by JOBSCHED_SECRET_FILE
        mounted = [s if isinstance(s, str) else s["source"] for s in service.get("secrets", [])]
        assert mounted == ["jobsched-secret"], f"{where}: secrets {mounted}"
        env = {k: str(v) for k, v in service.get("environment", {}).items()}
        assert "JOBSCHED_SECRET" not in env, f"{where}: the secret must not be in the environment"
        assert env.get("JOBSCHED_SECRET_FILE") == "/run/secrets/jobsched-secret", where
        assert service.get("init") is True, f"{where}: an init reaps the tasks' orphans"
        assert "build" in service or "image" in service
        section, args = check_command([str(a) for a in service["command"]], env, where=where)
        if section == "scheduler":
            assert args.host == "0.0.0.0", f"{where}: must listen on the network, not loopback"
            scheduler_port = args.port
            assert service.get("healthcheck"), f"{where}: workers wait for its healthcheck"
        else:
            address = parse_address(args.scheduler)
            assert address.host in (sched_name, sched.get("hostname")), f"{where}: connects to {address}"
            assert address.port == scheduler_port, f"{where}: connects to {address}"
            assert args.name and args.name not in names, f"{where}: worker names must be unique"
            names.add(args.name)
            assert args.memory_limit == "auto" and service.get("mem_limit"), where
            stop = timespan(str(service["stop_grace_period"]))
            assert stop >= float(args.drain_timeout) + SUPERVISOR_EXTRA_STOP + 5, f"{where}: stop_grace_period {stop}"
            assert service["depends_on"][sched_name]["condition"] == "service_healthy"
    build = sched["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == ROOT and (context / build["dockerfile"]).resolve() == DOCKERFILE.resolve()
