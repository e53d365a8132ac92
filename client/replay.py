"""Replay in the caller what a task printed, warned and logged on its worker.

Events come from ``worker/capture.py``.  Warnings go through the caller's own
``warnings`` machinery (its filters, ``catch_warnings``, ``pytest.warns``), with a
registry per source file so a warning shows once per location as in a local
run; log records go to the caller's logger of the same name if it is enabled
for their level.
"""

from __future__ import annotations

import importlib
import logging
import sys
import warnings
from collections.abc import Iterable

_registries: dict[str, dict] = {}


def _warning_category(module: str, qualname: str) -> type[Warning]:
    try:
        obj = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except Exception:  # noqa: BLE001 - importing a worker's module may fail any way: fall back to UserWarning
        return UserWarning
    return obj if isinstance(obj, type) and issubclass(obj, Warning) else UserWarning


def replay(events: Iterable[tuple]) -> None:
    """Re-issue events in order.  A warning turned into an error by the caller's filters raises."""
    for event in events:
        kind = event[0]
        if kind == "stdout":
            sys.stdout.write(event[1])
        elif kind == "stderr":
            sys.stderr.write(event[1])
        elif kind == "warning":
            _, module, qualname, message, filename, lineno = event
            category = _warning_category(module, qualname)
            if category is UserWarning and (module, qualname) != ("builtins", "UserWarning"):
                message = f"{module}.{qualname}: {message}"
            registry = _registries.setdefault(filename, {})
            warnings.warn_explicit(message, category, filename, lineno, module=_module_name(filename), registry=registry)
        elif kind == "log":
            _, name, levelno, message, pathname, lineno, func_name = event
            logger = logging.getLogger(name)
            if logger.isEnabledFor(levelno):
                record = logger.makeRecord(name, levelno, pathname, lineno, message, (), None, func_name)
                logger.handle(record)


def _module_name(filename: str) -> str:
    name = filename.rsplit("/", 1)[-1]
    return name[:-3] if name.endswith(".py") else name
