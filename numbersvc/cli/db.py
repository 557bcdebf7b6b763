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
import os
import sqlite3
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC
from typing import Any, Final

import psycopg

from numbersvc.cli import client
from numbersvc.cli.db_parser import EXIT_DATABASE, EXIT_PENDING
from numbersvc.config import Config, ConfigError
from numbersvc.ledger import pgimport, pgschema
from numbersvc.ledger.postgres import redacted, scrub

__all__ = ["import_command", "migrate_command", "status_command"]

_CONNECT_TIMEOUT_SECONDS: Final = 10

_Command = Callable[
    [psycopg.AsyncConnection[Any], argparse.Namespace, client.Console], Awaitable[int]
]


def migrate_command(args: argparse.Namespace) -> int:
    """`numbersvc db migrate`: apply the pending migrations."""
    return _run(_migrate, args)


def status_command(args: argparse.Namespace) -> int:
    """`numbersvc db status`: compare the database's schema with this version's."""
    return _run(_status, args)


def import_command(args: argparse.Namespace) -> int:
    """`numbersvc db import --from-sqlite PATH`: copy a SQLite ledger in."""
    return _run(_import, args)


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
    where = redacted(conninfo)
    try:
        async with await psycopg.AsyncConnection.connect(
            conninfo, autocommit=True, connect_timeout=_CONNECT_TIMEOUT_SECONDS
        ) as conn:
            return await command(conn, args, console)
    except pgschema.SchemaTooNewError as exc:
        console.error(f"{where}: {exc}")
        return client.EXIT_USAGE
    except psycopg.Error as exc:
        console.error(f"{where}: {scrub(str(exc).strip(), conninfo)}")
        return EXIT_DATABASE


async def _migrate(
    conn: psycopg.AsyncConnection[Any], args: argparse.Namespace, console: client.Console
) -> int:
    applied = await pgschema.migrate(conn)
    for migration in applied:
        console.result(f"applied {migration.version:04d}_{migration.name}")
    version = (await pgschema.status(conn)).version
    console.result(f"schema at version {version}" + ("" if applied else " (up to date)"))
    return client.EXIT_OK


async def _status(
    conn: psycopg.AsyncConnection[Any], args: argparse.Namespace, console: client.Console
) -> int:
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
    await pgschema.migrate(conn)
    try:
        report = await pgimport.import_sqlite(conn, args.from_sqlite, actor=client.cli_actor())
    except sqlite3.Error as exc:
        console.error(f"{args.from_sqlite}: {exc}")
        return EXIT_DATABASE
    console.result(
        f"imported {report.orders} order(s) and {report.events} event(s);"
        f" {report.present} already there (left as they are);"
        f" {report.in_flight} were being sent: their outcome is unknown, settle them"
    )
    return client.EXIT_OK
