"""The PostgreSQL ledger's schema: versioned migrations shipped in the package, applied once.

Migrations are the files `migrations/postgres/NNNN_name.sql` beside this module, applied in
order, each in its own transaction together with its row in `schema_migrations`. `migrate()`
holds a session advisory lock while it works, so replicas that start together (or a
migration Job racing a server) apply each migration exactly once; the others wait, then find
nothing to do; a schema with nothing pending is not locked at all, so a session holding the
lock (a stuck Job) never stops a replica from starting. A database whose schema is newer than
the running code knows is refused (`SchemaTooNewError`): an old replica must not write rows it
does not understand during a rollback.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Final

import psycopg

from numbersvc.ledger import LedgerSchemaError

__all__ = [
    "Applied",
    "Migration",
    "SchemaStatus",
    "SchemaTooNewError",
    "migrate",
    "shipped",
    "status",
]

# The session advisory lock key of migrations ("numbersv" in ASCII): any constant works, as
# long as nothing else in the database takes the same one-bigint key.
MIGRATION_LOCK_KEY: Final = 0x6E756D6265727376
_log = logging.getLogger("numbersvc.orders")
_FILE: Final = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")
_CREATE_TABLE: Final = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


class SchemaTooNewError(LedgerSchemaError):
    """The database holds migrations this version of numbersvc does not ship."""


class SchemaPendingError(LedgerSchemaError):
    """The database lacks migrations this version ships, and the caller must not apply them."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One shipped migration file."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        """sha256 of the file's text: `db status` notices an applied file that changed."""
        return hashlib.sha256(self.sql.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Applied:
    """One row of `schema_migrations`."""

    version: int
    name: str
    checksum: str
    applied_at: datetime


@dataclass(frozen=True, slots=True)
class SchemaStatus:
    """What a database holds compared with what this code ships."""

    applied: list[Applied]
    pending: list[Migration]
    unknown: list[Applied]
    """Applied versions this code does not ship: the schema is newer than the code."""
    changed: list[Applied]
    """Applied versions whose shipped file differs from what was applied."""

    @property
    def version(self) -> int:
        """The newest applied version, 0 for an empty database."""
        return max((a.version for a in self.applied), default=0)


def shipped() -> list[Migration]:
    """Every migration in the package, oldest first.

    Raises:
        RuntimeError: a file is misnamed or two share a version (a packaging mistake).
    """
    folder = resources.files("numbersvc.ledger").joinpath("migrations", "postgres")
    found: dict[int, Migration] = {}
    for item in folder.iterdir():
        if not item.name.endswith(".sql"):
            continue
        match = _FILE.fullmatch(item.name)
        if match is None:
            raise RuntimeError(f"migration file {item.name!r} is not named NNNN_name.sql")
        version = int(match.group(1))
        if version in found:
            raise RuntimeError(f"two migrations have version {version}")
        found[version] = Migration(version, match.group(2), item.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


async def status(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> SchemaStatus:
    """Compare the database's `schema_migrations` with the shipped migrations (reads only)."""
    cursor = await conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
    row = await cursor.fetchone()
    rows: list[tuple[object, ...]] = []
    if row is not None and row[0]:
        cursor = await conn.execute(
            "SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY version"
        )
        rows = await cursor.fetchall()
    applied = [Applied(int(v), str(n), str(c), a) for v, n, c, a in rows]  # type: ignore[call-overload, arg-type]
    known = {m.version: m for m in shipped()}
    done = {a.version for a in applied}
    return SchemaStatus(
        applied=applied,
        pending=[m for v, m in known.items() if v not in done],
        unknown=[a for a in applied if a.version not in known],
        changed=[
            a for a in applied if a.version in known and known[a.version].checksum != a.checksum
        ],
    )


async def migrate(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> list[Migration]:
    """Apply every pending migration, under the migration advisory lock.

    `conn` must be in autocommit mode: each migration runs in its own transaction.

    Returns:
        The migrations applied by this call (empty when another process got there first).

    Raises:
        SchemaTooNewError: the database has migrations this code does not ship.
        psycopg.Error: a migration failed (its transaction is rolled back).
    """
    # NOTE: an up-to-date schema needs no lock: a replica restarting must not wait on a
    # session that holds it (a stuck `db migrate`, a migration Job) to find nothing to do.
    before = await status(conn)
    check_not_too_new(before)
    if not before.pending:
        return []
    await _lock(conn)
    try:
        await conn.execute(_CREATE_TABLE)
        now = await status(conn)
        check_not_too_new(now)
        for migration in now.pending:
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                    (migration.version, migration.name, migration.checksum),
                )
        return now.pending
    finally:
        await conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))


async def _lock(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
    """Take the migration lock; if another session holds it, say which before waiting."""
    cursor = await conn.execute("SELECT pg_try_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
    row = await cursor.fetchone()
    if row is not None and row[0]:
        return
    cursor = await conn.execute(
        "SELECT pid, application_name FROM pg_locks JOIN pg_stat_activity USING (pid)"
        " WHERE locktype = 'advisory' AND granted"
        " AND ((classid::bigint << 32) | objid::bigint) = %s",
        (MIGRATION_LOCK_KEY,),
    )
    holders = ", ".join(
        f"pid {pid} ({name or 'no application name'})" for pid, name in await cursor.fetchall()
    )
    _log.warning(
        "waiting for the migration lock, held by %s: another process is migrating the schema",
        holders or "another session",
    )
    await conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))


def check_not_too_new(now: SchemaStatus) -> None:
    """Raise `SchemaTooNewError` when the database holds migrations this code does not ship."""
    if now.unknown:
        newest = max(a.version for a in now.unknown)
        latest = max((m.version for m in shipped()), default=0)
        raise SchemaTooNewError(
            f"the database schema is at version {newest}, newer than this numbersvc knows"
            f" ({latest}): run a numbersvc that ships it, or restore the database"
        )


def check_current(now: SchemaStatus) -> None:
    """Raise unless the database's schema is exactly this code's.

    For a caller that must not migrate: `numbersvc orders settle --offline`.

    Raises:
        SchemaTooNewError: it holds migrations this code does not ship.
        SchemaPendingError: it lacks some this code ships.
    """
    check_not_too_new(now)
    if now.pending:
        raise SchemaPendingError(
            f"the database schema is at version {now.version}, older than this numbersvc's"
            f" ({now.pending[-1].version}; {len(now.pending)} migration(s) pending): run"
            " `numbersvc db migrate` (or start a server of this version) first"
        )
