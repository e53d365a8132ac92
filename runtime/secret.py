"""Where the credentials come from: the environment or private files, never argv.

Two kinds: the cluster secret (workers and the admin) and a user's token (a client of
that user, see ``tokens.py``).  The default files live in ``config_dir()``:
``secret``, which a scheduler started without any secret creates for its owner, and
``token``, where a user keeps the token the admin gave them.
"""

from __future__ import annotations

import os
import secrets
import stat

from ..protocol.errors import JobschedError
from .tokens import TOKEN_FORM, token_user

ENV_SECRET = "JOBSCHED_SECRET"
ENV_SECRET_FILE = "JOBSCHED_SECRET_FILE"
ENV_TOKEN = "JOBSCHED_TOKEN"
ENV_TOKEN_FILE = "JOBSCHED_TOKEN_FILE"


class SecretError(JobschedError, ValueError):
    """The configured secret cannot be used; the message says why and how to fix it."""


# One captured handshake lets an attacker try guesses offline as fast as HMAC runs, so a
# secret must be long and not a human's pattern.  The rule is deliberately simple: at
# least 16 bytes, of at least 8 different values (which refuses "aaaa...", "abababab..."
# and the like; any secret from a random generator passes by far).
MIN_SECRET_BYTES = 16
MIN_DISTINCT_BYTES = 8
HOW_TO_GENERATE = ('generate a strong one with: jobsched-scheduler --generate-secret PATH (a file, mode 0600, for '
                   '--secret-file or JOBSCHED_SECRET_FILE), or: python -c "import secrets; print(secrets.token_hex(32))"')


def weakness(secret: bytes) -> str | None:
    """Why ``secret`` is too weak to use, or None if it is strong enough."""
    if len(secret) < MIN_SECRET_BYTES:
        return f"it is {len(secret)} bytes long; at least {MIN_SECRET_BYTES} are needed"
    if len(set(secret)) < MIN_DISTINCT_BYTES:
        return f"it uses only {len(set(secret))} different characters; at least {MIN_DISTINCT_BYTES} are needed"
    return None


def check_strength(secret: bytes, where: str, error: type[SecretError] = SecretError,
                   how_to_generate: str = HOW_TO_GENERATE) -> bytes:
    """``secret``, unless it is too weak: then ``error`` saying so, where it came from and how to make a strong one."""
    reason = weakness(secret)
    if reason is not None:
        raise error(f"{where} is too weak: {reason}; {how_to_generate}")
    return secret


def config_dir() -> str:
    """``$XDG_CONFIG_HOME/jobsched``, by default ``~/.config/jobsched``."""
    base = os.environ.get("XDG_CONFIG_HOME", "")
    if not os.path.isabs(base):  # the XDG spec: a relative value is to be ignored
        base = os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "jobsched")


def default_secret_path() -> str:
    return os.path.join(config_dir(), "secret")


def default_token_path() -> str:
    return os.path.join(config_dir(), "token")


