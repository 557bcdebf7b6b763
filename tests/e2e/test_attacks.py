"""Attacks from outside on the fixes of issue 12: real processes, real files, real sockets.

Each test reproduces one way the service still breaks a promise (docs/) and fails until it
is fixed. Loopback and ports from the OS only; every process started here is ended here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sqlite3
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final, cast

import grpc
import pytest
import trustme

from numbersvc.callers import add_caller
from numbersvc.gatekeeper import REQUEST_ARRIVAL_SECONDS
from numbersvc.orders import send_window_seconds
from numbersvc.sandbox import DEFAULT_AUTH_ID, DEFAULT_AUTH_TOKEN, SandboxControl, SandboxServer
from numbersvc.sandbox.faults import FaultKind, FaultSpec
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc
from tests.e2e.conftest import StartServer, eventually, reason_of, rich_details
from tests.e2e.test_crash import sandbox_for_leased_servers
from tests.e2e.test_ledger_faults import _LockHolder, lock_holder  # noqa: F401 (fixture)
from tests.e2e.test_process import Served, _serve, _start, plivo_env
from tests.e2e.test_secrets import (
    Capture,
    HostileProxy,
    _leaks,
    behind_a_hostile_proxy,
    captured_logs,
)
from tests.e2e.test_shared_ledger import _order_row

US: Final = pb.SearchFilter(region_code="US")


@contextlib.asynccontextmanager
async def _paused(served: Served, ledger: Path) -> AsyncIterator[None]:
    """SIGSTOP a server we started (a VM or container freeze, a laptop lid); SIGCONT after.

    Frozen while it holds the SQLite file's write lock (a heartbeat every third of a second
    takes it for a moment), it would stop every other server writing, recovering included:
    a file's lock is the host's, and SQLite cannot break a live process's. That is not the
    freeze the tests mean, so such a moment is let go and the freeze tried again.
    """

    async def stopped() -> bool:
        return _stopped(served.process.pid)

    for _ in range(100):
        served.process.send_signal(signal.SIGSTOP)
        await eventually(stopped, what="the server stopped")
        if _writable(ledger):
            break
        served.process.send_signal(signal.SIGCONT)
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the server held the ledger's write lock at 100 freezes")
    try:
        yield
    finally:
        if served.process.returncode is None:
            served.process.send_signal(signal.SIGCONT)


def _stopped(pid: int) -> bool:
    state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    return state in ("T", "t")


def _writable(ledger: Path) -> bool:
    db = sqlite3.connect(ledger, timeout=0)
    try:
        db.execute("BEGIN IMMEDIATE")
        db.rollback()
        return True
    except sqlite3.OperationalError:  # "database is locked"
        return False
    finally:
        db.close()


# --- renting --------------------------------------------------------------------------------

_RENT_TIMEOUT_SECONDS: Final = 8.0
# A's budget: one request per 7 s, so after a search its rent waits ~7 s for a token (within
# the rent timeout): a wide window to freeze A in, between its claim and its POST.
_A_RATE: Final = "1/7s"
_SEND_DEADLINE_SECONDS: Final = send_window_seconds(_RENT_TIMEOUT_SECONDS)
_B_POST_SECONDS: Final = 10.0  # long enough for A to thaw and answer meanwhile


class _TwoServers:
    """Servers A and B on one ledger, A with a budget of one Plivo request per 7 s."""

    def __init__(
        self,
        control: SandboxControl,
        ledger: Path,
        a: Served,
        stubs: tuple[pb_grpc.NumberGroupServiceAsyncStub, pb_grpc.NumberGroupServiceAsyncStub],
    ) -> None:
        self.control, self.ledger, self.a = control, ledger, a
        self.stub_a, self.stub_b = stubs
        self.request_id = str(uuid.uuid4())
        self.request = pb.RentNumbersRequest()

    def state(self) -> str:
        return str(_order_row(self.ledger, self.request_id)["state"])

    async def posts(self) -> int:
        return sum(r["method"] == "POST" for r in await self.control.requests())

    async def freeze_a_after_its_claim(
        self,
    ) -> tuple[asyncio.Future[pb.RentNumbersResponse], contextlib.AsyncExitStack]:
        """A claims an order and is frozen waiting for its token; B recovers the order and
        the operator, finding nothing in the Plivo console, settles it as failed.

        Returns A's rent call and the stack that thaws A when closed.
        """
        page = await self.stub_a.ListNumberGroups(
            pb.ListNumberGroupsRequest(filter=US, page_size=1)
        )
        self.request = pb.RentNumbersRequest(
            group_id=page.number_groups[0].group_id, request_id=self.request_id
        )
        # A's only token went to the search: the rent waits for the next one.
        rent = asyncio.ensure_future(self.stub_a.RentNumbers(self.request, timeout=120))

        async def claimed() -> bool:
            with contextlib.suppress(AssertionError):
                return self.state() == "sending"
            return False

        await eventually(claimed)
        frozen = contextlib.AsyncExitStack()
        await frozen.enter_async_context(_paused(self.a, self.ledger))

        async def recovered() -> bool:
            return self.state() == "outcome_unknown"

        await eventually(recovered, timeout_seconds=_SEND_DEADLINE_SECONDS + 30)
        assert await self.posts() == 0, "nothing was sent: the console shows nothing"
        await self.stub_b.SettleRentalOrder(
            pb.SettleRentalOrderRequest(
                request_id=self.request_id, status=pb.ORDER_STATUS_FAILED, note="not in console"
            )
        )
        return rent, frozen


@contextlib.asynccontextmanager
async def _two_servers(tmp_path: Path) -> AsyncIterator[_TwoServers]:
    ledger = tmp_path / "ledger.sqlite3"
    async with (
        sandbox_for_leased_servers(
            ledger, lease_seconds=1, rent_timeout_seconds=_RENT_TIMEOUT_SECONDS
        ) as (control, common),
        _serve({**common, "NUMBERSVC_UPSTREAM_RATE": _A_RATE}) as a,
        # B's POSTs may take long: its own claims have its own send deadline.
        _serve({**common, "NUMBERSVC_RENT_TIMEOUT_SECONDS": "30"}) as b,
        grpc.aio.insecure_channel(f"127.0.0.1:{a.port}") as channel_a,
        grpc.aio.insecure_channel(f"127.0.0.1:{b.port}") as channel_b,
    ):
        stubs = (
            pb_grpc.NumberGroupServiceStub(channel_a),
            pb_grpc.NumberGroupServiceStub(channel_b),
        )
        yield _TwoServers(control, ledger, a, stubs)


@pytest.mark.timeout(_SEND_DEADLINE_SECONDS + 120)
async def test_a_paused_server_never_posts_an_order_recovered_and_settled_meanwhile(
    tmp_path: Path,
) -> None:
    """A server frozen between its claim and its POST must not send once its claim is void.

    Server A claims an order, then waits for a rate-limit token (a wait the send deadline
    allows for) and is frozen there. Server B, on the same ledger, sees A's lease lapse and the
    send deadline pass and recovers the order as outcome unknown; the operator finds nothing
    in the Plivo console (nothing was sent) and settles it as failed; a retry under the id
    rents. When A thaws, it sends its POST anyway: two orders, one request id.
    """
    async with _two_servers(tmp_path) as two:
        rent, frozen = await two.freeze_a_after_its_claim()
        async with frozen:
            again = await two.stub_b.RentNumbers(two.request, timeout=30)
            assert again.order.status == pb.ORDER_STATUS_FULFILLED
        # A thaws: whatever it answers its caller, it must not send the void claim.
        await asyncio.gather(rent, return_exceptions=True)
        posts = await two.posts()
        assert posts == 1, f"one request id, {posts} POSTs (each rented numbers)"


@pytest.mark.timeout(_SEND_DEADLINE_SECONDS + 120)
async def test_a_late_outcome_never_overwrites_another_servers_claim(tmp_path: Path) -> None:
    """What a thawed server learns about its void claim must not land on B's new attempt.

    After the recovery and the settlement, a retry through B claims the id again and B's POST
    is out. A thaws and records how its own attempt ended (sent or not) over B's row: the order
    no longer reads `sending` while B's POST may still rent, so it could be settled or retried.
    """
    async with _two_servers(tmp_path) as two:
        rent, frozen = await two.freeze_a_after_its_claim()
        async with frozen:
            await two.control.inject_fault(
                FaultSpec(FaultKind.DELAY, seconds=_B_POST_SECONDS, operation="rent")
            )
            again = asyncio.ensure_future(two.stub_b.RentNumbers(two.request, timeout=60))

            async def b_posted() -> bool:
                return await two.posts() == 1

            await eventually(b_posted)
        await asyncio.gather(rent, return_exceptions=True)  # A has thawed and answered
        assert not again.done()
        assert two.state() == "sending", "B's POST is still out"
        assert (await again).order.status == pb.ORDER_STATUS_FULFILLED


# --- access control -------------------------------------------------------------------------


async def _guarded_server(
    start_server: StartServer, tmp_path: Path, *, max_concurrent_rpcs: int
) -> tuple[str, str]:
    """Start a server with a callers file and one health Watch; return its target and a token."""
    callers = tmp_path / "callers.json"
    token = add_caller(callers, "billing", ["numbers.read"]) or ""
    running = await start_server(
        callers_file=str(callers), max_concurrent_rpcs=max_concurrent_rpcs, max_health_watches=1
    )
    return f"127.0.0.1:{running.port}", token


@contextlib.asynccontextmanager
async def _calls_that_send_nothing(
    target: str, methods: list[str], metadata: tuple[tuple[str, str], ...] = ()
) -> AsyncIterator[list[Any]]:
    """Open a call to each method on a channel of its own: headers, then nothing, until exit."""
    never: asyncio.Event = asyncio.Event()

    async def nothing() -> AsyncIterator[bytes]:
        await never.wait()
        yield b""

    async with grpc.aio.insecure_channel(target) as hostile:
        # Raw calls (the stubs' types want no request stream at all).
        held: list[Any] = [
            hostile.stream_stream(m)(cast(Any, nothing()), metadata=metadata) for m in methods
        ]
        try:
            # Time for the calls to reach the server and take their slots before anyone else.
            await asyncio.sleep(1.0)
            yield held
        finally:
            for call in held:
                call.cancel()


async def test_unauthenticated_calls_that_never_send_their_request_cannot_starve_the_api(
    start_server: StartServer, tmp_path: Path
) -> None:
    """Calls with no identity that open a call and never send the request hold no RPC slot.

    A peer with no identity opens calls (here, to API methods and to health `Check`, which
    stays open) and sends nothing. The gatekeeper used to run only once a unary method's
    request had arrived, so each held one of NUMBERSVC_MAX_CONCURRENT_RPCS until the
    connection aged out (minutes), and every caller with a token got RESOURCE_EXHAUSTED
    meanwhile. The headers now decide: the API calls are refused at once.
    """
    target, token = await _guarded_server(start_server, tmp_path, max_concurrent_rpcs=4)
    methods = ["/numbersvc.v1.NumberGroupService/ListNumberGroups"] * 2
    methods += ["/numbersvc.v1.NumberGroupService/StreamNumberGroups"]
    methods += ["/grpc.health.v1.Health/Check"] * 2
    async with (
        _calls_that_send_nothing(target, methods) as held,
        grpc.aio.insecure_channel(target) as channel,
    ):
        # Refused from their headers, so they end without a request: before, they never did
        # (bounded, so the old code fails here instead of passing on a slot not yet taken).
        for call in held[:3]:
            code = await asyncio.wait_for(call.code(), timeout=5)
            assert code == grpc.StatusCode.UNAUTHENTICATED
        page = await pb_grpc.NumberGroupServiceStub(channel).ListNumberGroups(
            pb.ListNumberGroupsRequest(filter=US, page_size=1),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=10,
        )
        assert page.number_groups


async def test_a_known_caller_without_the_permission_is_refused_before_its_request(
    start_server: StartServer, tmp_path: Path
) -> None:
    """A caller the headers name (a bearer token) but who lacks the method's permission is
    refused from its headers too, not once a request that may never come arrives: rent calls
    from a read-only caller that send nothing held RPC slots as long as the anonymous ones did."""
    target, token = await _guarded_server(start_server, tmp_path, max_concurrent_rpcs=4)
    methods = ["/numbersvc.v1.NumberGroupService/RentNumbers"] * 3
    bearer = (("authorization", f"Bearer {token}"),)
    async with _calls_that_send_nothing(target, methods, bearer) as held:
        for call in held:
            code = await asyncio.wait_for(call.code(), timeout=5)
            assert code == grpc.StatusCode.PERMISSION_DENIED


async def test_health_calls_that_never_send_their_request_give_their_slots_back(
    start_server: StartServer, tmp_path: Path
) -> None:
    """Health is open to anyone (probes), so no identity refuses it: instead, a health call
    whose request does not follow its headers is ended after REQUEST_ARRIVAL_SECONDS, and its
    RPC slot serves the callers who wait. Before, such calls held every slot for minutes."""
    target, token = await _guarded_server(start_server, tmp_path, max_concurrent_rpcs=2)
    methods = ["/grpc.health.v1.Health/Check"] * 2 + ["/grpc.health.v1.Health/Watch"]
    async with (
        _calls_that_send_nothing(target, methods) as held,
        grpc.aio.insecure_channel(target) as channel,
    ):
        stub = pb_grpc.NumberGroupServiceStub(channel)
        refusals: list[grpc.StatusCode] = []
        # Refused while the held calls (2 + 1 slots) last; retried past the arrival bound.
        for _ in range(int(3 * REQUEST_ARRIVAL_SECONDS)):
            try:
                page = await stub.ListNumberGroups(
                    pb.ListNumberGroupsRequest(filter=US, page_size=1),
                    metadata=(("authorization", f"Bearer {token}"),),
                    timeout=10,
                )
                break
            except grpc.aio.AioRpcError as error:
                refusals.append(error.code())
                await asyncio.sleep(1.0)
        else:
            pytest.fail("the held health calls never gave their slots back")
        assert set(refusals) == {grpc.StatusCode.RESOURCE_EXHAUSTED}, refusals
        assert page.number_groups
        for call in held:
            assert await call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            ended = grpc.aio.AioRpcError(
                await call.code(),
                await call.initial_metadata(),
                await call.trailing_metadata(),
                await call.details(),
            )
            assert reason_of(ended) == "REQUEST_NOT_SENT"


class _Utf16Proxy(HostileProxy):
    """The hostile proxy, answering in UTF-16 (a BOM, then two bytes a character) with the
    plain token in `api_id`: JSON decoding reads UTF-16, while a scrub of the raw bytes looks
    for the token's UTF-8 bytes and does not see it."""

    def _rewrite(self, content: bytes) -> bytes:
        document = json.loads(content)
        document["api_id"] = self.token
        self.answered += 1
        return json.dumps(document).encode("utf-16")


