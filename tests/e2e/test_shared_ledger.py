"""Two `numbersvc serve` processes on one SQLite ledger (issue 12 item 2).

A second server used to recover the first one's in-flight orders at start-up (any owner but
itself was taken for dead), so an operator could settle a rent as failed while its POST was
still out, and a retry rented again. Now each server holds a lease and an order is recovered
only once its owner's lease has lapsed AND its send deadline (claim + twice the rent timeout
+ slack) has passed.

The sandbox runs in its own process (it must outlive a killed server) and holds the POST.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import sqlite3
import sys
import uuid
from pathlib import Path
from typing import Any, Final

import grpc
import httpx
import pytest

from numbersvc.config import ConfigError
from numbersvc.ledger import Begin, SqliteLedger
from numbersvc.orders import send_window_seconds
from numbersvc.sandbox import SandboxServer
from numbersvc.server import create_server
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc
from tests.e2e.conftest import StartServer, config_for, eventually
from tests.e2e.test_crash import held_rent, sandbox_for_leased_servers
from tests.e2e.test_process import Served, _serve, _start
from tests.ledger.support import new_attempt

_LEASE_SECONDS: Final = 1.0
# Long enough for a second server to start while the first one's POST is held.
_RENT_TIMEOUT_SECONDS: Final = 10.0
_SEND_DEADLINE_SECONDS: Final = send_window_seconds(_RENT_TIMEOUT_SECONDS)
_METRICS = re.compile(rb"metrics on (http://127\.0\.0\.1:\d+/metrics)")


def _order_row(path: Path, request_id: str) -> dict[str, Any]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT * FROM orders WHERE request_id = ?", (request_id,)).fetchone()
    assert row is not None
    return dict(row)


async def _settle(path: Path, request_id: str, *how: str) -> tuple[int, str]:
    """`numbersvc orders settle` as an operator runs it on the server's host."""
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "numbersvc", "orders", "settle", request_id, *how),
        *("--offline", "--ledger", str(path), "--note", "console"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode is not None
    return process.returncode, (out + err).decode()


async def _heartbeats(client: httpx.AsyncClient, served: Served) -> float:
    match = _METRICS.search(served.stderr)
    assert match, served.stderr.decode()
    text = (await client.get(match.group(1).decode())).text
    found = re.search(r'^numbersvc_ledger_lease_renewals_total\{result="ok"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


@pytest.mark.timeout(_SEND_DEADLINE_SECONDS + 90)
async def test_a_second_server_never_recovers_a_live_servers_rent(tmp_path: Path) -> None:
    ledger_path = tmp_path / "ledger.sqlite3"
    request_id = str(uuid.uuid4())
    async with sandbox_for_leased_servers(
        ledger_path, lease_seconds=_LEASE_SECONDS, rent_timeout_seconds=_RENT_TIMEOUT_SECONDS
    ) as (control, env):
        async with (
            _serve(env) as first,
            grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as channel,
            httpx.AsyncClient() as http,
        ):
            stub = pb_grpc.NumberGroupServiceStub(channel)
            # The sandbox sits on the POST past the rent timeout: it is out while we look.
            group_id, rent = await held_rent(
                stub, control, request_id, hold_seconds=60, timeout_seconds=30
            )
            async with _serve(env) as second:
                # The second server is up and has beaten for more than a lease: still sending.
                assert _order_row(ledger_path, request_id)["state"] == "sending"
                beats = await _heartbeats(http, second)

                async def beat_for_a_lease() -> bool:
                    return await _heartbeats(http, second) >= beats + 4

                await eventually(beat_for_a_lease)
                assert _order_row(ledger_path, request_id)["state"] == "sending"
                code, said = await _settle(ledger_path, request_id, "--as", "failed")
                assert (code, "is sending: nothing to settle" in said) == (1, True), said
                assert not rent.done()

                first.process.kill()  # SIGKILL, mid-POST
                await first.process.wait()
                assert isinstance(
                    (await asyncio.gather(rent, return_exceptions=True))[0], grpc.aio.AioRpcError
                )

                async def recovered() -> bool:
                    return bool(_order_row(ledger_path, request_id)["state"] == "outcome_unknown")

                await eventually(recovered, timeout_seconds=_SEND_DEADLINE_SECONDS + 30)
                row = _order_row(ledger_path, request_id)
                # Not before its send deadline: until then the dead owner's POST might run.
                assert row["update_time_ns"] - row["create_time_ns"] >= _SEND_DEADLINE_SECONDS * 1e9
                code, said = await _settle(
                    ledger_path, request_id, "--as", "fulfilled", "--numbers", "+12125550100"
                )
                assert code == 0, said
                async with grpc.aio.insecure_channel(f"127.0.0.1:{second.port}") as channel2:
                    retry = pb.RentNumbersRequest(group_id=group_id, request_id=request_id)
                    again = await pb_grpc.NumberGroupServiceStub(channel2).RentNumbers(retry)
                    assert again.order.status == pb.ORDER_STATUS_FULFILLED
        posts = [r for r in await control.requests() if r["method"] == "POST"]
        assert len(posts) == 1, "one request id, one POST"


async def _order_of_a_gone_process(path: Path) -> str:
    """A `sending` order whose owner exited: any heartbeat may recover it at once."""
    gone = await SqliteLedger.open(path, send_timeout_seconds=0)
    try:
        claim = new_attempt(str(uuid.uuid4()))
        assert (await gone.begin(claim, daily_cap=0)).kind is Begin.NEW
    finally:
        await gone.close()
    return claim.order.request_id


async def test_a_server_that_cannot_bind_recovers_nothing(
    sandbox: SandboxServer, start_server: StartServer, tmp_path: Path
) -> None:
    path = tmp_path / "ledger.sqlite3"
    request_id = await _order_of_a_gone_process(path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(ConfigError, match="NUMBERSVC_LISTEN"):
            await create_server(config_for(sandbox, listen=listen, ledger_path=str(path)))
    assert _order_row(path, request_id)["state"] == "sending"
    # A server that binds recovers it before it serves.
    await start_server(ledger_path=str(path))
    assert _order_row(path, request_id)["state"] == "outcome_unknown"


async def test_a_ledger_from_a_newer_numbersvc_is_refused_at_start(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA user_version=99")
    process = await _start({"NUMBERSVC_LEDGER_PATH": str(path)})
    _, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 2, err.decode()
    assert b"has schema version 99, newer than this numbersvc knows" in err
    assert b"Traceback" not in err
