"""The `numbersvc db` commands: the PostgreSQL ledger's schema, and importing a SQLite one.

`db migrate` applies the migrations this version ships (what a server does at start, as a
Kubernetes Job before a rollout); `db status` compares the database with them; `db import
--from-sqlite PATH` copies a SQLite ledger's orders and events in, idempotently. Each reads
the database as the server does: `NUMBERSVC_DATABASE_URL` or `NUMBERSVC_DATABASE_URL_FILE`,
with a password from either or from `PGPASSWORD`. The URL's password is never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sqlite3
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC
from typing import TYPE_CHECKING, Any, Final

from numbersvc.cli import client
from numbersvc.cli.options import add_command, exit_code_table
from numbersvc.config import Config, ConfigError

if TYPE_CHECKING:  # psycopg loads in 0.2 s: only the commands that use it import it
    import psycopg

__all__ = ["EXIT_DATABASE", "EXIT_PENDING", "add_db_command"]

EXIT_DATABASE: Final = 1
EXIT_PENDING: Final = 3
_SCHEMA_TOO_NEW: Final = "the database's schema is newer than this numbersvc (refused)"
_CONNECT_TIMEOUT_SECONDS: Final = 10

_Command = Callable[
    ["psycopg.AsyncConnection[Any]", argparse.Namespace, client.Console], Awaitable[int]
]


def add_db_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `db` with its subcommands `migrate`, `status` and `import` to the parser."""
    group = add_command(
        commands,
        "db",
        "the PostgreSQL order ledger: migrate, status, import",
        "Manage the PostgreSQL order ledger named by NUMBERSVC_DATABASE_URL (or"
        " NUMBERSVC_DATABASE_URL_FILE; a password may come from PGPASSWORD).",
        epilog=_exit_codes(),
    )
    subcommands = group.add_subparsers(title="commands", metavar="COMMAND", required=True)
    migrate = add_command(
        subcommands,
        "migrate",
        "apply the migrations this version ships",
        "Apply every pending migration, each in its own transaction, under an advisory lock"
        " (servers starting at the same time wait, then find nothing to do). Servers do this"
        " at start too; run it as a Job to migrate before a rollout.",
        epilog=_exit_codes(),
    )
    migrate.set_defaults(local_command=functools.partial(_run, _migrate))
    status = add_command(
        subcommands,
        "status",
        "compare the database's schema with this version's migrations",
        "Print each migration: applied (when), pending, or unknown to this version.",
        epilog=_exit_codes((EXIT_PENDING, "migrations are pending (db migrate applies them)")),
    )
    status.set_defaults(local_command=functools.partial(_run, _status))
    import_ = add_command(
        subcommands,
        "import",
        "copy a SQLite ledger's orders and events into PostgreSQL",
        "Copy every order and audit event of a SQLite ledger file into PostgreSQL, in one"
        " transaction. Orders already there (by request id) are left as they are, so running"
        " it twice changes nothing. An order still being sent in the file arrives with its"
        " outcome unknown: settle it from the Plivo console. Stop the servers that write the"
        " file first. Pending migrations are applied first.",
        epilog=_exit_codes(),
    )
    import_.add_argument(
        "--from-sqlite",
        required=True,
        metavar="PATH",
        help="the SQLite ledger file (read-only; required)",
    )
    import_.set_defaults(local_command=functools.partial(_run, _import))


def _exit_codes(*extra: tuple[int, str]) -> str:
    return exit_code_table(
        sorted(
            [
                (client.EXIT_OK, "done"),
                (EXIT_DATABASE, "the database cannot be reached, refused, or the file is bad"),
                (client.EXIT_USAGE, f"usage error, a bad configuration, or {_SCHEMA_TOO_NEW}"),
                *extra,
            ]
        )
    )


def _run(command: _Command, args: argparse.Namespace) -> int:
    console = client.Console.for_streams(sys.stdout, sys.stderr, environ=os.environ)
    try:
        url = Config.from_env(os.environ).database()
    except ConfigError as exc:
        console.error(f"configuration: {exc}")
        return client.EXIT_USAGE
    if not url:
        console.error(
            "configuration: set NUMBERSVC_DATABASE_URL or NUMBERSVC_DATABASE_URL_FILE"
            " (without them the server keeps its ledger in SQLite)"
        )
        return client.EXIT_USAGE
    return asyncio.run(_connected(command, url.reveal(), args, console))


async def _connected(
    command: _Command, conninfo: str, args: argparse.Namespace, console: client.Console
) -> int:
    import psycopg

    from numbersvc.ledger.pgschema import SchemaTooNewError
    from numbersvc.ledger.postgres import redacted, scrub

    where = redacted(conninfo)
    try:
        async with await psycopg.AsyncConnection.connect(
            conninfo, autocommit=True, connect_timeout=_CONNECT_TIMEOUT_SECONDS
        ) as conn:
            return await command(conn, args, console)
    except SchemaTooNewError as exc:
        console.error(f"{where}: {exc}")
        return client.EXIT_USAGE
    except psycopg.Error as exc:
        console.error(f"{where}: {scrub(str(exc).strip(), conninfo)}")
        return EXIT_DATABASE


async def _migrate(
    conn: psycopg.AsyncConnection[Any], args: argparse.Namespace, console: client.Console
) -> int:
    from numbersvc.ledger import pgschema

    applied = await pgschema.migrate(conn)
    for migration in applied:
        console.result(f"applied {migration.version:04d}_{migration.name}")
    version = (await pgschema.status(conn)).version
    console.result(f"schema at version {version}" + ("" if applied else " (up to date)"))
    return client.EXIT_OK


async def _status(
    conn: psycopg.AsyncConnection[Any], args: argparse.Namespace, console: client.Console
) -> int:
    from numbersvc.ledger import pgschema

    now = await pgschema.status(conn)
    rows = [
        (a.version, a.name, f"applied {a.applied_at.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}")
        for a in now.applied
        if a not in now.unknown and a not in now.changed
    ]
    rows += [(a.version, a.name, "applied, but its file has changed since") for a in now.changed]
    rows += [(a.version, a.name, "applied, UNKNOWN to this numbersvc") for a in now.unknown]
    rows += [(m.version, m.name, "pending") for m in now.pending]
    for version, name, state in sorted(rows):
        console.result(f"{version:04d}  {name:<40}  {state}")
    pgschema.check_not_too_new(now)
    if now.pending:
        console.result(f"{len(now.pending)} pending: run `numbersvc db migrate`")
        return EXIT_PENDING
    console.result(f"schema at version {now.version} (up to date)")
    return client.EXIT_OK


async def _import(
    conn: psycopg.AsyncConnection[Any], args: argparse.Namespace, console: client.Console
) -> int:
    from numbersvc.ledger import pgimport, pgschema

    await pgschema.migrate(conn)
    # A pod's uid often has no passwd entry: the audit then names the uid.
    actor = f"cli:{os.environ.get('USER') or f'uid {os.getuid()}'}"
    try:
        report = await pgimport.import_sqlite(conn, args.from_sqlite, actor=actor)
    except sqlite3.Error as exc:
        console.error(f"{args.from_sqlite}: {exc}")
        return EXIT_DATABASE
    console.result(
        f"imported {report.orders} order(s) and {report.events} event(s);"
        f" {report.present} already there (left as they are);"
        f" {report.in_flight} were being sent: their outcome is unknown, settle them"
    )
    return client.EXIT_OK
