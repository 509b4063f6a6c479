"""Hypothesis profiles for the pure-core tests: fast by default, deeper on request."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import settings

# The unit suite must stay well under 5 s, so the default run is modest; set
# MESHCTL_HYPOTHESIS=thorough for a long fuzzing run of the same properties.
settings.register_profile("unit", max_examples=50, deadline=None, database=None)
settings.register_profile("thorough", max_examples=5000, deadline=None, database=None)
settings.load_profile(os.environ.get("MESHCTL_HYPOTHESIS", "unit"))


@pytest.fixture(scope="session")
def fuzz_script() -> ModuleType:
    """benchmarks/fuzz.py as a module (benchmarks/ is not a package), for its harness."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "fuzz.py"
    spec = importlib.util.spec_from_file_location("meshctl_fuzz", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module
