"""Fixtures for the upstream client tests: clients on MockTransport, and a raw TCP server."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import httpx
import pytest

from numbersvc.upstream.client import PlivoClient

AUTH_ID = "MAXXXXXXXXXXXXXXXXXX"
AUTH_TOKEN = "tok-SECRET-0123456789abcdef"
BASE_URL = "https://api.plivo.test"

Handler = (
    Callable[[httpx.Request], httpx.Response]
    | Callable[[httpx.Request], Coroutine[Any, Any, httpx.Response]]
)
MakeClient = Callable[..., PlivoClient]
RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
StartServer = Callable[..., Awaitable["RawServer"]]
"""`raw_server`'s factory: `await start(handler)`, or `await start(handler, tls=context)`."""


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    """Build `PlivoClient`s (on a MockTransport when given a handler), closed at teardown."""
    clients: list[PlivoClient] = []

    def factory(handler: Handler | None = None, **kwargs: object) -> PlivoClient:
        options: dict[str, object] = {
            "base_url": BASE_URL,
            "auth_id": AUTH_ID,
            "auth_token": AUTH_TOKEN,
        }
        if handler is not None:
            options["transport"] = httpx.MockTransport(handler)
        options.update(kwargs)
        client = PlivoClient(**options)  # type: ignore[arg-type]
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.aclose()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """Read one HTTP/1.1 request (head plus a Content-Length body) off the stream."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + (await reader.readexactly(length) if length else b"")


class RawServer:
    """A bare asyncio TCP server on 127.0.0.1 that runs one handler per connection.

    With `tls` (a server context) it speaks TLS first and its base URL is https.
    """

    def __init__(self, handler: RawHandler, *, tls: ssl.SSLContext | None = None) -> None:
        self._handler = handler
        self._tls = tls
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self.connections = 0
        self.base_url = ""

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self._tls)
        port = self._server.sockets[0].getsockname()[1]
        self.base_url = f"{'https' if self._tls else 'http'}://127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        self.connections += 1
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await self._handler(reader, writer)

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        for writer in self._writers:
            writer.transport.abort()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()


@pytest.fixture
async def raw_server() -> AsyncIterator[StartServer]:
    """Start `RawServer`s on demand (TLS with `tls=`); all are stopped at teardown."""
    servers: list[RawServer] = []

    async def start(handler: RawHandler, *, tls: ssl.SSLContext | None = None) -> RawServer:
        server = RawServer(handler, tls=tls)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()
