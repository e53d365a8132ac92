"""The users file: who may connect with a token, and their share of the cluster.

TOML, kept by the admin with ``jobsched-scheduler --users-file PATH --add-user NAME`` /
``--remove-user NAME``, mode 0600 (a file group or others can read is refused, as a
secret file is)::

    [users."alice"]
    token = "alice:..."      # NAME:SECRET, as --add-user printed it
    weight = 1.0             # her share of the slots against other users with work (default 1)
    max-slots = 0            # cap on her running batches (default 0: none)

Writes go to a temporary file in the same folder, created mode 0600, then renamed
over the old one: a reader (the scheduler on SIGHUP) sees the old file or the new one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
from dataclasses import dataclass, replace
from typing import Any

from .config import read_toml
from .secret import SecretError, check_private, check_strength
from .tokens import TOKEN_FORM, new_token, token_user, valid_user_name

_KEYS = {"token", "weight", "max-slots"}


class UsersFileError(SecretError):
    """The users file cannot be used, or an edit of it is wrong; the message says why."""


@dataclass(frozen=True)
class User:
    token: str
    weight: float = 1.0
    max_slots: int = 0  # 0: no cap


Users = dict[str, User]


def _check_name(name: str) -> None:
    if not valid_user_name(name):
        raise UsersFileError(f"a user name is 1 to 64 letters, digits, '.', '_' or '-', not {name!r}")


def check_weight(value: Any, where: str = "weight") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UsersFileError(f"{where} must be a positive number, not {value!r}")
    return float(value)


def check_max_slots(value: Any, where: str = "max-slots") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsersFileError(f"{where} must be a whole number >= 0 (0: no cap), not {value!r}")
    return value


def read_users(path: str) -> Users:
    """The users in ``path``; UsersFileError naming the file and the problem."""
    hint = "; create it with jobsched-scheduler --users-file PATH --add-user NAME" if not os.path.lexists(path) else ""
    check_private(path, "users file", UsersFileError, hint)
    return _parse(read_toml(path, "users file", UsersFileError), path)


def _parse(data: dict[str, Any], path: str) -> Users:
    unknown = set(data) - {"users"}
    if unknown:
        raise UsersFileError(f"users file {path}: unknown key(s) {', '.join(sorted(unknown))}; users go in [users.NAME]")
    table = data.get("users", {})
    if not isinstance(table, dict):
        raise UsersFileError(f"users file {path}: 'users' must be a table of [users.NAME] entries")
    users: Users = {}
    for name, entry in table.items():
        where = f"users file {path}: [users.{name}]"
        if not valid_user_name(name):
            raise UsersFileError(f"{where}: a user name is 1 to 64 letters, digits, '.', '_' or '-'")
        if not isinstance(entry, dict):
            raise UsersFileError(f"{where} must be a table (token, weight, max-slots)")
        extra = set(entry) - _KEYS
        if extra:
            raise UsersFileError(f"{where}: unknown key(s) {', '.join(sorted(extra))}; known: token, weight, max-slots")
        token = entry.get("token")
        if not isinstance(token, str) or token_user(token) is None:
            raise UsersFileError(f"{where}: token must be a string {TOKEN_FORM}")
        if token_user(token) != name:
            raise UsersFileError(f"{where}: the token names user {token_user(token)!r}, not {name!r}")
        # a hand-written token is held to the rule of the cluster secret (--add-user's pass by far)
        check_strength(token.partition(":")[2].encode(), f"{where} token", UsersFileError,
                       f"give the user a new one with: jobsched-scheduler --users-file {path} --add-user {name}")
        users[name] = User(token, check_weight(entry.get("weight", 1.0), f"{where} weight"),
                           check_max_slots(entry.get("max-slots", 0), f"{where} max-slots"))
    return users


def format_users(users: Users) -> str:
    lines = ["# jobsched users: edit with jobsched-scheduler --users-file PATH --add-user / --remove-user NAME,",
             "# then send the running scheduler SIGHUP to apply.  Keep this file mode 0600: it holds every token."]
    for name in sorted(users):
        user = users[name]
        # json's strings are valid TOML basic strings (names and tokens are plain ASCII anyway)
        lines += ["", f"[users.{json.dumps(name)}]", f"token = {json.dumps(user.token)}",
                  f"weight = {user.weight!r}", f"max-slots = {user.max_slots}"]
    return "\n".join(lines) + "\n"


def write_users(path: str, users: Users) -> None:
    """Replace ``path`` with ``users``, atomically, mode 0600 from the first byte on."""
    folder = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise UsersFileError(f"cannot write users file {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(format_users(users))
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise UsersFileError(f"cannot write users file {path}: {exc.strerror}") from None


def add_user(path: str, name: str, weight: float | None = None, max_slots: int | None = None) -> str:
    """Create user ``name`` in ``path`` (the file too, if missing), or give them a new token
    (keeping their weight and max-slots unless given); returns the new token."""
    _check_name(name)
    users = read_users(path) if os.path.lexists(path) else {}
    current = users.get(name, User(""))
    updated = replace(current, token=new_token(name))
    if weight is not None:
        updated = replace(updated, weight=check_weight(weight, "--weight"))
    if max_slots is not None:
        updated = replace(updated, max_slots=check_max_slots(max_slots, "--max-slots"))
    users[name] = updated
    write_users(path, users)
    return updated.token


def remove_user(path: str, name: str) -> None:
    """Remove user ``name`` from ``path``; UsersFileError if there is no such user."""
    users = read_users(path)
    if name not in users:
        known = ", ".join(sorted(users)) or "none"
        raise UsersFileError(f"no user {name!r} in users file {path} (its users: {known})")
    del users[name]
    write_users(path, users)


def revoked(before: Users, after: Users) -> frozenset[str]:
    """Users whose token no longer opens a connection: removed, or given a new token."""
    return frozenset(name for name, user in before.items() if name not in after or after[name].token != user.token)
