"""The leanest facade the stack allows: row 1's baseline in `bench.bench`.

    python -m bench.facade --listen 127.0.0.1:0 --upstream URL --auth-id ID --auth-token TOKEN

One grpc.aio unary method, `/bench.Facade/Get`, on a `grpc.aio.server()` with default options,
no interceptors, no logging, no protobuf, and none of numbersvc's code: the request's bytes are
a path and query (`/v1/Account/.../AvailableNumberGroup/?...`), which it GETs from `--upstream`
with one shared aiohttp session (Basic auth), decodes as JSON and answers with the body's
bytes. What numbersvc does on top of this (deadlines, retries, validation, translation,
coalescing, access log, metrics) is what row 1 compares. It prints `serving on HOST:PORT` on
stderr once it listens and stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any, Final

import aiohttp
import grpc

from bench.echo import serve_unary

__all__ = ["FACADE_METHOD", "main", "serve"]

FACADE_METHOD: Final = "/bench.Facade/Get"


async def serve(listen: str, upstream: str, auth_id: str, auth_token: str) -> None:
    """Serve the facade method on `listen` until SIGTERM or SIGINT."""
    base = upstream.rstrip("/")
    session = aiohttp.ClientSession(
        auth=aiohttp.BasicAuth(auth_id, auth_token), headers={"Accept": "application/json"}
    )

    async def get(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        async with session.get(base + request.decode()) as response:
            body = await response.read()
            if response.status != 200:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"HTTP {response.status}")
        if not isinstance(json.loads(body), dict):
            await context.abort(grpc.StatusCode.INTERNAL, "not a JSON object")
        return body

    try:
        await serve_unary(listen, FACADE_METHOD, get)
    finally:
        await session.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags and serve."""
    parser = argparse.ArgumentParser(prog="python -m bench.facade", description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any)")
    parser.add_argument("--upstream", required=True, help="the sandbox's base URL")
    parser.add_argument("--auth-id", required=True)
    parser.add_argument("--auth-token", required=True)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.listen, args.upstream, args.auth_id, args.auth_token))
    return 0


if __name__ == "__main__":
    sys.exit(main())
