"""TLS, mutual TLS, caller identities and permissions, undecodable requests.

Certificates are made by the tests (trustme, and `cryptography` for a SPIFFE URI SAN).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from numbersvc.callers import CallersFileError, add_caller
from numbersvc.cli import main
from numbersvc.config import Secret
from numbersvc.sandbox import FaultKind, FaultSpec, SandboxControl, SandboxServer
from numbersvc.server import RunningServer
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc
from tests.e2e.conftest import StartServer, eventually, reason_of, rich_details
from tests.e2e.test_process import _start

US = pb.SearchFilter(region_code="US")
SPIFFE_ID = "spiffe://example.org/ns/billing/sa/numbers-client"


@pytest.fixture
def callers_file(tmp_path: Path) -> Path:
    return tmp_path / "callers.json"


def _auth(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


async def _open(running: RunningServer) -> tuple[grpc.aio.Channel, Any]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    return channel, pb_grpc.NumberGroupServiceStub(channel)


async def _error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


class TestCallers:
    async def test_identity_and_permissions(
        self, start_server: StartServer, control: SandboxControl, callers_file: Path
    ) -> None:
        reader = add_caller(callers_file, "dashboard", ["numbers.read"])
        renter = add_caller(callers_file, "billing", ["numbers.read", "numbers.rent"])
        assert reader
        assert renter
        running = await start_server(callers_file=str(callers_file))
        channel, stub = await _open(running)
        async with channel:
            anonymous = await _error(stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US)))
            assert anonymous.code() == grpc.StatusCode.UNAUTHENTICATED
            assert reason_of(anonymous) == "CALLER_UNAUTHENTICATED"
            wrong = await _error(
                stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US), metadata=_auth("nope"))
            )
            assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED
            assert await control.requests() == []

            page = await stub.ListNumberGroups(
                pb.ListNumberGroupsRequest(filter=US, page_size=1), metadata=_auth(reader)
            )
            group_id = page.number_groups[0].group_id
            # Permission is checked before validation: even a bad request gets PERMISSION_DENIED.
            for request in (
                pb.RentNumbersRequest(group_id=group_id),
                pb.RentNumbersRequest(group_id="not digits", quantity=-4),
            ):
                denied = await _error(stub.RentNumbers(request, metadata=_auth(reader)))
                assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
                assert rich_details(denied)["ErrorInfo"].metadata["permission"] == "numbers.rent"
            assert not [r for r in await control.requests() if r["operation"] == "rent"]

            request_id = str(uuid.uuid4())
            order = (
                await stub.RentNumbers(
                    pb.RentNumbersRequest(group_id=group_id, request_id=request_id),
                    metadata=_auth(renter),
                )
            ).order
            assert order.caller == "billing"
            entry = await running.ledger.get(request_id)
            assert entry is not None
            assert entry.order.caller == "billing"

            # The same request id from another caller is not their order.
            other = await _error(
                stub.RentNumbers(
                    pb.RentNumbersRequest(group_id=group_id, request_id=request_id),
                    metadata=_auth(add_caller(callers_file, "other", ["numbers.rent"]) or ""),
                )
            )
            assert other.code() == grpc.StatusCode.UNAUTHENTICATED  # not loaded: file read at start

    async def test_daily_cap_is_per_caller(
        self, start_server: StartServer, callers_file: Path
    ) -> None:
        first = add_caller(callers_file, "first", ["numbers.read", "numbers.rent"]) or ""
        second = add_caller(callers_file, "second", ["numbers.read", "numbers.rent"]) or ""
        running = await start_server(callers_file=str(callers_file), daily_rent_cap=1)
        channel, stub = await _open(running)
        async with channel:
            page = await stub.ListNumberGroups(
                pb.ListNumberGroupsRequest(filter=US, page_size=1), metadata=_auth(first)
            )
            group_id = page.number_groups[0].group_id
            for token in (first, second):
                await stub.RentNumbers(
                    pb.RentNumbersRequest(group_id=group_id, request_id=str(uuid.uuid4())),
                    metadata=_auth(token),
                )
            over = await _error(
                stub.RentNumbers(
                    pb.RentNumbersRequest(group_id=group_id, request_id=str(uuid.uuid4())),
                    metadata=_auth(first),
                )
            )
        assert over.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert rich_details(over)["QuotaFailure"].violations[0].subject == "caller:first"

    async def test_health_is_open_and_reflection_needs_read(
        self, start_server: StartServer, callers_file: Path
    ) -> None:
        reader = add_caller(callers_file, "dashboard", ["numbers.read"]) or ""
        running = await start_server(callers_file=str(callers_file))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = await health.Check(health_pb2.HealthCheckRequest())
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            ask = [reflection_pb2.ServerReflectionRequest(list_services="")]
            # Nothing sent: a request racing the refusal could fail on its own (INTERNAL).
            refused = reflect.ServerReflectionInfo()
            await refused.done_writing()  # so an unguarded server would answer at once: OK
            assert await refused.code() == grpc.StatusCode.UNAUTHENTICATED
            answers = [
                r async for r in reflect.ServerReflectionInfo(iter(ask), metadata=_auth(reader))
            ]
            assert answers[0].list_services_response.service

    async def test_reflection_can_be_off(self, start_server: StartServer) -> None:
        running = await start_server(reflection=False)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            # Nothing sent: a request racing the answer could fail on its own (INTERNAL).
            absent = reflect.ServerReflectionInfo()
            await absent.done_writing()
            assert await absent.code() == grpc.StatusCode.UNIMPLEMENTED

    async def test_tokens_never_logged_and_refusals_name_the_known_caller(
        self, start_server: StartServer, callers_file: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.DEBUG)
        token = add_caller(callers_file, "dashboard", ["numbers.read"]) or ""
        running = await start_server(callers_file=str(callers_file))
        channel, stub = await _open(running)
        async with channel:
            await stub.ListNumberGroups(
                pb.ListNumberGroupsRequest(filter=US), metadata=_auth(token)
            )
            denied = await _error(
                stub.RentNumbers(pb.RentNumbersRequest(group_id="1"), metadata=_auth(token))
            )
            unknown = await _error(
                stub.ListNumberGroups(
                    pb.ListNumberGroupsRequest(filter=US), metadata=_auth(token + "x")
                )
            )
        text = caplog.text + "".join(str(r.args) for r in caplog.records)
        assert "caller=dashboard" in text
        assert token not in text
        assert token not in repr(running.servicer) + repr(running)
        # A refusal names the caller when it is known: PERMISSION_DENIED, not UNAUTHENTICATED.
        assert (denied.code(), unknown.code()) == (
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.UNAUTHENTICATED,
        )

        def access_lines() -> list[str]:
            return [r.getMessage() for r in caplog.records if r.name == "numbersvc.access"]

        async def all_written() -> bool:
            return len(access_lines()) >= 3

        # A refusal's status goes out as it is raised, before the server writes its line.
        await eventually(all_written, timeout_seconds=5)
        access = access_lines()
        codes_and_callers = [
            (line.split(" code=")[1].split()[0], line.split(" caller=")[1].split()[0])
            for line in access
        ]
        assert codes_and_callers == [
            ("OK", "dashboard"),
            ("PERMISSION_DENIED", "dashboard"),
            ("UNAUTHENTICATED", "-"),
        ]


async def test_undecodable_request_is_invalid_argument(server: RunningServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        raw: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/numbersvc.v1.NumberGroupService/ListNumberGroups"
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await raw(b"\xff\xff\xff\xff garbage")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(info.value) == "MALFORMED_REQUEST"


# --- TLS ----------------------------------------------------------------------------------------


def _client_cert(
    ca: trustme.CA, *names: x509.GeneralName, common_name: str | None = None
) -> tuple[bytes, bytes]:
    """A client certificate signed by `ca` with these SANs (of any type) and common name."""
    issuer = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "numbersvc tests")]
    if common_name is not None:
        subject.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _spiffe_client_cert(ca: trustme.CA, uri: str) -> tuple[bytes, bytes]:
    """A client certificate signed by `ca` whose only identity is a SPIFFE URI SAN."""
    return _client_cert(ca, x509.UniformResourceIdentifier(uri))


def _secure_channel(
    port: int, ca: Path, cert: tuple[bytes, bytes] | None = None
) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        certificate_chain=cert[0] if cert else None,
        private_key=cert[1] if cert else None,
    )
    return grpc.aio.secure_channel(
        f"127.0.0.1:{port}", credentials, options=[("grpc.ssl_target_name_override", "localhost")]
    )


async def test_tls(start_server: StartServer, tls_files: dict[str, Any]) -> None:
    running = await start_server(tls_cert=str(tls_files["cert"]), tls_key=str(tls_files["key"]))
    async with _secure_channel(running.port, tls_files["ca"]) as channel:
        page = await pb_grpc.NumberGroupServiceStub(channel).ListNumberGroups(
            pb.ListNumberGroupsRequest(filter=US, page_size=1)
        )
        assert page.number_groups
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as plain:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.NumberGroupServiceStub(plain).ListNumberGroups(
                pb.ListNumberGroupsRequest(filter=US), timeout=2
            )
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_with_a_spiffe_identity(
    start_server: StartServer, tls_files: dict[str, Any], callers_file: Path
) -> None:
    add_caller(callers_file, "mesh-client", ["numbers.read"], spiffe_id=SPIFFE_ID)
    running = await start_server(
        tls_cert=str(tls_files["cert"]),
        tls_key=str(tls_files["key"]),
        tls_client_ca=str(tls_files["ca"]),
        callers_file=str(callers_file),
    )
    ca: trustme.CA = tls_files["ca_obj"]
    known = _spiffe_client_cert(ca, SPIFFE_ID)
    stranger = _spiffe_client_cert(ca, "spiffe://example.org/ns/other/sa/x")
    async with _secure_channel(running.port, tls_files["ca"], known) as channel:
        stub = pb_grpc.NumberGroupServiceStub(channel)
        page = await stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US, page_size=1))
        assert page.number_groups
        denied = await _error(
            stub.RentNumbers(pb.RentNumbersRequest(group_id=page.number_groups[0].group_id))
        )
        assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    async with _secure_channel(running.port, tls_files["ca"], stranger) as channel:
        refused = await _error(
            pb_grpc.NumberGroupServiceStub(channel).ListNumberGroups(
                pb.ListNumberGroupsRequest(filter=US)
            )
        )
        assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
    async with _secure_channel(running.port, tls_files["ca"]) as no_cert:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.NumberGroupServiceStub(no_cert).ListNumberGroups(
                pb.ListNumberGroupsRequest(filter=US), timeout=2
            )
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_plivo_token_from_a_file(
    start_server: StartServer, sandbox: SandboxServer, tmp_path: Path
) -> None:
    token = sandbox.auth_token
    token_file = tmp_path / "plivo-token"
    token_file.write_text(token + "\n")  # as a mounted Secret: a trailing newline is fine
    running = await start_server(plivo_auth_token=Secret(""), plivo_auth_token_file=str(token_file))
    channel, stub = await _open(running)
    async with channel:
        page = await stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US, page_size=1))
    assert page.number_groups
    assert token not in repr(running.upstream)


async def test_cli_reaches_a_secured_server(
    start_server: StartServer,
    tls_files: dict[str, Any],
    callers_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    token = add_caller(callers_file, "ops", ["numbers.read"]) or ""
    running = await start_server(
        tls_cert=str(tls_files["cert"]),
        tls_key=str(tls_files["key"]),
        callers_file=str(callers_file),
    )
    base = ["list", "--country", "GB", "--json", "--target", f"localhost:{running.port}"]
    tls = ["--tls-ca", str(tls_files["ca"])]
    ok = await asyncio.to_thread(main.run, [*base, *tls, "--token", token])
    no_token = await asyncio.to_thread(main.run, [*base, *tls])
    out = capsys.readouterr()
    assert ok == 0
    assert json.loads(out.out)["number_groups"]
    assert no_token == 10 + grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert token not in out.out + out.err


async def _mutual_tls_server(
    start_server: StartServer, tls_files: dict[str, Any], callers_file: Path
) -> RunningServer:
    return await start_server(
        tls_cert=str(tls_files["cert"]),
        tls_key=str(tls_files["key"]),
        tls_client_ca=str(tls_files["ca"]),
        callers_file=str(callers_file),
    )


async def _list_with(running: RunningServer, ca: Path, cert: tuple[bytes, bytes]) -> Any:
    """ListNumberGroups over mutual TLS with `cert`: the page, or the error."""
    async with _secure_channel(running.port, ca, cert) as channel:
        call = pb_grpc.NumberGroupServiceStub(channel).ListNumberGroups(
            pb.ListNumberGroupsRequest(filter=US, page_size=1), timeout=5
        )
        try:
            return await call
        except grpc.aio.AioRpcError as error:
            return error


async def test_a_spiffe_id_comes_only_from_the_one_uri_san(
    start_server: StartServer, tls_files: dict[str, Any], callers_file: Path
) -> None:
    """SPIFFE X.509-SVID: the ID is the URI SAN, and a certificate with two identifies no one."""
    add_caller(callers_file, "mesh-client", ["numbers.read", "numbers.rent"], spiffe_id=SPIFFE_ID)
    add_caller(callers_file, "legacy", ["numbers.read"], common_name="legacy.internal")
    running = await _mutual_tls_server(start_server, tls_files, callers_file)
    ca: trustme.CA = tls_files["ca_obj"]
    uri = x509.UniformResourceIdentifier
    impostors = {
        "a DNS SAN reading the SPIFFE ID": _client_cert(ca, x509.DNSName(SPIFFE_ID)),
        "an e-mail SAN reading the SPIFFE ID": _client_cert(ca, x509.RFC822Name(SPIFFE_ID)),
        "two URI SANs, one the SPIFFE ID": _client_cert(
            ca, uri(SPIFFE_ID), uri("spiffe://example.org/ns/other/sa/x")
        ),
        "two URI SANs and a known common name": _client_cert(
            ca, uri(SPIFFE_ID), uri(SPIFFE_ID + "-2"), common_name="legacy.internal"
        ),
        # An SVID is its SPIFFE ID: another workload's must not borrow a CN identity.
        "an unknown SPIFFE ID and a known common name": _client_cert(
            ca, uri("spiffe://example.org/ns/other/sa/x"), common_name="legacy.internal"
        ),
    }
    for what, cert in impostors.items():
        answer = await _list_with(running, tls_files["ca"], cert)
        assert isinstance(answer, grpc.aio.AioRpcError), what
        assert answer.code() == grpc.StatusCode.UNAUTHENTICATED, what
    # The same names where they belong are accepted.
    genuine = {
        "the one URI SAN": _spiffe_client_cert(ca, SPIFFE_ID),
        "the common name, beside a DNS SAN": _client_cert(
            ca, x509.DNSName("legacy.internal"), common_name="legacy.internal"
        ),
        # Not an SVID (its URI SAN is no SPIFFE ID): its common name is its identity.
        "the common name, beside an https URI SAN": _client_cert(
            ca, uri("https://legacy.internal/"), common_name="legacy.internal"
        ),
    }
    for what, cert in genuine.items():
        page = await _list_with(running, tls_files["ca"], cert)
        assert isinstance(page, pb.ListNumberGroupsResponse), (what, page)
        assert page.number_groups, what


async def test_an_authorization_that_is_not_bearer_never_falls_back_to_the_certificate(
    start_server: StartServer, tls_files: dict[str, Any], callers_file: Path
) -> None:
    add_caller(callers_file, "mesh-client", ["numbers.read"], spiffe_id=SPIFFE_ID)
    running = await _mutual_tls_server(start_server, tls_files, callers_file)
    cert = _spiffe_client_cert(tls_files["ca_obj"], SPIFFE_ID)
    async with _secure_channel(running.port, tls_files["ca"], cert) as channel:
        stub = pb_grpc.NumberGroupServiceStub(channel)
        request = pb.ListNumberGroupsRequest(filter=US, page_size=1)
        assert (await stub.ListNumberGroups(request)).number_groups  # the certificate alone
        for value in ("Basic bWVzaDpzZWNyZXQ=", "Token abc", "Bearer", "bearer  ", ""):
            refused = await _error(
                stub.ListNumberGroups(request, metadata=(("authorization", value),))
            )
            assert refused.code() == grpc.StatusCode.UNAUTHENTICATED, value
            assert reason_of(refused) == "CALLER_UNAUTHENTICATED", value


# --- Access control off, and the callers file at start-up ----------------------------------------


@pytest.mark.parametrize("blank", ["", " "])
async def test_a_blank_callers_file_setting_refuses_to_start(blank: str) -> None:
    """Set but blank is a mistake, not "no access control": the server must not start open."""
    process = await _start({"NUMBERSVC_CALLERS_FILE": blank})
    _, err = await asyncio.wait_for(process.communicate(), timeout=20)
    assert process.returncode == 2, err.decode()
    assert b"NUMBERSVC_CALLERS_FILE is set but blank" in err
    assert b"serving on" not in err


async def test_access_control_off_is_said_loudly_at_start_up(
    start_server: StartServer, callers_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    await start_server()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("ACCESS CONTROL IS OFF" in r.getMessage() for r in warnings), caplog.text
    caplog.clear()
    add_caller(callers_file, "dashboard", ["numbers.read"])
    await start_server(callers_file=str(callers_file))
    assert "ACCESS CONTROL IS OFF" not in caplog.text
    assert "callers file" in caplog.text


async def test_a_callers_file_others_can_write_is_refused_at_start_up(
    start_server: StartServer, callers_file: Path
) -> None:
    add_caller(callers_file, "dashboard", ["numbers.read"])
    os.chmod(callers_file, 0o664)
    with pytest.raises(CallersFileError, match=f"callers file {callers_file} .*chmod 600"):
        await start_server(callers_file=str(callers_file))
    os.chmod(callers_file, 0o600)
    assert (await start_server(callers_file=str(callers_file))).port


# --- Health stays open, and cannot starve the API ------------------------------------------------


async def test_open_health_watches_cannot_starve_authenticated_calls(
    start_server: StartServer, control: SandboxControl, callers_file: Path
) -> None:
    """More Watch streams than the RPC cap: the API still serves its whole cap at once."""
    cap, watches = 3, 2
    reader = add_caller(callers_file, "dashboard", ["numbers.read"]) or ""
    running = await start_server(
        callers_file=str(callers_file), max_concurrent_rpcs=cap, max_health_watches=watches
    )
    target = f"127.0.0.1:{running.port}"
    async with (
        grpc.aio.insecure_channel(target) as probes,
        grpc.aio.insecure_channel(target) as api,
    ):
        health = health_pb2_grpc.HealthStub(probes)
        streams, answers, reasons = [], [], set()
        for _ in range(cap + 1):  # one at a time: which ones get in is then certain
            stream = health.Watch(health_pb2.HealthCheckRequest())
            streams.append(stream)
            try:
                answers.append((await stream.read()).status)
            except grpc.aio.AioRpcError as error:
                answers.append(error.code())
                reasons.add(reason_of(error))  # a row of the error table, like every refusal
        serving = health_pb2.HealthCheckResponse.SERVING
        assert answers == [serving] * watches + [grpc.StatusCode.RESOURCE_EXHAUSTED] * (
            cap + 1 - watches
        )
        assert reasons == {"HEALTH_WATCHES_EXHAUSTED"}
        # The API's whole cap at once, each call held upstream so that they overlap.
        await control.inject_fault(FaultSpec(FaultKind.DELAY, seconds=0.3, count=cap))
        stub = pb_grpc.NumberGroupServiceStub(api)
        pages = await asyncio.gather(
            *(
                stub.ListNumberGroups(
                    pb.ListNumberGroupsRequest(filter=US, page_size=1), metadata=_auth(reader)
                )
                for _ in range(cap)
            )
        )
        assert all(page.number_groups for page in pages)
        # A probe's Check is never refused for the watches, and the open ones still serve.
        status = await health.Check(health_pb2.HealthCheckRequest())
        assert status.status == serving
        for stream in streams[:watches]:
            stream.cancel()
