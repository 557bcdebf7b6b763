"""`numbersvc db migrate|status|import` against a real PostgreSQL, in-process and as processes.

The database comes from the environment as the server reads it; a password (in the URL, its
file or PGPASSWORD) must never be printed, whatever fails.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from numbersvc.cli import main
from numbersvc.ledger import Begin, OrderState, SqliteLedger
from numbersvc.ledger.pgimport import IMPORTED_NOTE
from numbersvc.ledger.pgschema import SchemaTooNewError, shipped
from numbersvc.ledger.postgres import PostgresLedger
from numbersvc.v1 import number_groups_pb2 as pb
from tests.ledger.support import new_attempt
from tests.ledger.test_sqlite import _write_v1_file
from tests.pg import Cluster

LATEST = shipped()[-1]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NUMBERSVC_DATABASE_URL", "NUMBERSVC_DATABASE_URL_FILE", "PGPASSWORD"):
        monkeypatch.delenv(name, raising=False)


DbCommand = Callable[..., tuple[int, str]]


@pytest.fixture
def db(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> DbCommand:
    """Run `numbersvc db ARGV...` against a database URL; return the exit code and output."""

    def run(url: str, *argv: str) -> tuple[int, str]:
        monkeypatch.setenv("NUMBERSVC_DATABASE_URL", url)
        code = main.run(["db", *argv])
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    return run


def _versions(url: str) -> list[int]:
    with psycopg.connect(url, autocommit=True) as conn:
        return [v for (v,) in conn.execute("SELECT version FROM schema_migrations").fetchall()]


def test_migrate_then_status_then_migrate_again(empty_postgres_url: str, db: DbCommand) -> None:
    code, out = db(empty_postgres_url, "status")
    assert code == 3
    assert f"{LATEST.version:04d}  {LATEST.name}" in out
    assert "pending" in out
    code, out = db(empty_postgres_url, "migrate")
    assert code == 0
    assert f"applied {LATEST.version:04d}_{LATEST.name}" in out
    code, out = db(empty_postgres_url, "status")
    assert code == 0
    assert "up to date" in out
    code, out = db(empty_postgres_url, "migrate")
    assert (code, "applied 0" in out) == (0, False)
    assert _versions(empty_postgres_url) == [m.version for m in shipped()]


def test_migrators_started_together_apply_each_migration_once(empty_postgres_url: str) -> None:
    env = {"NUMBERSVC_DATABASE_URL": empty_postgres_url, "PATH": ""}
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "numbersvc", "db", "migrate"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=60)[0] for p in processes]
    assert [p.returncode for p in processes] == [0] * 4, outputs
    assert sum(f"applied {LATEST.version:04d}" in out for out in outputs) == 1, outputs
    assert _versions(empty_postgres_url) == [m.version for m in shipped()]


async def test_ledgers_opened_together_on_an_empty_schema_migrate_once(
    empty_postgres_url: str,
) -> None:
    ledgers = await asyncio.gather(*(PostgresLedger.open(empty_postgres_url) for _ in range(6)))
    try:
        assert _versions(empty_postgres_url) == [m.version for m in shipped()]
        assert (await ledgers[0].begin(new_attempt("r-1"), daily_cap=0)).kind is Begin.NEW
    finally:
        for ledger in ledgers:
            await ledger.close()


async def test_a_schema_newer_than_the_code_is_refused(postgres_url: str, db: DbCommand) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES (9999, 'future', '')"
        )
    with pytest.raises(SchemaTooNewError, match="9999"):
        await PostgresLedger.open(postgres_url)
    for command in ("migrate", "status"):
        code, out = await asyncio.to_thread(db, postgres_url, command)
        assert code == 2
        assert "version 9999, newer than this numbersvc knows" in out


def test_without_a_database_url_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main.run(["db", "status"]) == 2
    assert "NUMBERSVC_DATABASE_URL" in capsys.readouterr().err


class TestPasswords:
    def test_from_pgpassword_and_from_the_url_file(
        self,
        postgres_cluster: Cluster,
        postgres_url: str,
        db: DbCommand,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
        tmp_path: Path,
    ) -> None:
        password = postgres_cluster.set_password()
        bare = postgres_cluster.with_password_role(postgres_url, password=None)
        monkeypatch.setenv("PGPASSWORD", password)
        code, out = db(bare, "status")
        assert code == 0, out
        monkeypatch.delenv("PGPASSWORD")
        monkeypatch.delenv("NUMBERSVC_DATABASE_URL")
        secret = tmp_path / "url"
        secret.write_text(postgres_cluster.with_password_role(postgres_url, password=password))
        monkeypatch.setenv("NUMBERSVC_DATABASE_URL_FILE", str(secret))
        assert main.run(["db", "status"]) == 0
        assert password not in capsys.readouterr().out

    @pytest.mark.parametrize(
        "how", ["wrong password", "nothing listens", "unknown database", "malformed"]
    )
    def test_never_printed_when_the_database_refuses(
        self, postgres_cluster: Cluster, postgres_url: str, db: DbCommand, how: str
    ) -> None:
        postgres_cluster.set_password()
        password = "pw-never-shown-7f3a"
        url = postgres_cluster.with_password_role(postgres_url, password=password)
        url = {
            "wrong password": url,
            "nothing listens": url.replace(f":{postgres_cluster.port}/", ":1/"),
            "unknown database": url.replace("/postgres?", "/nosuchdb?"),
            "malformed": url.replace("postgresql://", "postgresql:/").replace("?", "?x=%zz&"),
        }[how]
        code, out = db(url, "migrate")
        assert code in (1, 2), out
        assert "error:" in out
        assert password not in out


class TestImport:
    async def _sqlite_ledger(self, path: Path) -> dict[str, OrderState]:
        """A SQLite ledger with an order in each state that matters, and their events."""
        ledger = await SqliteLedger.open(path)
        try:
            states = {
                "r-fulfilled": OrderState.FULFILLED,
                "r-failed": OrderState.FAILED,
                "r-unknown": OrderState.OUTCOME_UNKNOWN,
                "r-sending": OrderState.SENDING,
            }
            for request_id, state in states.items():
                attempt = new_attempt(request_id, quantity=2)
                await ledger.begin(attempt, daily_cap=0)
                if state is not OrderState.SENDING:
                    await ledger.finish(attempt.order, state)
            await ledger.settle(
                "r-unknown",
                OrderState.FULFILLED,
                numbers=["+14155550100"],
                note="console",
                actor="cli:ana",
            )
            states["r-unknown"] = OrderState.FULFILLED
            return states
        finally:
            await ledger.close()

    async def test_copies_orders_and_events_once_and_sending_becomes_unknown(
        self, postgres_url: str, tmp_path: Path, db: DbCommand, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # The login name as `orders settle --offline` finds it (LOGNAME too), not $USER alone.
        monkeypatch.delenv("USER", raising=False)
        monkeypatch.setenv("LOGNAME", "ana-oncall")
        path = tmp_path / "ledger.sqlite3"
        states = await self._sqlite_ledger(path)
        before = path.read_bytes()
        code, out = await asyncio.to_thread(db, postgres_url, "import", "--from-sqlite", str(path))
        assert code == 0, out
        assert "imported 4 order(s) and 8 event(s); 0 already there" in out
        assert "1 were being sent" in out
        with sqlite3.connect(path) as file:
            sqlite_events = file.execute(
                "SELECT request_id, time_ns, state, detail FROM events ORDER BY id"
            ).fetchall()
        ledger = await PostgresLedger.open(postgres_url)
        try:
            sqlite = await SqliteLedger.open(path)
            try:
                for request_id, state in states.items():
                    moved, original = await ledger.get(request_id), await sqlite.get(request_id)
                    assert moved is not None
                    assert original is not None
                    if state is OrderState.SENDING:
                        assert moved.state is OrderState.OUTCOME_UNKNOWN
                        assert moved.order.status == pb.ORDER_STATUS_OUTCOME_UNKNOWN
                        assert moved.order.status_message == IMPORTED_NOTE
                    else:
                        assert (moved.order, moved.state) == (original.order, original.state)
            finally:
                await sqlite.close()
        finally:
            await ledger.close()
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            events = conn.execute(
                "SELECT request_id, time_ns, state, detail FROM events ORDER BY id"
            ).fetchall()
        assert events[: len(sqlite_events)] == sqlite_events
        [extra] = events[len(sqlite_events) :]
        assert extra[0] == "r-sending"
        assert extra[2] == "outcome_unknown"
        assert extra[3].startswith(f"{IMPORTED_NOTE} (imported by cli:")
        assert extra[3].endswith("(imported by cli:ana-oncall)"), extra[3]
        dump = conn_dump(postgres_url)

        code, out = await asyncio.to_thread(db, postgres_url, "import", "--from-sqlite", str(path))
        assert code == 0, out
        assert "imported 0 order(s) and 0 event(s); 4 already there" in out
        assert conn_dump(postgres_url) == dump
        assert path.read_bytes() == before

    async def test_a_version_1_file_arrives_attempted_at_creation_and_past_its_deadline(
        self, postgres_url: str, tmp_path: Path, db: DbCommand
    ) -> None:
        path = tmp_path / "v1.sqlite3"
        _write_v1_file(path)
        code, out = await asyncio.to_thread(db, postgres_url, "import", "--from-sqlite", str(path))
        assert code == 0, out
        assert "imported 3 order(s) and 3 event(s); 0 already there" in out
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT request_id, state, attempt_time_ns - create_time_ns, send_deadline_ns"
                " FROM orders ORDER BY request_id"
            ).fetchall()
        assert rows == [
            ("v1-done", "fulfilled", 0, 0),
            ("v1-failed", "failed", 0, 0),
            ("v1-sending", "outcome_unknown", 0, 0),
        ]
        with sqlite3.connect(path) as file:  # read, never upgraded
            assert file.execute("PRAGMA user_version").fetchall() == [(1,)]

    def test_a_missing_file_exits_1_and_imports_nothing(
        self, postgres_url: str, tmp_path: Path, db: DbCommand
    ) -> None:
        missing = tmp_path / "nope.sqlite3"
        code, out = db(postgres_url, "import", "--from-sqlite", str(missing))
        assert code == 1
        assert "no SQLite ledger" in out
        assert not missing.exists()
        assert conn_dump(postgres_url) == ([], [])


def conn_dump(url: str) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return (
            conn.execute("SELECT * FROM orders ORDER BY request_id").fetchall(),
            conn.execute("SELECT * FROM events ORDER BY id").fetchall(),
        )


def test_status_shows_applied_times_in_utc_whatever_the_sessions_zone(
    postgres_url: str, db: DbCommand
) -> None:
    tokyo = postgres_url + "%20-ctimezone%3DAsia/Tokyo"
    before = datetime.now(UTC).replace(microsecond=0)
    assert _versions(tokyo) == [m.version for m in shipped()]
    code, out = db(tokyo, "status")
    assert code == 0
    shown = re.search(r"applied (\S+Z)", out)
    assert shown is not None, out
    applied = datetime.strptime(shown.group(1), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert abs(applied - before) < timedelta(minutes=5)


async def test_offline_settle_uses_the_servers_database_when_one_is_set(
    postgres_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With NUMBERSVC_DATABASE_URL set, `orders settle --offline` settles in PostgreSQL: the
    servers' store, not a SQLite file of its own (which would say "no order ledger")."""
    request_id = str(uuid.uuid4())
    ledger = await PostgresLedger.open(postgres_url)
    try:
        attempt = new_attempt(request_id)
        assert (await ledger.begin(attempt, daily_cap=0)).kind is Begin.NEW
        await ledger.finish(attempt.order, OrderState.OUTCOME_UNKNOWN)
    finally:
        await ledger.close()
    monkeypatch.setenv("NUMBERSVC_DATABASE_URL", postgres_url)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))  # no SQLite ledger there
    argv = ["orders", "settle", request_id, "--as", "failed", "--note", "no number", "--offline"]
    code = await asyncio.to_thread(main.run, argv)
    out = capsys.readouterr()
    assert code == 0, out
    ledger = await PostgresLedger.open(postgres_url)
    try:
        entry = await ledger.get(request_id)
    finally:
        await ledger.close()
    assert entry is not None
    assert entry.state is OrderState.FAILED
    assert "no number" in entry.order.status_message


