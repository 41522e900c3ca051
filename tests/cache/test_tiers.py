import pytest

from stream_run.cache import BudgetError, CacheConfig, Tier


def test_lru_eviction_by_bytes_skips_pinned():
    t = Tier("compute", budget_bytes=100)
    t.put("a", "A", 40)
    t.put("b", "B", 40)
    t.pin("a")
    t.put("c", "C", 40)  # must evict b (a is pinned even though older)
    assert t.keys() == ["a", "c"]
    assert t.used_bytes == 80
    assert t.stats.evictions == 1


def test_get_updates_recency_and_counts():
    t = Tier("compute", budget_bytes=100)
    t.put("a", 1, 50)
    t.put("b", 2, 50)
    assert t.get("a") == 1
    assert t.get("zz") is None
    t.put("c", 3, 50)  # LRU is now b
    assert "b" not in t and "a" in t
    assert (t.stats.hits, t.stats.misses) == (1, 1)


def test_budget_error_when_pinned_fill_the_tier():
    t = Tier("compute", budget_bytes=100)
    t.put("a", 1, 60, pins=1)
    with pytest.raises(BudgetError, match=r"cannot fit 50 bytes within budget 100 bytes"):
        t.put("b", 2, 50)


def test_reservations_count_against_budget():
    t = Tier("compute", budget_bytes=100)
    t.reserve(70)
    assert not t.can_fit(40)
    t.release(70)
    assert t.can_fit(100)


def test_unpin_of_unpinned_is_an_error():
    t = Tier("compute", budget_bytes=None)
    t.put("a", 1, 10)
    with pytest.raises(RuntimeError, match="not pinned"):
        t.unpin("a")


def test_budget_holds_under_churn():
    t = Tier("compute", budget_bytes=1000)
    for i in range(500):
        t.put(f"u{i}", i, 37 + (i * 7) % 200)
        assert t.used_bytes <= 1000
        assert t.used_bytes == sum(t._entries[k].nbytes for k in t.keys())


def test_config_rejects_negative_budget():
    with pytest.raises(ValueError, match="compute_bytes"):
        CacheConfig(compute_bytes=-1)
