"""A ledger that refuses a write after Plivo answered: the outcome is never lost.

Real faults, no mocks: another process holds the ledger's write lock (`BEGIN IMMEDIATE`) past
the busy timeout, or the ledger's disk is full (a 1 MiB tmpfs, mounted as root). The caller is
told `RENT_OUTCOME_UNKNOWN` with the order's request id (never INTERNAL_ERROR), Plivo's whole
answer is in the ERROR log, and the order is recorded as soon as the store takes writes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeAlias, cast

import grpc
import pytest
from prometheus_client import CollectorRegistry

from numbersvc import translation
from numbersvc.deadline import Deadline
from numbersvc.errors import Outcome, ServiceError
from numbersvc.ledger import Attempt, Begin, OrderLedger, OrderState, SqliteLedger
from numbersvc.metrics import Metrics
from numbersvc.orders import RentDesk, fingerprint
from numbersvc.sandbox import DEFAULT_AUTH_TOKEN, SandboxControl, SandboxServer
from numbersvc.sandbox.faults import FaultKind, FaultSpec
from numbersvc.server import RunningServer
from numbersvc.upstream import PlivoClient
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc
from numbersvc.validation import RentParams
from tests.ci import require
from tests.e2e.conftest import StartServer, eventually, reason_of, rich_details

US = pb.SearchFilter(region_code="US")
# SQLite waits this long for a lock (the ledger's `sqlite3.connect(timeout=...)`).
_BUSY_TIMEOUT_SECONDS = 10.0
_POST_DELAY_SECONDS = 3.0  # the fault is set up meanwhile
_SLOW_BUT_RENTED = FaultSpec(FaultKind.DELAY, seconds=_POST_DELAY_SECONDS, operation="rent")
_HOLD_LOCK = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
sys.stdin.readline()
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
db.execute("ROLLBACK")
"""


