"""Fixtures of the end-to-end tests (the daemon fixtures are in ``tests/conftest.py``)."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def digits():
    """600 rows of scikit-learn's digits: a subsample keeps the searches fast."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    rows = np.random.RandomState(0).choice(len(X), 600, replace=False)
    return X[rows], y[rows]
