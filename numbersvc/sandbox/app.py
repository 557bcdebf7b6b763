"""The sandbox's HTTP layer: routing, Basic auth, parameters, JSON, control routes, faults.

Speaks Plivo's v1 ``AvailableNumberGroup`` API (see /work/shared/plivo-api.md) over the
stateful :class:`~numbersvc.sandbox.inventory.Inventory`; every Plivo parameter rule is in
:mod:`~numbersvc.sandbox.params` and every byte-level fault in
:mod:`~numbersvc.sandbox.delivery`. Order of checks for an API request, as Django/tastypie
(which Plivo's ``meta`` block comes from) does it: route (404) -> method (405) -> auth (401) ->
parameters (400) -> model (404, 400). Control routes (``/__sandbox/...``) take no auth and are
never faulted or logged. The package docstring lists the routes and the sandbox's limitations.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, NamedTuple

from aiohttp import BasicAuth, web

from numbersvc.sandbox.delivery import Reply, deliver_fault, pause
from numbersvc.sandbox.faults import FaultQueue, FaultSpec
from numbersvc.sandbox.inventory import (
    Group,
    GroupNotFoundError,
    InsufficientStockError,
    Inventory,
    Rental,
)
from numbersvc.sandbox.journal import RequestLog
from numbersvc.sandbox.params import (
    ParamError,
    page_links,
    parse_json_object,
    parse_rent_body,
    parse_search_params,
    parse_seed_body,
)

__all__ = ["CONTROL_PREFIX", "STATE", "SandboxState", "create_app", "group_json"]

#: Every control route lives under this prefix.
CONTROL_PREFIX = "/__sandbox"
_GROUPS_PATH = "/v1/Account/{auth_id}/AvailableNumberGroup/"
_CENT_THOUSANDTHS = Decimal("0.00001")  # Plivo prints rates with 5 decimal places
_MAX_LATENCY_SECONDS = 60.0


@dataclass(slots=True)
class SandboxState:
    """Everything the routes share: the model, credentials, and the control-route state."""

    inventory: Inventory
    auth_id: str
    auth_token: str
    faults: FaultQueue = field(default_factory=FaultQueue)
    log: RequestLog = field(default_factory=RequestLog)
    latency_seconds: float = 0.0
    # Set on shutdown so hanging, slow or delayed requests let go of their connections at once.
    closing: asyncio.Event = field(default_factory=asyncio.Event)

    def reset(self) -> None:
        """Back to the seed: inventory rebuilt; faults, latency and request log cleared."""
        self.inventory.reset()
        self.faults.clear()
        self.log.clear()
        self.latency_seconds = 0.0


STATE = web.AppKey("sandbox_state", SandboxState)


def _money(value: Decimal) -> str:
    return str(value.quantize(_CENT_THOUSANDTHS))


def _groups_path(auth_id: str) -> str:
    return _GROUPS_PATH.format(auth_id=auth_id)


def group_json(group: Group, auth_id: str) -> dict[str, Any]:
    """Return Plivo's 12-field group object (rates as 5-place strings, ``sms_rate`` -1 if none)."""
    rates = group.offer.rates
    return {
        "group_id": group.group_id,
        "number_type": group.number_type,
        "prefix": group.prefix,
        "region": group.region.display,
        "rental_rate": _money(rates.rental),
        "setup_rate": _money(rates.setup),
        "voice_rate": _money(rates.voice),
        "sms_rate": _money(rates.sms) if group.sms_enabled else -1,
        "sms_enabled": group.sms_enabled,
        "voice_enabled": group.voice_enabled,
        "stock": group.stock,
        "resource_uri": f"{_groups_path(auth_id)}{group.group_id}/",
    }


def _rental_json(rental: Rental, api_id: str) -> dict[str, Any]:
    if not rental.pending:
        numbers = [{"number": number, "status": "Success"} for number in rental.numbers]
        return {"api_id": api_id, "message": "created", "numbers": numbers, "status": "fulfilled"}
    group = rental.group
    details = (
        f"Order for {rental.quantity} numbers(Region: {group.region.display}, "
        f"number_type: {group.number_type}, Prefix: {group.prefix}) initiated. Numbers will be "
        "assigned once the address and identity documents are verified. Our support team "
        "will get in touch with you soon."
    )
    return {"api_id": api_id, "details": details, "message": "created", "status": "pending"}


# --- API operations: each turns a checked request into a reply --------------------------------

Handler = Callable[[SandboxState, web.Request, bytes], Reply]


