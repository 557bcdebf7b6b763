"""Shared test set-up: the Hypothesis CI profile, and a PostgreSQL cluster for the run."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from tests.ci import missing
from tests.pg import Cluster, PostgresMissing, find_bindir, running_cluster

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


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[Cluster]:
    """One throwaway PostgreSQL cluster for the whole run, started on first use.

    Without server binaries: a failure under CI, where `make pytest` installs them, and a
    skip with the reason elsewhere (`tests.ci`).
    """
    try:
        find_bindir()
    except PostgresMissing as exc:
        missing(str(exc))
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture
def postgres_url(postgres_cluster: Cluster) -> Iterator[str]:
    """A URL to a migrated schema of this test's own, dropped afterwards."""
    url = postgres_cluster.create_schema()
    yield url
    postgres_cluster.drop_schema(url)


@pytest.fixture
def empty_postgres_url(postgres_cluster: Cluster) -> Iterator[str]:
    """A URL to an empty schema (no migrations) of this test's own, dropped afterwards."""
    url = postgres_cluster.create_schema(migrated=False)
    yield url
    postgres_cluster.drop_schema(url)
