"""Identity through a mesh sidecar: `x-forwarded-client-cert` from trusted peers only.

A real server and real gRPC clients on loopback send the header as metadata, as a sidecar
would. The peer is 127.0.0.1 (or ::1), so "trusted" is `127.0.0.0/8` (or `::1/128`) and
"untrusted" is a setting that leaves the client's address out.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path
from typing import Any, Final

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from numbersvc.callers import add_caller
from numbersvc.cli import main
from numbersvc.server import RunningServer
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc
from tests.e2e.conftest import StartServer, reason_of, rich_details
from tests.e2e.test_process import _start
from tests.e2e.test_security import _secure_channel, _spiffe_client_cert

US: Final = pb.SearchFilter(region_code="US")
RENTER: Final = "spiffe://cluster.local/ns/billing/sa/api"
READER: Final = "spiffe://cluster.local/ns/dashboard/sa/web"
SIDECAR: Final = "spiffe://cluster.local/ns/numbers/sa/numbersvc"
HASH: Final = "468ed33be74eee6556d90c0149c1309e9ba61d6425303443c0748a02dd8de688"
TRUSTED: Final = "127.0.0.0/8,::1/128"


def _xfcc(uri: str = RENTER, subject: str = "") -> str:
    """One element as Istio's sidecar writes it (SANITIZE_SET; URI, Subject, DNS)."""
    return f'By={SIDECAR};Hash={HASH};Subject="{subject}";URI={uri}'