def check_private(path: str, what: str, error: type[SecretError] = SecretError, hint: str = "") -> None:
    """Raise ``error`` unless ``path`` exists and only its owner may read it: it holds credentials."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}{hint}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise error(
            f"{what} {path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
            f"run: chmod 600 {path}"
        )


def _read_private(path: str, what: str) -> bytes:
    check_private(path, what)
    try:
        with open(path, "rb") as f:
            value = f.read().strip()
    except OSError as exc:
        raise SecretError(f"cannot read {what} {path}: {exc.strerror}") from None
    if not value:
        raise SecretError(f"{what} {path} is empty")
    return value


def read_secret_file(path: str, where: str = "") -> bytes:
    return check_strength(_read_private(path, "secret file"), where or f"secret file {path}")


def load_secret(secret_file: str | None = None, secret: str | bytes | None = None) -> bytes | None:
    """The secret to use: explicit value, then ``secret_file``, then the environment
    (``JOBSCHED_SECRET``, ``JOBSCHED_SECRET_FILE``, systemd's credentials), then the
    default file ``config_dir()/secret`` if it exists."""
    if secret:
        return check_strength(secret.encode() if isinstance(secret, str) else bytes(secret), "the secret given")
    if secret_file:
        return read_secret_file(secret_file)
    from_env = _secret_from_environment()
    if from_env is not None:
        return from_env
    default = default_secret_path()
    return read_secret_file(default) if os.path.lexists(default) else None


def _secret_from_environment() -> bytes | None:
    if os.environ.get(ENV_SECRET):
        return check_strength(os.environ[ENV_SECRET].encode(), f"${ENV_SECRET}")
    if os.environ.get(ENV_SECRET_FILE):
        path = os.environ[ENV_SECRET_FILE]
        return read_secret_file(path, f"${ENV_SECRET_FILE} ({path})")
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")  # systemd LoadCredential=
    if credentials and os.path.exists(os.path.join(credentials, "jobsched-secret")):
        return read_secret_file(os.path.join(credentials, "jobsched-secret"))
    return None


def write_new_secret(path: str) -> None:
    """Create ``path`` holding a new random secret, mode 0600 from the first byte on."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(48) + "\n")


def ensure_default_secret() -> tuple[bytes, str, bool]:
    """The owner's private secret in ``config_dir()/secret``, created (folder 0700, file
    0600) if missing; returns (secret, path, whether it was created now)."""
    path = default_secret_path()
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        write_new_secret(path)
        created = True
    except FileExistsError:  # there already, perhaps just made by another scheduler: use it
        created = False
    except OSError as exc:
        raise SecretError(f"cannot create the default secret file {path}: {exc.strerror}") from None
    return read_secret_file(path), path, created


# ------------------------------------------------------------------ tokens
def read_token_file(path: str) -> str:
    raw = _read_private(path, "token file")
    return _checked_token(raw.decode("utf-8", "replace"), f"token file {path}")


def _checked_token(token: str, where: str) -> str:
    token = token.strip()
    if token_user(token) is None:
        raise SecretError(f"{where} does not hold a user token: a token looks like {TOKEN_FORM}")
    return token


def load_token(token: str | None = None, token_file: str | None = None) -> str | None:
    """The user token to use: explicit value, then ``token_file``, then ``JOBSCHED_TOKEN``,
    then ``JOBSCHED_TOKEN_FILE``, then ``config_dir()/token`` if it exists."""
    if token:
        return _checked_token(token, "the token given")
    if token_file:
        return read_token_file(token_file)
    from_env = _token_from_environment()
    if from_env is not None:
        return from_env
    path = default_token_path()
    return read_token_file(path) if os.path.lexists(path) else None


def _token_from_environment() -> str | None:
    if os.environ.get(ENV_TOKEN):
        return _checked_token(os.environ[ENV_TOKEN], f"${ENV_TOKEN}")
    if os.environ.get(ENV_TOKEN_FILE):
        return read_token_file(os.environ[ENV_TOKEN_FILE])
    return None


def load_credentials(
    secret: str | bytes | None = None,
    secret_file: str | None = None,
    token: str | None = None,
    token_file: str | None = None,
) -> tuple[bytes | None, str | None]:
    """A client's credentials, as (secret, token) with at most one of them set.

    Precedence, first found wins: the arguments (a token or a secret, not both); the
    environment (``JOBSCHED_TOKEN``, ``JOBSCHED_TOKEN_FILE``, then ``JOBSCHED_SECRET``,
    ``JOBSCHED_SECRET_FILE``, systemd's credentials); the default files (``token``, then
    ``secret`` in ``config_dir()``).  At each level a token comes before the secret: who
    has set one means to act as that user.
    """
    explicit_token = bool(token or token_file)
    if explicit_token and (secret or secret_file):
        raise SecretError("give either a user token or the cluster secret, not both")
    if explicit_token:
        return None, load_token(token, token_file)
    if secret or secret_file:
        return load_secret(secret_file, secret), None
    from_env = _token_from_environment()
    if from_env is not None:
        return None, from_env
    secret_env = _secret_from_environment()
    if secret_env is not None:
        return secret_env, None
    token_path = default_token_path()
    if os.path.lexists(token_path):
        return None, read_token_file(token_path)
    secret_path = default_secret_path()
    return (read_secret_file(secret_path) if os.path.lexists(secret_path) else None), None
