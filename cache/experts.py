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
  valued first. A dense unit is used once a pass, more than all but the most popular experts,
  so the ones the plan streams stay when the leftover room holds them (as under LRU; letting
  them go first made a pass read more than LRU's, measured). Each use adds 2^(e / half_life),
  e its use number t rounded down to an epoch of half_life / 8 uses, so comparing the sums
  compares the decayed counts at any later time (the common factor cancels), and a use
  changes only its own unit's value.

  Ties go to the most recently used first (MRU). Units used as often within an epoch are
  worth the same; with a use worth more the later it came (no epochs) and ties by LRU, the
  order among them was recency alone, which is LRU: when every pass picks the same experts
  (a greedy decode looping on one token) and they do not all fit, each read evicted the one
  needed soonest and every pick missed (qwen3-moe-mid, a 4-bit-router stream-convert copy at
  480 MB: 0-10 of 128 picks hit per token for eight tokens). MRU among equals keeps a fixed
  set and lets the rest take turns (21-48 hit on the same run), and a new expert's first use
  still counts less than a popular one's many.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Collection, Iterable, Iterator
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

    def demote(self, key: str) -> None:
        """key's last touch was no use (an expert read on a wrong lookahead guess): it goes
        first. Called by the tier, which also moves it to the LRU end."""
        ...

    def order(self, keys: list[str], present: Collection[str]) -> Iterable[str]:
        """Unpinned keys in LRU order (least recent first) -> the order to evict them in;
        present: every key in the tier, pinned ones too. The tier may stop early."""
        ...


class LRUOrder:
    name = "lru"

    def set_experts(self, keys: Collection[str]) -> None:
        pass

    def touch(self, key: str) -> None:
        pass

    def demote(self, key: str) -> None:
        pass

    def order(self, keys: list[str], present: Collection[str]) -> Iterable[str]:
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
        self.last: dict[str, int] = {}  # each key's last use number (ties: the latest first)
        self.uses = 0
        # (value, -use number, key) per touch; an entry whose value is not the key's current
        # one is stale and skipped: eviction pops the least valued without sorting every key
        self._heap: list[tuple[float, int, str]] = []

    def set_experts(self, keys: Collection[str]) -> None:
        self.experts = frozenset(keys)
        if self.fixed_half_life is None:
            self.half_life = 4.0 * max(1, len(self.experts))

    def touch(self, key: str) -> None:
        if not self.experts:  # a dense model: plain LRU, nothing to count
            return
        self.uses += 1
        epoch = max(1.0, self.half_life / 8)
        gain = math.exp2(math.floor(self.uses / epoch) * epoch / self.half_life)
        if gain > _RENORM:
            self.value = {k: v / gain for k, v in self.value.items()}
            self.last = {k: t - self.uses for k, t in self.last.items()}
            self.uses, gain = 0, 1.0
            self._rebuild()
        value = self.value[key] = self.value.get(key, 0.0) + gain
        self.last[key] = self.uses
        heapq.heappush(self._heap, (value, -self.uses, key))
        if len(self._heap) > 4 * len(self.value) + 64:  # drop the stale entries
            self._rebuild()

    def _rebuild(self) -> None:
        self._heap = [(v, -self.last.get(k, 0), k) for k, v in self.value.items()]
        heapq.heapify(self._heap)

    def demote(self, key: str) -> None:
        if key in self.value:  # its value before the wrong guess's insert is lost: 0
            self.value[key] = 0.0
            heapq.heappush(self._heap, (0.0, -self.last.get(key, 0), key))

    def order(self, keys: list[str], present: Collection[str]) -> Iterable[str]:
        if not self.experts:  # a dense model: plain LRU
            return keys
        return self._ascending(set(keys), present)

    def _ascending(self, keys: set[str], present: Collection[str]) -> Iterator[str]:
        """keys by value, least first, popped lazily: the tier stops once it has room. Entries
        popped for keys it keeps (pinned, in flight) or did not get to evict go back; those
        of keys no longer in the tier are dropped (an insert pushes one again)."""
        heap, value = self._heap, self.value
        back: list[tuple[float, int, str]] = []
        untouched = [k for k in keys if k not in value]  # not expected: every insert touches
        yield from untouched
        keys.difference_update(untouched)
        try:
            while heap:
                entry = heapq.heappop(heap)
                v, _, key = entry
                if value.get(key) != v or key not in present:
                    continue  # stale (a later touch pushed the current value), or evicted
                back.append(entry)
                if key in keys:
                    keys.discard(key)
                    yield key
                    back.pop()  # evicted: a later insert pushes it again
            yield from list(keys)  # none expected: a key in the tier without an entry
        finally:
            for entry in back:
                heapq.heappush(heap, entry)

    def decayed_count(self, key: str) -> float:
        """key's use count, each use weighted 2^(-age / half_life), its time rounded down to
        its epoch (for tests and stats)."""
        return self.value.get(key, 0.0) / math.exp2(self.uses / self.half_life)


ORDERS = {"lru": LRUOrder, "lfru": LFRUOrder}


def make_order(name: str) -> EvictionOrder:
    try:
        return ORDERS[name]()
    except KeyError:
        raise ValueError(f"unknown expert cache policy {name!r}; choose from "
                         f"{', '.join(ORDERS)}") from None
