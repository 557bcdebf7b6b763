"""Loopback ports: where a child bound port 0 (its own word), where nothing listens, and
ports the OS picks for a program that cannot bind port 0 and say where.

A port picked here (bind port 0, close, hand the number over) can be taken by any process in
between; a child told to listen on 127.0.0.1:0 binds it itself and says where, so `picked_ports`
is only for what cannot (PostgreSQL, a documented script).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import AsyncIterator, Iterator


@contextlib.asynccontextmanager
async def announced(
    process: asyncio.subprocess.Process, pattern: re.Pattern[bytes], timeout_seconds: float
) -> AsyncIterator[re.Match[bytes]]:
    """The match of `pattern` in what `process` (on port 0) writes to stderr; killed after.

    The child's stderr (a pipe) is read until the line comes, then drained until the child
    exits, so a full pipe never blocks it.
    """
    assert process.stderr is not None
    said = b""
    drain: asyncio.Task[bytes] | None = None
    try:
        async with asyncio.timeout(timeout_seconds):
            while not (match := pattern.search(said)):
                line = await process.stderr.readline()
                assert line, f"exited before saying where it listens:\n{said.decode()}"
                said += line
        drain = asyncio.create_task(process.stderr.read())
        yield match
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        if drain is not None:
            await drain


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A port on 127.0.0.1 bound by a socket that never listens, held until the block ends.

    A connection to it is refused, and no other process can bind it meanwhile, unlike a port
    bound, closed and then used, which the OS may hand to anyone in between.
    """
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        port: int = bound.getsockname()[1]
        yield port


def picked_ports(count: int) -> list[int]:
    """`count` distinct loopback ports the OS picks (port 0), free when this returns.

    NOTE: held all at once while picked, so never the same port twice; let go before the
    caller's program binds them, so any process may take one in between (the OS hands ports
    out at random over its ephemeral range, which makes that rare). Prefer a child on port 0.
    """
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for bound in sockets:
            bound.bind(("127.0.0.1", 0))
        return [bound.getsockname()[1] for bound in sockets]
