"""The cyclic plan's ring against its resident set, and previews that move no pin."""

from stream_run.cache import CacheConfig, PassShape, WeightCache

KEYS = [f"u{i}" for i in range(8)]


def shape():
    return PassShape([(k,) for k in KEYS], lambda k: 100, lambda k: 100)


def test_deeper_ring_streams_more_bytes_per_pass():
    cache = WeightCache(CacheConfig(compute_bytes=600))
    s = shape()
    streamed = [s.streamed_bytes(cache.preview(s, depth)) for depth in (1, 2, 3)]
    assert streamed == [400, 500, 600]  # each ring slot is one resident unit less


def test_preview_moves_no_pin():
    cache = WeightCache(CacheConfig(compute_bytes=600))
    s = shape()
    planned = cache.plan(s, 1)
    for k in planned:
        cache.admit(k, k, 100)
        cache.release(k)  # the consumer's pin; the plan's stays
    assert sorted(cache.compute.pinned()) == sorted(planned)
    assert len(cache.preview(s, 3)) == 2
    assert cache.resident == planned and sorted(cache.compute.pinned()) == sorted(planned)


def test_plan_fills_the_room_the_spread_leaves():
    """Units of two sizes: the even spread and the drop to fit leave room a smaller unit fits
    in; the plan keeps it resident too (each pass reads only what cannot stay)."""
    sizes = {k: (130 if i % 2 else 74) for i, k in enumerate(KEYS)}
    s = PassShape([(k,) for k in KEYS], sizes.get, sizes.get)
    for budget in range(400, 1000, 7):
        cache = WeightCache(CacheConfig(compute_bytes=budget))
        resident = cache.plan(s, 1)
        room = budget - s.ring_bytes(resident, 1)
        kept = sum(sizes[k] for k in resident)
        assert kept <= room
        assert all(sizes[k] > room - kept for k in KEYS if k not in resident)
