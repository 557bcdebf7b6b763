"""The order ledger on SQLite only: its file, pragmas, schema versions and upgrades, locks,
full disks, and other processes on the same file."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from numbersvc.ledger import (
    Begin,
    BeginResult,
    LedgerEntry,
    LedgerSchemaError,
    LedgerUnreachableError,
    OrderQuery,
    OrderState,
    SqliteLedger,
    default_ledger_path,
)
from numbersvc.v1 import number_groups_pb2 as pb
from tests.ledger.support import (
    MIDNIGHT,
    SECOND,
    T0,
    Clock,
    SqliteFactory,
    dump,
    entry_of,
    new_attempt,
    row_of,
    seed,
)


@pytest.fixture
async def sqlite(tmp_path: Path) -> AsyncIterator[SqliteFactory]:
    factory = SqliteFactory(tmp_path / "state" / "ledger.sqlite3")
    yield factory
    await factory.aclose()


@pytest.fixture
async def ledger(sqlite: SqliteFactory, clock: Clock) -> SqliteLedger:
    opened = await sqlite.open(clock)
    assert isinstance(opened, SqliteLedger)
    return opened


class TestSchema:
    async def test_pragmas(self, ledger: SqliteLedger, sqlite: SqliteFactory) -> None:
        assert sqlite.query("PRAGMA journal_mode") == [("wal",)]
        assert sqlite.query("PRAGMA user_version") == [(3,)]

        # `synchronous` is per connection: read it on the ledger's own (private) connection,
        # on its worker thread.
        def synchronous() -> int:
            (value,) = ledger._conn().execute("PRAGMA synchronous").fetchone()
            return int(value)

        assert await ledger._run(synchronous) == 2  # FULL

    async def test_open_creates_the_folder(self, tmp_path: Path) -> None:
        deep = tmp_path / "a" / "b" / "c" / "ledger.sqlite3"
        ledger = await SqliteLedger.open(deep)
        try:
            await seed(ledger, "r-1")
        finally:
            await ledger.close()
        assert deep.is_file()

    async def test_memory_database_works_and_keeps_nothing(self, clock: Clock) -> None:
        for _ in range(2):
            ledger = await SqliteLedger.open(":memory:", clock_ns=clock)
            try:
                assert await ledger.get("r-1") is None
                await seed(ledger, "r-1", OrderState.OUTCOME_UNKNOWN, quantity=2)
                await ledger.settle("r-1", OrderState.FAILED, numbers=[], note="n", actor="ops")
                assert await ledger.list(OrderQuery(), after=None, limit=5) == (
                    [await entry_of(ledger, "r-1")],
                    1,
                )
                assert (await ledger.heartbeat()).recovered == 0
            finally:
                await ledger.close()


# The schema as the first release (version 1) wrote it, frozen here: the upgrade must take
# the files it left behind. NOTE: a copy of `sqlite._MIGRATIONS[0]` on purpose, never to be
# shared with it: if that code changed, this test must still write what the release wrote.
V1_SCHEMA = """
CREATE TABLE orders (
    request_id      TEXT PRIMARY KEY,
    fingerprint     TEXT NOT NULL,
    caller          TEXT NOT NULL,
    peer            TEXT NOT NULL,
    owner           TEXT NOT NULL,
    state           TEXT NOT NULL,
    status          INTEGER NOT NULL,
    quantity        INTEGER NOT NULL,
    create_time_ns  INTEGER NOT NULL,
    update_time_ns  INTEGER NOT NULL,
    order_proto     BLOB NOT NULL,
    error_outcome   TEXT NOT NULL DEFAULT '',
    upstream        TEXT NOT NULL DEFAULT ''
);
CREATE INDEX orders_by_time ON orders (create_time_ns, request_id);
CREATE INDEX orders_by_caller_time ON orders (caller, create_time_ns);
CREATE TABLE events (
    id          INTEGER PRIMARY KEY,
    request_id  TEXT NOT NULL,
    time_ns     INTEGER NOT NULL,
    state       TEXT NOT NULL,
    detail      TEXT NOT NULL
);
PRAGMA user_version=1;
"""


@contextlib.contextmanager
def _write_lock_held(path: Path) -> Iterator[Callable[[], object]]:
    """Another connection holds the file's write lock (BEGIN IMMEDIATE) until `release()`."""
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        yield lambda: blocker.execute("COMMIT")
    finally:
        blocker.close()


