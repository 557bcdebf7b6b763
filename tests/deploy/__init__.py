"""Checks of the deployment files against the code."""

from __future__ import annotations

import os

import pytest


def required_tool(found: str | None, message: str) -> str:
    """Return the tool's path; without one, skip, or fail under `CI=true` (never a skip there)."""
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found
