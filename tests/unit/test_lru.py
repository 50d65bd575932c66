"""The byte-bounded LRU every client-keyed cache uses."""

from __future__ import annotations

from dovecote.util.lru import ByteLRU, approx_size


def test_bounded_by_bytes_not_count() -> None:
    cache: ByteLRU[str, str] = ByteLRU(100_000)
    for i in range(1000):
        cache.put(f"did:example:{i}" + "x" * 1000, "v")
    assert cache.bytes <= 100_000
    assert 50 < len(cache) < 100  # ~1.3 kB per entry


def test_least_recently_used_goes_first() -> None:
    probe: ByteLRU[str, int] = ByteLRU(10_000)
    probe.put("k0", 0)
    cache: ByteLRU[str, int] = ByteLRU(3 * probe.bytes)  # room for exactly three
    for i in range(3):
        cache.put(f"k{i}", i)
    assert cache.get("k0") == 0  # k0 is now the most recent, k1 the least
    cache.put("k3", 3)
    assert "k1" not in cache
    assert {"k0", "k2", "k3"} <= set(cache)


def test_entry_larger_than_budget_is_not_kept() -> None:
    cache: ByteLRU[str, str] = ByteLRU(10_000)
    cache.put("small", "v")
    assert cache.put("big", "x" * 20_000) is False
    assert "big" not in cache and "small" in cache
    assert cache.get("big") is None


def test_key_size_counts() -> None:
    cache: ByteLRU[str, None] = ByteLRU(1_000_000)
    cache.put("d" * 500_000, None)
    assert cache.bytes >= 500_000


def test_approx_size_follows_containers() -> None:
    doc = {"id": "x" * 10_000, "list": ["y" * 5_000]}
    assert approx_size(doc) > 15_000
