"""Attacks on renting's edges from outside: real `numbersvc serve` processes, a real cluster.

What a replica frozen at the wrong moment, or a session holding a lock, can do to a server's
rents and its start-up: rents go on while the store answers, a stop during a migration is clean.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from typing import Final

import grpc
import httpx
import psycopg
import pytest

from numbersvc.sandbox import SandboxControl, SandboxServer
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc
from tests.e2e.conftest import eventually
from tests.e2e.test_pg_faults import _stops_cleanly
from tests.e2e.test_process import Served, _serve, _start
from tests.e2e.test_replicas import _env, _group, no_session_left, stopped_while_starting

_METRICS: Final = re.compile(rb"metrics on (http://127\.0\.0\.1:\d+/metrics)")
_BEATS: Final = re.compile(
    r'^numbersvc_ledger_lease_renewals_total\{result="(ok|error)"\} (\S+)$', re.M
)


async def _beats(client: httpx.AsyncClient, url: str) -> dict[str, float]:
    """The server's heartbeats so far, by result."""
    return {result: float(n) for result, n in _BEATS.findall((await client.get(url)).text)}


def _frozen_mid_heartbeat(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """A replica's lapsed lease, its renewal begun and never committed: the replica froze
    (SIGSTOP, a paused VM) inside its heartbeat's transaction for longer than its lease."""
    conn.execute(
        "INSERT INTO instances (instance, expires_ns, started_ns, host, pid)"
        " VALUES ('frozen', 1, 0, 'elsewhere', 1)"
    )
    conn.commit()
    conn.execute("UPDATE instances SET expires_ns = 2 WHERE instance = 'frozen'")


def _leases_locked(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """The leases' table locked by a session (VACUUM FULL, a migration altering it)."""
    conn.execute("LOCK TABLE instances IN ACCESS EXCLUSIVE MODE")


@pytest.mark.parametrize(
    ("hold", "beats_fail"),
    [(_frozen_mid_heartbeat, False), (_leases_locked, True)],
    ids=["a replica frozen mid-heartbeat", "the leases locked"],
)
async def test_rents_go_on_while_a_heartbeat_meets_a_lock_claims_never_need(
    sandbox: SandboxServer,
    control: SandboxControl,
    postgres_url: str,
    hold: Callable[[psycopg.Connection[tuple[object, ...]]], None],
    beats_fail: bool,
) -> None:
    """A lock claims never touch: a rent is placed once a heartbeat has met it. Both were
    refused (LEDGER_UNAVAILABLE) for as long as the lock was held: the heartbeat failed on its
    lock timeout, which the rent breaker took for the store out of reach. A frozen replica's
    lapsed lease is skipped, not waited for: no heartbeat fails at all."""
    env = _env(sandbox, postgres_url, NUMBERSVC_INSTANCE_LEASE_SECONDS="3")
    async with (
        _serve(env) as served,
        grpc.aio.insecure_channel(f"127.0.0.1:{served.port}") as channel,
        httpx.AsyncClient() as client,
    ):
        metrics = _METRICS.search(served.stderr)
        assert metrics, served.stderr.decode()
        url = metrics.group(1).decode()
        stub = pb_grpc.NumberGroupServiceStub(channel)
        rent = pb.RentNumbersRequest(group_id=await _group(stub), request_id=str(uuid.uuid4()))
        with psycopg.connect(postgres_url) as holder:
            hold(holder)
            before = await _beats(client, url)

            async def a_beat_ended() -> bool:
                now = await _beats(client, url)
                return now.get("error", 0) > before.get("error", 0) or (
                    now.get("ok", 0) >= before.get("ok", 0) + 2
                )

            await eventually(a_beat_ended, timeout_seconds=30, what="a heartbeat since the lock")
            placed = await stub.RentNumbers(rent, timeout=30)
            assert placed.order.status == pb.ORDER_STATUS_FULFILLED
            failed = (await _beats(client, url)).get("error", 0) > before.get("error", 0)
            assert failed == beats_fail
            # Nor is the store reported down (NumbersvcStoreDown pages): it answered.
            up = re.search(
                r'^numbersvc_store_up\{store="postgresql"\} (\S+)$',
                (await client.get(url)).text,
                re.M,
            )
            assert up, "no store_up"
            assert float(up.group(1)) == 1, "store_up says the store is down"
            holder.rollback()
        await _stops_cleanly(served, control)


async def test_a_sigterm_while_a_migration_waits_on_a_lock_exits_cleanly_migrating_nothing(
    sandbox: SandboxServer, postgres_url: str
) -> None:
    """Migration 3 pending (a rollout) while an operator's transaction holds a write lock on
    `orders`: the server's CREATE INDEX waits for it. SIGTERM then: exit 0, no traceback, the
    migration not applied, no session left."""
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute("DROP INDEX orders_unsettled")
        admin.execute("DELETE FROM schema_migrations WHERE version = 3")
        with psycopg.connect(postgres_url) as operator:
            operator.execute("LOCK TABLE orders IN ROW EXCLUSIVE MODE")
            served = Served(await _start(_env(sandbox, postgres_url)))

            async def migrating() -> bool:
                waiting = admin.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND query LIKE '%CREATE INDEX orders_unsettled%'"
                ).fetchone()
                return waiting == (1,)

            await stopped_while_starting(
                served,
                lambda: eventually(migrating, timeout_seconds=30, what="the migration's lock wait"),
            )
            operator.rollback()
        await no_session_left(admin)
        versions = admin.execute("SELECT max(version) FROM schema_migrations").fetchone()
    assert versions == (2,)
