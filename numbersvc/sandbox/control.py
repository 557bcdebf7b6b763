"""``SandboxControl``: an async client for the sandbox's ``/__sandbox/`` control routes.

For tests of other modules: reset the sandbox, queue faults, add latency, seed groups and read
what the client under test sent. It speaks plain HTTP, so it works against an in-process
:class:`~numbersvc.sandbox.server.SandboxServer` and a ``numbersvc sandbox`` process alike.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, cast

import httpx

from numbersvc.sandbox.faults import FaultSpec
from numbersvc.sandbox.journal import RequestRecord

__all__ = ["SandboxControl", "SandboxControlError"]

_DEFAULT_TIMEOUT_SECONDS = 5.0


class SandboxControlError(Exception):
    """A control route refused a request (for example a bad fault spec)."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(f"sandbox control error {status_code}: {message}")
        self.status_code = status_code
        self.message = message


class SandboxControl:
    """Client for one sandbox's control routes.

    Args:
        base_url: The sandbox's base URL (``SandboxServer.base_url``), without ``/__sandbox``.
        timeout_seconds: Per-request timeout.
        transport: An httpx transport to use instead of the network (for tests of this class).
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout_seconds: float = _DEFAULT_TIMEOUT_SECONDS,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._client = httpx.AsyncClient(
            base_url=f"{base_url.rstrip('/')}/__sandbox/",
            timeout=timeout_seconds,
            transport=transport,
        )

    async def _call(self, method: str, route: str, payload: dict[str, Any] | None = None) -> Any:
        response = await self._client.request(method, route, json=payload)
        try:
            data = response.json()
        except ValueError:
            data = {"error": response.text}
        if response.is_error:
            message = data.get("error", response.text) if isinstance(data, dict) else data
            raise SandboxControlError(response.status_code, str(message))
        return data

    async def info(self) -> dict[str, Any]:
        """Return the sandbox's auth id, seed, group count, latency and pending fault count."""
        return cast(dict[str, Any], await self._call("GET", "info"))

    async def reset(self) -> None:
        """Rebuild the inventory from the seed and clear faults, latency and the request log."""
        await self._call("POST", "reset")

    async def inject_fault(self, fault: FaultSpec) -> list[dict[str, Any]]:
        """Queue ``fault`` for the next ``fault.count`` matching API requests.

        Returns:
            Every pending fault, in JSON form with its ``remaining`` count.
        """
        data = await self._call("POST", "faults", fault.to_json())
        return cast(list[dict[str, Any]], data["faults"])

    async def faults(self) -> list[dict[str, Any]]:
        """Return the pending faults, oldest first."""
        return cast(list[dict[str, Any]], (await self._call("GET", "faults"))["faults"])

    async def clear_faults(self) -> int:
        """Drop every pending fault; return how many there were."""
        return int((await self._call("DELETE", "faults"))["cleared"])

    async def set_latency(self, seconds: float) -> None:
        """Add ``seconds`` before every API response until :meth:`reset`."""
        await self._call("POST", "latency", {"seconds": seconds})

    async def seed(
        self,
        country_iso: str,
        *,
        number_type: str = "local",
        count: int = 1,
        prefix: str | None = None,
        region: str | None = None,
        region_code: str | None = None,
        services: str | None = None,
        stock: int | None = None,
    ) -> dict[str, Any]:
        """Append ``count`` deterministic synthetic groups (see ``POST /__sandbox/seed``).

        Returns:
            ``added``, ``first_group_id``, ``last_group_id`` and ``total_groups``.
        """
        payload: dict[str, Any] = {
            "country_iso": country_iso,
            "number_type": number_type,
            "count": count,
        }
        optional = {
            "prefix": prefix,
            "region": region,
            "region_code": region_code,
            "services": services,
            "stock": stock,
        }
        payload.update({key: value for key, value in optional.items() if value is not None})
        return cast(dict[str, Any], await self._call("POST", "seed", payload))

    async def requests(self) -> list[RequestRecord]:
        """Return the API requests the sandbox received, oldest first."""
        return cast(list[RequestRecord], (await self._call("GET", "requests"))["requests"])

    async def clear_requests(self) -> int:
        """Forget the logged requests; return how many there were."""
        return int((await self._call("DELETE", "requests"))["cleared"])

    async def aclose(self) -> None:
        """Close the underlying HTTP client."""
        await self._client.aclose()

    async def __aenter__(self) -> SandboxControl:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()
