"""Loopback ports without races: where a child bound port 0 (its own word), where nothing listens.

A port picked here (bind port 0, close, hand the number over) can be taken by any process in
between; a child told to listen on 127.0.0.1:0 binds it itself and says where.
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
