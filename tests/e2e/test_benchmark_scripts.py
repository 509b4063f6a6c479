"""The benchmark scripts that CI does not otherwise run, at a tiny size, so they cannot rot."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.mesh]

ROOT = Path(__file__).resolve().parents[2]


def test_interest_churn_prints_both_phases_and_the_ratio(tmp_path: Path) -> None:
    argv = [sys.executable, str(ROOT / "benchmarks" / "interest_churn.py")]
    argv += ["--patterns", "2000", "--changes", "10", "--rate", "50", "--no-settle"]
    done = subprocess.run(
        argv, cwd=tmp_path, capture_output=True, text=True, timeout=110, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert [bool(re.search(r"no other patterns: A [\d.]+% of a core", x)) for x in lines[:1]] == [
        True
    ]
    assert "2,000 patterns held" in lines[1]
    assert re.match(r"ratio held/baseline: A [\d.]+x, B [\d.]+x CPU; routable [\d.]+x", lines[2])
