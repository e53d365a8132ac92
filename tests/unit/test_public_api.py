"""What ``import jobsched`` offers: one error root, every user-visible error importable."""

from __future__ import annotations

import pytest

import jobsched

BUILTIN_BASES = {
    "ConfigError": ValueError,
    "SecretError": ValueError,
    "ClusterError": RuntimeError,
    "NoWorkersError": RuntimeError,
    "WorkerLostError": RuntimeError,
    "SchedulerUnreachableError": ConnectionError,
    "CallCancelledError": RuntimeError,
    "CancelRefusedError": RuntimeError,
}
ERRORS = [name for name in jobsched.__all__ if name.endswith("Error") or name == "VersionMismatch"]


def test_every_error_in_the_public_api_is_listed():
    assert set(ERRORS) >= {
        "JobschedError", "ProtocolError", "HandshakeError", "AuthenticationError", "VersionMismatch", "TLSError",
        "ClusterError", "NoWorkersError", "RemoteError", "SchedulerUnreachableError", "WorkerLostError",
        "ConfigError", "SecretError", "CallCancelledError", "CancelRefusedError",
    }
    assert issubclass(jobsched.CallCancelledError, jobsched.ClusterError)


@pytest.mark.parametrize("name", ERRORS)
def test_every_public_error_derives_from_the_root(name):
    error = getattr(jobsched, name)
    assert issubclass(error, jobsched.JobschedError)
    assert name in dir(jobsched)


@pytest.mark.parametrize(("name", "base"), sorted(BUILTIN_BASES.items()))
def test_errors_keep_the_builtin_base_users_catch(name, base):
    assert issubclass(getattr(jobsched, name), base)


def test_errors_raised_deep_inside_are_the_public_ones(tmp_path):
    from jobsched.payload.serialize import RemoteError
    from jobsched.protocol.framing import PREAUTH_LIMITS, FrameDecoder
    from jobsched.runtime.secret import read_secret_file

    assert RemoteError is jobsched.RemoteError
    readable = tmp_path / "secret"
    readable.write_text("x" * 32)
    readable.chmod(0o644)
    with pytest.raises(jobsched.SecretError):
        read_secret_file(str(readable))
    with pytest.raises(jobsched.ProtocolError):
        FrameDecoder(PREAUTH_LIMITS).feed(b"\xff" * 64)  # a header announcing 4 GiB


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        jobsched.Nope  # noqa: B018 - the attribute access is the test
