"""Attacks on the PostgreSQL store from outside: real `numbersvc serve` processes, a real cluster.

What another session, a stuck migration Job or a hung database can do to replicas that must
start, rent and stop without hanging (issue 10).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest

from numbersvc.ledger import Begin, OrderState, pgschema
from numbersvc.ledger.postgres import PostgresLedger
from numbersvc.sandbox import SandboxControl, SandboxServer
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc
from tests.e2e.conftest import eventually, reason_of, rich_details
from tests.e2e.test_crash import held_rent
from tests.e2e.test_pg_faults import _stops_cleanly
from tests.e2e.test_process import Served, _serve, _start
from tests.e2e.test_replicas import _env, _group, _posts
from tests.ledger.support import new_attempt
from tests.pg import Cluster


@contextlib.contextmanager
def _migration_lock_held(url: str) -> Iterator[None]:
    """Another session (a stuck `db migrate`, an operator's psql) holds the migration lock."""
    with psycopg.connect(url, autocommit=True, application_name="stuck-job") as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (pgschema.MIGRATION_LOCK_KEY,))
        yield


async def _serves_then_drains(served: Served) -> None:
    """Once it says it serves, SIGTERM: a graceful exit 0."""
    await served.wait_serving()
    served.process.send_signal(signal.SIGTERM)
    assert await served.finish() == 0, served.stderr.decode()


async def test_a_replica_starts_on_a_migrated_schema_while_the_migration_lock_is_held(
    sandbox: SandboxServer, postgres_url: str
) -> None:
    """Nothing to migrate: the server must not wait for the lock at all. It waited forever
    (no log line, no exit), so a stuck migration Job stopped every rollout and restart."""
    with _migration_lock_held(postgres_url):
        async with _serve(_env(sandbox, postgres_url)) as served:
            served.process.send_signal(signal.SIGTERM)
            assert await served.finish() == 0, served.stderr.decode()


@pytest.mark.timeout(90)
async def test_a_replica_waiting_for_the_migration_lock_says_who_holds_it(
    sandbox: SandboxServer, empty_postgres_url: str
) -> None:
    """Migrations pending and the lock held: the server says whom it waits for, then
    migrates and serves once the lock is released."""
    served = Served(await _start(_env(sandbox, empty_postgres_url)))
    try:
        with _migration_lock_held(empty_postgres_url):
            assert served.process.stderr is not None
            async with asyncio.timeout(20):
                while b"waiting for the migration lock" not in served.stderr:
                    line = await served.process.stderr.readline()
                    assert line, served.stderr.decode()
                    served.stderr += line
            assert b"(stuck-job)" in served.stderr, served.stderr.decode()
        await _serves_then_drains(served)
    finally:
        await served.close()


async def test_sigterm_the_moment_a_replica_says_it_serves_drains(
    sandbox: SandboxServer, postgres_url: str
) -> None:
    """SIGTERM as soon as "serving on" is logged (a rollout's signal to a just-ready pod): a
    graceful exit 0. The handler was installed only after start-up, so the default action
    killed the process (-15) while its port already took rents."""
    for _ in range(3):
        served = Served(await _start(_env(sandbox, postgres_url), "--drain-seconds", "0.2"))
        try:
            await _serves_then_drains(served)
        finally:
            await served.close()


async def test_a_rent_on_a_read_only_database_is_refused_as_unavailable(
    sandbox: SandboxServer, control: SandboxControl, postgres_cluster: Cluster
) -> None:
    """The database turns read-only (a standby after a failover, or
    `default_transaction_read_only`): UNAVAILABLE `LEDGER_UNAVAILABLE` with RetryInfo and
    nothing sent, as for a database that is down. It was INTERNAL "internal error"."""
    database = f"ro_{uuid.uuid4().hex[:12]}"
    with postgres_cluster.connect() as admin:
        admin.execute(f"CREATE DATABASE {database}")
    try:
        async with _serve(_env(sandbox, postgres_cluster.url(database))) as served:
            with postgres_cluster.connect() as admin:
                admin.execute(f"ALTER DATABASE {database} SET default_transaction_read_only = on")
                # Connections take the setting when they open: the pool's open new ones.
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = %s AND pid <> pg_backend_pid()",
                    (database,),
                )
            async with grpc.aio.insecure_channel(f"127.0.0.1:{served.port}") as channel:
                stub = pb_grpc.NumberGroupServiceStub(channel)
                rent = pb.RentNumbersRequest(
                    group_id=await _group(stub), request_id=str(uuid.uuid4())
                )
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.RentNumbers(rent, timeout=20)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
            assert reason_of(refused.value) == "LEDGER_UNAVAILABLE"
            assert "RetryInfo" in rich_details(refused.value)
            served.process.send_signal(signal.SIGTERM)
            assert await served.finish() == 0, served.stderr.decode()
        assert b"Traceback" not in served.stderr, served.stderr.decode()
        assert await _posts(control) == 0
    finally:
        with postgres_cluster.connect() as admin:
            admin.execute(f"DROP DATABASE {database} WITH (FORCE)")