class _LockHolder:
    """Another process, started ahead (its start-up is slow under load), that takes the
    ledger's write lock on demand and holds it until released."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdin is not None
        assert process.stdout is not None
        self._process, self._stdin, self._stdout = process, process.stdin, process.stdout

    async def lock(self) -> None:
        self._stdin.write(b"lock\n")
        await self._stdin.drain()
        assert await asyncio.wait_for(self._stdout.readline(), 20) == b"locked\n"

    async def release(self) -> None:
        self._stdin.write(b"release\n")
        await self._stdin.drain()
        assert await asyncio.wait_for(self._process.wait(), 20) == 0


@pytest.fixture
async def lock_holder(tmp_path: Path) -> AsyncIterator[_LockHolder]:
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-c", _HOLD_LOCK, str(tmp_path / "ledger.sqlite3")),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        yield _LockHolder(process)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a disk that really fills up. Needs root, as CI has."""
    require(os.geteuid() == 0, "mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def _fill(folder: Path) -> Path:
    """Write a file until the disk is full; return it."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as out:
        for size in (64 * 1024, 512):  # big pieces, then the last few hundred bytes
            with pytest.raises(OSError, match="No space left on device"):
                _write_forever(out, b"\0" * size)
    return filler


def _write_forever(out: BinaryIO, chunk: bytes) -> None:
    while True:
        out.write(chunk)


@pytest.fixture(autouse=True)
def _info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="numbersvc")


Started: TypeAlias = tuple[RunningServer, "pb_grpc.NumberGroupServiceAsyncStub"]  # a .pyi-only name


@pytest.fixture
async def start_on(start_server: StartServer) -> AsyncIterator[Callable[..., Awaitable[Started]]]:
    """Start a server whose ledger is at `path`, and a stub to it (closed after the test)."""
    channels: list[grpc.aio.Channel] = []

    async def start(path: Path, **settings: object) -> Started:
        running = await start_server(ledger_path=str(path), **settings)
        channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{running.port}"))
        return running, pb_grpc.NumberGroupServiceStub(channels[-1])

    yield start
    for channel in channels:
        await channel.close()


async def _rent_while_posting(
    stub: pb_grpc.NumberGroupServiceAsyncStub,
    control: SandboxControl,
    request_id: str,
    deadline_seconds: float,
    fault: FaultSpec = _SLOW_BUT_RENTED,
) -> asyncio.Future[pb.RentNumbersResponse]:
    """Start a rent that the sandbox holds for a while; return once the POST has arrived."""
    page = await stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US, page_size=1))
    await control.inject_fault(fault)
    rent = asyncio.ensure_future(
        stub.RentNumbers(
            pb.RentNumbersRequest(group_id=page.number_groups[0].group_id, request_id=request_id),
            timeout=deadline_seconds,
        )
    )

    async def posted() -> bool:
        return any(r["operation"] == "rent" for r in await control.requests())

    await eventually(posted)
    return rent


async def _unknown(
    rent: asyncio.Future[pb.RentNumbersResponse], request_id: str
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await rent
    error = info.value
    assert reason_of(error) == "RENT_OUTCOME_UNKNOWN", error.details()
    assert rich_details(error)["ErrorInfo"].metadata["requestId"] == request_id
    assert f"numbersvc orders get {request_id}" in (error.details() or "")
    return error


async def _recorded(
    ledger: OrderLedger, request_id: str, state: OrderState = OrderState.FULFILLED
) -> pb.RentalOrder:
    """The order as soon as the ledger has recorded how it ended (no longer `sending`)."""

    async def recorded() -> bool:
        entry = await ledger.get(request_id)
        return entry is not None and entry.state is state

    await eventually(recorded, timeout_seconds=_BUSY_TIMEOUT_SECONDS + 10)
    entry = await ledger.get(request_id)
    assert entry is not None
    return entry.order


def _errors_about(caplog: pytest.LogCaptureFixture, request_id: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.ERROR and request_id in r.getMessage()
    ]


async def _answer_kept(
    running: RunningServer,
    control: SandboxControl,
    caplog: pytest.LogCaptureFixture,
    request_id: str,
    state: OrderState = OrderState.FULFILLED,
) -> pb.RentalOrder:
    """The order once recorded as `state`, Plivo's answer in the ERROR log, one POST in all."""
    order = await _recorded(running.ledger, request_id, state)
    errors = _errors_about(caplog, request_id)
    assert errors, "Plivo's answer is logged at ERROR"
    for number in order.numbers:
        assert number.number in errors[0]
    assert order.upstream_request_id in errors[0]
    assert DEFAULT_AUTH_TOKEN not in caplog.text
    assert sum(r["operation"] == "rent" for r in await control.requests()) == 1
    return order


async def test_write_lock_held_past_the_busy_timeout(
    start_on: Callable[..., Awaitable[Started]],
    lock_holder: _LockHolder,
    control: SandboxControl,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    request_id = str(uuid.uuid4())
    running, stub = await start_on(tmp_path / "ledger.sqlite3")
    # The caller waits longer than one write attempt (the busy timeout), not than the lock.
    rent = await _rent_while_posting(stub, control, request_id, _BUSY_TIMEOUT_SECONDS + 4)
    await lock_holder.lock()
    await _unknown(rent, request_id)

    async def refused() -> bool:  # a write attempt has run into the busy timeout
        return bool(_errors_about(caplog, request_id))

    await eventually(refused, timeout_seconds=_BUSY_TIMEOUT_SECONDS + 10)
    await lock_holder.release()
    order = await _answer_kept(running, control, caplog, request_id)
    assert order.numbers


@pytest.mark.parametrize(
    ("fault", "settings", "state", "note"),
    [
        (_SLOW_BUT_RENTED, {}, OrderState.FULFILLED, ""),
        # The failure path: the POST times out; outcome_unknown is what can be settled.
        (
            FaultSpec(FaultKind.HANG, operation="rent"),
            {"rent_timeout_seconds": _POST_DELAY_SECONDS},
            OrderState.OUTCOME_UNKNOWN,
            "answer was lost",
        ),
    ],
    ids=["answered", "answer-lost"],
)
async def test_full_disk(
    small_disk: Path,
    start_on: Callable[..., Awaitable[Started]],
    control: SandboxControl,
    caplog: pytest.LogCaptureFixture,
    fault: FaultSpec,
    settings: dict[str, float],
    state: OrderState,
    note: str,
) -> None:
    request_id = str(uuid.uuid4())
    running, stub = await start_on(small_disk / "ledger.sqlite3", **settings)
    rent = await _rent_while_posting(stub, control, request_id, _POST_DELAY_SECONDS + 4, fault)
    filler = _fill(small_disk)
    await _unknown(rent, request_id)
    filler.unlink()
    order = await _answer_kept(running, control, caplog, request_id, state)
    assert note in order.status_message
    assert bool(order.numbers) == (state is OrderState.FULFILLED)


async def test_a_rent_while_the_file_is_locked_is_refused_with_nothing_sent(
    start_on: Callable[..., Awaitable[Started]],
    lock_holder: _LockHolder,
    control: SandboxControl,
    tmp_path: Path,
) -> None:
    """The claim cannot be written (locked past the busy timeout): UNAVAILABLE
    `LEDGER_UNAVAILABLE` with RetryInfo, nothing sent (issue 10), not INTERNAL."""
    _, stub = await start_on(tmp_path / "ledger.sqlite3")
    page = await stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US, page_size=1))
    rent = pb.RentNumbersRequest(group_id=page.number_groups[0].group_id)
    await lock_holder.lock()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.RentNumbers(rent, timeout=_BUSY_TIMEOUT_SECONDS + 10)
    await lock_holder.release()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
    assert reason_of(refused.value) == "LEDGER_UNAVAILABLE"
    assert "RetryInfo" in rich_details(refused.value)
    assert not any(r["operation"] == "rent" for r in await control.requests())
    assert (await stub.RentNumbers(rent, timeout=10)).order.status == pb.ORDER_STATUS_FULFILLED


