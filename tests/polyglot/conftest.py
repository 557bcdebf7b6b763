"""What the polyglot tests share: a real server on a real sandbox, child processes, the walk.

The sandbox runs in the test's event loop (a real HTTP server on loopback, so the tests can
queue upstream faults through its control routes); `numbersvc serve` runs as a child process
pointed at it as if it were Plivo. The clients in other languages are child processes too.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from numbersvc.sandbox import SandboxServer
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc
from tests.ci import missing

# The e2e suite's sandbox (in this event loop, port 0) and its control client, shared.
from tests.e2e.conftest import control as control
from tests.e2e.conftest import sandbox as sandbox
from tests.polyglot import finished, serving

# The shared comparison's asserts show their operands, as a test module's do.
pytest.register_assert_rewrite("tests.polyglot.typed_clients")

ROOT = Path(__file__).resolve().parents[2]
_CHILD_TIMEOUT_SECONDS = 30
# A cold `make clients` downloads grpc-go, grpc-java and protoc: minutes on a fresh machine.
BUILD_TIMEOUT_SECONDS = 540


@pytest.fixture
async def port(sandbox: SandboxServer) -> AsyncIterator[int]:
    """The port of a `numbersvc serve` process whose Plivo is the sandbox, killed afterwards."""
    settings = {
        "NUMBERSVC_UPSTREAM": "plivo",
        "PLIVO_BASE_URL": sandbox.base_url,
        "PLIVO_AUTH_ID": sandbox.auth_id,
        "PLIVO_AUTH_TOKEN": sandbox.auth_token,
        # One upstream attempt per read: one queued fault fails one read, with no backoff.
        "NUMBERSVC_RETRY_MAX_ATTEMPTS": "1",
    }
    async with serving(settings) as bound:
        yield bound


async def run(*command: str | Path) -> bytes:
    """Run a child process from the repository root; its stdout, or fail with its stderr."""
    process = await asyncio.create_subprocess_exec(
        *command, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    return await finished(process, str(command[:2]), _CHILD_TIMEOUT_SECONDS)


async def walk(
    stub: pb_grpc.NumberGroupServiceAsyncStub, search: pb.SearchFilter, page_size: int
) -> tuple[list[str], int]:
    """Every group id of a search, page by page, and the total upstream counts."""
    ids: list[str] = []
    token = ""
    while True:
        page = await stub.ListNumberGroups(
            pb.ListNumberGroupsRequest(filter=search, page_size=page_size, page_token=token)
        )
        ids += [group.group_id for group in page.number_groups]
        token = page.next_page_token
        if not token:
            return ids, page.total_size


def build_client(target: str, *toolchain: str) -> None:
    """`make TARGET`: a no-op when `make clients` already built it (as `make pytest` does).

    A missing toolchain fails under CI and skips elsewhere (`tests.ci`).
    """
    absent = [tool for tool in toolchain if shutil.which(tool) is None]
    if absent:
        missing(f"{' and '.join(absent)} not on PATH: `make {target}` needs them")
    built = subprocess.run(
        ["make", "--no-print-directory", "-s", target],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_SECONDS,
        check=False,
    )
    assert built.returncode == 0, f"make {target} failed:\n{built.stdout}{built.stderr}"
