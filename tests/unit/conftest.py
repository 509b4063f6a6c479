"""Hypothesis profiles for the pure-core tests: fast by default, deeper on request."""

from __future__ import annotations

import os

from hypothesis import settings

# The unit suite must stay well under 5 s, so the default run is modest; set
# MESHCTL_HYPOTHESIS=thorough for a long fuzzing run of the same properties.
settings.register_profile("unit", max_examples=50, deadline=None, database=None)
settings.register_profile("thorough", max_examples=5000, deadline=None, database=None)
settings.load_profile(os.environ.get("MESHCTL_HYPOTHESIS", "unit"))
