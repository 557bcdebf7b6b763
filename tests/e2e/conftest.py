"""End-to-end fixtures: a real sandbox on loopback and a real grpc.aio server on port 0.

The server is pointed at the sandbox as if it were Plivo (upstream `plivo`, the sandbox's
URL and credentials), so every byte goes through the production client, over real HTTP.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme

from numbersvc.config import Config, Secret, UpstreamKind
from numbersvc.sandbox import SandboxControl, SandboxServer
from numbersvc.server import RunningServer, create_server
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc
from tests import richstatus

_POLL_SECONDS = 0.02

# Fast retries, no drain: the suite measures behaviour, not patience.
FAST: dict[str, Any] = {
    "retry_initial_delay_seconds": 0.01,
    "retry_max_delay_seconds": 0.05,
    "retry_after_ceiling_seconds": 0.2,
    "drain_seconds": 0.0,
    "shutdown_grace_seconds": 1.0,
    "ledger_path": ":memory:",
    "metrics_listen": "127.0.0.1:0",
}


@pytest.fixture
async def sandbox() -> AsyncIterator[SandboxServer]:
    async with SandboxServer(host="127.0.0.1", port=0) as server:
        yield server


@pytest.fixture
async def control(sandbox: SandboxServer) -> AsyncIterator[SandboxControl]:
    async with SandboxControl(sandbox.base_url) as client:
        yield client


def config_for(sandbox: SandboxServer, **overrides: Any) -> Config:
    """A config that treats the sandbox as Plivo, with fast retries."""
    settings: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "upstream": UpstreamKind.PLIVO,
        "plivo_base_url": sandbox.base_url,
        "plivo_auth_id": sandbox.auth_id,
        "plivo_auth_token": Secret(sandbox.auth_token),
        **FAST,
    }
    return Config(**{**settings, **overrides})


StartServer = Callable[..., Awaitable[RunningServer]]


@pytest.fixture
async def start_server(sandbox: SandboxServer) -> AsyncIterator[StartServer]:
    """Start servers with config overrides; all are stopped after the test."""
    started: list[RunningServer] = []

    async def start(**overrides: Any) -> RunningServer:
        running = await create_server(config_for(sandbox, **overrides))
        started.append(running)
        return running

    yield start
    for running in started:
        await running.stop(grace_seconds=0.5)


@pytest.fixture
async def server(start_server: StartServer) -> RunningServer:
    return await start_server()


@pytest.fixture
async def channel(server: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as chan:
        yield chan


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.NumberGroupServiceAsyncStub:
    return pb_grpc.NumberGroupServiceStub(channel)


def rich_details(error: grpc.aio.AioRpcError) -> dict[str, Any]:
    """Decode the `google.rpc` details of a failed call, by detail type name."""
    status, details = richstatus.decode(error.trailing_metadata() or ())
    assert status.code == error.code().value[0]
    return details


def reason_of(error: grpc.aio.AioRpcError) -> str:
    """The `ErrorInfo.reason` of a failed call."""
    info = rich_details(error)["ErrorInfo"]
    assert info.domain == "numbersvc"
    reason: str = info.reason
    return reason


async def eventually(
    probe: Callable[[], Awaitable[bool]], *, timeout_seconds: float = 10, what: str = ""
) -> None:
    """Poll `probe` (another process's state, which no event can signal) until it holds; fail
    saying `what` was awaited when it has not by `timeout_seconds`."""
    polls = int(timeout_seconds / _POLL_SECONDS)
    for _ in range(polls):
        if await probe():
            return
        await asyncio.sleep(_POLL_SECONDS)
    raise AssertionError(f"still false after {timeout_seconds} s: {what or repr(probe)}")


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, Any]:
    """A CA (`ca_obj`; its PEM at `ca`) and a localhost server certificate (`cert`, `key`)."""
    ca = trustme.CA()
    server_cert = ca.issue_cert("localhost", "127.0.0.1")
    files = {
        "ca": tmp_path / "ca.pem",
        "cert": tmp_path / "server.pem",
        "key": tmp_path / "server.key",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    server_cert.private_key_pem.write_to_path(str(files["key"]))
    server_cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
    with files["cert"].open("ab") as chain:
        for pem in server_cert.cert_chain_pems[1:]:
            chain.write(pem.bytes())
    return {"ca_obj": ca, **files}
