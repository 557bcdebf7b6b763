"""The sandbox's catalogue: countries, regions, prefixes and rates, loaded from JSON fixtures.

The fixtures in ``fixtures/`` are data, not code, so adding a country or an area code never
touches the generator. This module only turns them into frozen, typed objects; the
:mod:`~numbersvc.sandbox.inventory` decides how many groups each entry becomes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cache
from importlib import resources
from itertools import accumulate
from typing import Any

__all__ = [
    "NUMBER_TYPES",
    "SERVICES",
    "Catalog",
    "Country",
    "Offer",
    "Rates",
    "Region",
    "load_catalog",
]

#: The three number types of Plivo's group API, in the order the inventory lists them.
NUMBER_TYPES: tuple[str, ...] = ("local", "national", "tollfree")
#: Services a group can offer; a search asks for "at least" a subset of these.
SERVICES: tuple[str, ...] = ("voice", "sms")

_PACKAGE = "numbersvc.sandbox"


@dataclass(frozen=True, slots=True)
class Rates:
    """Per-number prices in USD, kept as :class:`~decimal.Decimal` because they are money."""

    rental: Decimal
    setup: Decimal
    voice: Decimal
    sms: Decimal


@dataclass(frozen=True, slots=True, eq=False)
class Region:
    """Where a group's numbers are; shared by every group in it to keep groups small.

    Identity equality (``eq=False``): groups share one object per region, and hashing by
    identity keeps region filters over 100k groups fast.

    Attributes:
        name: The region's own name (``"Texas"``, ``"AMIENS"``), what region searches match.
        display: The string Plivo shows (``"Texas, UNITED STATES"``).
        code: The 2-character region code (``"TX"``), or ``None`` where none is modelled.
    """

    name: str
    display: str
    code: str | None


@dataclass(frozen=True, slots=True)
class Offer:
    """One number type sold in one country: its prices and how the generator fills it.

    Attributes:
        country: The country this offer belongs to.
        number_type: ``"local"``, ``"national"`` or ``"tollfree"``.
        rates: Prices of every group of this offer.
        service_sets: The service sets a group may offer (``{"voice"}``, ``{"voice", "sms"}``).
        service_cum_weights: Cumulative fixture weights of ``service_sets``, for one draw each.
        groups_per_prefix: Inclusive bounds of how many groups one prefix becomes.
        places: ``(region, prefix)`` pairs, one per prefix sold, in fixture order.
    """

    country: Country
    number_type: str
    rates: Rates
    service_sets: tuple[frozenset[str], ...]
    service_cum_weights: tuple[int, ...]
    groups_per_prefix: tuple[int, int]
    places: tuple[tuple[Region, str], ...] = field(repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class Country:
    """A country with inventory; ``offers`` is keyed by number type.

    Identity equality (``eq=False``) because an offer points back at its country.
    """

    iso: str
    name: str
    calling_code: str
    national_length: int
    regulated: bool
    # Filled in by the loader right after construction, since each offer points back here.
    offers: dict[str, Offer] = field(repr=False)


@dataclass(frozen=True, slots=True)
class Catalog:
    """All countries the sandbox sells numbers in, keyed by ISO 3166-1 alpha-2 code."""

    countries: dict[str, Country]

    def offer(self, country_iso: str, number_type: str) -> Offer | None:
        """Return the offer for a country and number type, or ``None`` if none is sold."""
        country = self.countries.get(country_iso)
        return None if country is None else country.offers.get(number_type)


def _read_fixture(name: str) -> dict[str, Any]:
    fixture = resources.files(_PACKAGE).joinpath("fixtures").joinpath(name)
    text = fixture.read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    # "_comment" keys document the file for humans; they are not countries.
    return {key: value for key, value in data.items() if not key.startswith("_")}


def _parse_services(raw: dict[str, int]) -> tuple[tuple[frozenset[str], ...], tuple[int, ...]]:
    sets = tuple(frozenset(key.split(",")) for key in raw)
    if any(not s <= set(SERVICES) for s in sets) or any(w <= 0 for w in raw.values()):
        raise ValueError(f"bad services entry in fixtures: {raw!r}")
    return sets, tuple(accumulate(raw.values()))


def _build_country(iso: str, raw: dict[str, Any], regions: list[dict[str, Any]]) -> Country:
    offers: dict[str, Offer] = {}
    country = Country(
        iso=iso,
        name=raw["name"],
        calling_code=raw["calling_code"],
        national_length=int(raw["national_length"]),
        regulated=bool(raw["regulated"]),
        offers=offers,
    )
    # Non-local groups are not tied to a region: Plivo shows the country there.
    nationwide = Region(name=country.name, display=country.name, code=None)
    for number_type in NUMBER_TYPES:
        spec = raw["offers"].get(number_type)
        if spec is None:
            continue
        if number_type == "local":
            places = tuple(
                (Region(r["name"], f"{r['name']}, {country.name}", r["code"]), prefix)
                for r in regions
                for prefix in r["prefixes"]
            )
        else:
            places = tuple((nationwide, prefix) for prefix in spec["prefixes"])
        low, high = spec["groups_per_prefix"]
        service_sets, service_cum_weights = _parse_services(spec["services"])
        offers[number_type] = Offer(
            country=country,
            number_type=number_type,
            rates=Rates(**{key: Decimal(value) for key, value in spec["rates"].items()}),
            service_sets=service_sets,
            service_cum_weights=service_cum_weights,
            groups_per_prefix=(int(low), int(high)),
            places=places,
        )
    return country


@cache
def load_catalog() -> Catalog:
    """Load and check the packaged fixtures (cached: they never change at runtime).

    Returns:
        The catalogue of every country, region, prefix and rate the generator uses.

    Raises:
        ValueError: If a fixture entry is inconsistent (unknown service, bad weight).
    """
    countries = _read_fixture("countries.json")
    regions = _read_fixture("regions.json")
    return Catalog(
        countries={
            iso: _build_country(iso, raw, regions.get(iso, [])) for iso, raw in countries.items()
        }
    )
