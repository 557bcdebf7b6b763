"""Shared test set-up: the Hypothesis CI profile."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# Bounded, derandomized and without deadlines: CI machines are small and noisy, and a
# failure must reproduce. `HYPOTHESIS_PROFILE=dev` explores more locally.
settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
