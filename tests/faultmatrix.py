"""The fault matrix: every upstream fault against every RPC, as data, a runner and a report.

Each `Row` is one fault the sandbox injects (or, for `refused`, a base URL where nothing
listens) and what each RPC must answer: the exact gRPC code, the `ErrorInfo` reason, the
detail types beside `ErrorInfo`, and how many requests reach the upstream (reads retry, rents
never do). `run_cell` runs one (row, RPC) cell against a running server and sandbox and
returns what it saw (`Observed`); `problems` compares the two. `tests/e2e/test_fault_matrix.py`
asserts every cell; `python -m tests.faultmatrix` (`make faults`) starts its own sandbox and
server on port 0, runs every cell and prints one table, exiting 1 if any cell fails.

NOTE: a reset BEFORE the request was sent cannot be produced by the sandbox: it only resets a
connection after reading the request (`reset`), or after the headers and half the body
(`reset_after_headers`). The never-sent case is the `refused` row: the server's base URL is a
port held bound by a socket that never listens (it refuses), so nothing reaches any upstream
(0 requests) and a rent is safe to retry (UNAVAILABLE, not RENT_OUTCOME_UNKNOWN).

The store rows (`STORE_ROWS`) put the order ledger's PostgreSQL in trouble instead, around
the call, on a server whose ledger and budget live there: the database stopped (`down`), a
session holding a lock every claim needs (`slow`: statements wait past their lock timeout),
and every pooled connection of the server held by calls blocked on row locks (`pool
exhausted`). Reads go on (on the fallback budget when the database is down); a rent is refused
with UNAVAILABLE `LEDGER_UNAVAILABLE` before anything is sent, within the caller's deadline.

Upstream request counts are the requests the sandbox logged for the RPC's operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import grpc
import psycopg
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from numbersvc.config import Secret
from numbersvc.sandbox import SandboxControl, SandboxServer
from numbersvc.sandbox.faults import FaultSpec
from numbersvc.server import RunningServer, create_server
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc
from tests.e2e.conftest import config_for, eventually
from tests.pg import Cluster, running_cluster
from tests.ports import refused_port
from tests.timing import stopwatch

__all__ = [
    "ATTEMPTS",
    "DEADLINE_SECONDS",
    "DEADLINE_SLACK_SECONDS",
    "OPERATIONS",
    "ROWS",
    "RPCS",
    "SERVER_OVERRIDES",
    "STORE_ROWS",
    "Database",
    "Expected",
    "Observed",
    "Rig",
    "Row",
    "main",
    "problems",
    "render",
    "run_cell",
    "run_matrix",
    "start_rig",
]

C = grpc.StatusCode
DEADLINE_SECONDS: Final = 2.5  # the caller's deadline on every call: above the rent minimum (2 s)
DEADLINE_SLACK_SECONDS: Final = 0.5  # docs/contract.md: a hung upstream ends by deadline + 0.5 s
ATTEMPTS: Final = 3  # the server's retry_max_attempts for reads
# The rent POST gets a short budget of its own, so a hung one ends inside the cell.
SERVER_OVERRIDES: Final[Mapping[str, Any]] = {
    "retry_max_attempts": ATTEMPTS,
    "rent_timeout_seconds": 3.0,
}
_RENT_DRAIN_SECONDS: Final = 5.0
_FAULT_COUNT: Final = 50  # more hits than any cell makes, so every retry meets the fault
RPCS: Final = ("list", "stream", "get", "rent")
#: The sandbox operation each RPC calls.
OPERATIONS: Final[Mapping[str, str]] = {
    "list": "search",
    "stream": "search",
    "get": "get",
    "rent": "rent",
}
US: Final = pb.SearchFilter(region_code="US")
_RICH_KEY: Final = "grpc-status-details-bin"


@dataclass(frozen=True)
class Expected:
    """What one RPC must answer to one fault."""

    code: grpc.StatusCode
    reason: str
    requests: int  # upstream requests the sandbox receives for the RPC's operation
    details: frozenset[str] = frozenset()  # detail types beside ErrorInfo

    def describe(self) -> str:
        """`CODE REASON [+Detail...]`, for the table."""
        return _describe(self.code, self.reason, self.details)


@dataclass(frozen=True)
class Row:
    """One fault and what each RPC must answer.

    `fault` is the sandbox `FaultSpec` JSON without `count` and `operation` (the runner adds
    them), or `None` for a refused connection (the call goes to a server whose base URL is a
    port that refuses) or for a store row.
    """

    name: str
    fault: Mapping[str, Any] | None
    expected: Mapping[str, Expected]
    store: str | None = None
    """A store row's trouble (`STORE_FAULTS`), on the PostgreSQL server; `fault` is None."""


