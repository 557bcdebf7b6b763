"""`numbersvc serve` and `numbersvc sandbox`: run the server or the sandbox in this process."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys

from numbersvc import logs
from numbersvc.cli.client import Console
from numbersvc.cli.options import EXIT_OK, EXIT_USAGE
from numbersvc.config import Config, ConfigError

__all__ = ["sandbox", "serve"]


def serve(args: argparse.Namespace) -> int:
    """Run the server with the environment's settings and the flags over them."""
    try:
        config = Config.from_env(os.environ).with_args(args)
        # NOTE: contradictions between settings (one Plivo credential of two) are raised here,
        # before the server module is even imported, so nothing is bound or started.
        config.resolved_upstream()
    except ConfigError as exc:
        console = Console.for_streams(sys.stdout, sys.stderr, environ=os.environ)
        console.error(f"configuration: {exc}")
        return EXIT_USAGE
    from numbersvc.server import serve as run_server  # here: it loads grpc.aio and the server

    logs.configure_logging(config.log_level, config.log_format)
    return asyncio.run(run_server(config))


def sandbox(args: argparse.Namespace) -> int:
    """Run the Plivo-compatible sandbox alone until Ctrl-C."""
    from numbersvc.sandbox import run_sandbox  # here: it loads the sandbox's app

    host, port = args.listen
    logs.configure_logging("INFO")  # run_sandbox logs the URL and credentials to use
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how the sandbox is meant to stop
        asyncio.run(run_sandbox(host, port, seed=args.seed))
    return EXIT_OK