async def test_a_token_in_a_utf16_answer_never_reaches_anyone() -> None:
    capture = Capture()
    with captured_logs() as (text_log, json_log):
        async with behind_a_hostile_proxy(_Utf16Proxy) as (stub, control, proxy, _):
            page = await stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US, page_size=2))
            capture.add("list", page)
            rent = pb.RentNumbersRequest(group_id=page.number_groups[0].group_id)
            capture.add("rent", await stub.RentNumbers(rent))
            await control.inject_fault(FaultSpec(FaultKind.STATUS, status=400, operation="search"))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US))
            capture.add("refused", refused.value.details() or "")
    everything = "\n".join([capture.text(), text_log.getvalue(), json_log.getvalue()])
    # Read as UTF-8, UTF-16 text is its characters with NULs between: readable all the same.
    everything = everything.replace("\x00", "").replace("\\x00", "")
    assert proxy.answered == 3
    token = proxy.token
    assert _leaks(everything, {"plivo token": token}, {"plivo token": token}) == []


class _DeepProxy(HostileProxy):
    """The hostile proxy, answering searches with the token escaped in `api_id` beside a value
    nested `depth` arrays deep: deeper than Python's recursion limit, for a walk or a decoder
    that recurses."""

    depth = 900

    def _rewrite(self, content: bytes) -> bytes:
        document = json.loads(content)
        if "objects" not in document:
            return content
        self.answered += 1
        escaped = "".join(f"\\u{ord(c):04x}" for c in self.token)
        nested = b"[" * self.depth + b"1" + b"]" * self.depth
        return b'{"api_id": "%s", "deep": %s}' % (escaped.encode(), nested)