class TestOfflineSettleNeverMigrates:
    """`orders settle --offline` opens the servers' database without migrating it: a schema
    behind this numbersvc (migrations pending: `db migrate` is the operator's step, under its
    Job) or ahead of it is refused with a clear message and exit 2, the schema untouched."""

    async def _settle(
        self, url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> tuple[int, str]:
        monkeypatch.setenv("NUMBERSVC_DATABASE_URL", url)
        request_id = str(uuid.uuid4())
        argv = ["orders", "settle", request_id, "--as", "failed", "--note", "ok", "--offline"]
        code = await asyncio.to_thread(main.run, argv)
        out = capsys.readouterr()
        return code, out.out + out.err

    async def test_pending_migrations_are_refused_not_applied(
        self,
        empty_postgres_url: str,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        code, out = await self._settle(empty_postgres_url, monkeypatch, capsys)
        assert code == 2, out
        assert "pending" in out
        assert "numbersvc db migrate" in out
        with psycopg.connect(empty_postgres_url, autocommit=True) as conn:
            [(exists,)] = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
        assert not exists

    async def test_a_newer_schema_is_refused(
        self,
        postgres_url: str,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum)"
                " VALUES (9999, 'future', '')"
            )
        code, out = await self._settle(postgres_url, monkeypatch, capsys)
        assert code == 2, out
        assert "version 9999, newer than this numbersvc knows" in out
