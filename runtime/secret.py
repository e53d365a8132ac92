"""Where the shared secret comes from: the environment or a private file, never argv."""

from __future__ import annotations

import os
import secrets
import stat

from ..protocol.errors import JobschedError

ENV_SECRET = "JOBSCHED_SECRET"
ENV_SECRET_FILE = "JOBSCHED_SECRET_FILE"


class SecretError(JobschedError, ValueError):
    """The configured secret cannot be used; the message says why and how to fix it."""


def read_secret_file(path: str) -> bytes:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise SecretError(f"cannot read secret file {path}: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretError(
            f"secret file {path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
            f"run: chmod 600 {path}"
        )
    with open(path, "rb") as f:
        secret = f.read().strip()
    if not secret:
        raise SecretError(f"secret file {path} is empty")
    return secret


def load_secret(secret_file: str | None = None, secret: str | bytes | None = None) -> bytes | None:
    """The secret to use: explicit value, then ``secret_file``, then the environment."""
    if secret:
        return secret.encode() if isinstance(secret, str) else bytes(secret)
    if secret_file:
        return read_secret_file(secret_file)
    if os.environ.get(ENV_SECRET):
        return os.environ[ENV_SECRET].encode()
    if os.environ.get(ENV_SECRET_FILE):
        return read_secret_file(os.environ[ENV_SECRET_FILE])
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")  # systemd LoadCredential=
    if credentials and os.path.exists(os.path.join(credentials, "jobsched-secret")):
        return read_secret_file(os.path.join(credentials, "jobsched-secret"))
    return None


def write_new_secret(path: str) -> None:
    """Create ``path`` holding a new random secret, mode 0600 from the first byte on."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(48) + "\n")