class _DeeperProxy(_DeepProxy):
    depth = 100_000


@pytest.mark.parametrize("proxy_class", [_DeepProxy, _DeeperProxy])
async def test_a_deeply_nested_answer_is_a_bad_upstream_answer(
    proxy_class: type[_DeepProxy],
) -> None:
    """Not INTERNAL from a RecursionError: the answer is Plivo's fault, and says so."""
    capture = Capture()
    with captured_logs() as (text_log, json_log):
        async with behind_a_hostile_proxy(proxy_class) as (stub, _, proxy, _):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US), timeout=10)
            capture.add("refused", refused.value.details() or "")
    assert proxy.answered >= 1
    assert refused.value.code() == grpc.StatusCode.INTERNAL, refused.value
    assert reason_of(refused.value) == "UPSTREAM_BAD_RESPONSE"
    everything = "\n".join([capture.text(), text_log.getvalue(), json_log.getvalue()])
    assert "RecursionError" not in everything
    assert _leaks(everything, {"plivo token": proxy.token}, {"plivo token": proxy.token}) == []


# --- access control, from outside -------------------------------------------------------------


async def _list_as(port: int, *metadata: tuple[str, str]) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.NumberGroupServiceStub(channel)
        try:
            await stub.ListNumberGroups(
                pb.ListNumberGroupsRequest(filter=US, page_size=1), metadata=metadata, timeout=10
            )
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK


