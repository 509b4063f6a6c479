"""`meshctl topic check`: equivalents, the zero-level warning, and refusals as exit 2."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli

pytestmark = pytest.mark.e2e


def test_topic_check_shows_equivalent_and_warns() -> None:
    r = run_cli("topic", "check", "plant1/>", "--as", "mqtt")
    assert r.returncode == 0
    assert r.stdout.strip() == "plant1/#"
    assert "zero-level difference" in r.stderr


def test_topic_check_json_and_refusal() -> None:
    r = run_cli("topic", "check", "a.*.>", "--from", "nats", "--as", "mesh", "--json")
    assert json.loads(r.stdout) == {
        "from": "nats",
        "as": "mesh",
        "pattern": "a.*.>",
        "equivalent": ["a/*/>"],
        "warnings": [],
    }
    bad = run_cli("topic", "check", "a.b/c", "--as", "nats")
    assert bad.returncode == 2
    assert (
        bad.stderr.strip()
        == "error: cannot map 'a.b/c' to nats: level 'a.b' holds '.', a NATS separator"
    )
