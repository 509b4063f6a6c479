"""The examples are programs: run each against a real node so they cannot rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import NodeProcess, cli_env

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_quickstart_runs_against_a_node(node: NodeProcess) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py"), "--server", node.ipc],
        capture_output=True,
        text=True,
        timeout=30,
        env=cli_env(),
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "plant1/line3/temp b'21.5' {'unit': 'C'}",
        "b'HELLO'",
        "published 10000 events",
    ]