def _write_v1_file(path: Path) -> None:
    """A version-1 ledger as its server left it: one order sent, one done, one failed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(V1_SCHEMA)
        for i, (request_id, state, status) in enumerate(
            [
                ("v1-done", "fulfilled", pb.ORDER_STATUS_FULFILLED),
                ("v1-sending", "sending", pb.ORDER_STATUS_OUTCOME_UNKNOWN),
                ("v1-failed", "failed", pb.ORDER_STATUS_FAILED),
            ]
        ):
            claim = new_attempt(request_id, quantity=2)
            claim.order.create_time.FromNanoseconds(T0 + i * SECOND)
            claim.order.update_time.FromNanoseconds(T0 + i * SECOND)
            claim.order.status = status
            db.execute(
                "INSERT INTO orders VALUES (?, ?, ?, ?, 'old-instance', ?, ?, 2, ?, ?, ?, '', '')",
                (
                    request_id,
                    claim.fingerprint,
                    claim.order.caller,
                    claim.peer,
                    state,
                    status,
                    T0 + i * SECOND,
                    T0 + i * SECOND,
                    claim.order.SerializeToString(),
                ),
            )
            db.execute(
                "INSERT INTO events (request_id, time_ns, state, detail) VALUES (?, ?, ?, '')",
                (request_id, T0 + i * SECOND, state),
            )


class TestSchemaVersions:
    async def test_a_version_1_file_is_upgraded_in_place(
        self, sqlite: SqliteFactory, clock: Clock
    ) -> None:
        _write_v1_file(sqlite.path)
        before = dump(sqlite)
        clock.now = T0 + 60 * SECOND
        ledger = await sqlite.open(clock)
        assert sqlite.query("PRAGMA user_version") == [(3,)]
        rows = sqlite.rows()
        # Every old value is kept; the new columns: attempted at creation, past any deadline.
        assert [{k: r[k] for k in before[0][0]} for r in rows] == before[0]
        assert [(r["attempt_time_ns"], r["send_deadline_ns"]) for r in rows] == [
            (r["create_time_ns"], 0) for r in rows
        ]
        assert sqlite.events() == before[1]
        assert sqlite.instances() == {ledger.instance}
        indexes = {r[0] for r in sqlite.query("SELECT name FROM sqlite_master WHERE type='index'")}
        assert "orders_by_caller_time" not in indexes
        assert {"orders_by_time", "orders_by_caller_attempt"} <= indexes
        # The old server's order in flight: its owner held no lease, so it is recovered.
        assert (await ledger.heartbeat()).recovered == 1
        assert (await entry_of(ledger, "v1-sending")).state is OrderState.OUTCOME_UNKNOWN
        # The cap counts the old orders that may have rented (by their creation day).
        refused = await ledger.begin(new_attempt("new", quantity=2), daily_cap=5)
        assert refused == BeginResult(Begin.OVER_QUOTA, used_today=4)
        retry = new_attempt("v1-failed", quantity=2)
        assert (await ledger.begin(retry, daily_cap=0)).kind is Begin.NEW
        assert retry.order.create_time.ToNanoseconds() == T0 + 2 * SECOND
        await ledger.close()
        # Opened again, it is left as it is.
        again = dump(sqlite)
        await sqlite.open(clock)
        assert dump(sqlite) == again

    async def test_a_newer_version_is_refused_and_left_untouched(
        self, sqlite: SqliteFactory
    ) -> None:
        _write_v1_file(sqlite.path)
        with contextlib.closing(sqlite3.connect(sqlite.path)) as db:
            db.execute("PRAGMA user_version=4")
        before = dump(sqlite)
        with pytest.raises(LedgerSchemaError, match=r"schema version 4, newer than .* \(3\)"):
            await SqliteLedger.open(sqlite.path)
        assert dump(sqlite) == before
        assert sqlite.query("PRAGMA user_version") == [(4,)]
        tables = {r[0] for r in sqlite.query("SELECT name FROM sqlite_master WHERE type='table'")}
        assert "instances" not in tables


class TestDurability:
    async def test_sigkilled_process_leaves_its_claim_for_recovery(
        self, sqlite: SqliteFactory
    ) -> None:
        script = (
            "import asyncio, os, signal, sys\n"
            "from numbersvc.ledger import Attempt, SqliteLedger\n"
            "from numbersvc.v1 import number_groups_pb2 as pb\n"
            "async def main():\n"
            "    ledger = await SqliteLedger.open(sys.argv[1], lease_seconds=0.2,\n"
            "                                     send_timeout_seconds=0.2)\n"
            "    order = pb.RentalOrder(request_id='killed', caller='alice', quantity=2)\n"
            "    result = await ledger.begin(Attempt(order, 'alice|G1|2|', 'p'), daily_cap=0)\n"
            "    print(result.kind.name, ledger.instance, flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "asyncio.run(main())\n"
        )
        stdout = await _run_python(script, str(sqlite.path), returncode=-signal.SIGKILL)
        kind, owner = stdout.split()
        assert kind == "NEW"
        # Its lease is left behind, expiring: the next heartbeats recover its order.
        assert sqlite.instances() == {owner}
        second = await sqlite.open()
        entry = await entry_of(second, "killed")
        assert (entry.state, entry.owner) == (OrderState.SENDING, owner)
        recovered = 0
        async with asyncio.timeout(30):
            while not recovered:
                recovered = (await second.heartbeat()).recovered
                await asyncio.sleep(0.05)
        assert recovered == 1
        assert (await entry_of(second, "killed")).state is OrderState.OUTCOME_UNKNOWN
        assert sqlite.instances() == {second.instance}

    async def test_a_closed_ledger_refuses_work_and_closes_twice(
        self, sqlite: SqliteFactory
    ) -> None:
        ledger = await sqlite.open()
        await ledger.close()
        with pytest.raises(RuntimeError):
            await ledger.get("r-1")
        await ledger.close()

    async def test_close_lets_a_finish_queued_before_it_commit(
        self, sqlite: SqliteFactory, clock: Clock
    ) -> None:
        ledger = await sqlite.open(clock)
        order = await seed(ledger, "late")
        with _write_lock_held(sqlite.path) as release:
            # Keep the worker busy (a begin waiting for the write lock), so the finish is still
            # queued, not running, when close() is called.
            busy = asyncio.create_task(ledger.begin(new_attempt("busy"), daily_cap=0))
            finishing = asyncio.create_task(
                ledger.finish(order, OrderState.FULFILLED, upstream="late body")
            )
            await asyncio.sleep(0)  # the finish reaches the worker's queue
            closing = asyncio.create_task(ledger.close())
            await asyncio.sleep(0.2)
            assert not busy.done()
            assert not finishing.done()
            assert not closing.done()
            release()
            await asyncio.wait_for(closing, timeout=10)
        assert (await busy).kind is Begin.NEW
        assert (await finishing).state is OrderState.FULFILLED
        with pytest.raises(RuntimeError):
            await ledger.get("late")
        entry = await entry_of(await sqlite.open(), "late")
        assert (entry.state, entry.order.status) == (
            OrderState.FULFILLED,
            pb.ORDER_STATUS_FULFILLED,
        )
        assert row_of(sqlite, "late")["upstream"] == "late body"

    async def test_a_failed_write_leaves_nothing_and_the_ledger_usable(
        self, ledger: SqliteLedger, sqlite: SqliteFactory
    ) -> None:
        await _fill_the_disk(ledger)
        await _write_until_refused(ledger)
        written = {r[0] for r in sqlite.query("SELECT request_id FROM orders")}
        assert written == {e[0] for e in sqlite.events()}
        await _free_the_disk(ledger)
        assert (await ledger.begin(new_attempt("after"), daily_cap=0)).kind is Begin.NEW

    async def test_a_full_disk_is_reported_as_such(self, ledger: SqliteLedger) -> None:
        await _fill_the_disk(ledger)
        error = await _write_until_refused(ledger)
        assert "database or disk is full" in str(error)
        assert error.sqlite_errorname == "SQLITE_FULL"
        # SQLite rolled the transaction back itself: nothing is left open on the connection.
        assert not await ledger._run(lambda: ledger._conn().in_transaction)


class TestTransactions:
    async def test_a_heartbeat_keeps_an_outcome_committed_before_it(
        self, sqlite: SqliteFactory
    ) -> None:
        loop = asyncio.get_running_loop()
        first = await sqlite.open(lease_seconds=0.01, send_timeout_seconds=0)
        order = await seed(first, "race")
        await asyncio.sleep(0.05)  # the lease (10 ms) is over: the row is recoverable
        placed = pb.RentalOrder()
        placed.CopyFrom(order)
        placed.status, placed.upstream_status = pb.ORDER_STATUS_FULFILLED, "fulfilled"
        placed.numbers.add(number="14155550100", e164="+14155550100", upstream_status="Success")
        finishing: list[concurrent.futures.Future[LedgerEntry]] = []

        def let_the_owner_finish(statement: str) -> None:
            # Runs on the second ledger's worker thread as its heartbeat starts its write
            # transaction (before the lock is taken): the owner commits Plivo's answer first.
            if statement.startswith("BEGIN") and not finishing:
                finishing.append(
                    asyncio.run_coroutine_threadsafe(
                        first.finish(placed, OrderState.FULFILLED, upstream="BODY"), loop
                    )
                )
                finishing[0].result(timeout=30)

        second = await sqlite.open()
        assert isinstance(second, SqliteLedger)
        await second._run(lambda: second._conn().set_trace_callback(let_the_owner_finish))
        # Read under its lock: the row is known now.
        assert (await second.heartbeat()).recovered == 0
        assert finishing, "heartbeat() never began a write transaction"
        assert finishing[0].result().state is OrderState.FULFILLED
        entry = await entry_of(second, "race")
        assert entry.state is OrderState.FULFILLED
        assert [n.e164 for n in entry.order.numbers] == ["+14155550100"]
        assert row_of(sqlite, "race")["upstream"] == "BODY"
        assert [e[2] for e in sqlite.events("race")] == ["sending", "fulfilled"]

    async def test_the_total_and_the_page_are_one_snapshot(
        self, ledger: SqliteLedger, sqlite: SqliteFactory, clock: Clock
    ) -> None:
        for i, request_id in enumerate(("a", "b", "c")):
            clock.now = T0 + i * SECOND
            await seed(ledger, request_id)
        loop = asyncio.get_running_loop()
        inserting: list[concurrent.futures.Future[BeginResult]] = []
        other = await sqlite.open(Clock(T0 - SECOND))

        def insert_between(statement: str) -> None:
            # Runs on the listing ledger's worker thread as the page query starts, after the
            # count: another instance commits a new order right now.
            if statement.startswith("SELECT order_proto") and not inserting:
                inserting.append(
                    asyncio.run_coroutine_threadsafe(
                        other.begin(new_attempt("0-new"), daily_cap=0), loop
                    )
                )
                inserting[0].result(timeout=30)

        async def ids() -> tuple[list[str], int]:
            entries, total = await ledger.list(OrderQuery(), after=None, limit=10)
            return [e.order.request_id for e in entries], total

        await ledger._run(lambda: ledger._conn().set_trace_callback(insert_between))
        try:
            page = await ids()
        finally:
            await ledger._run(lambda: ledger._conn().set_trace_callback(None))
        assert inserting, "list() never ran its page query"
        assert inserting[0].result().kind is Begin.NEW
        assert page == (["a", "b", "c"], 3)
        # The order did land: the next call sees it, in both the total and the page.
        assert await ids() == (["0-new", "a", "b", "c"], 4)

    async def test_a_writer_holding_the_lock_is_waited_for(
        self, ledger: SqliteLedger, sqlite: SqliteFactory
    ) -> None:
        with _write_lock_held(sqlite.path) as release:
            begin = asyncio.create_task(ledger.begin(new_attempt("r-1"), daily_cap=0))
            await asyncio.sleep(0.3)
            assert not begin.done()
            release()
            assert (await asyncio.wait_for(begin, timeout=5)).kind is Begin.NEW

    async def test_a_claim_gives_up_on_the_lock_within_its_time(
        self, ledger: SqliteLedger, sqlite: SqliteFactory
    ) -> None:
        # The caller's time left, not the 10 s busy timeout: it hears LEDGER_UNAVAILABLE in time.
        with _write_lock_held(sqlite.path):
            began = time.monotonic()
            with pytest.raises(LedgerUnreachableError, match="locked"):
                await ledger.begin(new_attempt("r-1"), daily_cap=0, within_seconds=0.3)
            assert time.monotonic() - began < 5
        busy = await ledger._run(lambda: ledger._conn().execute("PRAGMA busy_timeout").fetchone())
        assert busy == (10_000,)  # the other statements wait as long as before
        assert (await ledger.begin(new_attempt("r-1"), daily_cap=0)).kind is Begin.NEW

    async def test_begin_reads_the_clock_once_it_holds_the_lock(
        self, ledger: SqliteLedger, sqlite: SqliteFactory, clock: Clock
    ) -> None:
        # The day (and the cap) is the one the row lands in, not the one the call started in.
        clock.now = MIDNIGHT - SECOND
        await seed(ledger, "yesterday", OrderState.FULFILLED, quantity=5)
        with _write_lock_held(sqlite.path) as release:
            begin = asyncio.create_task(ledger.begin(new_attempt("r-1", quantity=5), daily_cap=5))
            await asyncio.sleep(0.3)
            assert not begin.done()
            clock.now = MIDNIGHT + SECOND
            release()
            assert (await asyncio.wait_for(begin, timeout=5)).kind is Begin.NEW
        row = row_of(sqlite, "r-1")
        assert (row["create_time_ns"], row["update_time_ns"]) == (MIDNIGHT + SECOND,) * 2
        assert sqlite.events("r-1")[0][1] == MIDNIGHT + SECOND

    @pytest.mark.parametrize("how", ["finish", "settle"])
    async def test_updates_read_the_clock_once_they_hold_the_lock(
        self, ledger: SqliteLedger, sqlite: SqliteFactory, clock: Clock, how: str
    ) -> None:
        order = await seed(ledger, "r-1", OrderState.OUTCOME_UNKNOWN)
        with _write_lock_held(sqlite.path) as release:
            update = asyncio.create_task(
                ledger.finish(order, OrderState.FULFILLED)
                if how == "finish"
                else ledger.settle("r-1", OrderState.FAILED, numbers=[], note="n", actor="ops")
            )
            await asyncio.sleep(0.3)
            assert not update.done()
            clock.advance(SECOND)
            release()
            entry = await asyncio.wait_for(update, timeout=5)
        assert entry.order.update_time.ToNanoseconds() == T0 + SECOND
        assert row_of(sqlite, "r-1")["update_time_ns"] == T0 + SECOND
        assert sqlite.events("r-1")[-1][1] == T0 + SECOND

    async def test_settle_from_another_process_is_seen(
        self, ledger: SqliteLedger, sqlite: SqliteFactory
    ) -> None:
        await seed(ledger, "r-1", OrderState.OUTCOME_UNKNOWN, quantity=2)
        await seed(ledger, "r-2", OrderState.FULFILLED)
        script = (
            "import asyncio, sys\n"
            "from numbersvc.ledger import OrderState, SettleError, SqliteLedger\n"
            "async def main():\n"
            "    ledger = await SqliteLedger.open(sys.argv[1])\n"
            "    try:\n"
            "        entry = await ledger.settle(sys.argv[2], OrderState.FULFILLED,\n"
            "                                    numbers=sys.argv[3:], note='n', actor='cli:ops')\n"
            "        print(entry.state.value)\n"
            "    except SettleError as exc:\n"
            "        print('refused:', exc)\n"
            "    finally:\n"
            "        await ledger.close()\n"
            "asyncio.run(main())\n"
        )
        out = await _run_python(script, str(sqlite.path), "r-1", "+14155550100", "+14155550101")
        assert out.strip() == "fulfilled"
        entry = await entry_of(ledger, "r-1")
        assert entry.state is OrderState.FULFILLED
        assert entry.order.status_message == "settled as fulfilled by cli:ops: n"
        assert [n.e164 for n in entry.order.numbers] == ["+14155550100", "+14155550101"]
        out = await _run_python(script, str(sqlite.path), "r-2", "+14155550102")
        assert out.strip() == "refused: order r-2 is fulfilled: nothing to settle"


async def _fill_the_disk(ledger: SqliteLedger) -> None:
    """Cap the file at its current size (private connection): the next new page is SQLITE_FULL."""

    def cap() -> None:
        db = ledger._conn()
        (pages,) = db.execute("PRAGMA page_count").fetchone()
        db.execute(f"PRAGMA max_page_count={pages}")

    await ledger._run(cap)


async def _write_until_refused(ledger: SqliteLedger) -> sqlite3.OperationalError:
    """Claim until the file refuses; return SQLite's error, which `begin` names the cause of
    its `LedgerUnreachableError` (the rent desk's LEDGER_UNAVAILABLE)."""
    for i in range(100):
        try:
            await ledger.begin(new_attempt(f"r-{i}", peer="p" * 3000), daily_cap=0)
        except LedgerUnreachableError as exc:
            cause = exc.__cause__
            break
    else:
        raise AssertionError("a file capped at its size took 100 more orders")
    assert isinstance(cause, sqlite3.OperationalError), cause
    return cause


async def _free_the_disk(ledger: SqliteLedger) -> None:
    await ledger._run(lambda: ledger._conn().execute("PRAGMA max_page_count=1000000"))


async def _run_python(script: str, *args: str, returncode: int = 0) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == returncode, stderr.decode()
    return stdout.decode()


class TestDefaultPath:
    def test_xdg_state_home(self) -> None:
        assert default_ledger_path({"XDG_STATE_HOME": "/srv/state"}) == Path(
            "/srv/state/numbersvc/ledger.sqlite3"
        )

    @pytest.mark.parametrize("environ", [{}, {"XDG_STATE_HOME": ""}])
    def test_falls_back_to_home(self, environ: dict[str, str]) -> None:
        expected = Path.home() / ".local" / "state" / "numbersvc" / "ledger.sqlite3"
        assert default_ledger_path(environ) == expected
