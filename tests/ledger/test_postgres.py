"""The order ledger on PostgreSQL only: the database's clock, claims racing with and without
the cap's lock, the stored message of a taken-over order, and a URL's password kept out of
every message.

The behaviour both stores share is in `test_ledger.py` (its `postgres` parameter); each test
here has a schema of its own in the session's throwaway cluster.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Final

import pytest

from numbersvc.ledger import Begin, LedgerUnreachableError, OrderState
from numbersvc.ledger.postgres import PostgresLedger, redacted, scrub
from numbersvc.v1 import number_groups_pb2 as pb
from tests.e2e.conftest import eventually
from tests.ledger.support import SECOND, T0, Clock, PostgresFactory, new_attempt, row_of, seed
from tests.pg import PASSWORD_ROLE, Cluster

PASSWORD: Final = "pw-secret-93c1"


@pytest.fixture
async def postgres(postgres_url: str) -> AsyncIterator[PostgresFactory]:
    factory = PostgresFactory(postgres_url)
    yield factory
    await factory.aclose()


async def test_times_come_from_the_database_clock_without_one(postgres: PostgresFactory) -> None:
    [(before,)] = postgres.query("SELECT (extract(epoch FROM now()) * 1e9)::bigint")
    ledger = await postgres.open()
    order = await seed(ledger, "r-1")
    [(after,)] = postgres.query("SELECT (extract(epoch FROM now()) * 1e9)::bigint")
    assert before <= order.create_time.ToNanoseconds() <= after
    [(expires,)] = postgres.query("SELECT expires_ns FROM instances")
    assert before + 15 * SECOND <= expires <= after + 15 * SECOND


async def test_claims_with_and_without_the_cap_lock_race_for_one_id(
    postgres: PostgresFactory, clock: Clock
) -> None:
    replicas = [await postgres.open(clock), await postgres.open(clock)]
    for round_ in range(20):
        request_id = f"r-{round_}"
        results = await asyncio.gather(
            *(
                replica.begin(new_attempt(request_id), daily_cap=cap)
                for replica in replicas
                for cap in (0, 100)  # without the lock, and under it
            )
        )
        assert sorted(r.kind.name for r in results) == ["EXISTING"] * 3 + ["NEW"]
    assert len(postgres.rows()) == len(postgres.events()) == 20


@pytest.mark.parametrize("state", [OrderState.FAILED, OrderState.RELEASED])
async def test_a_taken_over_orders_stored_message_keeps_its_create_time(
    postgres: PostgresFactory, clock: Clock, state: OrderState
) -> None:
    ledger = await postgres.open(clock)
    await seed(ledger, "r-1", state)
    clock.advance(5 * SECOND)
    assert (await ledger.begin(new_attempt("r-1"), daily_cap=0)).kind is Begin.NEW
    stored = pb.RentalOrder.FromString(row_of(postgres, "r-1")["order_proto"])
    assert stored.create_time.ToNanoseconds() == T0
    assert stored.update_time.ToNanoseconds() == T0 + 5 * SECOND


class _AnswerEater:
    """A TCP proxy to the cluster that, once armed, passes the next COMMIT on and drops
    everything the server says on that connection from then on: a link lost just after a
    claim's commit left, so it committed and its caller never hears so. With `delay`, that
    COMMIT is held until `delay` is set: it reaches the database after its caller gave up."""

    def __init__(self, port: int) -> None:
        self._port = port
        self.armed = False
        self.eaten = asyncio.Event()
        self.delay: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        server, to_server = await asyncio.open_connection("127.0.0.1", self._port)
        mute = asyncio.Event()

        async def up() -> None:
            while data := await client.read(65536):
                if self.armed and b"COMMIT" in data:
                    self.armed = False
                    mute.set()
                    self.eaten.set()
                    if self.delay is not None:
                        await self.delay.wait()
                to_server.write(data)
                await to_server.drain()
            to_server.close()

        async def down() -> None:
            while data := await server.read(65536):
                if not mute.is_set():
                    to_client.write(data)
                    await to_client.drain()
            to_client.close()  # a cancel request's answer is the server closing

        for pump in (up(), down()):
            task = asyncio.create_task(pump)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


@pytest.fixture
async def eater(postgres_cluster: Cluster) -> AsyncIterator[_AnswerEater]:
    proxy = _AnswerEater(postgres_cluster.port)
    await proxy.start()
    yield proxy
    await proxy.close()


@pytest.fixture
async def through(
    eater: _AnswerEater, postgres_url: str, postgres_cluster: Cluster
) -> AsyncIterator[PostgresLedger]:
    """A ledger whose connections go through `eater`."""
    url = postgres_url.replace(f":{postgres_cluster.port}/", f":{eater.port}/")
    assert url != postgres_url
    ledger = await PostgresLedger.open(url)
    yield ledger
    await ledger.close()


class TestLostCommit:
    """A claim whose COMMIT reached the database but whose answer never came back: its caller
    is told nothing was claimed (and sends nothing), so the row it may have committed is
    released at once, not left `sending` until its send window ends."""

    async def test_a_committed_claim_whose_answer_was_lost_is_released(
        self, eater: _AnswerEater, through: PostgresLedger, postgres: PostgresFactory
    ) -> None:
        eater.armed = True
        with pytest.raises(LedgerUnreachableError):
            await through.begin(new_attempt("r-1"), daily_cap=0, within_seconds=2)
        assert eater.eaten.is_set()

        async def released() -> bool:
            return bool(row_of(postgres, "r-1")["state"] == OrderState.RELEASED.value)

        await eventually(released, timeout_seconds=20)
        events = postgres.events("r-1")
        assert [e[2] for e in events] == ["sending", "released"]
        entry = await through.get("r-1")
        assert entry is not None
        assert entry.order.status == pb.ORDER_STATUS_FAILED
        assert "nothing was sent" in entry.order.status_message
        # Free again: a retry claims it.
        assert (await through.begin(new_attempt("r-1"), daily_cap=0)).kind is Begin.NEW

    @pytest.mark.parametrize("cap", [0, 100], ids=["without the cap lock", "under it"])
    async def test_a_claim_whose_commit_lands_after_its_caller_gave_up_is_released(
        self, eater: _AnswerEater, through: PostgresLedger, postgres: PostgresFactory, cap: int
    ) -> None:
        # The COMMIT is on its way (a slow link, a database slow to commit) when the caller's
        # budget ends: the release must not conclude "never committed" before it lands.
        eater.delay = asyncio.Event()
        eater.armed = True
        with pytest.raises(LedgerUnreachableError):
            await through.begin(new_attempt("r-1"), daily_cap=cap, within_seconds=2)
        assert eater.eaten.is_set()

        async def release_looked() -> bool:
            # Done (it read the row before the COMMIT landed), or waiting for the claim's end.
            waiting = postgres.query(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'advisory'"
                " AND query LIKE 'SELECT pg_advisory_xact_lock(%%'"
            )
            return not through._releases or waiting[0][0] > 0

        await eventually(release_looked, timeout_seconds=20, what="the release's look")
        eater.delay.set()

        async def released() -> bool:
            return [r["state"] for r in postgres.rows()] == [OrderState.RELEASED.value]

        await eventually(released, timeout_seconds=20, what="the late claim released")
        assert [e[2] for e in postgres.events("r-1")] == ["sending", "released"]

    async def test_an_earlier_claim_of_the_id_is_never_released(
        self, eater: _AnswerEater, through: PostgresLedger, postgres: PostgresFactory
    ) -> None:
        # The same instance's earlier claim is `sending` (its POST may be out); a repeat's
        # claim (EXISTING) loses its answer: the earlier claim stays as it is.
        assert (await through.begin(new_attempt("r-1"), daily_cap=0)).kind is Begin.NEW
        before = postgres.rows(), postgres.events()
        eater.armed = True
        with pytest.raises(LedgerUnreachableError):
            await through.begin(new_attempt("r-1"), daily_cap=0, within_seconds=2)
        await through.close()  # after any release it started (closing twice is harmless)
        assert (postgres.rows(), postgres.events()) == before


class TestSecrets:
    async def test_an_unparseable_url_is_refused_without_quoting_it(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        url = f"postgresql:/alice:{PASSWORD}@127.0.0.1:1/db"
        with caplog.at_level(logging.DEBUG), pytest.raises(ValueError, match="does not parse") as e:
            await PostgresLedger.open(url, connect_timeout_seconds=1)
        assert PASSWORD not in str(e.value)
        assert PASSWORD not in caplog.text

    @pytest.mark.parametrize("how", ["wrong password", "nothing listens"])
    async def test_an_unreachable_database_is_named_without_the_password(
        self,
        postgres_cluster: Cluster,
        postgres_url: str,
        caplog: pytest.LogCaptureFixture,
        how: str,
    ) -> None:
        postgres_cluster.set_password()
        url = postgres_cluster.with_password_role(postgres_url, password=PASSWORD)
        if how == "nothing listens":
            url = url.replace(f":{postgres_cluster.port}/", ":1/")
        with caplog.at_level(logging.DEBUG), pytest.raises(LedgerUnreachableError) as e:
            await PostgresLedger.open(url, connect_timeout_seconds=2)
        assert f"at postgresql://{PASSWORD_ROLE}@127.0.0.1:" in str(e.value)
        assert PASSWORD not in str(e.value)
        assert PASSWORD not in caplog.text

    @pytest.mark.parametrize(
        ("conninfo", "shown"),
        [
            (f"postgresql://alice:{PASSWORD}@db.internal:6432/ledger", "alice@db.internal:6432"),
            (f"host=db port=5432 user=bob password={PASSWORD} dbname=x", "bob@db:5432/x"),
            (f"postgres:/alice:{PASSWORD}@h/db", "<unparseable database URL>"),
        ],
    )
    def test_redacted_and_scrubbed(self, conninfo: str, shown: str) -> None:
        assert shown in redacted(conninfo)
        assert PASSWORD not in redacted(conninfo)
        assert PASSWORD not in scrub(f"could not connect with {conninfo}", conninfo)
