"""The expert eviction orders (cache/experts.py): plain LRU, and frequency-weighted LRU (lfru)
that lets streamed dense units go first and keeps the experts a router picks most."""

from __future__ import annotations

import numpy as np
import pytest

from stream_run.cache import CacheConfig, Tier, WeightCache
from stream_run.cache.experts import LFRUOrder, LRUOrder, make_order

EXPERTS = [f"layers.0.mlp.experts.{e}" for e in range(8)]


def test_lfru_evicts_the_least_used_unit_first_ties_by_mru():
    """A streamed dense unit used every pass outranks all but the most used experts; units
    used as often in the same epoch go the most recent first."""
    order = LFRUOrder(half_life=1000)
    order.set_experts(EXPERTS)
    for key, n in ((EXPERTS[0], 5), (EXPERTS[1], 1), (EXPERTS[2], 3), ("layers.1", 4),
                   ("layers.3", 1)):
        for _ in range(n):
            order.touch(key)
    lru = [EXPERTS[0], "layers.3", EXPERTS[1], EXPERTS[2], "layers.1", EXPERTS[3]]
    # one use each, in the same epoch: the later one first
    assert list(order.order(lru, lru)) == [EXPERTS[3], "layers.3", EXPERTS[1], EXPERTS[2],
                                           "layers.1", EXPERTS[0]]
    for _ in range(200):  # two epochs later a use is worth more: the older one goes first
        order.touch(EXPERTS[4])
    order.touch(EXPERTS[1])
    order.touch(EXPERTS[5])
    assert list(order.order([EXPERTS[1], "layers.3", EXPERTS[5]], EXPERTS + ["layers.3"]))[
        :2] == ["layers.3", EXPERTS[5]]
    assert list(LRUOrder().order(lru, lru)) == lru
    dense = LFRUOrder()  # a model without experts: plain LRU
    for key in ("layers.1", "layers.1", "layers.0"):
        dense.touch(key)
    assert list(dense.order(["layers.1", "layers.0"], ())) == ["layers.1", "layers.0"]


def test_lfru_counts_decay_so_old_popularity_fades():
    order = LFRUOrder(half_life=2)
    order.set_experts(EXPERTS)
    for _ in range(8):
        order.touch(EXPERTS[0])  # popular long ago
    for _ in range(3):
        order.touch(EXPERTS[1])  # a little, recently
    assert order.decayed_count(EXPERTS[1]) > order.decayed_count(EXPERTS[0])
    assert list(order.order([EXPERTS[1], EXPERTS[0]], EXPERTS)) == [EXPERTS[0], EXPERTS[1]]
    for _ in range(5000):  # values are rescaled before 2^(t / half_life) overflows
        order.touch(EXPERTS[2])
    assert order.decayed_count(EXPERTS[2]) == pytest.approx(1 / (1 - 2 ** -0.5), rel=0.01)
    assert np.isfinite(list(order.value.values())).all()


def test_lfru_order_pops_lazily_as_a_full_sort_would():
    """The heap gives the order of sorting every unpinned key by value; keys the tier keeps
    (pinned) or stops before evicting stay in it; evicted ones leave until inserted again."""
    rng = np.random.default_rng(1)
    keys = [f"layers.{i}.mlp.experts.{e}" for i in range(4) for e in range(16)]
    order = LFRUOrder(half_life=50)
    order.set_experts(keys)
    for _ in range(3):
        for k in rng.choice(keys, 300):
            order.touch(str(k))
        present = [str(k) for k in rng.permutation(keys)[:40]]
        unpinned = present[:30]
        want = sorted(unpinned, key=lambda k: (order.value[k], -order.last[k]))
        gen = iter(order.order(unpinned, present))
        assert [next(gen), next(gen)] == want[:2]
        gen.close()  # the tier had room: the second key was not evicted
        assert list(order.order(unpinned[1:] if want[0] == unpinned[0] else
                                [k for k in unpinned if k != want[0]], present)) == want[1:]


