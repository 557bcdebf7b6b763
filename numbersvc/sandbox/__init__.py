"""An embedded Plivo-compatible sandbox for the v1 ``AvailableNumberGroup`` API.

A real HTTP server (aiohttp) speaking plivo-api.md's three operations, over a deterministic
inventory, with control routes to reset, seed and inject faults. It knows nothing of gRPC or of
the rest of numbersvc.

Usage::

    async with SandboxServer(port=0) as sandbox, SandboxControl(sandbox.base_url) as control:
        await control.inject_fault(FaultSpec(FaultKind.STATUS, status=429, retry_after="1"))
        ...  # point the client under test at sandbox.base_url with
             # (sandbox.auth_id, sandbox.auth_token)

API (HTTP Basic auth as ``DEFAULT_AUTH_ID`` / ``DEFAULT_AUTH_TOKEN``; trailing slash required):
    ``GET  /v1/Account/{auth_id}/AvailableNumberGroup/?country_iso=..``  search, 200
    ``GET  /v1/Account/{auth_id}/AvailableNumberGroup/{group_id}/``       get one, 200
    ``POST /v1/Account/{auth_id}/AvailableNumberGroup/{group_id}/``       rent, 201

Control routes (no auth, JSON; never faulted, never logged):
    ``GET /__sandbox/info``; ``POST /__sandbox/reset`` (inventory back to the seed; faults,
    latency and request log cleared); ``GET|POST|DELETE /__sandbox/faults`` (see
    :mod:`~numbersvc.sandbox.faults` for the JSON); ``GET|POST /__sandbox/latency``
    ``{"seconds": 0.025}``; ``POST /__sandbox/seed`` ``{"country_iso": "US", "number_type":
    "local", "count": 100000, "prefix"?, "region"?, "region_code"?, "services"?, "stock"?}``;
    ``GET|DELETE /__sandbox/requests``.

Faults that change stock when they hit a rent: ``reset_after_headers``, ``slow_body`` and
``delay`` (the upstream processed the request, the response was lost or late). Every other
kind fails before the model is touched.

Choices for the facts plivo-api.md marks [U] (each in one place, named in brackets):
    - ``quantity`` above ``stock``: 400 naming the stock left, nothing rented; no partial
      fulfilment; every fulfilled number has status ``"Success"`` [app._process].
    - ``region``: an exact name match wins over "contains" (``Kansas`` is not Arkansas)
      [inventory.match_regions].
    - ``limit`` outside 1..20: 400 [params.parse_search_params].
    - ``services=mms`` (or any value but voice/sms): 400 [params.parse_services].
    - No ``Retry-After``/``X-RateLimit-*`` headers unless a ``status`` fault adds them.
Other choices: ``country_iso`` is case-insensitive and a valid ISO code without inventory
gives an empty 200; a group sold out stays listed with ``stock: 0``; ``meta.previous`` from an
offset below ``limit`` points at offset 0; a non-empty rent body must be ``application/json``;
unknown query parameters and rent fields are ignored, a repeated parameter's first value counts;
``app_id`` may be a digit string or an integer; non-local groups show the country name as region;
a path without its trailing slash is a 404; checks run route (404), method (405), auth (401),
parameters (400), group (404).

Limitations (what the sandbox does not model):
    - Rate limits: nothing throttles; a 429 only comes from a queued fault.
    - One account and three operations: no subaccounts, no ``PhoneNumber``/``Number``/
      ``Application`` resources; rented numbers are not listed anywhere, ``app_id`` is only
      validated and logged, pending (regulated) orders never complete, no webhooks.
    - Catalogue: regions, prefixes and prices are plausible fixtures, not Plivo's; numbers are
      random digits after the prefix, unique but not checked against numbering plans.
    - Error texts are the sandbox's own; only statuses and body shapes follow Plivo.
    - Plain HTTP/1.1 only; no TLS, no HTTP/2, no proxies.
    - Determinism: same seed and same sequence of requests give the same ids and numbers;
      concurrent requests take api ids in arrival order. The request log keeps the last 10,000.
"""

from numbersvc.sandbox.control import SandboxControl, SandboxControlError
from numbersvc.sandbox.faults import FaultKind, FaultSpec
from numbersvc.sandbox.inventory import DEFAULT_SEED, Inventory, SearchQuery, SyntheticSpec
from numbersvc.sandbox.journal import RequestRecord
from numbersvc.sandbox.server import (
    DEFAULT_AUTH_ID,
    DEFAULT_AUTH_TOKEN,
    SandboxServer,
    run_sandbox,
)

__all__ = [
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
]
