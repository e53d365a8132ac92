"""Daemon configuration: built-in defaults, TOML files, ``JOBSCHED_*`` variables and flags.

Precedence, lowest to highest: the parser's defaults; ``/etc/jobsched/jobsched.toml``;
``~/.config/jobsched/jobsched.toml``; the file given with ``--config``; environment
variables ``JOBSCHED_<OPTION>``; the command line.  A TOML file holds options by
their long-flag names, at the top level (shared by both daemons) or in a
``[scheduler]`` / ``[worker]`` table::

    log-level = "INFO"
    [worker]
    nthreads = 4
    memory-limit = "auto"

Every value goes through the same check as its flag; an unknown key or a bad
value stops the daemon with a message naming the option and where it came from.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..protocol.errors import JobschedError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

SYSTEM_FILES = ("/etc/jobsched/jobsched.toml", "~/.config/jobsched/jobsched.toml")
SECTIONS = ("scheduler", "worker")
_NOT_OPTIONS = {"help", "config", "print_config"}
SHARED_OPTIONS = {"secret_file", "tls_cert", "tls_key", "tls_ca_file", "log_level", "scheduler_file"}


class ConfigError(JobschedError, ValueError):
    """A configuration value is unusable; the message names the option and its source."""


def env_name(dest: str) -> str:
    return "JOBSCHED_" + dest.upper()


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in _NOT_OPTIONS}  # noqa: SLF001


def _convert(action: argparse.Action, value: Any, where: str) -> Any:
    name = action.option_strings[-1] if action.option_strings else action.dest
    if isinstance(action, argparse._StoreTrueAction):  # noqa: SLF001
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"{name} from {where}: expected true or false, got {value!r}")
    if isinstance(action, argparse._AppendAction):  # noqa: SLF001
        # a repeatable option: a list in a config file, comma-separated in the environment
        items = value if isinstance(value, list) else [v for v in str(value).split(",") if v.strip()]
        return [_convert_one(action, item, name, where) for item in items]
    return _convert_one(action, value, name, where)


def _convert_one(action: argparse.Action, value: Any, name: str, where: str) -> Any:
    try:
        result = action.type(str(value)) if callable(action.type) else (value if isinstance(value, str) else str(value))
    except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
        raise ConfigError(f"{name} from {where}: {exc}") from None
    if action.choices is not None and result not in action.choices:
        raise ConfigError(f"{name} from {where}: {result!r} is not one of {', '.join(map(str, action.choices))}")
    return result


def read_toml(path: str, what: str, error: type[JobschedError]) -> dict[str, Any]:
    """The TOML document in ``path``, or ``error`` naming ``what`` it is and the problem."""
    try:
        with open(path, "rb") as f:
            data: dict[str, Any] = tomllib.load(f)
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{what} {path} is not valid TOML: {exc}") from None
    return data


def _read_file(path: str, section: str, options: dict[str, argparse.Action]) -> dict[str, Any]:
    data = read_toml(path, "config file", ConfigError)
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: [{key}] must be a table")
            if key == section:
                for sub_key, sub_value in value.items():
                    values[_dest(sub_key, path, options, f"[{key}] ")] = sub_value
            continue
        dest = key.replace("-", "_")
        if dest not in SHARED_OPTIONS:
            raise ConfigError(
                f"{path}: unknown top-level option {key!r}; top-level keys are the shared options "
                f"({', '.join(sorted(o.replace('_', '-') for o in SHARED_OPTIONS))}), others go under [scheduler] or [worker]"
            )
        if dest in options:
            values[dest] = value
    return values


def _dest(key: str, path: str, options: dict[str, argparse.Action], prefix: str) -> str:
    dest = key.replace("-", "_")
    if dest not in options:
        raise ConfigError(f"{path}: unknown option {prefix}{key!r}")
    return dest


def resolve(parser: argparse.ArgumentParser, argv: list[str] | None, section: str) -> tuple[argparse.Namespace, dict[str, str]]:
    """Parse ``argv`` with every layer applied; returns the options and where each came from."""
    options = _options(parser)
    given = _explicit_args(parser, argv)
    values = {dest: action.default for dest, action in options.items()}
    sources = {dest: "default" for dest in options}
    files = [os.path.expanduser(p) for p in SYSTEM_FILES if os.path.exists(os.path.expanduser(p))]
    config_path = given.get("config") or os.environ.get("JOBSCHED_CONFIG")
    if config_path:
        files.append(config_path)
    for path in files:
        for dest, value in _read_file(path, section, options).items():
            values[dest] = _convert(options[dest], value, path)
            sources[dest] = path
    for dest, action in options.items():
        variable = env_name(dest)
        if variable in os.environ:
            values[dest] = _convert(action, os.environ[variable], f"${variable}")
            sources[dest] = f"${variable}"
    for dest, value in given.items():
        if dest in options:
            values[dest] = value
            sources[dest] = "command line"
    values["config"] = config_path
    values["print_config"] = given.get("print_config", False)
    return argparse.Namespace(**values), sources


def _explicit_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> dict[str, Any]:
    """The options the command line itself sets (parsed with every default suppressed)."""
    saved = [(action, action.default) for action in parser._actions]  # noqa: SLF001
    try:
        for action, _ in saved:
            if action.dest != "help":
                action.default = argparse.SUPPRESS
        return vars(parser.parse_args(argv))
    finally:
        for action, default in saved:
            action.default = default


def parse_daemon_args(parser: argparse.ArgumentParser, argv: list[str] | None, section: str) -> argparse.Namespace:
    """``resolve`` for a daemon's ``main``: a bad value ends it with status 2 and a message
    naming the option; ``--print-config`` prints the configuration and ends it with status 0."""
    try:
        args, sources = resolve(parser, argv, section)
    except ConfigError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.print_config:
        print(format_config(args, sources))
        raise SystemExit(0)
    return args


def format_config(args: argparse.Namespace, sources: dict[str, str]) -> str:
    width = max(len(k) for k in sources)
    lines = [f"{dest.replace('_', '-'):<{width}}  {getattr(args, dest)!r:<30}  # {sources[dest]}" for dest in sorted(sources)]
    return "\n".join(lines)