def test_half_life_defaults_to_four_uses_per_expert():
    order = LFRUOrder()
    order.set_experts(EXPERTS)
    assert order.half_life == 32
    with pytest.raises(ValueError, match="unknown expert cache policy 'mru'; choose from lru, "
                                         "lfru"):
        make_order("mru")
    with pytest.raises(ValueError, match="CacheConfig.expert_policy must be one of lru, lfru"):
        CacheConfig(expert_policy="lfu")


def replay(order, trace: list[str], budget_experts: int) -> float:
    """Hit rate of a tier holding budget_experts experts of 1 byte, over the trace."""
    tier = Tier("compute", budget_experts, evict_order=order)
    for key in trace:
        if tier.get(key) is None:
            tier.put(key, key, 1)
    return tier.stats.hit_rate


def test_lfru_beats_lru_on_a_zipf_skewed_trace_and_ties_on_a_uniform_one():
    """64 experts, a quarter of them cached, 8 picked per token: LRU keeps whatever came last,
    LFRU the popular ones."""
    rng = np.random.default_rng(0)
    keys = [f"layers.0.mlp.experts.{e}" for e in range(64)]
    zipf = 1.0 / np.arange(1, 65)
    rates = {}
    for name, p in (("zipf", zipf / zipf.sum()), ("uniform", np.full(64, 1 / 64))):
        trace = [keys[e] for _ in range(2000) for e in rng.choice(64, 8, replace=False, p=p)]
        lfru = LFRUOrder()
        lfru.set_experts(keys)
        rates[name] = (replay(LRUOrder(), trace, 16), replay(lfru, trace, 16))
    lru, lfru_rate = rates["zipf"]
    assert lfru_rate > lru + 0.1, rates
    assert abs(rates["uniform"][1] - rates["uniform"][0]) < 0.03, rates


def test_weight_cache_hands_the_plan_s_experts_to_its_order():
    from stream_run.cache.policy import PassShape

    class Late:
        candidates = tuple(EXPERTS)
        picks = 2

    cache = WeightCache(CacheConfig(compute_bytes=1000, expert_policy="lfru"))
    shape = PassShape([("embed",), ("layers.0",), Late(), ("head",)], lambda k: 10,
                      lambda k: 10)
    cache.plan(shape, depth=2)
    assert cache.compute.evict_order.experts == frozenset(EXPERTS)


@pytest.mark.parametrize("name", ["lfru", "lru"])
def test_a_demoted_unit_is_evicted_first(name):
    """An expert read on a wrong lookahead guess: its insert counted as a use, so the tier
    demotes it once the guess is known wrong, and it is the first to go, however popular it
    was before."""
    tier = Tier("compute", 3, evict_order=make_order(name))
    tier.evict_order.set_experts(EXPERTS)
    for key in EXPERTS[:3]:
        tier.put(key, key, 1)
    for _ in range(5):
        tier.get(EXPERTS[2])  # the most used and the most recent
    tier.demote(EXPERTS[2])
    tier.put(EXPERTS[3], EXPERTS[3], 1)
    assert EXPERTS[2] not in tier and EXPERTS[0] in tier and EXPERTS[1] in tier
    tier.demote("layers.0.mlp.experts.7")  # not in the tier: nothing to do


def test_lfru_keeps_a_fixed_set_when_every_pass_picks_the_same_experts():
    """A greedy decode looping on one token: 16 layers pick the same 8 experts each pass, 128
    in all, and 70 fit. Plain LRU evicts the expert needed soonest every time (no hit);
    LFRU's equals go the most recent first, so most of the 70 stay (keeping 70 fixed would
    hit 70 / 128 = 55 %). Its ties went by LRU before: no hit either."""
    rng = np.random.default_rng(0)
    keys = [f"layers.{i}.mlp.experts.{e}" for i in range(16) for e in range(64)]
    picks = [rng.choice(64, 8, replace=False) for _ in range(16)]
    trace = [f"layers.{i}.mlp.experts.{e}" for _ in range(40) for i in range(16)
             for e in picks[i]]
    lfru = LFRUOrder()
    lfru.set_experts(keys)
    assert replay(LRUOrder(), trace, 70) == 0.0
    assert replay(lfru, trace, 70) > 0.45
