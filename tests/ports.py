"""Loopback ports without races: where a child bound port 0 (its own word), where nothing
listens, and ports reserved for a program that cannot bind port 0 and say where.

A port picked here (bind port 0, close, hand the number over) can be taken by any process in
between; a child told to listen on 127.0.0.1:0 binds it itself and says where.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import random
import re
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Final

# Reservations of every test process on this machine, one lock file per port.
_LOCKS: Final = Path(tempfile.gettempdir()) / "numbersvc-test-ports"
# How many ports on each side of the OS's ephemeral range `reserved_ports` takes from.
_SPAN: Final = 8000


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


def ephemeral_range() -> tuple[int, int]:
    """The OS's range for port 0 and outgoing connections (`ip_local_port_range`), inclusive."""
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return int(low), int(high)


@contextlib.contextmanager
def reserved_ports(count: int) -> Iterator[list[int]]:
    """`count` free loopback ports that no other process is given until the block ends.

    For programs that must be told a fixed port (a script written with port numbers,
    PostgreSQL): the ports lie outside the OS's ephemeral range (below it, or above it where
    it starts low), so no bind to port 0 and no outgoing connection ever gets one, and each
    is locked (an exclusive `flock` on a file of its own, let go when this process ends
    however it ends) against every other reservation.
    A port something already holds is skipped; one that a program outside these tests binds
    by number in between makes the reserved port's user fail to bind, as it would anywhere.

    Raises:
        RuntimeError: fewer than `count` ports outside the ephemeral range were free.
    """
    low, high = ephemeral_range()
    candidates = [
        *range(max(1024, low - _SPAN), low),
        *range(high + 1, min(65536, high + 1 + _SPAN)),
    ]
    start = random.randrange(len(candidates)) if candidates else 0  # reservations rarely meet
    held: dict[int, int] = {}
    try:
        for port in candidates[start:] + candidates[:start]:
            if len(held) == count:
                break
            lock = _claim(port)
            if lock is not None:
                held[port] = lock
        if len(held) < count:
            raise RuntimeError(f"{len(held)} of {count} ports free outside {low}-{high}")
        yield list(held)
    finally:
        for lock in held.values():
            os.close(lock)


def _claim(port: int) -> int | None:
    """Lock `port`'s file and check that nothing is bound to it; the lock, or None if taken."""
    _LOCKS.mkdir(exist_ok=True)
    lock = os.open(_LOCKS / f"{port}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # NOTE: no SO_REUSEADDR: even a port left in TIME_WAIT is skipped.
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))
    except OSError:  # locked by another reservation, or bound
        os.close(lock)
        return None
    return lock