def _sent(header: str, *more: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    return (("x-forwarded-client-cert", header), *more)


@pytest.fixture
def callers_file(tmp_path: Path) -> Path:
    """Callers known only by certificate: `renter` and `reader` by SPIFFE ID, `legacy` by CN."""
    path = tmp_path / "callers.json"
    for name, permissions, identity in (
        ("renter", "numbers.read,numbers.rent", ["--spiffe-id", RENTER]),
        ("reader", "numbers.read", ["--spiffe-id", READER]),
        ("legacy", "numbers.read", ["--common-name", 'legacy, "the" one; v=1']),
    ):
        command = ["callers", "add", name, "--permissions", permissions, *identity]
        assert main.run([*command, "--file", str(path)]) == 0
    return path


async def _list(running: RunningServer, metadata: Any, target: str = "") -> Any:
    """ListNumberGroups with this metadata: the page, or the error."""
    async with grpc.aio.insecure_channel(target or f"127.0.0.1:{running.port}") as channel:
        call = pb_grpc.NumberGroupServiceStub(channel).ListNumberGroups(
            pb.ListNumberGroupsRequest(filter=US, page_size=1), metadata=metadata, timeout=10
        )
        try:
            return await call
        except grpc.aio.AioRpcError as error:
            return error


def _refused(answer: Any) -> bool:
    return (
        isinstance(answer, grpc.aio.AioRpcError)
        and answer.code() == grpc.StatusCode.UNAUTHENTICATED
        and reason_of(answer) == "CALLER_UNAUTHENTICATED"
    )


async def _rent(running: RunningServer, metadata: Any, request_id: str = "") -> Any:
    """List a page, then rent from its first group, both with this metadata: order or error."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.NumberGroupServiceStub(channel)
        try:
            page = await stub.ListNumberGroups(
                pb.ListNumberGroupsRequest(filter=US, page_size=1), metadata=metadata, timeout=10
            )
            group_id = page.number_groups[0].group_id
            request = pb.RentNumbersRequest(group_id=group_id, request_id=request_id)
            return (await stub.RentNumbers(request, metadata=metadata, timeout=10)).order
        except grpc.aio.AioRpcError as error:
            return error


def _denied_to(answer: Any) -> str:
    """The caller a PERMISSION_DENIED answer names."""
    assert isinstance(answer, grpc.aio.AioRpcError), answer
    assert answer.code() == grpc.StatusCode.PERMISSION_DENIED, answer
    caller: str = rich_details(answer)["ErrorInfo"].metadata["caller"]
    return caller


async def test_a_caller_is_recognised_by_its_spiffe_id_through_the_sidecar(
    start_server: StartServer, callers_file: Path
) -> None:
    running = await start_server(callers_file=str(callers_file), trust_xfcc_from=TRUSTED)
    request_id = str(uuid.uuid4())
    order = await _rent(running, _sent(_xfcc()), request_id)
    assert isinstance(order, pb.RentalOrder), order
    assert order.caller == "renter"
    entry = await running.ledger.get(request_id)
    assert entry is not None
    assert entry.order.caller == "renter"
    assert _denied_to(await _rent(running, _sent(_xfcc(READER)))) == "reader"


async def test_the_nearest_proxys_element_is_the_last(
    start_server: StartServer, callers_file: Path
) -> None:
    """With APPEND_FORWARD the sidecar appends its element after whatever the caller sent."""
    running = await start_server(callers_file=str(callers_file), trust_xfcc_from=TRUSTED)
    forged_first = _sent(f"{_xfcc(RENTER)},{_xfcc(READER)}")
    assert _denied_to(await _rent(running, forged_first)) == "reader"
    two_uris = f"{_xfcc(READER)};URI={RENTER}"
    assert _refused(await _list(running, _sent(two_uris)))


async def test_quoted_values_as_envoy_writes_them(
    start_server: StartServer, callers_file: Path
) -> None:
    running = await start_server(callers_file=str(callers_file), trust_xfcc_from=TRUSTED)
    # OpenSSL's RFC 2253 subject escapes `,` `"` `;` (not `=`); Envoy quotes it whole, a quote
    # as `\"`. The certificate is URL-encoded and quoted too.
    subject = 'CN=legacy\\, \\"the\\" one\\; v=1,O=Example\\, Inc.'
    cert = "-----BEGIN%20CERTIFICATE-----%0AMIIB%2Cx%3By%3D%3D%0A-----END%20CERTIFICATE-----%0A"
    header = f'By={SIDECAR};Hash={HASH};Cert="{cert}";Subject="{subject}";URI='
    page = await _list(running, _sent(header))
    assert isinstance(page, pb.ListNumberGroupsResponse), page
    # Not `legacy` once the CN differs by one character.
    assert _refused(await _list(running, _sent(header.replace("v=1", "v=2"))))
    # Nor beside a SPIFFE ID the callers file does not know: that workload is someone else.
    other = header.replace(";URI=", ";URI=spiffe://cluster.local/ns/other/sa/x")
    assert _refused(await _list(running, _sent(other)))


@pytest.mark.parametrize("untrusted", ["10.0.0.0/8", "::1/128", ""])
async def test_a_forged_header_from_an_untrusted_peer_names_no_one(
    start_server: StartServer, callers_file: Path, untrusted: str
) -> None:
    token = add_caller(callers_file, "ops", ["numbers.read"]) or ""
    running = await start_server(callers_file=str(callers_file), trust_xfcc_from=untrusted)
    assert _refused(await _list(running, _sent(_xfcc())))
    # Never read at all: not even a malformed one spoils a token.
    bearer = ("authorization", f"Bearer {token}")
    for header in (_xfcc(), 'Subject="unterminated', "x" * 9000):
        page = await _list(running, _sent(header, bearer))
        assert isinstance(page, pb.ListNumberGroupsResponse), (untrusted, page)


async def test_an_ipv6_sidecar(start_server: StartServer, callers_file: Path) -> None:
    """grpc writes an IPv6 peer as `ipv6:%5B::1%5D:port`: still the sidecar's address."""
    running = await start_server(
        callers_file=str(callers_file), trust_xfcc_from="::1/128", listen="[::1]:0"
    )
    page = await _list(running, _sent(_xfcc()), target=f"[::1]:{running.port}")
    assert isinstance(page, pb.ListNumberGroupsResponse), page


async def test_a_malformed_or_oversized_header_from_a_trusted_peer_is_refused_unlogged(
    start_server: StartServer, callers_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = add_caller(callers_file, "ops", ["numbers.read"]) or ""
    running = await start_server(callers_file=str(callers_file), trust_xfcc_from=TRUSTED)
    marker = uuid.uuid4().hex
    fits = f"{_xfcc()};DNS={marker}"
    fits += ";DNS=" + "d" * (8192 - len(fits) - len(";DNS="))
    assert len(fits.encode()) == 8192
    page = await _list(running, _sent(fits))
    assert isinstance(page, pb.ListNumberGroupsResponse), page
    malformed = {
        "over 8 KiB": fits + "d",
        "unterminated": f'{_xfcc()};Subject="CN={marker}',
        "no key": f"{marker}",
        "a bad subject": _xfcc(subject=f"CN={marker}\\q"),
    }
    bearer = ("authorization", f"Bearer {token}")
    for what, header in malformed.items():
        assert _refused(await _list(running, _sent(header))), what
        assert _refused(await _list(running, _sent(header, bearer))), what
    assert _refused(await _list(running, (*_sent(_xfcc()), *_sent(_xfcc()))))  # one per sidecar
    refusals = 2 * len(malformed) + 1
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), metadata=_sent(malformed["no key"])
        )
    assert health.status == health_pb2.HealthCheckResponse.SERVING

    warnings = [r.getMessage() for r in caplog.records if r.name == "numbersvc.security"]
    # Every malformed header is logged, the health check's too, though health lets it in.
    assert sum("malformed x-forwarded-client-cert" in w for w in warnings) == refusals + 1
    assert any("longer than 8192 bytes" in w for w in warnings), warnings
    assert any("sent 2 times" in w for w in warnings), warnings
    text = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert marker not in text
    access = [r.getMessage() for r in caplog.records if r.name == "numbersvc.access"]
    assert sum("code=UNAUTHENTICATED" in line for line in access) == refusals
    scrape = running.metrics.render().decode()
    list_method = "/numbersvc.v1.NumberGroupService/ListNumberGroups"
    counted = f'numbersvc_rpcs_total{{code="UNAUTHENTICATED",method="{list_method}"}}'
    assert f"{counted} {float(refusals)}" in scrape, scrape


