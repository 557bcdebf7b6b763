"""What a test does when something it needs is missing: fail under CI, skip elsewhere.

CI must never pass by skipping: a missing PostgreSQL, toolchain or privilege there is a broken
machine, and a skip would hide it. On a developer's machine the same test skips with the
reason. This is the one place that says what "under CI" means; the Makefile's `build_with`
(the Go and Java clients) reads `CI` the same way, and tests/unit/test_ci.py holds them equal.
"""

from __future__ import annotations

import os
from typing import Final, NoReturn, TypeVar

import pytest

__all__ = ["CI_VALUES", "missing", "require", "under_ci"]

#: The values of `CI` that mean "this is CI" (compared in lower case, spaces stripped):
#: `true` is what GitHub Actions, GitLab and most runners set; `1` is the other common habit.
CI_VALUES: Final = frozenset({"true", "1"})

T = TypeVar("T")


def under_ci() -> bool:
    """Whether this run is CI: the `CI` environment variable is `true` or `1`, in any case."""
    return os.environ.get("CI", "").strip().lower() in CI_VALUES


def missing(message: str) -> NoReturn:
    """Stop the test for a missing component: `pytest.fail` under CI, `pytest.skip` elsewhere."""
    if under_ci():
        pytest.fail(f"CI={os.environ['CI']} and {message}", pytrace=False)
    pytest.skip(message)


def require(found: T | None, message: str) -> T:
    """Return `found` (a path, a condition that holds, ...); `missing(message)` on None or False.

    `require(shutil.which("go"), "go is not on PATH")` gives the path;
    `require(os.geteuid() == 0, "needs root")` gives True or stops the test.
    """
    if found is None or found is False:
        missing(message)
    return found
