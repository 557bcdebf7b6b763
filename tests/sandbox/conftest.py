"""Fixtures for the sandbox tests: a live server on port 0, an API client and a control client."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from numbersvc.sandbox import SandboxControl, SandboxServer


@pytest.fixture
async def sandbox() -> AsyncIterator[SandboxServer]:
    async with SandboxServer(host="127.0.0.1", port=0) as server:
        yield server


@pytest.fixture
async def client(sandbox: SandboxServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=sandbox.base_url,
        auth=(sandbox.auth_id, sandbox.auth_token),
        timeout=5.0,
    ) as api_client:
        yield api_client


@pytest.fixture
async def control(sandbox: SandboxServer) -> AsyncIterator[SandboxControl]:
    async with SandboxControl(sandbox.base_url) as control_client:
        yield control_client


@pytest.fixture
def groups_path(sandbox: SandboxServer) -> str:
    return f"/v1/Account/{sandbox.auth_id}/AvailableNumberGroup/"
