"""A bare grpc.aio echo server: the floor under any grpc.aio unary call, for `bench.bench`.

    python -m bench.echo --listen 127.0.0.1:0

One unary method, `/bench.Echo/Echo`, on a `grpc.aio.server()` with default options, no
interceptors, no logging, no protobuf: the request's bytes come back as the response. It prints
`serving on HOST:PORT` on stderr once it listens and stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import grpc

__all__ = ["ECHO_METHOD", "main", "serve", "serve_unary"]

ECHO_METHOD: Final = "/bench.Echo/Echo"


async def _echo(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    return request


async def serve(listen: str) -> None:
    """Serve the echo method on `listen` until SIGTERM or SIGINT."""
    await serve_unary(listen, ECHO_METHOD, _echo)


async def serve_unary(
    listen: str,
    method: str,
    behaviour: Callable[[bytes, grpc.aio.ServicerContext[Any, Any]], Awaitable[bytes]],
) -> None:
    """Serve one unary method, bytes in and out, on a default `grpc.aio.server()`.

    Prints `serving on HOST:PORT` on stderr once it listens; returns after SIGTERM or SIGINT.
    """
    service, _, name = method.strip("/").partition("/")
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        service, {name: grpc.unary_unary_rpc_method_handler(behaviour)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(listen)
    await server.start()
    print(f"serving on {listen.rpartition(':')[0]}:{port}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(None)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `--listen` and serve."""
    parser = argparse.ArgumentParser(prog="python -m bench.echo", description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any)")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.listen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