@dataclass(frozen=True)
class Observed:
    """What one cell answered. `code` is `OK` when the call succeeded."""

    code: grpc.StatusCode
    reason: str | None
    domain: str | None
    details: frozenset[str]
    message: str
    elapsed_seconds: float
    upstream_requests: int
    kept_serving: bool
    #: How late this process's event loop ran during the call (`tests.timing`): the server and
    #: the sandbox share it, so on a loaded machine their timers fire late by as much.
    loop_lag_seconds: float = 0.0

    @property
    def on_time_seconds(self) -> float:
        """The call's time less the loop's lag: what the deadline is held to."""
        return self.elapsed_seconds - self.loop_lag_seconds

    def describe(self) -> str:
        """`CODE REASON [+Detail...]`, for the table."""
        return _describe(self.code, self.reason or "-", self.details)


def _describe(code: grpc.StatusCode, reason: str, details: Iterable[str]) -> str:
    extras = "".join(f" +{name}" for name in sorted(details))
    return f"{code.name} {reason or '-'}{extras}"


_RETRY = frozenset({"RetryInfo"})
_RESOURCE = frozenset({"ResourceInfo"})


def _each(reads: Expected, rent: Expected, *, get: Expected | None = None) -> dict[str, Expected]:
    """The same answer for the three reads (`get` may differ), and the rent's.

    Every rent error names its order (a ResourceInfo), whatever the row.
    """
    rent = dataclasses.replace(rent, details=rent.details | _RESOURCE)
    return {"list": reads, "stream": reads, "get": get or reads, "rent": rent}


def _same(expected: Expected) -> dict[str, Expected]:
    return _each(expected, expected)


