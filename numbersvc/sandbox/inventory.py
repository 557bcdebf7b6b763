"""The sandbox's stateful model of Plivo number groups: search, get, rent, reset and seed.

No HTTP here (the stripe-mock/moto split): :mod:`~numbersvc.sandbox.app` parses requests and
writes JSON, this module owns the groups. Everything random comes from ONE
:class:`random.Random` seeded with the inventory's seed, consumed in a fixed order, so the same
seed and the same sequence of calls give the same group ids, stocks, numbers and api ids.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from numbersvc.sandbox.catalog import Catalog, Offer, Region, load_catalog

__all__ = [
    "DEFAULT_SEED",
    "MAX_SYNTHETIC_GROUPS",
    "Group",
    "GroupNotFoundError",
    "InsufficientStockError",
    "Inventory",
    "InventoryError",
    "Rental",
    "SearchPage",
    "SearchQuery",
    "SeedError",
    "SeedResult",
    "SyntheticSpec",
    "match_regions",
]

#: Seed used when none is given: fixes the whole inventory and every id the sandbox hands out.
DEFAULT_SEED = 20240611
#: Largest number of synthetic groups one seed call may add (about 20 MB of groups).
MAX_SYNTHETIC_GROUPS = 500_000

_GROUP_ID_RANGE = (10**13, 10**14)  # 14-digit ids, like Plivo's "55350421590053"
_FIXTURE_STOCK_RANGE = (1, 250)
_SYNTHETIC_STOCK_RANGE = (1, 100)
_NUMBER_ATTEMPTS = 1000  # draws before a group's number space counts as exhausted


class InventoryError(Exception):
    """Base class of the inventory's refusals; the HTTP layer maps each to a status."""


class GroupNotFoundError(InventoryError, LookupError):
    """No group has this id."""


class InsufficientStockError(InventoryError):
    """A rent asked for more numbers than the group has left."""

    def __init__(self, group_id: str, requested: int, stock: int) -> None:
        super().__init__(
            f"quantity {requested} exceeds the stock of group {group_id} ({stock} left)"
        )
        self.group_id, self.requested, self.stock = group_id, requested, stock


class SeedError(InventoryError, ValueError):
    """A synthetic-seed request the catalogue cannot satisfy."""


@dataclass(slots=True, eq=False)
class Group:
    """One number group. Shared objects (offer, region, services) keep 100k groups small."""

    group_id: str
    offer: Offer = field(repr=False)
    region: Region
    prefix: str
    services: frozenset[str]
    stock: int

    @property
    def country_iso(self) -> str:
        """ISO 3166-1 alpha-2 code of the group's country."""
        return self.offer.country.iso

    @property
    def number_type(self) -> str:
        """``"local"``, ``"national"`` or ``"tollfree"``."""
        return self.offer.number_type

    @property
    def voice_enabled(self) -> bool:
        """Whether numbers of this group take calls."""
        return "voice" in self.services

    @property
    def sms_enabled(self) -> bool:
        """Whether numbers of this group take SMS."""
        return "sms" in self.services


@dataclass(frozen=True, slots=True)
class SearchQuery:
    """A validated search filter; ``services`` empty means any, else "at least these"."""

    country_iso: str
    number_type: str = "local"
    prefix: str | None = None
    region: str | None = None
    services: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class SearchPage:
    """One page of a search and the number of groups matching it in all."""

    total_count: int
    groups: tuple[Group, ...]


@dataclass(frozen=True, slots=True)
class Rental:
    """The outcome of a rent: ``numbers`` is empty when the order is pending (regulated)."""

    group: Group
    quantity: int
    numbers: tuple[str, ...]
    pending: bool


@dataclass(frozen=True, slots=True)
class SyntheticSpec:
    """What a seed call adds; ``None`` fields cycle through or draw from the catalogue."""

    country_iso: str
    number_type: str = "local"
    count: int = 1
    prefix: str | None = None
    region: str | None = None
    region_code: str | None = None
    services: frozenset[str] | None = None
    stock: int | None = None


@dataclass(frozen=True, slots=True)
class SeedResult:
    """What a seed call added, and the inventory's size afterwards."""

    added: int
    first_group_id: str
    last_group_id: str
    total_groups: int


