"""The house checks run with the suite, so that CI enforces them and not only whoever
remembers: ruff (lint and format) over everything, mypy over the shipped packages. The
versions are pinned in pyproject.toml's test extras, so a new release cannot turn CI red."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "argv",
    [
        ["ruff", "check", "."],
        ["ruff", "format", "--check", "."],
        ["mypy", "node", "edge", "meshctl"],
    ],
    ids=["ruff", "ruff-format", "mypy"],
)
def test_static_checks_pass(argv: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", *argv],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"{' '.join(argv)}:\n{done.stdout}{done.stderr}"
