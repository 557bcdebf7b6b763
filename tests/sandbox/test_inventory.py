"""The stateful model alone: generation, search filters, rent, reset and synthetic seeding."""

from __future__ import annotations

import re
import time
import tracemalloc
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from numbersvc.sandbox.catalog import NUMBER_TYPES, load_catalog
from numbersvc.sandbox.inventory import (
    DEFAULT_SEED,
    GroupNotFoundError,
    InsufficientStockError,
    Inventory,
    SearchQuery,
    SeedError,
    SyntheticSpec,
    match_regions,
)

# Read-only and shared: generation is deterministic, so one copy serves every read-only test.
SHARED = Inventory()


def all_groups(inventory: Inventory, query: SearchQuery) -> list[str]:
    page = inventory.search(query, offset=0, limit=1_000_000)
    return [group.group_id for group in page.groups]


def regions_of(inventory: Inventory, query: SearchQuery) -> set[str]:
    page = inventory.search(query, offset=0, limit=1_000_000)
    return {group.region.display for group in page.groups}


class TestGeneration:
    def test_same_seed_same_inventory(self) -> None:
        first, second = Inventory(DEFAULT_SEED), Inventory(DEFAULT_SEED)
        query = SearchQuery("US")
        assert all_groups(first, query) == all_groups(second, query)
        assert [first.new_api_id() for _ in range(3)] == [second.new_api_id() for _ in range(3)]

    def test_other_seed_other_inventory(self) -> None:
        assert all_groups(Inventory(1), SearchQuery("US")) != all_groups(SHARED, SearchQuery("US"))

    def test_countries_and_number_types(self) -> None:
        present = Counter(
            (iso, number_type)
            for iso in ("US", "CA", "GB", "DE", "FR", "BE")
            for number_type in NUMBER_TYPES
            for _ in all_groups(SHARED, SearchQuery(iso, number_type))
        )
        assert {iso for iso, _ in present} == {"US", "CA", "GB", "DE", "FR", "BE"}
        assert {number_type for _, number_type in present} == set(NUMBER_TYPES)
        assert 300 <= present["US", "local"] <= 500  # enough for paging to matter

    def test_group_ids_are_unique_14_digit_strings(self) -> None:
        ids = [
            gid for iso in load_catalog().countries for gid in all_groups(SHARED, SearchQuery(iso))
        ]
        assert len(ids) == len(set(ids))
        assert all(re.fullmatch(r"[1-9][0-9]{13}", gid) for gid in ids)

    def test_services_mix(self) -> None:
        page = SHARED.search(SearchQuery("US"), offset=0, limit=1000)
        kinds = Counter(frozenset(group.services) for group in page.groups)
        assert kinds[frozenset({"voice"})] > 0
        assert kinds[frozenset({"sms"})] > 0
        assert kinds[frozenset({"voice", "sms"})] > 0

    def test_regulated_countries(self) -> None:
        regulated = {iso for iso, c in load_catalog().countries.items() if c.regulated}
        assert regulated == {"DE", "FR", "BE"}


class TestSearch:
    def test_unknown_country_or_type_is_empty(self) -> None:
        assert SHARED.search(SearchQuery("JP"), offset=0, limit=20).total_count == 0
        assert SHARED.search(SearchQuery("US", "national"), offset=0, limit=20).total_count == 0

    def test_prefix_matches_the_start(self) -> None:
        page = SHARED.search(SearchQuery("US", prefix="21"), offset=0, limit=1000)
        assert page.total_count > 0
        assert {group.prefix for group in page.groups} >= {"210", "214"}
        assert all(group.prefix.startswith("21") for group in page.groups)

    def test_region_code(self) -> None:
        assert regions_of(SHARED, SearchQuery("US", region="TX")) == {"Texas, UNITED STATES"}
        assert regions_of(SHARED, SearchQuery("US", region="ny")) == {"New York, UNITED STATES"}

    def test_region_contained_text(self) -> None:
        assert regions_of(SHARED, SearchQuery("US", region="ebra")) == {"Nebraska, UNITED STATES"}
        assert regions_of(SHARED, SearchQuery("FR", region="amien")) == {"AMIENS, FRANCE"}

    def test_region_exact_name_wins_over_contains(self) -> None:
        assert regions_of(SHARED, SearchQuery("US", region="Kansas")) == {"Kansas, UNITED STATES"}
        assert regions_of(SHARED, SearchQuery("US", region="virginia")) == {
            "Virginia, UNITED STATES"
        }
        both = {"Virginia, UNITED STATES", "West Virginia, UNITED STATES"}
        assert regions_of(SHARED, SearchQuery("US", region="irginia")) == both

    def test_region_full_display_name(self) -> None:
        query = SearchQuery("US", region="Texas, UNITED STATES")
        assert regions_of(SHARED, query) == {"Texas, UNITED STATES"}

    def test_match_regions_two_characters_only_codes(self) -> None:
        regions = [r for r, _ in load_catalog().countries["US"].offers["local"].places]
        # "ma" is in "Alabama" etc. but 2 characters are always a code: Massachusetts.
        assert {r.name for r in match_regions("ma", regions)} == {"Massachusetts"}

    @pytest.mark.parametrize(
        ("wanted", "allowed"),
        [
            ({"voice"}, [{"voice"}, {"voice", "sms"}]),
            ({"sms"}, [{"sms"}, {"voice", "sms"}]),
            ({"voice", "sms"}, [{"voice", "sms"}]),
        ],
    )
    def test_services_at_least(self, wanted: set[str], allowed: list[set[str]]) -> None:
        page = SHARED.search(SearchQuery("US", services=frozenset(wanted)), offset=0, limit=1000)
        assert {frozenset(g.services) for g in page.groups} == {frozenset(a) for a in allowed}

    @given(
        prefix=st.none() | st.from_regex(r"[2-9][0-9]{0,2}", fullmatch=True),
        services=st.sampled_from([frozenset(), frozenset({"voice"}), frozenset({"sms"})]),
        limit=st.integers(1, 20),
    )
    def test_pages_tile_the_full_result(
        self, prefix: str | None, services: frozenset[str], limit: int
    ) -> None:
        query = SearchQuery("US", prefix=prefix, services=services)
        everything = all_groups(SHARED, query)
        paged: list[str] = []
        for offset in range(0, len(everything) + limit, limit):
            page = SHARED.search(query, offset=offset, limit=limit)
            assert page.total_count == len(everything)
            paged.extend(group.group_id for group in page.groups)
        assert paged == everything


