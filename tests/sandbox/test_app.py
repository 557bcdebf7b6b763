"""The sandbox over real loopback HTTP: Plivo's API rules, control routes and the server."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from typing import Any

import httpx
import pytest

import numbersvc.sandbox
from numbersvc.sandbox import (
    DEFAULT_AUTH_ID,
    DEFAULT_AUTH_TOKEN,
    DEFAULT_SEED,
    SandboxControl,
    SandboxControlError,
    SandboxServer,
    run_sandbox,
)

GROUP_FIELDS = {
    "group_id",
    "number_type",
    "prefix",
    "region",
    "rental_rate",
    "setup_rate",
    "voice_rate",
    "sms_rate",
    "sms_enabled",
    "voice_enabled",
    "stock",
    "resource_uri",
}
RATE = re.compile(r"[0-9]+\.[0-9]{5}")


def assert_plivo_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"api_id", "error"}
    uuid.UUID(body["api_id"])
    assert isinstance(body["error"], str)
    assert body["error"]
    return str(body["error"])


async def search(client: httpx.AsyncClient, path: str, **params: Any) -> dict[str, Any]:
    response = await client.get(path, params=params)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


async def first_group(client: httpx.AsyncClient, path: str, country: str) -> dict[str, Any]:
    objects: list[dict[str, Any]] = (await search(client, path, country_iso=country))["objects"]
    return objects[0]


def test_public_names_are_pinned() -> None:
    assert set(numbersvc.sandbox.__all__) == {
        "DEFAULT_AUTH_ID",
        "DEFAULT_AUTH_TOKEN",
        "DEFAULT_SEED",
        "FaultKind",
        "FaultSpec",
        "Inventory",
        "RequestRecord",
        "SandboxControl",
        "SandboxControlError",
        "SandboxServer",
        "SearchQuery",
        "SyntheticSpec",
        "run_sandbox",
    }
    assert len(DEFAULT_AUTH_ID) == 20
    assert DEFAULT_AUTH_ID.startswith("MA")


class TestAuth:
    async def test_good_credentials(self, client: httpx.AsyncClient, groups_path: str) -> None:
        await search(client, groups_path, country_iso="US")

    @pytest.mark.parametrize(
        "auth",
        [(DEFAULT_AUTH_ID, "wrong-token"), ("MAOTHER0000000000000", DEFAULT_AUTH_TOKEN), None],
    )
    async def test_bad_credentials(
        self, sandbox: SandboxServer, groups_path: str, auth: tuple[str, str] | None
    ) -> None:
        async with httpx.AsyncClient(base_url=sandbox.base_url, auth=auth) as client:
            response = await client.get(groups_path, params={"country_iso": "US"})
        assert_plivo_error(response, 401)

    async def test_malformed_header(self, client: httpx.AsyncClient, groups_path: str) -> None:
        headers = {"Authorization": "Basic !!!not-base64"}
        params = {"country_iso": "US"}
        response = await client.get(groups_path, params=params, headers=headers, auth=None)
        assert_plivo_error(response, 401)

    async def test_path_auth_id_must_be_the_user(self, client: httpx.AsyncClient) -> None:
        path = "/v1/Account/MAOTHER0000000000000/AvailableNumberGroup/"
        message = assert_plivo_error(await client.get(path, params={"country_iso": "US"}), 401)
        assert "does not match" in message


class TestSearchParameters:
    @pytest.mark.parametrize(
        ("params", "fragment"),
        [
            ({}, "invalid country ISO"),
            ({"country_iso": "XX"}, "invalid country ISO"),
            ({"country_iso": "USA"}, "invalid country ISO"),
            ({"country_iso": "US", "number_type": "mobile"}, "number_type"),
            ({"country_iso": "US", "prefix": "abc"}, "prefix"),
            ({"country_iso": "US", "prefix": "123456"}, "prefix"),
            ({"country_iso": "US", "prefix": ""}, "prefix"),
            ({"country_iso": "US", "number_type": "tollfree", "region": "NY"}, "region"),
            ({"country_iso": "US", "region": "N"}, "region"),
            ({"country_iso": "US", "services": "mms"}, "services"),
            ({"country_iso": "US", "services": "VOICE"}, "services"),
            ({"country_iso": "US", "services": "voice,"}, "services"),
            ({"country_iso": "US", "limit": "0"}, "limit"),
            ({"country_iso": "US", "limit": "21"}, "limit"),
            ({"country_iso": "US", "limit": "ten"}, "limit"),
            ({"country_iso": "US", "offset": "-1"}, "offset"),
            ({"country_iso": "US", "offset": "1.5"}, "offset"),
        ],
    )
    async def test_refusals(
        self, client: httpx.AsyncClient, groups_path: str, params: dict[str, str], fragment: str
    ) -> None:
        message = assert_plivo_error(await client.get(groups_path, params=params), 400)
        assert fragment in message

    async def test_valid_country_without_inventory(
        self, client: httpx.AsyncClient, groups_path: str
    ) -> None:
        data = await search(client, groups_path, country_iso="JP")
        assert data["objects"] == []
        assert data["meta"] == {
            "previous": None,
            "total_count": 0,
            "offset": 0,
            "limit": 20,
            "next": None,
        }

    async def test_country_case_is_ignored(
        self, client: httpx.AsyncClient, groups_path: str
    ) -> None:
        lower = await search(client, groups_path, country_iso="us")
        upper = await search(client, groups_path, country_iso="US")
        assert lower["objects"] == upper["objects"]

    @pytest.mark.parametrize("number_type", ["local", "national", "tollfree"])
    async def test_number_types(
        self, client: httpx.AsyncClient, groups_path: str, number_type: str
    ) -> None:
        data = await search(client, groups_path, country_iso="GB", number_type=number_type)
        assert data["objects"]
        assert {group["number_type"] for group in data["objects"]} == {number_type}

    async def test_number_type_defaults_to_local(
        self, client: httpx.AsyncClient, groups_path: str
    ) -> None:
        data = await search(client, groups_path, country_iso="US")
        assert {group["number_type"] for group in data["objects"]} == {"local"}

    async def test_prefix(self, client: httpx.AsyncClient, groups_path: str) -> None:
        data = await search(client, groups_path, country_iso="US", prefix="21")
        assert data["meta"]["total_count"] > 0
        assert all(group["prefix"].startswith("21") for group in data["objects"])

    @pytest.mark.parametrize(
        ("region", "expected"),
        [
            ("TX", {"Texas, UNITED STATES"}),
            ("California", {"California, UNITED STATES"}),
            ("ebra", {"Nebraska, UNITED STATES"}),
            ("Kansas", {"Kansas, UNITED STATES"}),
            ("AMIENS", {"AMIENS, FRANCE"}),
        ],
    )
    async def test_region(
        self, client: httpx.AsyncClient, groups_path: str, region: str, expected: set[str]
    ) -> None:
        country = "FR" if region == "AMIENS" else "US"
        data = await search(client, groups_path, country_iso=country, region=region)
        assert data["meta"]["total_count"] > 0
        assert {group["region"] for group in data["objects"]} == expected

    async def test_services_at_least(self, client: httpx.AsyncClient, groups_path: str) -> None:
        voice = await search(client, groups_path, country_iso="US", services="voice", limit=20)
        assert all(group["voice_enabled"] for group in voice["objects"])
        sms = await search(client, groups_path, country_iso="US", services="sms")
        assert all(group["sms_enabled"] for group in sms["objects"])
        both = await search(client, groups_path, country_iso="US", services="voice,sms")
        reverse = await search(client, groups_path, country_iso="US", services="sms,voice")
        assert both["meta"]["total_count"] == reverse["meta"]["total_count"]
        assert all(g["voice_enabled"] and g["sms_enabled"] for g in both["objects"])
        anything = (await search(client, groups_path, country_iso="US"))["meta"]["total_count"]
        assert both["meta"]["total_count"] < voice["meta"]["total_count"] < anything

    async def test_group_object_shape(self, client: httpx.AsyncClient, groups_path: str) -> None:
        data = await search(client, groups_path, country_iso="US", limit=20)
        uuid.UUID(data["api_id"])
        for group in data["objects"]:
            assert set(group) == GROUP_FIELDS
            assert re.fullmatch(r"[0-9]{14}", group["group_id"])
            for rate in ("rental_rate", "setup_rate", "voice_rate"):
                assert RATE.fullmatch(group[rate])
            if group["sms_enabled"]:
                assert RATE.fullmatch(group["sms_rate"])
            else:
                assert group["sms_rate"] == -1
            assert isinstance(group["voice_enabled"], bool)
            assert isinstance(group["stock"], int)
            assert group["resource_uri"] == f"{groups_path}{group['group_id']}/"
        sms_less = await search(client, groups_path, country_iso="DE")
        assert -1 in {group["sms_rate"] for group in sms_less["objects"]}


class TestPaging:
    async def test_meta_links_keep_the_query(
        self, client: httpx.AsyncClient, groups_path: str
    ) -> None:
        response = await client.get(f"{groups_path}?limit=5&country_iso=US&offset=5&prefix=2")
        meta = response.json()["meta"]
        assert meta["offset"] == 5
        assert meta["limit"] == 5
        assert meta["previous"] == f"{groups_path}?limit=5&country_iso=US&offset=0&prefix=2"
        assert meta["next"] == f"{groups_path}?limit=5&country_iso=US&offset=10&prefix=2"

    async def test_first_and_last_pages(self, client: httpx.AsyncClient, groups_path: str) -> None:
        first = await search(client, groups_path, country_iso="US", services="sms", limit=10)
        total = first["meta"]["total_count"]
        assert first["meta"]["previous"] is None
        assert first["meta"]["next"].endswith("&offset=10")  # appended when the caller had none
        last_offset = (total - 1) // 10 * 10
        last = await search(
            client, groups_path, country_iso="US", services="sms", limit=10, offset=last_offset
        )
        assert last["meta"]["next"] is None
        assert last["meta"]["previous"] is not None
        assert len(last["objects"]) == total - last_offset

    async def test_past_the_end(self, client: httpx.AsyncClient, groups_path: str) -> None:
        data = await search(client, groups_path, country_iso="US", offset=100_000)
        assert data["objects"] == []
        assert data["meta"]["next"] is None
        assert data["meta"]["total_count"] > 300

    async def test_following_next_visits_every_group_once(
        self, client: httpx.AsyncClient, groups_path: str
    ) -> None:
        data = await search(client, groups_path, country_iso="CA")
        seen = [group["group_id"] for group in data["objects"]]
        while data["meta"]["next"]:
            data = (await client.get(data["meta"]["next"])).json()
            seen.extend(group["group_id"] for group in data["objects"])
        assert len(seen) == len(set(seen)) == data["meta"]["total_count"]


class TestGetAndRent:
    async def test_get(self, client: httpx.AsyncClient, groups_path: str) -> None:
        group = await first_group(client, groups_path, "US")
        response = await client.get(f"{groups_path}{group['group_id']}/")
        assert response.status_code == 200
        body = response.json()
        uuid.UUID(body.pop("api_id"))
        assert body == group

    async def test_unknown_group(self, client: httpx.AsyncClient, groups_path: str) -> None:
        assert_plivo_error(await client.get(f"{groups_path}99999999999999/"), 404)
        assert_plivo_error(await client.post(f"{groups_path}99999999999999/", json={}), 404)

    async def test_rent_fulfilled(self, client: httpx.AsyncClient, groups_path: str) -> None:
        group = await first_group(client, groups_path, "US")
        url = f"{groups_path}{group['group_id']}/"
        response = await client.post(url, json={"quantity": 2, "app_id": "20372631212782780"})
        assert response.status_code == 201
        body = response.json()
        assert set(body) == {"api_id", "message", "numbers", "status"}
        assert (body["message"], body["status"]) == ("created", "fulfilled")
        assert [n["status"] for n in body["numbers"]] == ["Success", "Success"]
        for number in body["numbers"]:
            assert re.fullmatch(rf"1{group['prefix']}[0-9]{{7}}", number["number"])
        assert (await client.get(url)).json()["stock"] == group["stock"] - 2

    async def test_rent_pending_in_regulated_country(
        self, client: httpx.AsyncClient, groups_path: str
    ) -> None:
        group = await first_group(client, groups_path, "FR")
        url = f"{groups_path}{group['group_id']}/"
        body = (await client.post(url, json={"quantity": 2})).json()
        assert set(body) == {"api_id", "details", "message", "status"}
        assert body["status"] == "pending"
        assert body["details"].startswith(
            f"Order for 2 numbers(Region: {group['region']}, number_type: local, "
            f"Prefix: {group['prefix']}) initiated."
        )
        assert body["details"].endswith("Our support team will get in touch with you soon.")
        assert (await client.get(url)).json()["stock"] == group["stock"] - 2

    @pytest.mark.parametrize(
        ("content", "expected"), [(b"", 1), (b'{"quantity": "3"}', 3), (b'{"app_id": 12}', 1)]
    )
    async def test_rent_body_forms(
        self, client: httpx.AsyncClient, groups_path: str, content: bytes, expected: int
    ) -> None:
        group = await first_group(client, groups_path, "GB")
        headers = {"Content-Type": "application/json"}
        url = f"{groups_path}{group['group_id']}/"
        response = await client.post(url, content=content, headers=headers)
        assert response.status_code == 201, response.text
        assert len(response.json()["numbers"]) == expected

    async def test_quantity_above_stock(self, client: httpx.AsyncClient, groups_path: str) -> None:
        group = await first_group(client, groups_path, "US")
        url = f"{groups_path}{group['group_id']}/"
        response = await client.post(url, json={"quantity": group["stock"] + 1})
        assert f"({group['stock']} left)" in assert_plivo_error(response, 400)
        assert (await client.get(url)).json()["stock"] == group["stock"]

    @pytest.mark.parametrize(
        ("content", "content_type"),
        [
            (b"quantity=2", "application/json"),
            (b"[1, 2]", "application/json"),
            (b'{"quantity": 0}', "application/json"),
            (b'{"quantity": -1}', "application/json"),
            (b'{"quantity": "two"}', "application/json"),
            (b'{"quantity": 1.5}', "application/json"),
            (b'{"quantity": true}', "application/json"),
            (b'{"app_id": "app-1"}', "application/json"),
            (b'{"quantity": 1}', "text/plain"),
        ],
    )
    async def test_bad_rent_bodies(
        self, client: httpx.AsyncClient, groups_path: str, content: bytes, content_type: str
    ) -> None:
        group = await first_group(client, groups_path, "US")
        url = f"{groups_path}{group['group_id']}/"
        response = await client.post(url, content=content, headers={"Content-Type": content_type})
        assert_plivo_error(response, 400)
        assert (await client.get(url)).json()["stock"] == group["stock"]

    @pytest.mark.parametrize(
        ("method", "suffix", "allow"),
        [
            ("POST", "", "GET"),
            ("DELETE", "12345678901234/", "GET, POST"),
            ("PUT", "1/", "GET, POST"),
        ],
    )
    async def test_method_not_allowed(
        self, client: httpx.AsyncClient, groups_path: str, method: str, suffix: str, allow: str
    ) -> None:
        response = await client.request(method, f"{groups_path}{suffix}")
        assert_plivo_error(response, 405)
        assert response.headers["Allow"] == allow

    async def test_missing_trailing_slash_is_404(
        self, client: httpx.AsyncClient, groups_path: str
    ) -> None:
        response = await client.get(groups_path.rstrip("/"), params={"country_iso": "US"})
        assert_plivo_error(response, 404)


async def test_same_seed_same_answers() -> None:
    pages = []
    for _ in range(2):
        async with SandboxServer(port=0, seed=DEFAULT_SEED) as sandbox:
            path = f"/v1/Account/{sandbox.auth_id}/AvailableNumberGroup/"
            auth = (sandbox.auth_id, sandbox.auth_token)
            async with httpx.AsyncClient(base_url=sandbox.base_url, auth=auth) as client:
                pages.append([await search(client, path, country_iso="US") for _ in range(2)])
    assert pages[0] == pages[1]
    assert pages[0][0]["api_id"] != pages[0][1]["api_id"]


class TestControl:
    async def test_reset(
        self, client: httpx.AsyncClient, control: SandboxControl, groups_path: str
    ) -> None:
        group = await first_group(client, groups_path, "US")
        url = f"{groups_path}{group['group_id']}/"
        await client.post(url, json={"quantity": 1})
        await control.set_latency(0.5)
        await control.seed("US", count=5)
        await control.reset()
        info = await control.info()
        assert info["latency_seconds"] == 0
        assert info["logged_requests"] == 0
        assert info["seed"] == DEFAULT_SEED
        assert (await client.get(url)).json()["stock"] == group["stock"]

    async def test_seed_100k_then_page_deep(
        self, client: httpx.AsyncClient, control: SandboxControl, groups_path: str
    ) -> None:
        before = (await search(client, groups_path, country_iso="US"))["meta"]["total_count"]
        # This process's CPU time (the sandbox runs in it), not the wall clock: a guard against a
        # seed or a deep page gone quadratic (about 0.8 s here), not a speed claim, and blind
        # to how many other processes share the cores.
        started = time.process_time()
        result = await control.seed("US", count=100_000)
        assert result["added"] == 100_000
        data = await search(client, groups_path, country_iso="US", offset=100_000, limit=20)
        assert time.process_time() - started < 5.0
        assert data["meta"]["total_count"] == before + 100_000
        assert len(data["objects"]) == 20
        assert data["meta"]["next"] is not None
        filtered = await search(client, groups_path, country_iso="US", region="TX", offset=3000)
        assert filtered["meta"]["total_count"] > 3000

    async def test_seed_with_region(
        self, client: httpx.AsyncClient, control: SandboxControl, groups_path: str
    ) -> None:
        await control.seed("US", count=3, region="Springfield", region_code="SP", prefix="555")
        data = await search(client, groups_path, country_iso="US", region="SP")
        assert [g["region"] for g in data["objects"]] == ["Springfield, UNITED STATES"] * 3

    async def test_request_log(
        self, client: httpx.AsyncClient, control: SandboxControl, groups_path: str
    ) -> None:
        group = await first_group(client, groups_path, "GB")
        await client.post(f"{groups_path}{group['group_id']}/", json={"quantity": 1})
        await client.post(f"{groups_path}{group['group_id']}/", content=b"oops")
        search_log, rent_log, bad_log = await control.requests()
        assert search_log["operation"] == "search"
        assert search_log["query"] == {"country_iso": "GB"}
        assert search_log["method"] == "GET"
        assert search_log["status"] == 200
        assert search_log["fault"] is None
        assert "python-httpx" in search_log["headers"]["User-Agent"]
        assert rent_log["path"] == f"{groups_path}{group['group_id']}/"
        assert (rent_log["operation"], rent_log["body"], rent_log["status"]) == (
            "rent",
            {"quantity": 1},
            201,
        )
        assert (bad_log["body"], bad_log["raw_body"], bad_log["status"]) == (None, "oops", 400)
        assert search_log["time"] <= rent_log["time"] <= time.time()
        assert await control.clear_requests() == 3
        assert await control.requests() == []

    async def test_latency(
        self, client: httpx.AsyncClient, control: SandboxControl, groups_path: str
    ) -> None:
        await control.set_latency(0.15)
        started = time.perf_counter()
        await search(client, groups_path, country_iso="BE")
        assert time.perf_counter() - started >= 0.15

    async def test_control_refusals(self, sandbox: SandboxServer, control: SandboxControl) -> None:
        with pytest.raises(SandboxControlError, match="seconds"):
            await control.set_latency(-1)
        with pytest.raises(SandboxControlError, match=r"no .* offer"):
            await control.seed("JP")
        async with httpx.AsyncClient(base_url=sandbox.control_url) as raw:
            assert (await raw.get("/nothing")).status_code == 404
            assert (await raw.get("/reset")).status_code == 405
            response = await raw.post("/seed", json={"country_iso": "US", "colour": "red"})
            assert response.status_code == 400
            assert "colour" in response.json()["error"]


class TestServer:
    async def test_address_and_logging(self, caplog: pytest.LogCaptureFixture) -> None:
        server = SandboxServer(port=0)
        with pytest.raises(RuntimeError):
            _ = server.base_url
        with caplog.at_level(logging.INFO, logger="numbersvc.sandbox"):
            async with server:
                assert re.fullmatch(r"http://127\.0\.0\.1:[0-9]+", server.base_url)
                assert server.base_url.endswith(f":{server.port}")
                assert server.auth_id == DEFAULT_AUTH_ID
                assert server.auth_token == DEFAULT_AUTH_TOKEN
                assert server.base_url in caplog.text
        await server.stop()  # idempotent
        async with server, httpx.AsyncClient(base_url=server.control_url) as raw:  # restartable
            assert (await raw.get("/info")).json()["auth_id"] == DEFAULT_AUTH_ID

    async def test_run_sandbox_logs_url_and_credentials(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        with caplog.at_level(logging.INFO, logger="numbersvc.sandbox"):
            task = asyncio.create_task(run_sandbox("127.0.0.1", 0, seed=3))
            for _ in range(200):
                if "ready" in caplog.text:
                    break
                await asyncio.sleep(0.01)
            match = re.search(r"base URL (http://127\.0\.0\.1:[0-9]+)", caplog.text)
            assert match is not None
            assert DEFAULT_AUTH_ID in caplog.text
            assert DEFAULT_AUTH_TOKEN in caplog.text
            async with SandboxControl(match.group(1)) as control:
                assert (await control.info())["seed"] == 3
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert "stopped" in caplog.text