async def test_a_bad_network_list_stops_the_server_at_start_up() -> None:
    process = await _start({"NUMBERSVC_TRUST_XFCC_FROM": "127.0.0.1/8"})
    _, err = await asyncio.wait_for(process.communicate(), timeout=20)
    assert process.returncode == 2, err.decode()
    assert b"NUMBERSVC_TRUST_XFCC_FROM: 127.0.0.1/8 has host bits set" in err


async def test_a_trusted_header_stands_for_the_connections_certificate(
    start_server: StartServer, callers_file: Path, tls_files: dict[str, Any]
) -> None:
    """Over mTLS from a trusted peer, the sidecar's certificate is the caller, not the TLS one."""
    running = await start_server(
        tls_cert=str(tls_files["cert"]),
        tls_key=str(tls_files["key"]),
        tls_client_ca=str(tls_files["ca"]),
        callers_file=str(callers_file),
        trust_xfcc_from=TRUSTED,
    )
    reader_cert = _spiffe_client_cert(tls_files["ca_obj"], READER)
    async with _secure_channel(running.port, tls_files["ca"], reader_cert) as channel:
        stub = pb_grpc.NumberGroupServiceStub(channel)
        page = await stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US, page_size=1))
        rent = pb.RentNumbersRequest(group_id=page.number_groups[0].group_id)
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await stub.RentNumbers(rent)  # the connection's certificate: reader
        assert _denied_to(denied.value) == "reader"
        order = (await stub.RentNumbers(rent, metadata=_sent(_xfcc(RENTER)))).order
    assert order.caller == "renter"