class _Endpoint(NamedTuple):
    operation: str
    handler: Handler


def _search(state: SandboxState, request: web.Request, body: bytes) -> Reply:
    params = parse_search_params(request.query)
    page = state.inventory.search(params.query, offset=params.offset, limit=params.limit)
    path = _groups_path(request.match_info["auth_id"])
    previous, following = page_links(
        path,
        request.rel_url.raw_query_string,
        offset=params.offset,
        limit=params.limit,
        total=page.total_count,
    )
    meta = {
        "previous": previous,
        "total_count": page.total_count,
        "offset": params.offset,
        "limit": params.limit,
        "next": following,
    }
    objects = [group_json(group, state.auth_id) for group in page.groups]
    return Reply(200, {"api_id": state.inventory.new_api_id(), "meta": meta, "objects": objects})


def _get(state: SandboxState, request: web.Request, body: bytes) -> Reply:
    group = state.inventory.get(request.match_info["group_id"])
    return Reply(200, {"api_id": state.inventory.new_api_id(), **group_json(group, state.auth_id)})


def _rent(state: SandboxState, request: web.Request, body: bytes) -> Reply:
    group_id = request.match_info["group_id"]
    state.inventory.get(group_id)  # an unknown group is a 404 even when the body is also bad
    params = parse_rent_body(body, request.content_type)
    # NOTE: `app_id` is validated and logged but not modelled: there are no applications here.
    rental = state.inventory.rent(group_id, params.quantity)
    return Reply(201, _rental_json(rental, state.inventory.new_api_id()))


def _authenticate(state: SandboxState, request: web.Request) -> str | None:
    """Return why Basic auth fails, or ``None`` if the credentials and the path agree."""
    header = request.headers.get("Authorization")
    if header is None:
        return "Authentication credentials were not provided"
    try:
        credentials = BasicAuth.decode(header)
    except ValueError:
        return "Authentication failed: malformed Authorization header"
    login_ok = hmac.compare_digest(credentials.login.encode(), state.auth_id.encode())
    token_ok = hmac.compare_digest(credentials.password.encode(), state.auth_token.encode())
    if not (login_ok and token_ok):
        return "Authentication failed: invalid auth id or auth token"
    if request.match_info.get("auth_id") != credentials.login:
        return "Authentication failed: the auth id in the URL does not match the credentials"
    return None


def _process(
    state: SandboxState, request: web.Request, body: bytes, endpoints: Mapping[str, _Endpoint]
) -> Reply:
    """Run the checks and the operation; map every refusal to Plivo's error shape."""
    new_api_id = state.inventory.new_api_id
    if not endpoints:
        return Reply.error(404, f"no such resource: {request.path}", new_api_id())
    endpoint = endpoints.get(request.method)
    if endpoint is None:
        allow = {"Allow": ", ".join(endpoints)}
        return Reply.error(405, f"method {request.method} not allowed", new_api_id(), allow)
    failure = _authenticate(state, request)
    if failure is not None:
        return Reply.error(401, failure, new_api_id())
    try:
        return endpoint.handler(state, request, body)
    except GroupNotFoundError as exc:
        return Reply.error(404, str(exc), new_api_id())
    except (ParamError, InsufficientStockError) as exc:
        # NOTE: quantity > stock is [U] upstream; the sandbox's choice is a 400 naming the stock.
        return Reply.error(400, str(exc), new_api_id())


def _api_route(
    endpoints: Mapping[str, _Endpoint],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Build the aiohttp handler for one API path (empty ``endpoints``: an unknown path)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE]
        body = await request.read()
        endpoint = endpoints.get(request.method)
        operation = None if endpoint is None else endpoint.operation
        fault = state.faults.take(request.method, operation)
        record = state.log.record(
            method=request.method,
            path=request.path,
            query=request.query,
            headers=request.headers,
            body=body,
            operation=operation,
            fault=None if fault is None else fault.kind.value,
        )
        if state.latency_seconds and not await pause(state.latency_seconds, state.closing):
            raise web.HTTPServiceUnavailable(text="sandbox is stopping")

        def process() -> Reply:
            return _process(state, request, body, endpoints)

        if fault is None:
            response: web.StreamResponse = process().response()
        else:
            response = await deliver_fault(
                request,
                fault,
                operation=operation,
                process=process,
                new_api_id=state.inventory.new_api_id,
                closing=state.closing,
            )
        record["status"] = response.status if fault is None or fault.kind.responds else None
        return response

    return handle