@dataclass(slots=True)
class _Bucket:
    """The groups of one (country, number type), in listing order, and their regions."""

    groups: list[Group] = field(default_factory=list)
    regions: dict[Region, None] = field(default_factory=dict)  # ordered set


def match_regions(term: str, regions: Iterable[Region]) -> set[Region]:
    """Return the regions a ``region`` search term selects.

    A 2-character term is a region code (``NY``). A longer term matches a region whose name
    (or displayed ``"Name, COUNTRY"``) equals it, else any region whose name contains it; all
    comparisons ignore case.

    NOTE: plivo-api.md marks "how exact and contains combine" [U]. The sandbox's choice: an exact
    match wins, so ``Kansas`` finds Kansas and not Arkansas, and ``ebra`` still finds Nebraska.
    """
    folded = term.casefold()
    candidates = list(regions)
    if len(term) == 2:
        return {r for r in candidates if r.code is not None and r.code.casefold() == folded}
    exact = {r for r in candidates if folded in (r.name.casefold(), r.display.casefold())}
    return exact or {r for r in candidates if folded in r.name.casefold()}


class Inventory:
    """Every group the sandbox sells, built deterministically from a seed and the fixtures."""

    def __init__(self, seed: int = DEFAULT_SEED, *, catalog: Catalog | None = None) -> None:
        self._seed = seed
        self._catalog = catalog if catalog is not None else load_catalog()
        self._random = random.Random(seed)
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._by_id: dict[str, Group] = {}
        self._issued: set[str] = set()
        self.reset()

    @property
    def seed(self) -> int:
        """The seed this inventory is rebuilt from on :meth:`reset`."""
        return self._seed

    @property
    def catalog(self) -> Catalog:
        """The fixtures the inventory is generated from."""
        return self._catalog

    def __len__(self) -> int:
        return len(self._by_id)

    def reset(self) -> None:
        """Rebuild the seeded inventory: drops synthetic groups, restores stock, reseeds ids."""
        self._random = random.Random(self._seed)
        self._buckets, self._by_id, self._issued = {}, {}, set()
        for country in self._catalog.countries.values():
            for offer in country.offers.values():
                low, high = offer.groups_per_prefix
                for region, prefix in offer.places:
                    for _ in range(self._random.randint(low, high)):
                        stock = self._random.randint(*_FIXTURE_STOCK_RANGE)
                        self._add(offer, region, prefix, self._draw_services(offer), stock)

    def new_api_id(self) -> str:
        """Return a UUID4-shaped request id drawn from the one seeded random source."""
        return str(uuid.UUID(int=self._random.getrandbits(128), version=4))

    def search(self, query: SearchQuery, *, offset: int, limit: int) -> SearchPage:
        """Return the groups matching ``query``, ``limit`` of them from ``offset`` on.

        Args:
            query: A validated filter (the HTTP layer enforces Plivo's parameter rules).
            offset: Groups to skip, >= 0; past the end gives an empty page.
            limit: Largest page size, >= 1.

        Returns:
            The page and the total number of matching groups.
        """
        bucket = self._buckets.get((query.country_iso, query.number_type))
        if bucket is None:
            return SearchPage(0, ())
        predicate = _compile_filter(query, bucket)
        matches = bucket.groups if predicate is None else list(filter(predicate, bucket.groups))
        return SearchPage(len(matches), tuple(matches[offset : offset + limit]))

    def get(self, group_id: str) -> Group:
        """Return the group with this id.

        Raises:
            GroupNotFoundError: If there is none.
        """
        group = self._by_id.get(group_id)
        if group is None:
            raise GroupNotFoundError(f"group {group_id} not found")
        return group

    def rent(self, group_id: str, quantity: int = 1) -> Rental:
        """Take ``quantity`` numbers from a group; stock drops even when the order is pending.

        Raises:
            GroupNotFoundError: If there is no such group.
            InsufficientStockError: If ``quantity`` exceeds the stock (nothing changes).
            ValueError: If ``quantity`` < 1.
        """
        group = self.get(group_id)
        if quantity < 1:
            raise ValueError("quantity must be at least 1")
        if quantity > group.stock:
            raise InsufficientStockError(group_id, quantity, group.stock)
        group.stock -= quantity
        if group.offer.country.regulated:
            return Rental(group, quantity, (), pending=True)
        numbers = tuple(self._new_number(group) for _ in range(quantity))
        return Rental(group, quantity, numbers, pending=False)

    def seed_synthetic(self, spec: SyntheticSpec) -> SeedResult:
        """Append ``spec.count`` deterministic synthetic groups after the existing ones.

        Raises:
            SeedError: If the country or number type has no offer, the count is out of range,
                a region is given for a non-local type, or no prefix is known or given.
        """
        offer = self._catalog.offer(spec.country_iso, spec.number_type)
        if offer is None:
            raise SeedError(f"no {spec.number_type} offer for country {spec.country_iso}")
        if not 1 <= spec.count <= MAX_SYNTHETIC_GROUPS:
            raise SeedError(f"count must be between 1 and {MAX_SYNTHETIC_GROUPS}")
        places = _synthetic_places(offer, spec)
        added = []
        for index in range(spec.count):
            region, prefix = places[index % len(places)]
            services = spec.services or self._draw_services(offer)
            stock = spec.stock
            if stock is None:
                stock = self._random.randint(*_SYNTHETIC_STOCK_RANGE)
            added.append(self._add(offer, region, prefix, services, stock))
        first, last = added[0].group_id, added[-1].group_id
        return SeedResult(spec.count, first, last, len(self._by_id))

    def _add(
        self, offer: Offer, region: Region, prefix: str, services: frozenset[str], stock: int
    ) -> Group:
        group_id = str(self._random.randrange(*_GROUP_ID_RANGE))
        while group_id in self._by_id:
            group_id = str(self._random.randrange(*_GROUP_ID_RANGE))
        group = Group(group_id, offer, region, prefix, services, stock)
        bucket = self._buckets.setdefault((offer.country.iso, offer.number_type), _Bucket())
        bucket.groups.append(group)
        bucket.regions.setdefault(region)
        self._by_id[group_id] = group
        return group

    def _draw_services(self, offer: Offer) -> frozenset[str]:
        return self._random.choices(offer.service_sets, cum_weights=offer.service_cum_weights)[0]

    def _new_number(self, group: Group) -> str:
        country = group.offer.country
        width = max(country.national_length - len(group.prefix), 1)
        for _ in range(_NUMBER_ATTEMPTS):
            subscriber = f"{self._random.randrange(10**width):0{width}d}"
            number = f"{country.calling_code}{group.prefix}{subscriber}"
            if number not in self._issued:
                self._issued.add(number)
                return number
        raise InventoryError(f"no unused numbers left under prefix {group.prefix}")


