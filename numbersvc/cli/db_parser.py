"""The parser of `numbersvc db`: `migrate`, `status` and `import`, run by `numbersvc.cli.db`.

Apart from the commands it names, so that building it imports nothing heavy (see
`numbersvc.cli.options`): psycopg alone takes a fifth of a second to load.
"""

from __future__ import annotations

import argparse
from typing import Final

from numbersvc.cli.options import EXIT_OK, EXIT_USAGE, Lazy, add_command, exit_code_table

__all__ = ["EXIT_DATABASE", "EXIT_PENDING", "add_db_command"]

EXIT_DATABASE: Final = 1
EXIT_PENDING: Final = 3
_SCHEMA_TOO_NEW: Final = "the database's schema is newer than this numbersvc (refused)"
_DB: Final = "numbersvc.cli.db"


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
    migrate.set_defaults(local_command=Lazy(_DB, "migrate_command"))
    status = add_command(
        subcommands,
        "status",
        "compare the database's schema with this version's migrations",
        "Print each migration: applied (when), pending, or unknown to this version.",
        epilog=_exit_codes((EXIT_PENDING, "migrations are pending (db migrate applies them)")),
    )
    status.set_defaults(local_command=Lazy(_DB, "status_command"))
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
    import_.set_defaults(local_command=Lazy(_DB, "import_command"))


def _exit_codes(*extra: tuple[int, str]) -> str:
    return exit_code_table(
        sorted(
            [
                (EXIT_OK, "done"),
                (EXIT_DATABASE, "the database cannot be reached, refused, or the file is bad"),
                (EXIT_USAGE, f"usage error, a bad configuration, or {_SCHEMA_TOO_NEW}"),
                *extra,
            ]
        )
    )