class TestRent:
    def first(self, inventory: Inventory, iso: str) -> str:
        return inventory.search(SearchQuery(iso), offset=0, limit=1).groups[0].group_id

    def test_fulfilled_numbers_and_stock(self) -> None:
        inventory = Inventory()
        group = inventory.get(self.first(inventory, "US"))
        stock = group.stock
        rental = inventory.rent(group.group_id, 2)
        assert not rental.pending
        assert len(set(rental.numbers)) == 2
        assert all(re.fullmatch(rf"1{group.prefix}[0-9]{{7}}", n) for n in rental.numbers)
        assert group.stock == stock - 2

    def test_regulated_country_is_pending_without_numbers(self) -> None:
        inventory = Inventory()
        group = inventory.get(self.first(inventory, "FR"))
        stock = group.stock
        rental = inventory.rent(group.group_id, 1)
        assert rental.pending
        assert rental.numbers == ()
        assert group.stock == stock - 1

    def test_quantity_above_stock_changes_nothing(self) -> None:
        inventory = Inventory()
        group = inventory.get(self.first(inventory, "US"))
        stock = group.stock
        with pytest.raises(InsufficientStockError, match=f"{stock} left"):
            inventory.rent(group.group_id, stock + 1)
        assert group.stock == stock
        inventory.rent(group.group_id, stock)  # exactly the stock is fine
        assert group.stock == 0

    def test_unknown_group(self) -> None:
        with pytest.raises(GroupNotFoundError):
            Inventory().rent("12345678901234")

    def test_numbers_never_repeat(self) -> None:
        inventory = Inventory()
        numbers: list[str] = []
        for group in inventory.search(SearchQuery("GB"), offset=0, limit=20).groups:
            numbers.extend(inventory.rent(group.group_id, group.stock).numbers)
        assert len(numbers) > 100
        assert len(numbers) == len(set(numbers))


class TestResetAndSeed:
    def test_reset_restores_everything(self) -> None:
        inventory = Inventory()
        before = all_groups(inventory, SearchQuery("US"))
        ids = [inventory.new_api_id() for _ in range(2)]
        group = inventory.get(before[0])
        stock = group.stock
        inventory.rent(group.group_id, 1)
        inventory.seed_synthetic(SyntheticSpec("US", count=10))
        inventory.reset()
        assert all_groups(inventory, SearchQuery("US")) == before
        assert inventory.get(before[0]).stock == stock
        assert [inventory.new_api_id() for _ in range(2)] == ids

    def test_seed_100k_is_fast_and_appended(self) -> None:
        inventory = Inventory()
        before = len(inventory)
        started = time.perf_counter()
        result = inventory.seed_synthetic(SyntheticSpec("US", count=100_000))
        assert time.perf_counter() - started < 5.0
        assert result.added == 100_000
        assert result.total_groups == len(inventory) == before + 100_000
        page = inventory.search(SearchQuery("US"), offset=100_300, limit=20)
        assert page.total_count == 100_000 + len(all_groups(SHARED, SearchQuery("US")))
        assert len(page.groups) == 20

    def test_seed_memory_is_modest(self) -> None:
        inventory = Inventory()
        tracemalloc.start()
        try:
            inventory.seed_synthetic(SyntheticSpec("US", count=20_000))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak / 20_000 < 500  # bytes per group: 100k groups stay well under 50 MB

    def test_seed_is_deterministic(self) -> None:
        spec = SyntheticSpec("DE", "tollfree", count=50)
        assert Inventory().seed_synthetic(spec) == Inventory().seed_synthetic(spec)

    def test_seed_overrides(self) -> None:
        inventory = Inventory()
        spec = SyntheticSpec(
            "US",
            count=30,
            prefix="555",
            region="Springfield",
            region_code="SP",
            services=frozenset({"sms"}),
            stock=7,
        )
        inventory.seed_synthetic(spec)
        page = inventory.search(SearchQuery("US", region="SP"), offset=0, limit=100)
        assert page.total_count == 30
        assert {(g.prefix, g.region.display, g.stock) for g in page.groups} == {
            ("555", "Springfield, UNITED STATES", 7)
        }
        assert all(g.services == {"sms"} for g in page.groups)

    @pytest.mark.parametrize(
        "spec",
        [
            SyntheticSpec("JP"),
            SyntheticSpec("US", "national"),
            SyntheticSpec("US", count=0),
            SyntheticSpec("US", "tollfree", region="Somewhere"),
        ],
    )
    def test_seed_refusals(self, spec: SyntheticSpec) -> None:
        with pytest.raises(SeedError):
            Inventory().seed_synthetic(spec)
