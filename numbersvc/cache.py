"""The search cache: recent read answers kept in memory for a few seconds, dropped on a rent.

`SingleFlight` (`coalesce.py`) shares a read while it is in flight; this keeps its answer for
`ttl_seconds` after it arrived, so identical reads a moment later cost no upstream request and
no rate budget. The servicer keys entries by the upstream query after translation (filter with
its defaults, offset, limit; or the group id of a get), never by the caller: the inventory is
the account's, every caller with `numbers.read` would get the same answer from Plivo.

Entries are decoded answers (a page of groups, one group) that nobody mutates: callers copy
them into their own messages. Each entry names the groups it shows; `drop_group` drops every
entry showing a group (after a rent from it) and moves the epoch on, and `put` refuses an answer
whose read began before the latest drop, so no answer older than a rent survives it.

Bounded: at most `max_entries` entries, least recently used out first; the group index holds
only the groups of the entries present. Pure: no gRPC, no upstream; time comes from an injected
monotonic clock.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["SearchCache"]

V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class _Entry(Generic[V]):
    value: V
    expires_at: float  # on the cache's monotonic clock
    groups: tuple[str, ...]  # without repeats


class SearchCache(Generic[V]):
    """Answers by key for `ttl_seconds` after they arrived, `max_entries` at most (LRU).

    Args:
        ttl_seconds: how long an answer is served, from when `put` stored it; > 0.
        max_entries: the most answers kept; >= 1.
        clock: a monotonic clock in seconds (injected in tests).
    """

    def __init__(
        self,
        *,
        ttl_seconds: float,
        max_entries: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_seconds <= 0 or max_entries < 1:
            raise ValueError("a search cache needs ttl_seconds > 0 and max_entries >= 1")
        self._ttl = ttl_seconds
        self._max = max_entries
        self._clock = clock
        self._entries: OrderedDict[Hashable, _Entry[V]] = OrderedDict()
        self._by_group: dict[str, set[Hashable]] = {}
        self._epoch = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def epoch(self) -> int:
        """How many drops there were: read it before a read starts, hand it to `put` after."""
        return self._epoch

    @property
    def index_size(self) -> int:
        """Links from groups to entries: at most the groups of the entries present."""
        return sum(len(keys) for keys in self._by_group.values())

    def get(self, key: Hashable) -> V | None:
        """Return the answer under `key` if it is younger than the TTL, else None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._clock() >= entry.expires_at:
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        return entry.value

    def put(self, key: Hashable, value: V, *, groups: Iterable[str], epoch: int) -> bool:
        """Keep `value` under `key` for the TTL from now, unless a drop came since `epoch`.

        Args:
            key: the upstream query the answer is for.
            value: the decoded answer (never an error: only answers are kept).
            groups: the group ids the answer shows, for `drop_group`.
            epoch: `epoch` as read before the read that produced `value` began.

        Returns:
            Whether it was kept (False: a rent's drop came while the read was on its way).
        """
        if epoch != self._epoch:
            return False
        self._remove(key)
        now = self._clock()
        entry = _Entry(value, now + self._ttl, tuple(dict.fromkeys(groups)))
        self._entries[key] = entry
        for group in entry.groups:
            self._by_group.setdefault(group, set()).add(key)
        # Out with the least recently used while over the bound, or while it has expired.
        while True:
            lru_key, lru = next(iter(self._entries.items()))
            if len(self._entries) <= self._max and now < lru.expires_at:
                return True
            self._remove(lru_key)

    def drop_group(self, group_id: str) -> int:
        """Drop every answer that shows `group_id`, and refuse answers of reads begun before.

        Returns:
            How many answers were dropped.
        """
        self._epoch += 1
        keys = self._by_group.pop(group_id, set())
        for key in keys:
            self._remove(key)
        return len(keys)

    def _remove(self, key: Hashable) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        for group in entry.groups:
            keys = self._by_group.get(group)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_group[group]
