"""Property-based tests: arbitrary requests and upstream bodies through a real server.

The end-to-end properties start ONE sandbox and server per test function and run every
Hypothesis example against them. They do it from a *sync* test that owns its event loop
(`LiveStack`, an `asyncio.Runner`): `@given` wraps a sync inner function that runs each example
to completion on that loop. Why not `@given` on an `async def` test with async fixtures:

- Hypothesis refuses function-scoped fixtures under `@given` (the `function_scoped_fixture`
  health check), because they are NOT reset between examples; silencing it would hide that.
- Module-scoped async fixtures would need a module-scoped event loop, which pytest-asyncio
  (`asyncio_default_fixture_loop_scope = "function"`) does not give the tests around them.
- With one loop we own, the server, its upstream pool, background rent tasks and the grpc.aio
  channel live on one loop for the whole test, and each example is an ordinary
  `runner.run(coroutine)`; nothing depends on how pytest-asyncio drives Hypothesis.

Each example resets the sandbox first (inventory, faults and request log), so what it sees and
asserts is its own; the server's state (ledger, connection pool) deliberately carries over,
which is also what a long-running server sees.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Final, TypeVar

import grpc
from hypothesis import strategies as st

from numbersvc.sandbox import SandboxControl, SandboxServer
from numbersvc.server import RunningServer, create_server
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc
from tests.e2e.conftest import config_for

__all__ = ["RPCS", "LiveStack", "mostly"]

T = TypeVar("T")
RPCS: Final = ("list", "stream", "get", "rent")
_TIMEOUT_SECONDS: Final = 10.0  # well above the rent minimum (2 s); nothing here should wait
_MAX_STREAM_MESSAGES: Final = 3  # a stream is read this far, then cancelled: walks stay short


def mostly(valid: st.SearchStrategy[T], odd: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """Draw from `valid` 7 times in 8, else from `odd`.

    Inputs with one odd part in an otherwise good whole get furthest (past validation, deep
    into parsing), so they find the most; uniform choices would mostly be rejected at once.
    """
    return st.integers(0, 7).flatmap(lambda roll: odd if roll == 0 else valid)


class LiveStack:
    """A sandbox, its control client and a grpc.aio server on it, on an event loop we own.

    Use as a context manager in a sync test; run coroutines with `run`. `overrides` are
    `Config` fields, applied over the e2e defaults (`tests.e2e.conftest.config_for`).
    """

    def __init__(self, **overrides: Any) -> None:
        self._overrides = overrides
        self._runner = asyncio.Runner()
        self._sandbox: SandboxServer | None = None
        self._control: SandboxControl | None = None
        self._server: RunningServer | None = None
        self._channel: grpc.aio.Channel | None = None

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` to completion on the stack's loop."""
        return self._runner.run(coroutine)

    @property
    def control(self) -> SandboxControl:
        assert self._control is not None, "the stack is not running"
        return self._control

    @property
    def server(self) -> RunningServer:
        assert self._server is not None, "the stack is not running"
        return self._server

    @property
    def stub(self) -> pb_grpc.NumberGroupServiceAsyncStub:
        assert self._channel is not None, "the stack is not running"
        return pb_grpc.NumberGroupServiceStub(self._channel)

    async def group_ids(self, count: int) -> list[str]:
        """Return the ids of up to `count` groups the seeded sandbox sells (US first)."""
        request = pb.ListNumberGroupsRequest(
            filter=pb.SearchFilter(region_code="US"), page_size=count
        )
        page = await self.stub.ListNumberGroups(request, timeout=5)
        return [group.group_id for group in page.number_groups]

    async def send(self, rpc: str, request: Any) -> grpc.aio.AioRpcError | None:
        """Call `rpc` ("list", "stream", "get", "rent"); return its error, or None if it succeeded.

        A stream is read for at most 3 messages and then cancelled, so a filter with
        thousands of groups is not walked to the end.
        """
        stub = self.stub
        try:
            if rpc == "list":
                await stub.ListNumberGroups(request, timeout=_TIMEOUT_SECONDS)
            elif rpc == "stream":
                call = stub.StreamNumberGroups(request, timeout=_TIMEOUT_SECONDS)
                received = 0
                async for _ in call:
                    received += 1
                    if received >= _MAX_STREAM_MESSAGES:
                        call.cancel()
                        break
            elif rpc == "get":
                await stub.GetNumberGroup(request, timeout=_TIMEOUT_SECONDS)
            elif rpc == "rent":
                await stub.RentNumbers(request, timeout=_TIMEOUT_SECONDS)
            else:
                raise ValueError(f"unknown rpc {rpc!r}: one of {RPCS}")
        except grpc.aio.AioRpcError as error:
            return error
        return None

    async def _start(self) -> None:
        self._sandbox = SandboxServer(host="127.0.0.1", port=0)
        await self._sandbox.start()
        self._control = SandboxControl(self._sandbox.base_url)
        self._server = await create_server(config_for(self._sandbox, **self._overrides))
        self._channel = grpc.aio.insecure_channel(f"127.0.0.1:{self._server.port}")

    async def _stop(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        if self._server is not None:
            await self._server.stop(grace_seconds=0.5)
        if self._control is not None:
            await self._control.aclose()
        if self._sandbox is not None:
            await self._sandbox.stop()

    def __enter__(self) -> LiveStack:
        self._runner.__enter__()
        try:
            self.run(self._start())
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            self.run(self._stop())
        finally:
            self._runner.__exit__(exc_type, exc, traceback)