async def test_forged_authorization_variants_name_no_one(tmp_path: Path) -> None:
    """A real `numbersvc serve`: only the token itself, after `Bearer ` in any case, gets in."""
    callers = tmp_path / "callers.json"
    token = add_caller(callers, "dashboard", ["numbers.read"]) or ""
    async with _serve({"NUMBERSVC_CALLERS_FILE": str(callers)}) as served:
        admitted = [f"Bearer {token}", f"bearer {token}", f"BEARER {token}"]
        for value in admitted:
            assert await _list_as(served.port, ("authorization", value)) == grpc.StatusCode.OK
        forged = [
            f"Bearer {token.upper()}",  # tokens are case-sensitive
            f"Bearer {token[:-1]}",
            f"Bearer {token}x",
            f"Bearer {token} {token}",
            f"Bearer{token}",
            f"Basic {token}",
            f"Bearer {token[:32]}",
            f"Token {token}",
        ]
        for value in forged:
            code = await _list_as(served.port, ("authorization", value))
            assert code == grpc.StatusCode.UNAUTHENTICATED, value
        # The first `authorization` is the one read: a valid one after a forged one is no key.
        two = (("authorization", f"Bearer {token}x"), ("authorization", f"Bearer {token}"))
        assert await _list_as(served.port, *two) == grpc.StatusCode.UNAUTHENTICATED
        assert await _list_as(served.port, ("authorization-x", f"Bearer {token}")) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
    assert token.encode() not in served.stderr


