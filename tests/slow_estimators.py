"""An estimator slow enough to kill a scheduler in the middle of its search.

A module of its own, importable by the worker processes (the task modules' folder is on
their path), so that the class pickles by reference and only searches import scikit-learn.
"""

from __future__ import annotations

import time

from sklearn.svm import SVC

FIT_SECONDS = 0.25


class SlowSVC(SVC):
    """``SVC`` whose every fit first sleeps ``FIT_SECONDS``; its results are SVC's."""

    def fit(self, X, y, sample_weight=None):
        time.sleep(FIT_SECONDS)
        return super().fit(X, y, sample_weight=sample_weight)