@contextlib.asynccontextmanager
async def _desk(
    sandbox: SandboxServer, ledger: OrderLedger, metrics: Metrics | None = None
) -> AsyncIterator[tuple[RentDesk, str]]:
    """A rent desk of this process on `ledger` and the sandbox, and a US group to rent from."""
    async with PlivoClient(
        base_url=sandbox.base_url, auth_id=sandbox.auth_id, auth_token=sandbox.auth_token
    ) as client:
        found = await client.search_number_groups({"country_iso": "US"}, timeout_seconds=5)
        group_id = cast(dict[str, Any], found.body)["objects"][0]["group_id"]
        yield (
            RentDesk(
                upstream=client,
                ledger=ledger,
                rent_timeout_seconds=30,
                daily_cap=0,
                metrics=metrics,
            ),
            group_id,
        )


async def test_a_hard_stop_stays_a_cancellation_when_the_ledger_refuses_its_write(
    sandbox: SandboxServer, control: SandboxControl, tmp_path: Path
) -> None:
    """A rent's task cancelled by a hard stop while its POST hangs, with a ledger that cannot
    be written (closed here): the task ends cancelled, as a stop expects, not with the
    ledger's error; the row stays `sending` for another server's heartbeat to recover."""
    path = tmp_path / "ledger.sqlite3"
    ledger = await SqliteLedger.open(path)
    async with _desk(sandbox, ledger) as (desk, group_id):
        await control.inject_fault(FaultSpec(FaultKind.HANG, operation="rent"))
        request_id = str(uuid.uuid4())
        params = RentParams(group_id=group_id, quantity=1, app_id="", request_id=request_id)
        call = asyncio.ensure_future(
            desk.rent(params, caller="alice", peer="test", deadline=Deadline(time.monotonic() + 20))
        )

        async def posted() -> bool:
            return any(r["method"] == "POST" for r in await control.requests())

        await eventually(posted)
        [flight] = [t for t in asyncio.all_tasks() if t.get_name() == f"rent {request_id}"]
        await ledger.close()  # from here every write fails
        flight.cancel()
        with pytest.raises(asyncio.CancelledError):
            await flight
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
    with sqlite3.connect(path) as db:
        (state,) = db.execute(
            "SELECT state FROM orders WHERE request_id = ?", (request_id,)
        ).fetchone()
    assert state == "sending"


async def test_an_answer_to_a_claim_taken_over_meanwhile_is_told_unknown_and_logged_once(
    sandbox: SandboxServer,
    control: SandboxControl,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While a POST is out, its claim is recovered by another server (this one's lease lapsed:
    a frozen process, a broken link to the store), settled as failed and claimed again. The
    answer is not this order's outcome in the ledger any more: the caller is told
    RENT_OUTCOME_UNKNOWN at once (not the other claim's row, not after its deadline), Plivo's
    answer is logged once and counted for an alert, and the write is not retried (it never can
    succeed)."""
    path = tmp_path / "ledger.sqlite3"
    metrics = Metrics(CollectorRegistry())
    # This desk's ledger never beats: its lease lapses, its claim's send window is short.
    mine = await SqliteLedger.open(path, lease_seconds=0.3, send_timeout_seconds=0.3)
    other = await SqliteLedger.open(path, lease_seconds=600)
    async with _desk(sandbox, mine, metrics) as (desk, group_id):
        # Answered (rented) after the take-over below, which takes well under a second.
        await control.inject_fault(FaultSpec(FaultKind.DELAY, seconds=8, operation="rent"))
        request_id = str(uuid.uuid4())
        params = RentParams(group_id=group_id, quantity=1, app_id="", request_id=request_id)
        started = time.monotonic()
        call = asyncio.ensure_future(
            desk.rent(params, caller="alice", peer="test", deadline=Deadline(started + 25))
        )

        async def posted() -> bool:
            return any(r["method"] == "POST" for r in await control.requests())

        async def recovered() -> bool:
            return (await other.heartbeat()).recovered == 1

        await eventually(posted)
        await eventually(recovered)
        await other.settle(request_id, OrderState.FAILED, numbers=[], note="ops", actor="ops")
        retry = Attempt(
            translation.new_order(params, caller="alice"), fingerprint(params, "alice"), "b"
        )
        assert (await other.begin(retry, daily_cap=0)).kind is Begin.NEW
        assert not call.done(), "the take-over came after the answer: the test proves nothing"
        with pytest.raises(ServiceError) as told:
            await call
        # Once the answer came, not at the deadline (a write retried until then).
        assert time.monotonic() - started < 20
        await desk.stop(0)
        await mine.close()
        assert told.value.outcome is Outcome.RENT_OUTCOME_UNKNOWN
        assert "claimed again" in told.value.message
        entry = await other.get(request_id)
        assert entry is not None
        assert (entry.state, entry.owner) == (OrderState.SENDING, other.instance)
        lost = [m for m in _errors_about(caplog, request_id) if "not recorded" in m]
        assert len(lost) == 1, _errors_about(caplog, request_id)
        assert metrics.registry.get_sample_value("numbersvc_rent_answers_unrecorded_total") == 1
        await other.close()