_RENT_UNKNOWN = Expected(C.INTERNAL, "RENT_OUTCOME_UNKNOWN", 1)
_TIMED_OUT = _each(
    Expected(C.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", 1),
    Expected(C.DEADLINE_EXCEEDED, "RENT_OUTCOME_UNKNOWN", 1),
)
_LOST = _each(Expected(C.UNAVAILABLE, "UPSTREAM_UNREACHABLE", ATTEMPTS, _RETRY), _RENT_UNKNOWN)
_SERVER_ERROR = _each(
    Expected(C.UNAVAILABLE, "UPSTREAM_UNAVAILABLE", ATTEMPTS, _RETRY), _RENT_UNKNOWN
)
_RATE_LIMITED = _each(
    Expected(C.UNAVAILABLE, "UPSTREAM_RATE_LIMITED", ATTEMPTS, _RETRY),
    Expected(C.UNAVAILABLE, "UPSTREAM_RATE_LIMITED", 1, _RETRY),
)
_REJECTED = _same(Expected(C.INVALID_ARGUMENT, "UPSTREAM_REJECTED_REQUEST", 1))
_UNREADABLE = _each(Expected(C.INTERNAL, "UPSTREAM_BAD_RESPONSE", 1), _RENT_UNKNOWN)
_GROUP_NOT_FOUND = Expected(C.NOT_FOUND, "NUMBER_GROUP_NOT_FOUND", 1, _RESOURCE)

ROWS: Final[Sequence[Row]] = (
    Row("hang", {"kind": "hang"}, _TIMED_OUT),
    Row("slow body", {"kind": "slow_body", "chunks": 50, "chunk_delay_seconds": 0.2}, _TIMED_OUT),
    Row("reset", {"kind": "reset"}, _LOST),
    Row("reset mid-body", {"kind": "reset_after_headers"}, _LOST),
    # Nothing listens: the request never left, so even a rent is safe to retry.
    Row("refused", None, _same(Expected(C.UNAVAILABLE, "UPSTREAM_UNREACHABLE", 0, _RETRY))),
    Row("500", {"kind": "status", "status": 500}, _SERVER_ERROR),
    Row("502 HTML", {"kind": "html", "status": 502}, _SERVER_ERROR),
    Row("503", {"kind": "status", "status": 503}, _SERVER_ERROR),
    Row("429 Retry-After", {"kind": "status", "status": 429, "retry_after": "1"}, _RATE_LIMITED),
    Row("429", {"kind": "status", "status": 429}, _RATE_LIMITED),
    Row("400", {"kind": "status", "status": 400}, _REJECTED),
    Row(
        "401",
        {"kind": "status", "status": 401},
        _same(Expected(C.INTERNAL, "UPSTREAM_AUTH_FAILED", 1)),
    ),
    Row(
        "403",
        {"kind": "status", "status": 403},
        _same(Expected(C.FAILED_PRECONDITION, "UPSTREAM_PERMISSION_DENIED", 1)),
    ),
    Row(
        "404",
        {"kind": "status", "status": 404},
        _each(
            Expected(C.NOT_FOUND, "UPSTREAM_NOT_FOUND", 1), _GROUP_NOT_FOUND, get=_GROUP_NOT_FOUND
        ),
    ),
    Row(
        "405",
        {"kind": "status", "status": 405},
        _same(Expected(C.INTERNAL, "UPSTREAM_METHOD_NOT_ALLOWED", 1)),
    ),
    Row("409", {"kind": "status", "status": 409}, _REJECTED),
    Row("422", {"kind": "status", "status": 422}, _REJECTED),
    Row("truncated JSON", {"kind": "truncated"}, _UNREADABLE),
    Row("malformed JSON", {"kind": "malformed"}, _UNREADABLE),
    Row(
        "wrong shape",
        {"kind": "wrong_shape", "body": {"objects": "nope", "group_id": []}},
        _UNREADABLE,
    ),
)

# The database in trouble: reads answer as usual (they never touch the ledger; the budget falls
# back to a local one), a rent is refused before anything is sent.
_STORE_TROUBLE = {
    **_each(Expected(C.OK, "", 1), Expected(C.UNAVAILABLE, "LEDGER_UNAVAILABLE", 0, _RETRY)),
    "stream": Expected(C.OK, "", 2),  # its 40 results come in two pages
}
STORE_FAULTS: Final = ("down", "slow", "pool exhausted")
STORE_ROWS: Final[Sequence[Row]] = tuple(
    Row(f"store {kind}", None, _STORE_TROUBLE, store=kind) for kind in STORE_FAULTS
)
# The store server's pool is this small, so that a few blocked calls exhaust it.
STORE_POOL_MAX: Final = 2
_BLOCKED_CALL_SECONDS: Final = 20.0


# --- Running cells ------------------------------------------------------------------------------

StartServer = Callable[..., Awaitable[RunningServer]]


@dataclass
class _Endpoint:
    """A running server and a channel to it."""

    server: RunningServer
    channel: grpc.aio.Channel

    @property
    def stub(self) -> pb_grpc.NumberGroupServiceAsyncStub:
        return pb_grpc.NumberGroupServiceStub(self.channel)


@dataclass(frozen=True)
class Database:
    """The PostgreSQL cluster of the store rows, and the URL of a migrated schema in it."""

    cluster: Cluster
    url: str


@dataclass
class Rig:
    """A server on the sandbox, and on demand one whose upstream is a port that refuses and one
    whose ledger is in PostgreSQL (`database`, for the store rows).

    Servers come from `start` (which owns and stops them); the rig owns its channels and the
    socket that keeps the refusing port refusing.
    """

    control: SandboxControl
    main: _Endpoint
    group_id: str  # a group the seeded sandbox knows, for get and rent
    start: StartServer
    database: Database | None = None
    _refused: _Endpoint | None = field(default=None)
    _store: _Endpoint | None = field(default=None)
    _held: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    async def refused(self) -> _Endpoint:
        """The server whose base URL refuses every connection, started on first use.

        The port stays bound (never listening) until `aclose`: a port merely found free could
        be taken by another process meanwhile, and the `refused` row would then talk to it.
        """
        if self._refused is None:
            port = self._held.enter_context(refused_port())
            running = await self.start(
                plivo_base_url=f"http://127.0.0.1:{port}", **SERVER_OVERRIDES
            )
            self._refused = _Endpoint(running, _channel(running))
        return self._refused

    async def store(self) -> _Endpoint:
        """The server on PostgreSQL, started on first use."""
        if self._store is None:
            assert self.database is not None, "the store rows need a PostgreSQL database"
            running = await self.start(
                database_url=Secret(self.database.url),
                database_pool_max=STORE_POOL_MAX,
                daily_rent_cap=0,  # no per-caller lock: the blocked calls hold only connections
                **SERVER_OVERRIDES,
            )
            self._store = _Endpoint(running, _channel(running))
        return self._store

    async def aclose(self) -> None:
        """Close the rig's channels (not the servers) and free the refusing port."""
        try:
            for endpoint in (self.main, self._refused, self._store):
                if endpoint is not None:
                    await endpoint.channel.close()
        finally:
            self._held.close()


def _channel(running: RunningServer) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")


async def start_rig(
    control: SandboxControl,
    start: StartServer,
    *,
    database: Database | None = None,
    **overrides: Any,
) -> Rig:
    """Start the matrix's server (config `overrides` on top) and learn a group id from it."""
    running = await start(**{**SERVER_OVERRIDES, **overrides})
    main = _Endpoint(running, _channel(running))
    page = await main.stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US, page_size=1))
    group_id = page.number_groups[0].group_id
    return Rig(control=control, main=main, group_id=group_id, start=start, database=database)