@contextlib.contextmanager
def _database_hung(cluster: Cluster) -> Iterator[None]:
    """Every process of the cluster stopped (SIGSTOP), as a paused VM or a partition that drops
    packets: connections stay open, nothing answers. SIGCONT after, whatever happens."""
    postmaster = int((cluster.data / "postmaster.pid").read_text().split()[0])
    pids = [postmaster]
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int((proc / "stat").read_text().rpartition(")")[2].split()[1]) == postmaster:
                pids.append(int(proc.name))
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


@pytest.mark.timeout(150)
async def test_reads_of_orders_on_a_hung_database_answer_unavailable(
    sandbox: SandboxServer, postgres_cluster: Cluster, postgres_url: str
) -> None:
    """The database hangs: `GetRentalOrder` without a deadline hung for good on a pooled
    connection (no statement is ever answered), and `ListRentalOrders` was INTERNAL. Both must
    answer UNAVAILABLE `LEDGER_UNAVAILABLE` with RetryInfo, within the ledger's call bound."""
    async with (
        _serve(_env(sandbox, postgres_url)) as served,
        grpc.aio.insecure_channel(f"127.0.0.1:{served.port}") as channel,
    ):
        stub = pb_grpc.NumberGroupServiceStub(channel)
        with _database_hung(postgres_cluster):
            for call in (
                stub.GetRentalOrder(pb.GetRentalOrderRequest(request_id=str(uuid.uuid4()))),
                stub.ListRentalOrders(pb.ListRentalOrdersRequest()),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await asyncio.wait_for(call, timeout=45)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
                assert reason_of(refused.value) == "LEDGER_UNAVAILABLE"
                assert "RetryInfo" in rich_details(refused.value)
        served.process.send_signal(signal.SIGTERM)
        assert await served.finish() == 0, served.stderr.decode()
    assert b"Traceback" not in served.stderr, served.stderr.decode()


@pytest.mark.timeout(150)
async def test_sigterm_while_the_outcome_write_hangs_logs_plivos_answer_and_exits(
    sandbox: SandboxServer, control: SandboxControl, postgres_cluster: Cluster, postgres_url: str
) -> None:
    """Plivo answers while the database hangs, then SIGTERM: the write of the outcome hung for
    good, so the server never exited and never logged Plivo's answer (lost but for Plivo's
    console). It must give up on the write in bounded time, log the answer and exit."""
    request_id = str(uuid.uuid4())
    env = _env(
        sandbox,
        postgres_url,
        NUMBERSVC_RENT_TIMEOUT_SECONDS="6",
        NUMBERSVC_SHUTDOWN_GRACE_SECONDS="3",
    )
    async with (
        _serve(env) as served,
        grpc.aio.insecure_channel(f"127.0.0.1:{served.port}") as channel,
    ):
        stub = pb_grpc.NumberGroupServiceStub(channel)
        _, rent = await held_rent(stub, control, request_id, hold_seconds=1.0, timeout_seconds=5)
        with _database_hung(postgres_cluster):
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await rent
            assert reason_of(unknown.value) == "RENT_OUTCOME_UNKNOWN", unknown.value
            served.process.send_signal(signal.SIGTERM)
            started = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(served.process.wait(), timeout=60)
            took = time.monotonic() - started
        assert await served.finish() == 0, served.stderr.decode()
        assert took < 40, (took, served.stderr.decode())
    assert b"Plivo's answer" in served.stderr, served.stderr.decode()
    assert b"Traceback" not in served.stderr, served.stderr.decode()
    assert await _posts(control) == 1


@pytest.mark.timeout(120)
async def test_a_replica_stopped_mid_post_and_resumed_after_its_lease_lapsed(
    sandbox: SandboxServer, control: SandboxControl, postgres_url: str
) -> None:
    """A is SIGSTOPped with its POST out; B recovers the order as outcome unknown once A's
    lease and the send deadline pass, and a retry on B sends nothing. SIGCONT: A's late answer
    (Plivo did rent) never frees the id: nothing is sent again, and both exit 0."""
    env = _env(
        sandbox,
        postgres_url,
        NUMBERSVC_INSTANCE_LEASE_SECONDS="1",
        NUMBERSVC_RENT_TIMEOUT_SECONDS="1.5",
    )
    async with (
        _serve(env) as a_served,
        _serve(env) as b_served,
        grpc.aio.insecure_channel(f"127.0.0.1:{a_served.port}") as a_channel,
        grpc.aio.insecure_channel(f"127.0.0.1:{b_served.port}") as b_channel,
    ):
        a, b = pb_grpc.NumberGroupServiceStub(a_channel), pb_grpc.NumberGroupServiceStub(b_channel)
        request_id = str(uuid.uuid4())
        group_id, call = await held_rent(
            a, control, request_id, hold_seconds=1.0, timeout_seconds=30
        )
        a_served.process.send_signal(signal.SIGSTOP)
        try:

            async def unknown_on_b() -> bool:
                got = await b.GetRentalOrder(pb.GetRentalOrderRequest(request_id=request_id))
                return got.order.status == pb.ORDER_STATUS_OUTCOME_UNKNOWN

            await eventually(unknown_on_b, timeout_seconds=30)
            rent = pb.RentNumbersRequest(group_id=group_id, request_id=request_id)
            with pytest.raises(grpc.aio.AioRpcError) as retried:
                await b.RentNumbers(rent, timeout=10)
            assert reason_of(retried.value) == "RENT_OUTCOME_UNKNOWN", retried.value
        finally:
            a_served.process.send_signal(signal.SIGCONT)
        with contextlib.suppress(grpc.aio.AioRpcError):
            await call
        # A's total timeout ran out while it was stopped: it may not trust the answer, but it
        # never records a failure (which would free the id for a second POST).
        got = await b.GetRentalOrder(pb.GetRentalOrderRequest(request_id=request_id))
        assert got.order.status in (pb.ORDER_STATUS_OUTCOME_UNKNOWN, pb.ORDER_STATUS_FULFILLED)
        for stub in (a, b):
            with pytest.raises(grpc.aio.AioRpcError) as again:
                await stub.RentNumbers(rent, timeout=10)
            assert reason_of(again.value) == "RENT_OUTCOME_UNKNOWN", again.value
        for served in (a_served, b_served):
            await _stops_cleanly(served, control)


async def test_lock_table_by_another_session_refuses_rents_and_reads_in_bounded_time(
    sandbox: SandboxServer, control: SandboxControl, postgres_url: str
) -> None:
    """`LOCK TABLE orders` (ACCESS EXCLUSIVE) held by an operator's session: a rent and a read
    each answer UNAVAILABLE `LEDGER_UNAVAILABLE` within the lock wait, nothing sent (the read
    was INTERNAL), and the server serves again once the lock goes."""
    async with (
        _serve(_env(sandbox, postgres_url)) as served,
        grpc.aio.insecure_channel(f"127.0.0.1:{served.port}") as channel,
    ):
        stub = pb_grpc.NumberGroupServiceStub(channel)
        rent = pb.RentNumbersRequest(group_id=await _group(stub), request_id=str(uuid.uuid4()))
        with psycopg.connect(postgres_url) as holder:
            holder.execute("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
            # One after the other, each timed from its own start (a call starts when made).
            for make in (
                lambda: stub.RentNumbers(rent, timeout=30),
                lambda: stub.GetRentalOrder(pb.GetRentalOrderRequest(request_id=rent.request_id)),
            ):
                started = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await asyncio.wait_for(make(), timeout=30)
                assert reason_of(refused.value) == "LEDGER_UNAVAILABLE", refused.value
                assert time.monotonic() - started < 15
            holder.rollback()
        assert (await stub.RentNumbers(rent, timeout=30)).order.status == (
            pb.ORDER_STATUS_FULFILLED
        )
        await _stops_cleanly(served, control)


async def test_a_claim_its_live_owner_lost_track_of_is_recovered_after_its_send_deadline(
    postgres_url: str,
) -> None:
    """The claim committed but its caller was told LEDGER_UNAVAILABLE ("nothing was sent: send
    it again"), so nothing will ever send or finish it. Every retry of the id then answers
    RENT_IN_PROGRESS until the owning replica restarts; past the send deadline it should read
    outcome unknown (settleable), as it does once the owner is gone."""
    now = [time.time_ns()]
    ledger = await PostgresLedger.open(
        postgres_url, lease_seconds=1, send_timeout_seconds=1, clock_ns=lambda: now[0]
    )
    try:
        assert (await ledger.begin(new_attempt("r-lost"), daily_cap=0)).kind is Begin.NEW
        now[0] += 5 * 10**9  # past the send deadline; this owner's lease is renewed below
        await ledger.heartbeat()
        entry = await ledger.get("r-lost")
        assert entry is not None
        assert entry.state is OrderState.OUTCOME_UNKNOWN, entry.state
    finally:
        await ledger.close()