async def test_a_callers_file_swapped_for_a_writable_one_is_never_believed(
    tmp_path: Path,
) -> None:
    """Swapped after start for a link to a world-writable file that grants a new token: the
    running server read its file once; a restart refuses the link's target, by its mode."""
    callers = tmp_path / "callers.json"
    token = add_caller(callers, "dashboard", ["numbers.read"]) or ""
    planted = tmp_path / "planted.json"
    intruder = add_caller(planted, "intruder", ["numbers.read", "numbers.rent"]) or ""
    planted.chmod(0o666)
    env = {"NUMBERSVC_CALLERS_FILE": str(callers)}
    async with _serve(env) as served:
        callers.unlink()
        callers.symlink_to(planted)
        bearer = ("authorization", f"Bearer {intruder}")
        assert await _list_as(served.port, bearer) == grpc.StatusCode.UNAUTHENTICATED
        own = ("authorization", f"Bearer {token}")
        assert await _list_as(served.port, own) == grpc.StatusCode.OK
    code, said = await _start_up_error(env)
    assert code == 2
    assert "can be written by its group and others (mode 666)" in said, said


# --- what trips a newcomer ------------------------------------------------------------------


async def _start_up_error(env: dict[str, str]) -> tuple[int, str]:
    """`numbersvc serve` that should not start: its exit code and what it printed."""
    process = await _start(env)
    _, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode is not None
    return process.returncode, err.decode()


