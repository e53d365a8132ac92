"""Fixtures of the integration tests (the daemon fixtures are in ``tests/conftest.py``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture
def marks(tmp_path) -> Path:
    """An empty directory where tasks leave ``started-<pid>`` marks (``support.wait_for_mark``)."""
    path = tmp_path / "marks"
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def big() -> np.ndarray:
    """200 MB of float64; arange: every slice sum is an integer below 2**53, so sums are exact in any order."""
    return np.arange(25_000_000, dtype=np.float64)
