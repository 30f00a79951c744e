"""The runnable examples (the README's demo command runs them) keep working."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.worker


@pytest.mark.parametrize("script", ["examples/stripe_webhooks/run.py", "examples/demo.py"])
def test_example_runs_and_reports(script, dsn):
    env = {**os.environ, "RIVER_BROKER_DSN": dsn}
    out = subprocess.run([sys.executable, script], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    if "stripe" in script:
        assert "per-customer order kept: 40/40 customers" in out.stdout
        assert "running at once: 0" in out.stdout
        assert "celery inspect ping: answered by 2 workers" in out.stdout
    else:
        assert "all 4 long tasks finished" in out.stdout
