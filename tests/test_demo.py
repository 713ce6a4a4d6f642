"""The demonstration (`make demo`) shows every operation of the table, and
every step works."""

from __future__ import annotations

import io

import pytest

from remsh.demo import Report, run_demo
from remsh.ops import OPERATIONS

pytestmark = pytest.mark.timeout(120)


def test_demo_shows_every_operation_and_every_step_works(tmp_path):
    """run_demo reports no failure and has a step for each operation of
    remsh/ops.py (an operation added to the table and not to the demo fails)."""
    out = io.StringIO()
    report = Report(out=out)
    run_demo(str(tmp_path), report)
    assert report.failures == 0, out.getvalue()
    assert set(OPERATIONS) <= report.shown, sorted(set(OPERATIONS) - report.shown)
