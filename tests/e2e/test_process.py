"""`numbersvc serve` as a real process: start-up line, SIGTERM exit 0, nothing secret logged."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from numbersvc.sandbox import DEFAULT_AUTH_ID, DEFAULT_AUTH_TOKEN, SandboxServer
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc

_SERVING = re.compile(rb"serving on 127\.0\.0\.1:(\d+)")
_START_TIMEOUT_SECONDS = 20


class Served:
    """A running `numbersvc serve` and everything it wrote to stderr so far.

    Once serving, stderr is read on in the background: a server whose log fills the pipe
    (64 KiB, a few hundred access lines) would otherwise block on its next write.
    """

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.stderr = b""
        self.port = 0
        self._reader: asyncio.Task[None] | None = None

    async def wait_serving(self) -> None:
        assert self.process.stderr is not None
        async with asyncio.timeout(_START_TIMEOUT_SECONDS):
            while not (match := _SERVING.search(self.stderr)):
                line = await self.process.stderr.readline()
                assert line, f"server exited early:\n{self.stderr.decode()}"
                self.stderr += line
        self.port = int(match.group(1))
        self._reader = asyncio.create_task(self._read_on())

    async def _read_on(self) -> None:
        assert self.process.stderr is not None
        while chunk := await self.process.stderr.read(65536):
            self.stderr += chunk

    async def finish(self) -> int:
        """Wait for the process to exit (20 s at most) and for the last of its stderr."""
        async with asyncio.timeout(20):
            await self.process.wait()
            if self._reader is not None:
                await self._reader
        assert self.process.returncode is not None
        return self.process.returncode

    async def close(self) -> None:
        """Kill the process if it still runs, and stop reading its stderr."""
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


async def _start(env: Mapping[str, str], *args: str) -> asyncio.subprocess.Process:
    """`numbersvc serve` on port 0 with none of this machine's settings, only `env`'s."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PLIVO_", "NUMBERSVC_"))}
    clean["NUMBERSVC_LEDGER_PATH"] = ":memory:"
    clean["NUMBERSVC_METRICS_LISTEN"] = "127.0.0.1:0"
    return await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "numbersvc", "serve", "--listen", "127.0.0.1:0", *args),
        env={**clean, **env},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


def plivo_env(base_url: str, ledger_path: Path, **settings: str) -> dict[str, str]:
    """Settings for a server that takes a sandbox (default credentials) for Plivo."""
    return {
        "NUMBERSVC_UPSTREAM": "plivo",
        "PLIVO_BASE_URL": base_url,
        "PLIVO_AUTH_ID": DEFAULT_AUTH_ID,
        "PLIVO_AUTH_TOKEN": DEFAULT_AUTH_TOKEN,
        "NUMBERSVC_LEDGER_PATH": str(ledger_path),
        **settings,
    }


@contextlib.asynccontextmanager
async def _serve(env: Mapping[str, str], *args: str) -> AsyncIterator[Served]:
    process = await _start(env, "--drain-seconds", "0.2", *args)
    served = Served(process)
    try:
        await served.wait_serving()
        yield served
    finally:
        await served.close()


async def test_sigterm_drains_and_exits_zero() -> None:
    async with _serve({}) as served:
        assert b"UPSTREAM IS THE EMBEDDED SANDBOX" in served.stderr
        async with grpc.aio.insecure_channel(f"127.0.0.1:{served.port}") as channel:
            status = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest()
            )
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            stub = pb_grpc.NumberGroupServiceStub(channel)
            page = await stub.ListNumberGroups(
                pb.ListNumberGroupsRequest(filter=pb.SearchFilter(region_code="GB"))
            )
            assert page.number_groups
        served.process.send_signal(signal.SIGTERM)
        assert await served.finish() == 0
        assert b"shutting down" in served.stderr
        assert b"rpc method=/numbersvc.v1.NumberGroupService/ListNumberGroups code=OK" in (
            served.stderr
        )


