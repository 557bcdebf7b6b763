"""Replicas: several `numbersvc serve` processes on one PostgreSQL schema and one sandbox.

Each server is a real process (its own pool, its own lease); the sandbox, in this process,
journals every request it receives, so "one POST" is counted where Plivo would count it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import psycopg
import pytest

from numbersvc import translation
from numbersvc.deadline import Deadline
from numbersvc.errors import Outcome, ServiceError
from numbersvc.ledger import Attempt, Begin, BeginResult, OrderState, pgschema
from numbersvc.ledger.postgres import PostgresLedger
from numbersvc.orders import RentDesk, fingerprint
from numbersvc.sandbox import SandboxControl, SandboxServer
from numbersvc.sandbox.faults import FaultKind, FaultSpec
from numbersvc.upstream import PlivoClient
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc
from numbersvc.validation import RentParams
from tests.e2e.conftest import eventually, reason_of, rich_details
from tests.e2e.test_process import Served, _start
from tests.pg import Cluster

if TYPE_CHECKING:  # the async stub type exists only in the generated .pyi
    Stub = pb_grpc.NumberGroupServiceAsyncStub

US = pb.SearchFilter(region_code="US")
# Long enough for a claim under load, short enough for many polls (50 ms backing off to 1 s).
_DUPLICATE_DEADLINE_SECONDS = 3.0


def _env(sandbox: SandboxServer, database_url: str, **extra: str) -> dict[str, str]:
    return {
        "NUMBERSVC_UPSTREAM": "plivo",
        "PLIVO_BASE_URL": sandbox.base_url,
        "PLIVO_AUTH_ID": sandbox.auth_id,
        "PLIVO_AUTH_TOKEN": sandbox.auth_token,
        "NUMBERSVC_DATABASE_URL": database_url,
        **extra,
    }


@contextlib.asynccontextmanager
async def _replicas(env: Mapping[str, str], count: int) -> AsyncIterator[list[Stub]]:
    """Start `count` servers at the same moment; yield a stub for each."""
    async with _served_replicas(env, count) as replicas:
        yield [stub for _, stub in replicas]


@contextlib.asynccontextmanager
async def _served_replicas(
    env: Mapping[str, str], count: int
) -> AsyncIterator[list[tuple[Served, Stub]]]:
    """Start `count` servers at the same moment; yield each process with a stub on it."""
    processes = await asyncio.gather(*(_start(env) for _ in range(count)))
    served = [Served(p) for p in processes]
    try:
        await asyncio.gather(*(s.wait_serving() for s in served))
        async with contextlib.AsyncExitStack() as channels:
            stubs = []
            for s in served:
                channel = await channels.enter_async_context(
                    grpc.aio.insecure_channel(f"127.0.0.1:{s.port}")
                )
                stubs.append((s, pb_grpc.NumberGroupServiceStub(channel)))
            yield stubs
    finally:
        for s in served:
            if s.process.returncode is None:
                s.process.send_signal(signal.SIGTERM)
        for s in served:
            assert await s.finish() == 0, s.stderr.decode()


async def _posts(control: SandboxControl) -> int:
    return sum(1 for r in await control.requests() if r["operation"] == "rent")


async def stopped_while_starting(served: Served, starting: Callable[[], Awaitable[None]]) -> None:
    """Once `starting` (a wait for a step of the server's start-up) returns, SIGTERM: the
    server exits 0 within 10 s, without a traceback, as for a normal stop."""
    try:
        await starting()
        served.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            _, rest = await served.process.communicate()
        served.stderr += rest
    finally:
        await served.close()
    assert served.process.returncode == 0, served.stderr.decode()
    assert b"Traceback" not in served.stderr, served.stderr.decode()


async def no_session_left(watcher: psycopg.Connection[Any]) -> None:
    """Wait (bounded, 5 s) until no numbersvc session is left in the database `watcher` is on.

    NOTE: a backend ends a moment after its client has gone, so a count at once can still see
    it; one whose wait was never cancelled stays as long as what it waits for is held.
    """

    async def gone() -> bool:
        return watcher.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'numbersvc%'"
            " AND pid <> pg_backend_pid()"
        ).fetchone() == (0,)

    await eventually(gone, timeout_seconds=5, what="the server's database sessions gone")


async def _group(stub: Stub) -> str:
    page = await stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US, page_size=1))
    return page.number_groups[0].group_id


async def test_duplicates_split_across_replicas_started_together_send_one_post(
    sandbox: SandboxServer, control: SandboxControl, empty_postgres_url: str
) -> None:
    async with _replicas(_env(sandbox, empty_postgres_url), 2) as (a, b):
        group_id, request_id = await _group(a), str(uuid.uuid4())
        rent = pb.RentNumbersRequest(group_id=group_id, request_id=request_id)
        # Plivo sits on the POST: every duplicate arrives while the order is being sent.
        await control.inject_fault(FaultSpec(FaultKind.DELAY, seconds=1.0, operation="rent"))
        results = await asyncio.gather(
            *(stub.RentNumbers(rent, timeout=20) for stub in (a, b) * 5),
            return_exceptions=True,
        )
        assert await _posts(control) == 1
        # The other replica's duplicates waited for the order in flight (20 s of deadline is
        # far more than the 1 s POST): every call got the one order.
        assert all(isinstance(r, pb.RentNumbersResponse) for r in results), results
        orders = [r.order for r in results if isinstance(r, pb.RentNumbersResponse)]
        assert all(order == orders[0] for order in orders)
        assert orders[0].status == pb.ORDER_STATUS_FULFILLED
        # Once the order landed, either replica answers a repeat from the shared ledger.
        for stub in (a, b):
            assert (await stub.RentNumbers(rent, timeout=10)).order == orders[0]
        assert await _posts(control) == 1


async def test_an_order_placed_on_one_replica_is_read_on_the_other_at_once(
    sandbox: SandboxServer, control: SandboxControl, postgres_url: str
) -> None:
    async with _replicas(_env(sandbox, postgres_url), 2) as (a, b):
        group_id, request_id = await _group(a), str(uuid.uuid4())
        placed = (
            await a.RentNumbers(pb.RentNumbersRequest(group_id=group_id, request_id=request_id))
        ).order
        got = await b.GetRentalOrder(pb.GetRentalOrderRequest(request_id=request_id))
        assert got.order == placed
        listed = await b.ListRentalOrders(pb.ListRentalOrdersRequest())
        assert [o.request_id for o in listed.orders] == [request_id]
        # The same id for another request, on the other replica: refused, nothing sent.
        with pytest.raises(grpc.aio.AioRpcError) as reused:
            await b.RentNumbers(
                pb.RentNumbersRequest(group_id=group_id, request_id=request_id, quantity=2)
            )
        assert reused.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert await _posts(control) == 1


async def test_sigkill_of_a_replica_mid_rent_the_other_answers_outcome_unknown(
    sandbox: SandboxServer, control: SandboxControl, postgres_url: str
) -> None:
    # A short lease and rent timeout: the send deadline is 2 x 1.5 s + 2 s after the claim.
    env = _env(
        sandbox,
        postgres_url,
        NUMBERSVC_INSTANCE_LEASE_SECONDS="1",
        NUMBERSVC_RENT_TIMEOUT_SECONDS="1.5",
    )
    async with _replicas(env, 1) as (b,):
        victim = Served(await _start(env))
        try:
            await victim.wait_serving()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{victim.port}") as channel:
                a = pb_grpc.NumberGroupServiceStub(channel)
                group_id, request_id = await _group(a), str(uuid.uuid4())
                await control.inject_fault(
                    FaultSpec(FaultKind.DELAY, seconds=1.0, operation="rent")
                )
                rent = pb.RentNumbersRequest(group_id=group_id, request_id=request_id)
                call = asyncio.ensure_future(a.RentNumbers(rent, timeout=10))

                async def post_arrived() -> bool:
                    return await _posts(control) == 1

                await eventually(post_arrived)
                victim.process.send_signal(signal.SIGKILL)
                await victim.process.wait()
                assert isinstance(
                    (await asyncio.gather(call, return_exceptions=True))[0], grpc.aio.AioRpcError
                )
        finally:
            await victim.close()

        async def unknown_on_b() -> bool:
            order = (await b.GetRentalOrder(pb.GetRentalOrderRequest(request_id=request_id))).order
            return "lease expired" in order.status_message

        await eventually(unknown_on_b, timeout_seconds=20)
        order = (await b.GetRentalOrder(pb.GetRentalOrderRequest(request_id=request_id))).order
        assert order.status == pb.ORDER_STATUS_OUTCOME_UNKNOWN
        with pytest.raises(grpc.aio.AioRpcError) as retried:
            await b.RentNumbers(rent, timeout=10)
        assert retried.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert reason_of(retried.value) == "RENT_OUTCOME_UNKNOWN"
        assert await _posts(control) == 1


class TestStart:
    async def test_a_schema_newer_than_the_server_exits_2(
        self, sandbox: SandboxServer, postgres_url: str
    ) -> None:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES (9999, 'x', '')"
            )
        process = await _start(_env(sandbox, postgres_url))
        _, err = await asyncio.wait_for(process.communicate(), timeout=30)
        assert process.returncode == 2
        assert b"version 9999, newer than this numbersvc knows" in err

    async def test_a_sigterm_while_waiting_for_the_migration_lock_exits_promptly_holding_nothing(
        self, sandbox: SandboxServer, empty_postgres_url: str
    ) -> None:
        """A server waiting at start for the migration lock (a `db migrate` Job holds it) is
        stopped by SIGTERM at once, exit 0 as for a normal stop, not SIGKILLed by Kubernetes
        after its grace period; it leaves no session and no migration behind."""
        with psycopg.connect(empty_postgres_url, autocommit=True) as holder:
            holder.execute("SELECT pg_advisory_lock(%s)", (pgschema.MIGRATION_LOCK_KEY,))
            served = Served(await _start(_env(sandbox, empty_postgres_url)))

            async def waiting() -> None:
                assert served.process.stderr is not None
                async with asyncio.timeout(30):
                    while b"waiting for the migration lock" not in served.stderr:
                        line = await served.process.stderr.readline()
                        assert line, f"server exited early:\n{served.stderr.decode()}"
                        served.stderr += line

            await stopped_while_starting(served, waiting)
            await no_session_left(holder)
            [(tables,)] = holder.execute(
                "SELECT count(*) FROM information_schema.tables"
                " WHERE table_schema = current_schema()"
            ).fetchall()
        assert tables == 0  # nothing migrated

    @pytest.mark.parametrize("how", ["wrong password", "nothing listens", "malformed"])
    async def test_the_password_never_shows_when_the_database_refuses(
        self, sandbox: SandboxServer, postgres_cluster: Cluster, postgres_url: str, how: str
    ) -> None:
        postgres_cluster.set_password()
        password = f"pw-{uuid.uuid4().hex}"
        url = postgres_cluster.with_password_role(postgres_url, password=password)
        url = {
            "wrong password": url,
            "nothing listens": url.replace(f":{postgres_cluster.port}/", ":1/"),
            "malformed": url.replace("postgresql://", "postgresql:/"),
        }[how]
        env = _env(sandbox, url, NUMBERSVC_LOG_LEVEL="DEBUG")
        process = await _start(env)
        _, err = await asyncio.wait_for(process.communicate(), timeout=60)
        assert process.returncode != 0
        said = {
            "wrong password": b"NUMBERSVC_DATABASE_URL: cannot reach the order ledger at"
            b" postgresql://numbersvc_pw@",
            "nothing listens": b"NUMBERSVC_DATABASE_URL: cannot reach the order ledger at"
            b" postgresql://numbersvc_pw@",
            "malformed": b"NUMBERSVC_DATABASE_URL: the database URL does not parse",
        }[how]
        assert said in err
        assert process.returncode == 2
        assert b"Traceback" not in err
        assert password.encode() not in err

    async def test_the_password_from_a_file_works_and_never_shows(
        self,
        sandbox: SandboxServer,
        postgres_cluster: Cluster,
        postgres_url: str,
        tmp_path: Path,
    ) -> None:
        password = postgres_cluster.set_password()
        secret = tmp_path / "database-url"
        secret.write_text(postgres_cluster.with_password_role(postgres_url, password=password))
        env = _env(sandbox, "", NUMBERSVC_DATABASE_URL_FILE=str(secret))
        del env["NUMBERSVC_DATABASE_URL"]
        served = Served(await _start({**env, "NUMBERSVC_LOG_LEVEL": "DEBUG"}))
        try:
            await served.wait_serving()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{served.port}") as channel:
                stub = pb_grpc.NumberGroupServiceStub(channel)
                await stub.RentNumbers(pb.RentNumbersRequest(group_id=await _group(stub)))
            served.process.send_signal(signal.SIGTERM)
            assert await served.finish() == 0
        finally:
            await served.close()
        assert b"order ledger in PostgreSQL at postgresql://numbersvc_pw@127.0.0.1" in (
            served.stderr
        )
        assert password.encode() not in served.stderr


class _CountedLedger(PostgresLedger):
    """The real PostgreSQL ledger, counting its claims (`begin`), the costly call."""

    claims = 0

    async def begin(
        self, attempt: Attempt, *, daily_cap: int, within_seconds: float | None = None
    ) -> BeginResult:
        self.claims += 1
        return await super().begin(attempt, daily_cap=daily_cap, within_seconds=within_seconds)


async def test_a_duplicate_of_another_replicas_rent_reads_until_its_deadline_and_is_in_progress(
    postgres_url: str, sandbox: SandboxServer
) -> None:
    """Another replica's order is `sending` for longer than this duplicate waits: the
    duplicate polls with reads (one claim in all, so no cap lock per poll) and, at its
    deadline, is told RENT_IN_PROGRESS, not LEDGER_UNAVAILABLE from a claim given no time."""
    other = await PostgresLedger.open(postgres_url)
    mine = await _CountedLedger.open(postgres_url)
    params = RentParams(group_id="G1", quantity=1, app_id="", request_id=str(uuid.uuid4()))
    order = translation.new_order(params, caller="alice")
    claim = Attempt(order, fingerprint(params, "alice"), "other replica")
    try:
        assert (await other.begin(claim, daily_cap=100)).kind is Begin.NEW
        async with PlivoClient(
            base_url=sandbox.base_url, auth_id=sandbox.auth_id, auth_token=sandbox.auth_token
        ) as client:
            desk = RentDesk(upstream=client, ledger=mine, rent_timeout_seconds=30, daily_cap=100)
            started = time.monotonic()
            with pytest.raises(ServiceError) as told:
                await desk.rent(
                    params,
                    caller="alice",
                    peer="test",
                    deadline=Deadline(started + _DUPLICATE_DEADLINE_SECONDS),
                )
            waited = time.monotonic() - started
        assert told.value.outcome is Outcome.RENT_IN_PROGRESS, told.value.message
        assert told.value.retry_delay_seconds
        assert waited < _DUPLICATE_DEADLINE_SECONDS
        assert mine.claims == 1
        entry = await other.get(params.request_id)
        assert entry is not None
        assert (entry.state, entry.owner) == (OrderState.SENDING, other.instance)
    finally:
        await mine.close()
        await other.close()


async def test_while_the_store_is_known_down_rents_are_refused_at_once(
    sandbox: SandboxServer,
    control: SandboxControl,
    postgres_cluster: Cluster,
    postgres_url: str,
) -> None:
    """Once a heartbeat has found the database down, a rent is refused at once (UNAVAILABLE
    LEDGER_UNAVAILABLE with RetryInfo, nothing sent), not after a wait for a pool connection
    (5 s) each; after the database is back, rents work again within a few heartbeats."""
    env = _env(sandbox, postgres_url, NUMBERSVC_INSTANCE_LEASE_SECONDS="1")
    async with _served_replicas(env, 1) as [(served, stub)]:
        group_id = await _group(stub)
        try:
            await asyncio.to_thread(postgres_cluster.stop)

            async def known_down() -> bool:
                return b"ledger heartbeat failed" in served.stderr

            await eventually(known_down, timeout_seconds=30)
            for _ in range(3):
                rent = pb.RentNumbersRequest(group_id=group_id, request_id=str(uuid.uuid4()))
                started = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.RentNumbers(rent, timeout=20)
                # Half the pool's wait: under any load, an answer without one is far quicker.
                assert time.monotonic() - started < 2.5
                assert reason_of(refused.value) == "LEDGER_UNAVAILABLE", refused.value.details()
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "RetryInfo" in rich_details(refused.value)
            # The pool retries its lost connections all along: said once per outage, as the
            # heartbeat's ERROR is, not once per try.
            assert served.stderr.count(b"psycopg.pool") <= 1, served.stderr.decode()
        finally:
            await asyncio.to_thread(postgres_cluster.start)
        assert await _posts(control) == 0

        async def known_up() -> bool:
            return b"ledger heartbeat works again" in served.stderr

        # From the first heartbeat that reaches the database on, rents are taken.
        await eventually(known_up, timeout_seconds=60)
        rent = pb.RentNumbersRequest(group_id=group_id, request_id=str(uuid.uuid4()))
        placed = await stub.RentNumbers(rent, timeout=20)
        assert placed.order.status == pb.ORDER_STATUS_FULFILLED
