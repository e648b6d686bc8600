"""Fixtures of the fleet-side tests: the session's PostgreSQL cluster, a fresh database
per test module."""

from __future__ import annotations

import pytest

from pgharness import PgCluster, shared_cluster


@pytest.fixture(scope="session")
def pg(request: pytest.FixtureRequest) -> PgCluster:
    """The session's throwaway PostgreSQL (initdb + pg_ctl, loopback port)."""
    return shared_cluster(request)