@contextlib.asynccontextmanager
async def _store_trouble(rig: Rig, row: Row, endpoint: _Endpoint) -> AsyncIterator[None]:
    """The row's trouble with the database, for the length of the call."""
    database = rig.database
    if row.store is None or database is None:
        yield
    elif row.store == "down":
        await asyncio.to_thread(database.cluster.pg_ctl, "stop", "-m", "fast", "-w")
        try:
            yield
        finally:
            await asyncio.to_thread(database.cluster.start)
    elif row.store == "slow":
        async with await psycopg.AsyncConnection.connect(database.url) as locker:
            await locker.execute("LOCK TABLE orders IN SHARE MODE")  # no claim until it ends
            yield
    elif row.store == "pool exhausted":
        async with _pool_held(rig, database, endpoint):
            yield
    else:
        raise ValueError(f"unknown store fault {row.store!r}: one of {STORE_FAULTS}")


@contextlib.asynccontextmanager
async def _pool_held(rig: Rig, database: Database, endpoint: _Endpoint) -> AsyncIterator[None]:
    """Every pooled connection of the server held by a call that waits on a row lock.

    One order per connection (duplicates of one id would join one call in the server), placed
    first; another session locks their rows, and a retry of each waits on its row's lock, in
    its claim, holding its connection, for up to the claim's lock timeout.
    """
    rents = [
        pb.RentNumbersRequest(group_id=rig.group_id, request_id=str(uuid.uuid4()))
        for _ in range(STORE_POOL_MAX)
    ]
    for rent in rents:
        await endpoint.stub.RentNumbers(rent, timeout=DEADLINE_SECONDS)
    await rig.control.clear_requests()  # those POSTs are not the cell's
    async with (
        await psycopg.AsyncConnection.connect(database.url) as locker,
        # Its own connection: a transaction sees one snapshot of pg_stat_activity.
        await psycopg.AsyncConnection.connect(database.url, autocommit=True) as watcher,
    ):
        await locker.execute(
            "SELECT 1 FROM orders WHERE request_id = ANY(%s) FOR UPDATE",
            ([r.request_id for r in rents],),
        )
        held = [
            asyncio.ensure_future(endpoint.stub.RentNumbers(r, timeout=_BLOCKED_CALL_SECONDS))
            for r in rents
        ]
        try:

            async def all_held() -> bool:
                return await _waiting_on_locks(watcher) == STORE_POOL_MAX

            await eventually(all_held)
            yield
        finally:
            await locker.rollback()
            await asyncio.gather(*held, return_exceptions=True)


async def _waiting_on_locks(conn: psycopg.AsyncConnection[Any]) -> int:
    cursor = await conn.execute(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE application_name = 'numbersvc' AND wait_event_type = 'Lock'"
    )
    row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


