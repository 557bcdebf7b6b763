from __future__ import annotations

import pytest

from numbersvc.cache import SearchCache


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def cache(clock: Clock, *, ttl: float = 2.0, max_entries: int = 10) -> SearchCache[str]:
    return SearchCache(ttl_seconds=ttl, max_entries=max_entries, clock=clock)


def test_an_answer_is_served_until_the_ttl_from_when_it_was_put() -> None:
    clock = Clock()
    c = cache(clock, ttl=2.0)
    clock.now += 5  # time before the put does not count
    assert c.put("k", "page", groups=["1"], epoch=c.epoch)
    clock.now += 1.999
    assert c.get("k") == "page"
    clock.now += 0.001
    assert c.get("k") is None
    assert len(c) == 0
    assert c.index_size == 0


def test_a_read_does_not_extend_the_ttl() -> None:
    clock = Clock()
    c = cache(clock, ttl=2.0)
    c.put("k", "page", groups=[], epoch=c.epoch)
    for _ in range(3):
        clock.now += 0.6
        assert c.get("k") == "page"
    clock.now += 0.3
    assert c.get("k") is None


def test_a_missing_key_is_none() -> None:
    c = cache(Clock())
    assert c.get("nothing") is None


def test_the_least_recently_used_goes_first() -> None:
    c = cache(Clock(), max_entries=3)
    for key in "abc":
        c.put(key, key.upper(), groups=[key], epoch=c.epoch)
    assert c.get("a") == "A"  # now b is the least recently used
    c.put("d", "D", groups=["d"], epoch=c.epoch)
    assert len(c) == 3
    assert c.get("b") is None
    assert [c.get(key) for key in "acd"] == ["A", "C", "D"]
    assert c.drop_group("b") == 0  # its group left the index with it


def test_expired_entries_at_the_lru_end_make_room_before_live_ones() -> None:
    clock = Clock()
    c = cache(clock, ttl=2.0, max_entries=3)
    c.put("old", "O", groups=["1"], epoch=c.epoch)
    clock.now += 3
    c.put("new", "N", groups=["2"], epoch=c.epoch)
    assert len(c) == 1  # the expired one went on the put, not at the bound
    assert c.get("new") == "N"


def test_put_replaces_an_entry_and_its_groups() -> None:
    c = cache(Clock())
    c.put("k", "v1", groups=["1", "2"], epoch=c.epoch)
    c.put("k", "v2", groups=["2", "3"], epoch=c.epoch)
    assert c.index_size == 2
    assert c.drop_group("1") == 0
    assert c.get("k") == "v2"
    assert c.drop_group("3") == 1
    assert c.get("k") is None


def test_dropping_a_group_drops_every_entry_that_shows_it_and_only_those() -> None:
    c = cache(Clock())
    c.put("page-1", "P1", groups=["10", "11"], epoch=c.epoch)
    c.put("page-2", "P2", groups=["12", "13"], epoch=c.epoch)
    c.put("other-filter", "P3", groups=["11", "14"], epoch=c.epoch)
    c.put("get-11", "G", groups=["11"], epoch=c.epoch)
    assert c.drop_group("11") == 3
    assert [c.get(k) for k in ("page-1", "other-filter", "get-11")] == [None, None, None]
    assert c.get("page-2") == "P2"
    assert c.index_size == 2  # 12 and 13; 10 and 14 left with their entries


def test_an_answer_read_before_a_drop_is_not_kept() -> None:
    c = cache(Clock())
    epoch = c.epoch  # the read starts
    c.drop_group("99")  # a rent lands while it is on its way, whatever the group
    assert not c.put("k", "stale", groups=["1"], epoch=epoch)
    assert c.get("k") is None
    assert c.put("k", "fresh", groups=["1"], epoch=c.epoch)
    assert c.get("k") == "fresh"


def test_the_group_index_stays_bounded_by_the_entries() -> None:
    c = cache(Clock(), max_entries=5)
    for n in range(1000):
        groups = [str(n * 20 + i) for i in range(20)]
        c.put(("search", n), f"page {n}", groups=groups, epoch=c.epoch)
        if n % 7 == 0:
            c.drop_group(str(n * 20 - 3))  # a group of the page before, some of the time
    assert len(c) <= 5
    assert c.index_size <= 5 * 20
    assert c.index_size == 20 * len(c)


@pytest.mark.parametrize(("ttl", "max_entries"), [(0, 10), (-1, 10), (1, 0)])
def test_an_empty_cache_is_refused(ttl: float, max_entries: int) -> None:
    with pytest.raises(ValueError, match="ttl_seconds > 0 and max_entries >= 1"):
        SearchCache[str](ttl_seconds=ttl, max_entries=max_entries)