# --- Control routes: no auth, JSON in and out --------------------------------------------------

ControlHandler = Callable[[SandboxState, dict[str, Any]], tuple[int, Any]]


def _reset(state: SandboxState, data: dict[str, Any]) -> tuple[int, Any]:
    state.reset()
    return 200, {"seed": state.inventory.seed, "groups": len(state.inventory)}


def _info(state: SandboxState, data: dict[str, Any]) -> tuple[int, Any]:
    return 200, {
        "auth_id": state.auth_id,
        "seed": state.inventory.seed,
        "groups": len(state.inventory),
        "latency_seconds": state.latency_seconds,
        "pending_faults": len(state.faults),
        "logged_requests": len(state.log),
    }


def _add_fault(state: SandboxState, data: dict[str, Any]) -> tuple[int, Any]:
    state.faults.add(FaultSpec.from_json(data))
    return 201, {"faults": state.faults.snapshot()}


def _set_latency(state: SandboxState, data: dict[str, Any]) -> tuple[int, Any]:
    seconds = data.get("seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise ParamError("seconds must be a number")
    if not 0 <= seconds <= _MAX_LATENCY_SECONDS:
        raise ParamError(f"seconds must be between 0 and {_MAX_LATENCY_SECONDS}")
    state.latency_seconds = float(seconds)
    return 200, {"seconds": state.latency_seconds}


def _seed(state: SandboxState, data: dict[str, Any]) -> tuple[int, Any]:
    result = state.inventory.seed_synthetic(parse_seed_body(data))
    return 201, {
        "added": result.added,
        "first_group_id": result.first_group_id,
        "last_group_id": result.last_group_id,
        "total_groups": result.total_groups,
    }


_CONTROL: dict[str, dict[str, ControlHandler]] = {
    "info": {"GET": _info},
    "reset": {"POST": _reset},
    "faults": {
        "GET": lambda state, data: (200, {"faults": state.faults.snapshot()}),
        "POST": _add_fault,
        "DELETE": lambda state, data: (200, {"cleared": state.faults.clear()}),
    },
    "latency": {
        "GET": lambda state, data: (200, {"seconds": state.latency_seconds}),
        "POST": _set_latency,
    },
    "seed": {"POST": _seed},
    "requests": {
        "GET": lambda state, data: (200, {"requests": state.log.records()}),
        "DELETE": lambda state, data: (200, {"cleared": state.log.clear()}),
    },
}


async def _control(request: web.Request) -> web.Response:
    state = request.app[STATE]
    handlers = _CONTROL.get(request.match_info["name"])
    if handlers is None:
        return web.json_response({"error": f"no control route {request.path}"}, status=404)
    handler = handlers.get(request.method)
    if handler is None:
        error = {"error": f"method {request.method} not allowed"}
        return web.json_response(error, status=405, headers={"Allow": ", ".join(handlers)})
    try:
        status, payload = handler(state, parse_json_object(await request.read()))
    except ValueError as exc:  # ParamError, SeedError and FaultSpec validation alike
        return web.json_response({"error": str(exc)}, status=400)
    return web.json_response(payload, status=status)


async def _on_shutdown(app: web.Application) -> None:
    app[STATE].closing.set()


def create_app(inventory: Inventory, *, auth_id: str, auth_token: str) -> web.Application:
    """Build the sandbox's aiohttp application over ``inventory``.

    Args:
        inventory: The model the API serves; control routes reset and seed it.
        auth_id: The one account's Auth ID (Basic auth user, and the path's ``{auth_id}``).
        auth_token: Its Auth Token (Basic auth password).

    Returns:
        An application whose :data:`STATE` holds the shared :class:`SandboxState`.
    """
    app = web.Application()
    app[STATE] = SandboxState(inventory=inventory, auth_id=auth_id, auth_token=auth_token)
    app.on_shutdown.append(_on_shutdown)
    router = app.router
    router.add_route("*", f"{CONTROL_PREFIX}/{{name:.*}}", _control)
    router.add_route(
        "*", _groups_path("{auth_id}"), _api_route({"GET": _Endpoint("search", _search)})
    )
    group_route = _api_route({"GET": _Endpoint("get", _get), "POST": _Endpoint("rent", _rent)})
    router.add_route("*", f"{_groups_path('{auth_id}')}{{group_id}}/", group_route)
    # Anything else is an API request for a resource that does not exist: a Plivo-shaped 404.
    router.add_route("*", "/{tail:.*}", _api_route({}))
    return app
