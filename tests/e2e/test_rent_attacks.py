"""Attacks on renting's edges from outside: real `numbersvc serve` processes, a real cluster.

What one replica frozen at the wrong moment, a session holding a lock, can do to the others'
rents: never refuse them while the store answers.
"""

from __future__ import annotations

import asyncio
import re
import signal
import uuid
from typing import Final

import grpc
import httpx
import psycopg

from numbersvc.sandbox import SandboxControl, SandboxServer
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc
from tests.e2e.conftest import eventually
from tests.e2e.test_pg_faults import _stops_cleanly
from tests.e2e.test_process import Served, _serve, _start
from tests.e2e.test_replicas import _env, _group

_METRICS: Final = re.compile(rb"metrics on (http://127\.0\.0\.1:\d+/metrics)")
_BEATS: Final = re.compile(
    r'^numbersvc_ledger_lease_renewals_total\{result="(ok|error)"\} (\S+)$', re.M
)


def _metrics_url(served: Served) -> str:
    metrics = _METRICS.search(served.stderr)
    assert metrics, served.stderr.decode()
    return metrics.group(1).decode()


async def _beats(client: httpx.AsyncClient, url: str) -> dict[str, float]:
    """The server's heartbeats so far, by result."""
    return {result: float(n) for result, n in _BEATS.findall((await client.get(url)).text)}


async def test_a_replica_frozen_mid_heartbeat_does_not_stop_another_renting(
    sandbox: SandboxServer, control: SandboxControl, postgres_url: str
) -> None:
    """A replica frozen (SIGSTOP, a paused VM) inside its heartbeat's transaction holds its
    lease row, and past its lease that row is lapsed: every other replica's heartbeat deleted
    lapsed leases by waiting for that row, failed on the lock timeout, took the store for down
    and refused every rent (LEDGER_UNAVAILABLE) for as long as the frozen one stayed frozen."""
    env = _env(sandbox, postgres_url, NUMBERSVC_INSTANCE_LEASE_SECONDS="3")
    async with (
        _serve(env) as served,
        grpc.aio.insecure_channel(f"127.0.0.1:{served.port}") as channel,
        httpx.AsyncClient() as client,
    ):
        url = _metrics_url(served)
        stub = pb_grpc.NumberGroupServiceStub(channel)
        rent = pb.RentNumbersRequest(group_id=await _group(stub), request_id=str(uuid.uuid4()))
        with psycopg.connect(postgres_url) as frozen:
            # The frozen replica's lease, lapsed, and its renewal begun but never committed.
            frozen.execute(
                "INSERT INTO instances (instance, expires_ns, started_ns, host, pid)"
                " VALUES ('frozen', 1, 0, 'elsewhere', 1)"
            )
            frozen.commit()
            frozen.execute("UPDATE instances SET expires_ns = 2 WHERE instance = 'frozen'")
            before = await _beats(client, url)

            async def a_beat_ended() -> bool:
                now = await _beats(client, url)
                return now.get("error", 0) > before.get("error", 0) or (
                    now.get("ok", 0) >= before.get("ok", 0) + 2
                )

            await eventually(a_beat_ended, timeout_seconds=30, what="a heartbeat since the lock")
            placed = await stub.RentNumbers(rent, timeout=30)
            assert placed.order.status == pb.ORDER_STATUS_FULFILLED
            assert (await _beats(client, url)).get("error", 0) == before.get("error", 0)
            frozen.rollback()
        await _stops_cleanly(served, control)


async def test_a_lock_on_the_leases_alone_does_not_stop_rents(
    sandbox: SandboxServer, control: SandboxControl, postgres_url: str
) -> None:
    """A session holds `instances` locked (VACUUM FULL, a migration altering it): heartbeats
    fail on their lock timeout while claims, which never touch it, work. The heartbeat took
    that for the store out of reach and the rent breaker refused every rent (as a SQLite file
    locked does not)."""
    env = _env(sandbox, postgres_url, NUMBERSVC_INSTANCE_LEASE_SECONDS="3")
    async with (
        _serve(env) as served,
        grpc.aio.insecure_channel(f"127.0.0.1:{served.port}") as channel,
        httpx.AsyncClient() as client,
    ):
        url = _metrics_url(served)
        stub = pb_grpc.NumberGroupServiceStub(channel)
        rent = pb.RentNumbersRequest(group_id=await _group(stub), request_id=str(uuid.uuid4()))
        with psycopg.connect(postgres_url) as operator:
            operator.execute("LOCK TABLE instances IN ACCESS EXCLUSIVE MODE")
            before = await _beats(client, url)

            async def a_beat_failed() -> bool:
                return (await _beats(client, url)).get("error", 0) > before.get("error", 0)

            await eventually(a_beat_failed, timeout_seconds=30, what="a heartbeat on the lock")
            placed = await stub.RentNumbers(rent, timeout=30)
            assert placed.order.status == pb.ORDER_STATUS_FULFILLED
            operator.rollback()
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
            try:

                async def migrating() -> bool:
                    waiting = admin.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                        " AND query LIKE '%CREATE INDEX orders_unsettled%'"
                    ).fetchone()
                    return waiting == (1,)

                await eventually(migrating, timeout_seconds=30, what="the migration's lock wait")
                served.process.send_signal(signal.SIGTERM)
                async with asyncio.timeout(10):
                    _, rest = await served.process.communicate()
                served.stderr += rest
            finally:
                await served.close()
            operator.rollback()
        assert served.process.returncode == 0, served.stderr.decode()
        assert b"Traceback" not in served.stderr, served.stderr.decode()
        sessions = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'numbersvc%'"
        ).fetchone()
        versions = admin.execute("SELECT max(version) FROM schema_migrations").fetchone()
    assert sessions == (0,)
    assert versions == (2,)