@pytest.mark.parametrize(
    "env", [{"PLIVO_AUTH_ID": "MAXXXXXXXXXXXXXXXXXX"}, {"NUMBERSVC_UPSTREAM": "plivo"}]
)
async def test_contradictory_upstream_settings_fail_at_start(env: dict[str, str]) -> None:
    process = await _start(env)
    _, err = await asyncio.wait_for(process.communicate(), timeout=20)
    assert process.returncode == 2
    assert b"PLIVO_AUTH" in err


@pytest.mark.parametrize(
    "env", ["NUMBERSVC_RENT_TIMEOUT_SECONDS", "NUMBERSVC_MAX_CONNECTION_AGE_SECONDS"]
)
async def test_a_huge_duration_fails_at_start_in_one_line(env: str) -> None:
    # Both once ended in an OverflowError traceback (the ledger's clock, gRPC's options).
    process = await _start({env: "1e300"})
    _, err = await asyncio.wait_for(process.communicate(), timeout=20)
    assert process.returncode == 2, err.decode()
    assert b"Traceback" not in err
    assert f"{env} must be a finite number".encode() in err


async def test_token_absent_from_every_line_at_debug() -> None:
    token = f"tok-{uuid.uuid4().hex}"
    async with SandboxServer(auth_token=token) as sandbox:
        env = {
            "PLIVO_AUTH_ID": sandbox.auth_id,
            "PLIVO_AUTH_TOKEN": token,
            "PLIVO_BASE_URL": sandbox.base_url,
            "NUMBERSVC_LOG_LEVEL": "DEBUG",
        }
        async with _serve(env) as served:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{served.port}") as channel:
                stub = pb_grpc.NumberGroupServiceStub(channel)
                page = await stub.ListNumberGroups(
                    pb.ListNumberGroupsRequest(filter=pb.SearchFilter(region_code="US"))
                )
                await stub.RentNumbers(
                    pb.RentNumbersRequest(group_id=page.number_groups[0].group_id)
                )
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.GetNumberGroup(pb.GetNumberGroupRequest(group_id="1"))
            served.process.send_signal(signal.SIGINT)
            assert await served.finish() == 0
            assert b"numbersvc.upstream" in served.stderr  # the DEBUG lines were there
            assert token.encode() not in served.stderr


async def test_cli_stream_into_a_closed_pipe_exits_quietly() -> None:
    async with _serve({}) as served:
        read_end, write_end = os.pipe()
        reader = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "numbersvc", "stream", "--country", "US", "--json"),
            *("--target", f"127.0.0.1:{served.port}"),
            stdout=write_end,
            stderr=asyncio.subprocess.PIPE,
        )
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:  # like `| head -1`: read a line, then close
            first = await asyncio.to_thread(pipe.readline)
        assert first.startswith(b"{")
        _, err = await asyncio.wait_for(reader.communicate(), timeout=20)
        assert reader.returncode == 0
        assert b"Traceback" not in err


async def test_a_chatty_server_never_blocks_on_its_log() -> None:
    """More log than the pipe and asyncio's reader buffer hold together (about 192 KiB):
    the server keeps answering, because `Served` reads its stderr on after start-up; before,
    the server's next log write blocked its event loop and every call hung."""
    calls = 1500
    async with _serve({"NUMBERSVC_LOG_LEVEL": "DEBUG"}) as served:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{served.port}") as channel:
            stub = pb_grpc.NumberGroupServiceStub(channel)
            request = pb.ListNumberGroupsRequest(
                filter=pb.SearchFilter(region_code="US"), page_size=1
            )
            for _ in range(calls // 50):
                await asyncio.gather(
                    *(stub.ListNumberGroups(request, timeout=10) for _ in range(50))
                )
        served.process.send_signal(signal.SIGTERM)
        assert await served.finish() == 0
    assert len(served.stderr) > 4 * 65536  # more than the pipe and the reader's buffer
    assert served.stderr.count(b"ListNumberGroups") >= calls
