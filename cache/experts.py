"""Eviction order for routed experts (late-bound units): which unpinned entries the compute
tier lets go first when it must make room.

Dense units follow the residency plan (cache/policy.py): the resident set is pinned and the rest
streams through a ring, re-read every pass. Routed experts are not in that cycle: a pass reads
only the ones its router picks, and a real router picks some far more often than others, so an
expert that stays after its use is a read saved on a later token.

- "lru": the tier's plain LRU order over every unpinned entry, experts and streamed dense units
  alike (the baseline; a dense model always evicts so).
- "lfru": frequency-weighted LRU. Every unpinned unit, expert or streamed dense unit, by a use
  count that decays with a half-life (in uses; default four per expert of the model), least
  valued first, ties by LRU. A dense unit is used once a pass, more than all but the most
  popular experts, so the ones the plan streams stay when the leftover room holds them (as
  under LRU; letting them go first made a pass read more than LRU's, measured). Each use adds
  2^(t / half_life) at use number t, so comparing the sums compares the decayed counts at any
  later time (the common factor 2^(-now / half_life) cancels), and a use changes only its own
  unit's value.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from typing import Protocol

_RENORM = 2.0 ** 900  # rescale the values before 2^(t / half_life) overflows a float


class EvictionOrder(Protocol):
    name: str

    def set_experts(self, keys: Collection[str]) -> None:
        """The keys of routed experts (late-bound candidates); called when the cache plans
        (the default half-life scales with their number)."""
        ...

    def touch(self, key: str) -> None:
        """A use of key: called on every hit and every insert of the compute tier."""
        ...

    def order(self, keys: list[str]) -> Iterable[str]:
        """Unpinned keys in LRU order (least recent first) -> the order to evict them in."""
        ...


class LRUOrder:
    name = "lru"

    def set_experts(self, keys: Collection[str]) -> None:
        pass

    def touch(self, key: str) -> None:
        pass

    def order(self, keys: list[str]) -> Iterable[str]:
        return keys


class LFRUOrder:
    name = "lfru"

    def __init__(self, half_life: float | None = None) -> None:
        if half_life is not None and half_life <= 0:
            raise ValueError(f"half_life must be > 0, got {half_life}")
        self.fixed_half_life = half_life
        self.half_life = half_life or 1.0
        self.experts: frozenset[str] = frozenset()
        self.value: dict[str, float] = {}  # survives eviction: the history is the point
        self.uses = 0

    def set_experts(self, keys: Collection[str]) -> None:
        self.experts = frozenset(keys)
        if self.fixed_half_life is None:
            self.half_life = 4.0 * max(1, len(self.experts))

    def touch(self, key: str) -> None:
        self.uses += 1
        gain = math.exp2(self.uses / self.half_life)
        if gain > _RENORM:
            self.value = {k: v / gain for k, v in self.value.items()}
            self.uses = 0
            gain = 1.0
        self.value[key] = self.value.get(key, 0.0) + gain

    def order(self, keys: list[str]) -> Iterable[str]:
        if not self.experts:  # a dense model: plain LRU
            return keys
        lru_rank = {k: i for i, k in enumerate(keys)}
        return sorted(keys, key=lambda k: (self.value.get(k, 0.0), lru_rank[k]))

    def decayed_count(self, key: str) -> float:
        """key's use count, each use weighted 2^(-age / half_life) (for tests and stats)."""
        return self.value.get(key, 0.0) / math.exp2(self.uses / self.half_life)


ORDERS = {"lru": LRUOrder, "lfru": LFRUOrder}


def make_order(name: str) -> EvictionOrder:
    try:
        return ORDERS[name]()
    except KeyError:
        raise ValueError(f"unknown expert cache policy {name!r}; choose from "
                         f"{', '.join(ORDERS)}") from None
