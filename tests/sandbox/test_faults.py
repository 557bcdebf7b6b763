"""Fault specs, the fault queue, and every fault kind as an httpx client sees it."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

from numbersvc.sandbox import FaultKind, FaultSpec, SandboxControl, SandboxServer
from numbersvc.sandbox.control import SandboxControlError
from numbersvc.sandbox.delivery import DELIVERIES
from numbersvc.sandbox.faults import FaultQueue
from tests.e2e.conftest import eventually


class TestFaultSpec:
    def test_every_kind_has_a_delivery(self) -> None:
        assert set(DELIVERIES) == set(FaultKind)

    def test_kinds_that_process_the_request(self) -> None:
        processing = {kind for kind in FaultKind if kind.processes_request}
        assert processing == {
            FaultKind.RESET_AFTER_HEADERS,
            FaultKind.SLOW_BODY,
            FaultKind.DELAY,
        }
        assert {kind for kind in FaultKind if not kind.responds} == {
            FaultKind.RESET,
            FaultKind.HANG,
        }

    def test_json_round_trip_leaves_out_defaults(self) -> None:
        spec = FaultSpec(FaultKind.STATUS, status=429, retry_after="2", method="get")
        assert spec.method == "GET"
        assert spec.to_json() == {
            "kind": "status",
            "status": 429,
            "retry_after": "2",
            "method": "GET",
        }
        assert FaultSpec.from_json(spec.to_json()) == spec

    def test_numeric_retry_after_becomes_text(self) -> None:
        spec = FaultSpec.from_json({"kind": "status", "retry_after": 3})
        assert spec.retry_after == "3"

    @pytest.mark.parametrize(
        ("data", "fragment"),
        [
            ({}, "kind is required"),
            ({"kind": "explode"}, "invalid kind"),
            ({"kind": "status", "colour": "red"}, "unknown fault fields"),
            ({"kind": "status", "count": 0}, "count"),
            ({"kind": "status", "count": True}, "count"),
            ({"kind": "status", "status": 99}, "status"),
            ({"kind": "status", "operation": "delete"}, "operation"),
            ({"kind": "status", "method": "G E T"}, "method"),
            ({"kind": "status", "headers": {"X-A": 1}}, "headers"),
            ({"kind": "delay", "seconds": -1}, "seconds"),
            ({"kind": "delay", "seconds": "1"}, "seconds"),
            ({"kind": "slow_body", "chunks": 0}, "chunks"),
        ],
    )
    def test_refusals(self, data: dict[str, Any], fragment: str) -> None:
        with pytest.raises(ValueError, match=fragment):
            FaultSpec.from_json(data)


class TestFaultQueue:
    def test_fifo_counts_and_matching(self) -> None:
        queue = FaultQueue()
        queue.add(FaultSpec(FaultKind.STATUS, count=2, operation="rent"))
        queue.add(FaultSpec(FaultKind.HTML, method="GET"))
        assert queue.take("GET", "search") == FaultSpec(FaultKind.HTML, method="GET")
        assert queue.take("GET", "get") is None
        assert queue.snapshot() == [
            {"kind": "status", "count": 2, "operation": "rent", "remaining": 2}
        ]
        assert queue.take("POST", "rent") is not None
        assert queue.take("POST", "rent") is not None
        assert queue.take("POST", "rent") is None
        assert len(queue) == 0

    def test_clear(self) -> None:
        queue = FaultQueue()
        queue.add(FaultSpec(FaultKind.RESET))
        queue.add(FaultSpec(FaultKind.HANG))
        assert queue.clear() == 2
        assert queue.take("GET", None) is None


# --- Each kind over loopback HTTP --------------------------------------------------------------


async def group_url(client: httpx.AsyncClient, path: str, country: str = "US") -> str:
    data = (await client.get(path, params={"country_iso": country})).json()
    return f"{path}{data['objects'][0]['group_id']}/"


async def stock(client: httpx.AsyncClient, url: str) -> int:
    return int((await client.get(url)).json()["stock"])


async def test_status_with_retry_after(
    client: httpx.AsyncClient, control: SandboxControl, groups_path: str
) -> None:
    await control.inject_fault(
        FaultSpec(
            FaultKind.STATUS, status=429, retry_after="2", headers={"X-RateLimit-Limit": "300"}
        )
    )
    response = await client.get(groups_path, params={"country_iso": "US"})
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "2"
    assert response.headers["X-RateLimit-Limit"] == "300"
    body = response.json()
    assert set(body) == {"api_id", "error"}
    assert body["error"] == "Too Many Requests"
    # Consumed: the next request is answered normally.
    assert (await client.get(groups_path, params={"country_iso": "US"})).status_code == 200


async def test_status_with_custom_body(
    client: httpx.AsyncClient, control: SandboxControl, groups_path: str
) -> None:
    nested = {"error": {"error": "nested message"}}
    await control.inject_fault(FaultSpec(FaultKind.STATUS, status=503, body=nested))
    response = await client.get(groups_path, params={"country_iso": "US"})
    assert (response.status_code, response.json()) == (503, nested)


async def test_html(client: httpx.AsyncClient, control: SandboxControl, groups_path: str) -> None:
    await control.inject_fault(FaultSpec(FaultKind.HTML))
    response = await client.get(groups_path, params={"country_iso": "US"})
    assert response.status_code == 502
    assert response.headers["Content-Type"].startswith("text/html")
    assert "<h1>502 Bad Gateway</h1>" in response.text


async def test_malformed(
    client: httpx.AsyncClient, control: SandboxControl, groups_path: str
) -> None:
    url = await group_url(client, groups_path)
    before = await stock(client, url)
    await control.inject_fault(FaultSpec(FaultKind.MALFORMED, operation="rent"))
    response = await client.post(url, json={"quantity": 1})
    assert response.status_code == 201
    assert response.headers["Content-Type"].startswith("application/json")
    with pytest.raises(json.JSONDecodeError):
        response.json()
    assert await stock(client, url) == before  # failed before the model


async def test_truncated(
    client: httpx.AsyncClient, control: SandboxControl, groups_path: str
) -> None:
    await control.inject_fault(FaultSpec(FaultKind.TRUNCATED))
    response = await client.get(groups_path, params={"country_iso": "US"})
    assert response.status_code == 200
    assert int(response.headers["Content-Length"]) == len(response.content)
    assert response.content.startswith(b'{"api_id": ')
    with pytest.raises(json.JSONDecodeError):
        response.json()


@pytest.mark.parametrize("custom", [None, {"objects": "nope"}])
async def test_wrong_shape(
    client: httpx.AsyncClient,
    control: SandboxControl,
    groups_path: str,
    custom: dict[str, Any] | None,
) -> None:
    await control.inject_fault(FaultSpec(FaultKind.WRONG_SHAPE, body=custom))
    response = await client.get(groups_path, params={"country_iso": "US"})
    assert response.status_code == 200
    body = response.json()
    assert not isinstance(body["objects"], list)
    if custom is not None:
        assert body == custom


async def test_reset_before_the_model(
    client: httpx.AsyncClient, control: SandboxControl, groups_path: str
) -> None:
    url = await group_url(client, groups_path)
    before = await stock(client, url)
    await control.inject_fault(FaultSpec(FaultKind.RESET, method="POST"))
    with pytest.raises(httpx.TransportError):
        await client.post(url, json={"quantity": 1})
    assert await stock(client, url) == before
    (*_, rent, _) = await control.requests()
    assert (rent["operation"], rent["fault"], rent["status"]) == ("rent", "reset", None)


async def test_reset_after_headers_mid_body(
    client: httpx.AsyncClient, control: SandboxControl, groups_path: str
) -> None:
    url = await group_url(client, groups_path)
    before = await stock(client, url)
    await control.inject_fault(FaultSpec(FaultKind.RESET_AFTER_HEADERS, operation="rent"))
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        await client.post(url, json={"quantity": 2})
    assert await stock(client, url) == before - 2  # processed: the response was lost, not the rent


async def test_hang_until_client_timeout_then_prompt_stop() -> None:
    server = SandboxServer(port=0)
    await server.start()
    groups_path = f"/v1/Account/{server.auth_id}/AvailableNumberGroup/"
    try:
        async with SandboxControl(server.base_url) as control:
            await control.inject_fault(FaultSpec(FaultKind.HANG))
        auth = (server.auth_id, server.auth_token)
        async with httpx.AsyncClient(base_url=server.base_url, auth=auth, timeout=0.3) as client:
            started = time.perf_counter()
            with pytest.raises(httpx.ReadTimeout):
                await client.get(groups_path, params={"country_iso": "US"})
            assert time.perf_counter() - started < 2.0
            # A second hang, held while the server stops: stop must not wait for it.
            async with SandboxControl(server.base_url) as control:
                await control.inject_fault(FaultSpec(FaultKind.HANG))
                held = asyncio.create_task(
                    client.get(groups_path, params={"country_iso": "US"}, timeout=10.0)
                )

                async def both_hangs_arrived() -> bool:
                    return sum(r["fault"] == "hang" for r in await control.requests()) == 2

                await eventually(both_hangs_arrived, what="the server holds the second hang")
            started = time.perf_counter()
            await server.stop()
            assert time.perf_counter() - started < 1.0
            with pytest.raises(httpx.TransportError):
                await held
    finally:
        await server.stop()


async def test_slow_body(
    client: httpx.AsyncClient, control: SandboxControl, groups_path: str
) -> None:
    await control.inject_fault(FaultSpec(FaultKind.SLOW_BODY, chunks=5, chunk_delay_seconds=0.04))
    started = time.perf_counter()
    response = await client.get(groups_path, params={"country_iso": "BE"})
    assert time.perf_counter() - started >= 5 * 0.04
    assert response.json()["meta"]["total_count"] > 0


async def test_delay_then_normal_answer(
    client: httpx.AsyncClient, control: SandboxControl, groups_path: str
) -> None:
    url = await group_url(client, groups_path, "GB")
    before = await stock(client, url)
    await control.inject_fault(FaultSpec(FaultKind.DELAY, seconds=0.2))
    started = time.perf_counter()
    response = await client.post(url, json={"quantity": 1})
    assert time.perf_counter() - started >= 0.2
    assert response.status_code == 201
    assert await stock(client, url) == before - 1


async def test_delay_outlasting_the_client_still_rents(
    client: httpx.AsyncClient, control: SandboxControl, groups_path: str
) -> None:
    url = await group_url(client, groups_path, "GB")
    before = await stock(client, url)
    await control.inject_fault(FaultSpec(FaultKind.DELAY, seconds=0.3, operation="rent"))
    with pytest.raises(httpx.ReadTimeout):
        await client.post(url, json={"quantity": 1}, timeout=0.1)
    await asyncio.sleep(0.3)
    assert await stock(client, url) == before - 1  # the ambiguous-rent case


async def test_match_on_operation_and_count(
    client: httpx.AsyncClient, control: SandboxControl, groups_path: str
) -> None:
    url = await group_url(client, groups_path)
    pending = await control.inject_fault(
        FaultSpec(FaultKind.STATUS, status=500, count=2, operation="get")
    )
    assert pending == [
        {"kind": "status", "status": 500, "count": 2, "operation": "get", "remaining": 2}
    ]
    assert (await client.get(groups_path, params={"country_iso": "US"})).status_code == 200
    assert [(await client.get(url)).status_code for _ in range(3)] == [500, 500, 200]
    assert await control.faults() == []


async def test_clear_faults(
    client: httpx.AsyncClient, control: SandboxControl, groups_path: str
) -> None:
    await control.inject_fault(FaultSpec(FaultKind.HTML, count=5))
    assert await control.clear_faults() == 1
    assert (await client.get(groups_path, params={"country_iso": "US"})).status_code == 200


async def test_bad_spec_is_refused_by_the_server(sandbox: SandboxServer) -> None:
    async with httpx.AsyncClient(base_url=sandbox.control_url) as raw:
        response = await raw.post("/faults", json={"kind": "explode"})
    assert response.status_code == 400
    assert "invalid kind" in response.json()["error"]
    async with SandboxControl(sandbox.base_url) as control:
        with pytest.raises(SandboxControlError) as caught:
            await control.set_latency(61)
    assert caught.value.status_code == 400
