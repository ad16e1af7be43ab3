"""cluster.bounded: a cache bounded in entries and in bytes."""

from __future__ import annotations

from cluster.bounded import ENTRY_OVERHEAD, BoundedCache


def test_the_oldest_entries_go_past_the_entry_bound():
    cache = BoundedCache(max_entries=3, max_bytes=10**9)
    for n in range(5):
        cache.put(n, str(n), 10)
    assert cache.items() == [(2, "2"), (3, "3"), (4, "4")]
    assert cache.bytes == 3 * (10 + ENTRY_OVERHEAD)


def test_the_oldest_entries_go_past_the_byte_bound_whatever_their_count():
    cache = BoundedCache(max_entries=10**6, max_bytes=10 * (1000 + ENTRY_OVERHEAD))
    for n in range(100):
        cache.put(n, b"x", 1000)
    assert len(cache) == 10 and cache.oldest() == (90, b"x")
    cache.put("huge", b"y", 10**6)  # alone over the bound: not kept
    assert len(cache) == 0 and cache.bytes == 0


def test_replacing_pop_and_clear_keep_the_count_of_bytes():
    cache = BoundedCache(max_entries=10, max_bytes=10**6)
    cache.put("a", 1, 100)
    cache.put("b", 2, 50)
    cache.put("a", 3, 10)  # replaced: the newest now, charged its new size
    assert cache.items() == [("b", 2), ("a", 3)]
    assert cache.bytes == 60 + 2 * ENTRY_OVERHEAD
    assert cache.pop("b") == 2 and cache.pop("b", "none") == "none"
    assert cache.bytes == 10 + ENTRY_OVERHEAD and "a" in cache and cache.get("a") == 3
    cache.pop_oldest()
    assert not cache and cache.bytes == 0 and cache.oldest() is None
    cache.put("c", 1, 5)
    cache.clear()
    assert len(cache) == 0 and cache.bytes == 0