@pytest.mark.parametrize(
    ("broken", "setting"),
    [
        ("cert", "NUMBERSVC_TLS_CERT"),
        ("key", "NUMBERSVC_TLS_KEY"),
        ("other key", "NUMBERSVC_TLS_KEY"),
        ("client ca", "NUMBERSVC_TLS_CLIENT_CA"),
    ],
)
async def test_unusable_tls_files_name_their_setting(
    tmp_path: Path, broken: str, setting: str
) -> None:
    """A TLS file that is not PEM, or a key of another certificate, was reported as a taken
    port: `NUMBERSVC_LISTEN: cannot listen on 127.0.0.1:0: the address is in use`."""
    ca = trustme.CA()
    files = {
        name: tmp_path / f"{name.replace(' ', '-')}.pem" for name in ("cert", "key", "client ca")
    }
    issued = ca.issue_cert("localhost")
    issued.cert_chain_pems[0].write_to_path(files["cert"])
    issued.private_key_pem.write_to_path(files["key"])
    ca.cert_pem.write_to_path(files["client ca"])
    if broken == "other key":
        ca.issue_cert("other").private_key_pem.write_to_path(files["key"])
    else:
        files[broken].write_text("not PEM at all\n")
    code, said = await _start_up_error(
        {
            "NUMBERSVC_TLS_CERT": str(files["cert"]),
            "NUMBERSVC_TLS_KEY": str(files["key"]),
            "NUMBERSVC_TLS_CLIENT_CA": str(files["client ca"]),
        }
    )
    errors = [line for line in said.splitlines() if line.startswith("error:")]
    assert code == 2, said
    assert len(errors) == 1, said
    assert setting in errors[0], said
    assert "NUMBERSVC_LISTEN" not in errors[0]


@pytest.mark.parametrize("base_url", ["ftp://api.plivo.example/", "http:///v1"])
async def test_a_base_url_that_is_not_http_is_one_error_line(base_url: str) -> None:
    code, said = await _start_up_error(
        {
            "NUMBERSVC_UPSTREAM": "plivo",
            "PLIVO_AUTH_ID": DEFAULT_AUTH_ID,
            "PLIVO_AUTH_TOKEN": DEFAULT_AUTH_TOKEN,
            "PLIVO_BASE_URL": base_url,
        }
    )
    assert (code, "Traceback" in said) == (2, False), said
    assert "error: configuration: PLIVO_BASE_URL" in said, said


async def test_the_sandbox_on_a_taken_port_is_one_error_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "numbersvc", "sandbox", "--listen", address),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(process.communicate(), timeout=30)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    said = (out + err).decode()
    assert (process.returncode, "Traceback" in said) == (2, False), said
    assert f"error: cannot listen on {address}" in said, said


