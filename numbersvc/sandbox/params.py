"""Plivo's parameter rules as pure functions: query strings and JSON bodies in, typed values out.

Every rule of plivo-api.md's search table lives in :func:`parse_search_params`, the rent body
rules in :func:`parse_rent_body`, and the paging links in :func:`page_links`, so a rule that turns
out wrong upstream is changed in one place. Nothing here knows aiohttp: inputs are a mapping of
query parameters and raw bytes, and every refusal is a :class:`ParamError` (HTTP 400).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

import iso3166

from numbersvc.sandbox.catalog import NUMBER_TYPES, SERVICES
from numbersvc.sandbox.inventory import SearchQuery, SyntheticSpec

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "ParamError",
    "RentParams",
    "SearchParams",
    "int_field",
    "page_links",
    "parse_json_object",
    "parse_rent_body",
    "parse_search_params",
    "parse_seed_body",
    "parse_services",
]

DEFAULT_LIMIT = 20
MAX_LIMIT = 20
_DIGITS = re.compile(r"[0-9]+")
_PREFIX = re.compile(r"[0-9]{1,5}")


class ParamError(ValueError):
    """A parameter or body Plivo would refuse with HTTP 400; the message goes in ``error``."""


@dataclass(frozen=True, slots=True)
class SearchParams:
    """A validated search: the filter and the page window."""

    query: SearchQuery
    limit: int
    offset: int


@dataclass(frozen=True, slots=True)
class RentParams:
    """A validated rent body."""

    quantity: int
    app_id: str | None


def parse_services(raw: str) -> frozenset[str]:
    """Parse ``voice``, ``sms`` or ``voice,sms`` (any order) into a set of services.

    NOTE: ``mms`` is refused: plivo-api.md marks it [U] on this resource, and refusing it
    makes a client that sends it fail loudly against the sandbox.

    Raises:
        ParamError: On an empty, unknown or upper-case value.
    """
    values = raw.split(",")
    if not raw or any(value not in SERVICES for value in values):
        raise ParamError(f"invalid services {raw!r}: use voice, sms or voice,sms")
    return frozenset(values)


def _window_int(params: Mapping[str, str], name: str, default: int, low: int) -> int:
    raw = params.get(name)
    if raw is None:
        return default
    if not _DIGITS.fullmatch(raw) or int(raw) < low:
        raise ParamError(f"invalid {name} {raw!r}: must be an integer >= {low}")
    return int(raw)


def parse_search_params(params: Mapping[str, str]) -> SearchParams:
    """Apply Plivo's search parameter rules (plivo-api.md, "Search parameters").

    Args:
        params: The query parameters; the first value of a repeated name counts, unknown
            names are ignored.

    Returns:
        The filter and the page window.

    Raises:
        ParamError: On the first rule broken, checked in the table's order.
    """
    country = params.get("country_iso")
    # NOTE: case-insensitive ("us" works): Plivo's handling of case is not documented.
    if (
        country is None
        or len(country) != 2
        or iso3166.countries_by_alpha2.get(country.upper()) is None
    ):
        raise ParamError(f"invalid country ISO {country!r}: country_iso is required")
    number_type = params.get("number_type", "local")
    if number_type not in NUMBER_TYPES:
        raise ParamError(f"invalid number_type {number_type!r}: use local, national or tollfree")
    prefix = params.get("prefix")
    if prefix is not None and not _PREFIX.fullmatch(prefix):
        raise ParamError(f"invalid prefix {prefix!r}: 1 to 5 digits")
    region = params.get("region")
    if region is not None:
        if number_type != "local":
            raise ParamError("region is only allowed with number_type local")
        if len(region.strip()) < 2:
            raise ParamError(f"invalid region {region!r}: a 2-character code or 3+ characters")
    services = params.get("services")
    limit = _window_int(params, "limit", DEFAULT_LIMIT, 1)
    if limit > MAX_LIMIT:
        # NOTE: plivo-api.md marks out-of-range limits [U]; the sandbox refuses them.
        raise ParamError(f"invalid limit {limit}: must be between 1 and {MAX_LIMIT}")
    offset = _window_int(params, "offset", 0, 0)
    query = SearchQuery(
        country_iso=country.upper(),
        number_type=number_type,
        prefix=prefix,
        region=None if region is None else region.strip(),
        services=frozenset() if services is None else parse_services(services),
    )
    return SearchParams(query=query, limit=limit, offset=offset)


def page_links(
    path: str, raw_query: str, *, offset: int, limit: int, total: int
) -> tuple[str | None, str | None]:
    """Return ``(previous, next)`` for a search page, or ``None`` at either end.

    Each link is ``path`` plus the caller's own query string with only ``offset`` changed
    (parameter order and encoding kept, as plivo-api.md describes).
    """
    previous = None if offset == 0 else _with_offset(path, raw_query, max(offset - limit, 0))
    following = _with_offset(path, raw_query, offset + limit) if offset + limit < total else None
    return previous, following


def _with_offset(path: str, raw_query: str, offset: int) -> str:
    parts = raw_query.split("&") if raw_query else []
    replaced = False
    for index, part in enumerate(parts):
        if unquote_plus(part.split("=", 1)[0]) == "offset":
            parts[index] = f"offset={offset}"
            replaced = True
    if not replaced:
        parts.append(f"offset={offset}")
    return f"{path}?{'&'.join(parts)}"


def parse_json_object(body: bytes) -> dict[str, Any]:
    """Decode a JSON object body; an empty body is an empty object.

    Raises:
        ParamError: If the body is not JSON or not an object.
    """
    if not body.strip():
        return {}
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ParamError(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ParamError("request body must be a JSON object")
    return data


def int_field(
    data: Mapping[str, Any], name: str, default: int, *, low: int, high: int | None = None
) -> int:
    """Read an integer field given as a JSON number or a digit string (old SDKs send strings).

    Raises:
        ParamError: If the value is not an integer (``true`` is not), or is out of range.
    """
    value = data.get(name, default)
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ParamError(f"invalid {name} {value!r}: must be an integer")
    if value < low or (high is not None and value > high):
        upper = "" if high is None else f" and <= {high}"
        raise ParamError(f"invalid {name} {value}: must be >= {low}{upper}")
    return value


def parse_rent_body(body: bytes, content_type: str) -> RentParams:
    """Apply the rent body rules: optional ``quantity`` (default 1) and ``app_id``.

    Args:
        body: The raw request body; empty means all defaults.
        content_type: The request's media type, without parameters.

    Raises:
        ParamError: On a non-JSON body or media type, or a bad field.
    """
    # NOTE: Plivo "only accepts input of type application/json"; the sandbox holds clients to
    # that so a client that forgets the header fails here rather than in production.
    if body.strip() and content_type != "application/json":
        raise ParamError("Plivo only accepts input of type application/json")
    data = parse_json_object(body)
    quantity = int_field(data, "quantity", 1, low=1)
    app_id = data.get("app_id")
    if isinstance(app_id, int) and not isinstance(app_id, bool) and app_id >= 0:
        app_id = str(app_id)
    if app_id is not None and not (isinstance(app_id, str) and _DIGITS.fullmatch(app_id)):
        raise ParamError(f"invalid app_id {app_id!r}: must be a string of digits")
    return RentParams(quantity=quantity, app_id=app_id)


_SEED_FIELDS = frozenset(
    {"country_iso", "number_type", "count", "prefix", "region", "region_code", "services", "stock"}
)


def _optional_str(data: Mapping[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is not None and not isinstance(value, str):
        raise ParamError(f"invalid {name} {value!r}: must be a string")
    return value


def parse_seed_body(data: Mapping[str, Any]) -> SyntheticSpec:
    """Validate a ``POST /__sandbox/seed`` body into a :class:`SyntheticSpec`.

    Raises:
        ParamError: On unknown fields (to catch typos in tests) or bad values.
    """
    unknown = set(data) - _SEED_FIELDS
    if unknown:
        raise ParamError(f"unknown seed fields: {sorted(unknown)}")
    country = _optional_str(data, "country_iso")
    if country is None:
        raise ParamError("country_iso is required")
    prefix = _optional_str(data, "prefix")
    if prefix is not None and not _PREFIX.fullmatch(prefix):
        raise ParamError(f"invalid prefix {prefix!r}: 1 to 5 digits")
    code = _optional_str(data, "region_code")
    if code is not None and len(code) != 2:
        raise ParamError(f"invalid region_code {code!r}: 2 characters")
    services = _optional_str(data, "services")
    return SyntheticSpec(
        country_iso=country.upper(),
        number_type=_optional_str(data, "number_type") or "local",
        count=int_field(data, "count", 1, low=1),
        prefix=prefix,
        region=_optional_str(data, "region"),
        region_code=code,
        services=None if services is None else parse_services(services),
        stock=None if data.get("stock") is None else int_field(data, "stock", 0, low=0),
    )
