"""benchmarks/fuzz.py runs in CI at a small count, so the fuzzer itself cannot rot."""

from __future__ import annotations

from types import ModuleType

import pytest


def test_fuzz_script_small_run(fuzz_script: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert fuzz_script.main(["--inputs", "20000", "--seed", "7", "--max-seconds", "60"]) == 0
    out = capsys.readouterr().out
    assert "inputs      20,000 of 20,000" in out
    assert "failures    0" in out


def test_minimize_reports_no_reproducer_when_nothing_fails(fuzz_script: ModuleType) -> None:
    """A frame too deep for json.loads is a bad frame: no failure, nothing to minimize."""
    fuzz = fuzz_script
    noise = [fuzz.Input("router.client", fuzz.CLIENT, b"\x01\x06{}")] * 50
    deep = b'\x01\x09{"t":' + b"[" * 5000
    failing = fuzz.Input("router.link", fuzz.PEER_IDENT, deep)
    harness = fuzz.Harness()
    try:
        assert fuzz.feed(harness, failing) is None
    finally:
        harness.close()
    assert fuzz.minimize(noise, failing, budget=5.0) is None