def _compile_filter(query: SearchQuery, bucket: _Bucket) -> Callable[[Group], bool] | None:
    """Return one predicate for the query's optional filters, or ``None`` when there are none."""
    checks: list[Callable[[Group], bool]] = []
    if query.prefix is not None:
        prefix = query.prefix
        checks.append(lambda group: group.prefix.startswith(prefix))
    if query.region is not None:
        wanted = match_regions(query.region, list(bucket.regions))
        checks.append(lambda group: group.region in wanted)
    if query.services:
        services = query.services
        checks.append(lambda group: services <= group.services)
    if len(checks) <= 1:
        return checks[0] if checks else None
    return lambda group: all(check(group) for check in checks)


def _synthetic_places(offer: Offer, spec: SyntheticSpec) -> list[tuple[Region, str]]:
    """Return the (region, prefix) pairs synthetic groups cycle through.

    Without overrides these are the fixture's own pairs; a given region or prefix replaces that
    side, combined with every distinct value of the other side.
    """
    if spec.region is None and spec.prefix is None:
        places = list(offer.places)
    else:
        regions = list(dict.fromkeys(region for region, _ in offer.places))
        prefixes = list(dict.fromkeys(prefix for _, prefix in offer.places))
        if spec.region is not None:
            if offer.number_type != "local":
                raise SeedError("region is only allowed with number_type local")
            display = f"{spec.region}, {offer.country.name}"
            regions = [Region(spec.region, display, spec.region_code)]
        if spec.prefix is not None:
            prefixes = [spec.prefix]
        places = [(region, prefix) for region in regions for prefix in prefixes]
    if not places:
        raise SeedError(
            f"no prefixes known for {offer.country.iso} {offer.number_type}: give a prefix"
        )
    return places
