"""`numbersvc serve` and `numbersvc sandbox`: run the server or the sandbox in this process.

A server that cannot start says why in one `error:` line naming the setting at fault, and
exits 2: a taken or foreign address (NUMBERSVC_LISTEN, NUMBERSVC_METRICS_LISTEN), a callers
file that is missing or unsafe (NUMBERSVC_CALLERS_FILE), a ledger that cannot be opened
(NUMBERSVC_LEDGER_PATH), a PostgreSQL ledger that cannot be reached (NUMBERSVC_DATABASE_URL),
a file that cannot be read (the TLS settings), or settings that contradict each other. A
traceback is kept for bugs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sqlite3
import sys

from numbersvc import logs
from numbersvc.callers import CALLERS_FILE_ENV, CallersFileError
from numbersvc.cli.client import Console
from numbersvc.cli.options import EXIT_OK, EXIT_USAGE
from numbersvc.config import Config, ConfigError, settings

__all__ = ["sandbox", "serve", "startup_error"]


def serve(args: argparse.Namespace) -> int:
    """Run the server with the environment's settings and the flags over them."""
    console = Console.for_streams(sys.stdout, sys.stderr, environ=os.environ)
    try:
        config = Config.from_env(os.environ).with_args(args)
        # NOTE: contradictions between settings (one Plivo credential of two) are raised here,
        # before the server module is even imported, so nothing is bound or started.
        config.resolved_upstream()
    except ConfigError as exc:
        console.error(f"configuration: {exc}")
        return EXIT_USAGE
    from numbersvc.ledger import LedgerSchemaError, LedgerUnreachableError
    from numbersvc.server import serve as run_server  # here: it loads grpc.aio and the server

    logs.configure_logging(config.log_level, config.log_format)
    try:
        return asyncio.run(run_server(config))
    except LedgerSchemaError as exc:  # written by a newer numbersvc: run that one
        console.error(str(exc))
        return EXIT_USAGE
    except LedgerUnreachableError as exc:  # its message names the database, not its password
        console.error(f"NUMBERSVC_DATABASE_URL: {exc}")
        return EXIT_USAGE
    except (ConfigError, CallersFileError, sqlite3.Error, OSError) as exc:
        message = startup_error(exc, config)
        if message is None:
            raise
        console.error(message)
        return EXIT_USAGE


def startup_error(exc: BaseException, config: Config) -> str | None:
    """Say why the server could not start, naming the setting; None for what is not that.

    Args:
        exc: what `numbersvc.server.serve` raised.
        config: the settings it ran with.
    """
    if isinstance(exc, ConfigError):
        return f"configuration: {exc}"
    if isinstance(exc, CallersFileError):
        return f"{CALLERS_FILE_ENV}: {exc}"
    ledger_path = config.resolved_ledger_path()
    if isinstance(exc, sqlite3.Error):
        return f"NUMBERSVC_LEDGER_PATH: cannot open the order ledger at {ledger_path}: {exc}"
    if not isinstance(exc, OSError) or exc.filename is None:
        return None
    filename = os.fsdecode(exc.filename)
    why = exc.strerror or str(exc)
    for name, setting, _ in settings():
        if getattr(config, name) == filename:
            return f"{setting.env}: cannot read {filename}: {why}"
    if ledger_path.startswith(filename):  # its folder could not be made
        return f"NUMBERSVC_LEDGER_PATH: cannot create {filename} for the order ledger: {why}"
    return None


def sandbox(args: argparse.Namespace) -> int:
    """Run the Plivo-compatible sandbox alone until Ctrl-C."""
    from numbersvc.sandbox import run_sandbox  # here: it loads the sandbox's app

    host, port = args.listen
    logs.configure_logging("INFO")  # run_sandbox logs the URL and credentials to use
    try:
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how the sandbox should stop
            asyncio.run(run_sandbox(host, port, seed=args.seed))
    except OSError as exc:  # the address is taken, or not this host's
        console = Console.for_streams(sys.stdout, sys.stderr, environ=os.environ)
        why = exc.strerror or str(exc)
        console.error(f"cannot listen on {host}:{port}: {why}; pick another with --listen")
        return EXIT_USAGE
    return EXIT_OK