async def _call(stub: pb_grpc.NumberGroupServiceAsyncStub, rpc: str, group_id: str) -> None:
    timeout = DEADLINE_SECONDS
    if rpc == "list":
        await stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US), timeout=timeout)
    elif rpc == "stream":
        request = pb.StreamNumberGroupsRequest(filter=US, max_results=40)
        [_ async for _ in stub.StreamNumberGroups(request, timeout=timeout)]
    elif rpc == "get":
        await stub.GetNumberGroup(pb.GetNumberGroupRequest(group_id=group_id), timeout=timeout)
    elif rpc == "rent":
        await stub.RentNumbers(pb.RentNumbersRequest(group_id=group_id), timeout=timeout)
    else:
        raise ValueError(f"unknown rpc {rpc!r}: one of {RPCS}")


def _rich(
    metadata: Iterable[tuple[str, Any]] | None,
) -> tuple[str | None, str | None, frozenset[str]]:
    """Return (reason, domain, other detail types) of a rich status; Nones when it has none."""
    raw = dict(metadata or ()).get(_RICH_KEY)
    if not isinstance(raw, bytes):
        return None, None, frozenset()
    status = status_pb2.Status.FromString(raw)
    reason = domain = None
    others = set()
    for packed in status.details:
        if packed.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            packed.Unpack(info)
            reason, domain = info.reason, info.domain
        else:
            others.add(packed.TypeName().rpartition(".")[2])
    return reason, domain, frozenset(others)


async def _serving(endpoint: _Endpoint, *, with_upstream: bool) -> bool:
    """Whether the server still says SERVING and, if its upstream works, answers a search."""
    try:
        health = health_pb2_grpc.HealthStub(endpoint.channel)
        check = await health.Check(health_pb2.HealthCheckRequest(), timeout=DEADLINE_SECONDS)
        if check.status != health_pb2.HealthCheckResponse.SERVING:
            return False
        if with_upstream:
            request = pb.ListNumberGroupsRequest(filter=US, page_size=1)
            page = await endpoint.stub.ListNumberGroups(request, timeout=DEADLINE_SECONDS)
            return len(page.number_groups) == 1
    except grpc.aio.AioRpcError:
        return False
    return True


async def run_cell(rig: Rig, row: Row, rpc: str) -> Observed:
    """Run one cell: reset the sandbox, inject the fault, call, and see what came back.

    The sandbox is reset first, so cells do not see each other's faults, stock or requests.
    Afterwards the fault is cleared, a rent's background POST is drained, and the server that
    took the call must still answer a health check (and a search, when its upstream is the
    sandbox).
    """
    operation = OPERATIONS[rpc]
    await rig.control.reset()
    if row.store is not None:
        endpoint = await rig.store()
    elif row.fault is not None:
        endpoint = rig.main
    else:
        endpoint = await rig.refused()
    if row.fault is not None:
        spec = {**row.fault, "count": _FAULT_COUNT, "operation": operation}
        await rig.control.inject_fault(FaultSpec.from_json(spec))

    code, metadata, message = grpc.StatusCode.OK, None, ""
    async with _store_trouble(rig, row, endpoint):
        async with stopwatch() as took:
            try:
                await _call(endpoint.stub, rpc, rig.group_id)
            except grpc.aio.AioRpcError as exc:
                code, metadata, message = exc.code(), exc.trailing_metadata(), exc.details() or ""
        sent = [r for r in await rig.control.requests() if r["operation"] == operation]

    await rig.control.clear_faults()
    if rpc == "rent":
        await endpoint.server.rent_desk.drain(_RENT_DRAIN_SECONDS)
    # Only the refused row's server has no upstream to search.
    with_upstream = row.fault is not None or row.store is not None
    kept_serving = await _serving(endpoint, with_upstream=with_upstream)
    reason, domain, details = _rich(metadata)
    return Observed(
        code=code,
        reason=reason,
        domain=domain,
        details=details,
        message=message,
        elapsed_seconds=took.elapsed,
        loop_lag_seconds=took.lag,
        upstream_requests=len(sent),
        kept_serving=kept_serving,
    )


