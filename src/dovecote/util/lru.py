"""A least-recently-used map bounded by an estimate of the bytes it holds.

Every in-memory structure keyed by client input (resolved DID documents, key ids, rate
buckets, acknowledged ids, subscriptions) uses this, so that a flood of distinct, large
inputs costs at most the configured bytes, not a count of entries whose size the client
chooses. cachetools does the LRU bookkeeping and the byte accounting (`getsizeof`); this
wrapper adds the key's size to each entry's cost (a 2 MB DID as a key costs 2 MB) and
declines entries larger than the whole budget instead of raising.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

from cachetools import LRUCache

K = TypeVar("K")
V = TypeVar("V")

# Per-entry bookkeeping of the map itself (dict slot, LRU link, the size tuple).
ENTRY_OVERHEAD = 200
# Containers deeper than this are costed as their shallow size (no client sends them:
# depth is limited at the edge; this only keeps the estimate from recursing forever).
_MAX_DEPTH = 32


def approx_size(value: Any, _depth: int = 0) -> int:
    """A cheap estimate of the bytes `value` keeps alive (strings, bytes, containers)."""
    size = sys.getsizeof(value)
    if _depth >= _MAX_DEPTH:
        return size
    if isinstance(value, dict):
        return size + sum(
            approx_size(k, _depth + 1) + approx_size(v, _depth + 1) for k, v in value.items()
        )
    if isinstance(value, list | tuple | set | frozenset):
        return size + sum(approx_size(item, _depth + 1) for item in value)
    return size


class ByteLRU(Generic[K, V]):
    """A map of at most `max_bytes` (estimated) that forgets least recently used entries."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._cache: LRUCache[K, tuple[int, V]] = LRUCache(
            maxsize=self.max_bytes, getsizeof=lambda entry: entry[0]
        )

    def get(self, key: K, default: V | None = None) -> V | None:
        entry = self._cache.get(key)
        return default if entry is None else entry[1]

    def put(self, key: K, value: V, size: int | None = None) -> bool:
        """Remember `value`; False when it alone exceeds the budget (then not kept)."""
        cost = ENTRY_OVERHEAD + approx_size(key) + (approx_size(value) if size is None else size)
        if cost > self.max_bytes:
            self._cache.pop(key, None)
            return False
        self._cache[key] = (cost, value)
        return True

    def pop(self, key: K, default: V | None = None) -> V | None:
        entry = self._cache.pop(key, None)
        return default if entry is None else entry[1]

    def clear(self) -> None:
        """Forget every entry."""
        self._cache.clear()

    def __contains__(self, key: object) -> bool:
        return key in self._cache

    def __len__(self) -> int:
        return len(self._cache)

    def __iter__(self) -> Iterator[K]:
        return iter(self._cache)

    @property
    def bytes(self) -> int:
        """The estimated bytes held now (never more than max_bytes)."""
        return int(self._cache.currsize)
