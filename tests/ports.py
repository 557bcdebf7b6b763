"""A loopback port where nothing listens, for tests of a refused connection."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator


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