async def test_a_rent_claimed_after_the_desk_gave_up_is_never_sent(
    sandbox: SandboxServer,
    control: SandboxControl,
    lock_holder: _LockHolder,  # noqa: F811 (the fixture, imported)
    tmp_path: Path,
) -> None:
    """SIGTERM while a rent waits for the ledger's write lock: when the claim lands, after the
    desk has given up on its orders and "sends no more", the POST still goes out (on a kept
    connection its bytes leave before the shutdown is noticed) and the order reads unknown."""
    path = tmp_path / "ledger.sqlite3"
    env = plivo_env(sandbox.base_url, path, NUMBERSVC_SHUTDOWN_GRACE_SECONDS="2")
    async with (
        _serve(env) as served,
        grpc.aio.insecure_channel(f"127.0.0.1:{served.port}") as channel,
    ):
        stub = pb_grpc.NumberGroupServiceStub(channel)
        page = await stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US, page_size=1))
        await lock_holder.lock()
        request_id = str(uuid.uuid4())
        request = pb.RentNumbersRequest(
            group_id=page.number_groups[0].group_id, request_id=request_id
        )
        rent = asyncio.ensure_future(stub.RentNumbers(request, timeout=60))
        # The rent waits for the lock in the ledger's begin. No signal says it got there, so
        # the order's row is checked below: a rent that arrived after SIGTERM would be refused
        # before the ledger, write no row, and send nothing, passing without proving anything.
        await asyncio.sleep(1.0)
        served.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(3.0)  # drain (0.2 s), then the desk gives up after 1 s
        await lock_holder.release()
        outcome = (await asyncio.gather(rent, return_exceptions=True))[0]
        assert await served.finish() == 0
    posts = sum(r["method"] == "POST" for r in await control.requests())
    assert posts == 0, "a POST sent after the desk stopped"
    row = _order_row(path, request_id)  # the claim landed (after the desk gave up)
    assert row["state"] == "released", (row["state"], outcome)  # never sent: the id is free


async def test_a_retry_through_another_server_while_the_post_is_out_waits_or_is_told_to_retry(
    start_server: StartServer, control: SandboxControl, tmp_path: Path
) -> None:
    """Two servers on one ledger: a retry that reaches B while A's POST is out was told the
    outcome is unknown and to settle the order first, which `orders settle` then refuses
    ("is sending"). Now B waits for A's outcome within the retry's deadline: a short one gets
    ABORTED (RENT_IN_PROGRESS) with RetryInfo, as on A; a long one gets A's order, one POST."""
    path = str(tmp_path / "ledger.sqlite3")
    first, second = await start_server(ledger_path=path), await start_server(ledger_path=path)
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as channel_a,
        grpc.aio.insecure_channel(f"127.0.0.1:{second.port}") as channel_b,
    ):
        stub_a = pb_grpc.NumberGroupServiceStub(channel_a)
        page = await stub_a.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US, page_size=1))
        await control.inject_fault(FaultSpec(FaultKind.DELAY, seconds=6.0, operation="rent"))
        request = pb.RentNumbersRequest(
            group_id=page.number_groups[0].group_id, request_id=str(uuid.uuid4())
        )
        rent = asyncio.ensure_future(stub_a.RentNumbers(request, timeout=30))

        async def posted() -> bool:
            return any(r["method"] == "POST" for r in await control.requests())

        await eventually(posted)
        with pytest.raises(grpc.aio.AioRpcError) as retried:
            await pb_grpc.NumberGroupServiceStub(channel_b).RentNumbers(request, timeout=2.5)
        assert (retried.value.code(), reason_of(retried.value)) == (
            grpc.StatusCode.ABORTED,
            "RENT_IN_PROGRESS",
        ), retried.value.details()
        assert "RetryInfo" in rich_details(retried.value)
        waited = await pb_grpc.NumberGroupServiceStub(channel_b).RentNumbers(request, timeout=10)
        placed = await rent
        assert placed.order.status == pb.ORDER_STATUS_FULFILLED
        assert waited.order == placed.order
        assert [r["method"] for r in await control.requests()].count("POST") == 1