def problems(expected: Expected, observed: Observed) -> list[str]:
    """Return what is wrong with a cell's answer; empty when it is exactly as expected."""
    found = []
    if (observed.code, observed.reason or "") != (expected.code, expected.reason):
        found.append(f"answered {observed.describe()}: {observed.message}")
    elif expected.code is not grpc.StatusCode.OK and observed.domain != "numbersvc":
        found.append(f"ErrorInfo domain {observed.domain!r}")
    if observed.details != expected.details:
        found.append(f"details {sorted(observed.details)}, want {sorted(expected.details)}")
    if observed.on_time_seconds >= DEADLINE_SECONDS + DEADLINE_SLACK_SECONDS:
        found.append(
            f"took {observed.elapsed_seconds:.2f} s"
            f" (the loop ran {observed.loop_lag_seconds:.2f} s late)"
        )
    if observed.upstream_requests != expected.requests:
        found.append(f"{observed.upstream_requests} upstream requests, want {expected.requests}")
    if not observed.kept_serving:
        found.append("the server stopped serving")
    return found


# --- The command: python -m tests.faultmatrix ---------------------------------------------------

Result = tuple[Row, str, Observed]


async def run_matrix(
    rows: Sequence[Row] = (*ROWS, *STORE_ROWS),
    rpcs: Sequence[str] = RPCS,
    *,
    on_cell: Callable[[Row, str, Observed], None] | None = None,
) -> list[Result]:
    """Start a sandbox and servers on port 0 (and a PostgreSQL cluster for the store rows),
    run every cell in order, stop everything.

    Raises:
        tests.pg.PostgresMissing: store rows, and no PostgreSQL server binaries.
    """
    with contextlib.ExitStack() as clusters:
        database = None
        if any(row.store is not None for row in rows):
            cluster = clusters.enter_context(running_cluster())
            database = Database(cluster, cluster.create_schema())
        return await _run_matrix(rows, rpcs, database, on_cell)


async def _run_matrix(
    rows: Sequence[Row],
    rpcs: Sequence[str],
    database: Database | None,
    on_cell: Callable[[Row, str, Observed], None] | None,
) -> list[Result]:
    results: list[Result] = []
    started: list[RunningServer] = []
    async with SandboxServer(host="127.0.0.1", port=0) as sandbox:

        async def start(**overrides: Any) -> RunningServer:
            running = await create_server(config_for(sandbox, **overrides))
            started.append(running)
            return running

        try:
            async with SandboxControl(sandbox.base_url) as control:
                rig = await start_rig(control, start, database=database)
                try:
                    for row in rows:
                        for rpc in rpcs:
                            observed = await run_cell(rig, row, rpc)
                            results.append((row, rpc, observed))
                            if on_cell is not None:
                                on_cell(row, rpc, observed)
                finally:
                    await rig.aclose()
        finally:
            for running in started:
                await running.stop(grace_seconds=0.5)
    return results


def render(results: Sequence[Result]) -> str:
    """Render the results as one aligned table, failures explained beneath it."""
    header = ("FAULT", "RPC", "EXPECTED", "OBSERVED", "MS", "UPSTREAM", "RESULT")
    lines: list[tuple[str, ...]] = [header]
    notes: list[str] = []
    failed = 0
    for row, rpc, observed in results:
        expected = row.expected[rpc]
        wrong = problems(expected, observed)
        failed += bool(wrong)
        lines.append(
            (
                row.name,
                rpc,
                expected.describe(),
                observed.describe(),
                f"{observed.elapsed_seconds * 1000:.0f}",
                f"{observed.upstream_requests}/{expected.requests}",
                "FAIL" if wrong else "ok",
            )
        )
        notes.extend(f"FAIL {row.name} / {rpc}: {problem}" for problem in wrong)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    right = {4}  # milliseconds align right
    table = [
        "  ".join(
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(line)
        ).rstrip()
        for line in lines
    ]
    summary = f"{len(results)} cells, {failed} failed (UPSTREAM: observed/expected requests)"
    return "\n".join([*table, "", summary, *notes])


def main() -> int:
    """Run the matrix and print it; exit 1 if any cell fails."""
    cells = (len(ROWS) + len(STORE_ROWS)) * len(RPCS)
    # NOTE: the sandbox's slow_body delivery logs a traceback through aiohttp when the server
    # gives up on the body mid-stream (what that row tests); it is noise here, not a failure.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    print(f"running {cells} fault cells (about 45 s)", end="", file=sys.stderr, flush=True)
    results = asyncio.run(run_matrix(on_cell=lambda *_: print(".", end="", file=sys.stderr)))
    print(file=sys.stderr)
    print(render(results))
    failed = any(problems(row.expected[rpc], observed) for row, rpc, observed in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
