"""The dashboard page as shipped: one self-contained file (rendered in a browser against
real and fake schedulers in integration/test_dashboard.py)."""

from __future__ import annotations

import re
from importlib import resources

import pytest


@pytest.mark.timeout(30)
def test_dashboard_page_is_self_contained() -> None:
    page = resources.files("jobsched.scheduler").joinpath("dashboard.html").read_text()
    # the machines may have no internet: nothing may be fetched from elsewhere
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "@import" not in page and "url(" not in page
    assert len(page.splitlines()) < 450
