"""What a user token looks like: ``NAME:SECRET``, as ``jobsched-scheduler --add-user NAME`` prints it.

The name travels in the handshake's hello (so the scheduler knows whose token to check);
the whole token is the key of that user's challenge-response and is never sent.
"""

from __future__ import annotations

import re
import secrets

USER_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_TOKEN = re.compile(r"([A-Za-z0-9._-]{1,64}):([A-Za-z0-9_-]{32,256})")
TOKEN_FORM = "NAME:SECRET (NAME of letters, digits, '.', '_' and '-', as printed by jobsched-scheduler --add-user)"


def valid_user_name(name: str) -> bool:
    return USER_NAME.fullmatch(name) is not None


def new_token(name: str) -> str:
    """A fresh random token for user ``name``."""
    if not valid_user_name(name):
        raise ValueError(f"a user name is 1 to 64 letters, digits, '.', '_' or '-', not {name!r}")
    return f"{name}:{secrets.token_urlsafe(32)}"


def token_user(token: str) -> str | None:
    """The user ``token`` belongs to, or None if it is not a token."""
    match = _TOKEN.fullmatch(token)
    return match.group(1) if match else None


def looks_like_token(value: str | bytes) -> bool:
    """Whether a configured value (e.g. a worker's "secret") is in fact a user token."""
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return False
    return token_user(value.strip()) is not None
