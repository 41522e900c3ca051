"""Byte-budgeted tiers of the weight cache: LRU order, pins, in-flight reservations, stats.

Synchronous with a single owner (the scheduler's event-loop thread); no asyncio, no I/O.
cachetools' LRUCache is not used: its eviction cannot skip pinned entries or count bytes
reserved for reads still in flight.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from stream_run.cache.errors import BudgetError
from stream_run.cache.experts import ORDERS, EvictionOrder, make_order
from stream_run.cache.policy import POLICIES, PassShape, make_policy


@dataclass(frozen=True)
class CacheConfig:
    """Budgets in bytes; None means unlimited.

    On a CPU backend the compute tier is host RAM already, so the host tier defaults to 0
    (caching raw bytes beside the prepared arrays would hold the same weights twice).
    """

    compute_bytes: int | None = None
    host_bytes: int | None = 0
    policy: str = "cyclic"  # cache/policy.py: which units stay resident
    expert_policy: str = "lfru"  # cache/experts.py: the order routed experts are evicted in
    # not None: compute_bytes is picked when the engine opens, from the memory available,
    # leaving room for a KV cache of this many positions (0: the model's context)
    auto_kv_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"CacheConfig.policy must be one of {', '.join(POLICIES)}, "
                             f"got {self.policy!r}")
        if self.expert_policy not in ORDERS:
            raise ValueError(f"CacheConfig.expert_policy must be one of {', '.join(ORDERS)}, "
                             f"got {self.expert_policy!r}")
        for name in ("compute_bytes", "host_bytes"):
            val = getattr(self, name)
            if val is not None and val < 0:
                raise ValueError(f"CacheConfig.{name} must be >= 0 or None, got {val}")


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    inserted_bytes: int = 0
    peak_bytes: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


@dataclass
class _Entry:
    value: Any
    nbytes: int
    pins: int = 0


@dataclass
class Tier:
    name: str
    budget_bytes: int | None
    stats: TierStats = field(default_factory=TierStats)
    _entries: OrderedDict[str, _Entry] = field(default_factory=OrderedDict)
    used_bytes: int = 0
    reserved_bytes: int = 0
    # the order make_room evicts unpinned entries in (cache/experts.py); None: LRU
    evict_order: EvictionOrder | None = None

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def keys(self) -> list[str]:
        return list(self._entries)

    def get(self, key: str) -> Any | None:
        """Return the value and mark it most recently used; counts a hit or a miss."""
        entry = self._entries.get(key)
        if entry is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        self._entries.move_to_end(key)
        if self.evict_order is not None:
            self.evict_order.touch(key)
        return entry.value

    def demote(self, key: str) -> None:
        """key goes first when room is made (the LRU end; the eviction order's first): its
        last insert was no use (a wrong lookahead guess)."""
        if key in self._entries:
            self._entries.move_to_end(key, last=False)
            if self.evict_order is not None:
                self.evict_order.demote(key)

    def peek(self, key: str) -> Any | None:
        """Return the value without touching LRU order or statistics."""
        entry = self._entries.get(key)
        return None if entry is None else entry.value

    def free_bytes(self) -> float:
        if self.budget_bytes is None:
            return float("inf")
        return self.budget_bytes - self.used_bytes - self.reserved_bytes

    def evictable_bytes(self, keep: Collection[str] = ()) -> int:
        return sum(e.nbytes for k, e in self._entries.items() if e.pins == 0 and k not in keep)

    def can_fit(self, nbytes: int, keep: Collection[str] = ()) -> bool:
        """Whether nbytes fit after evicting every unpinned entry not in keep."""
        return self.free_bytes() + self.evictable_bytes(keep) >= nbytes

    def make_room(self, nbytes: int, keep: Collection[str] = ()) -> list[str]:
        """Evict least recently used unpinned entries (never those in keep) until nbytes fit;
        return the evicted keys.

        Raises:
            BudgetError: not enough can be evicted (pinned entries and reservations).
        """
        if not self.can_fit(nbytes, keep):
            raise BudgetError(
                f"{self.name} tier: cannot fit {nbytes} bytes within budget "
                f"{self.budget_bytes} bytes ({self.used_bytes} resident, "
                f"{self.reserved_bytes} reserved for reads in flight, "
                f"{self.used_bytes - self.evictable_bytes()} pinned)"
            )
        evicted: list[str] = []
        if self.free_bytes() >= nbytes:
            return evicted
        keys = [k for k, e in self._entries.items() if e.pins == 0 and k not in keep]
        for key in keys if self.evict_order is None else self.evict_order.order(
                keys, self._entries):
            if self.free_bytes() >= nbytes:
                break
            if self._entries[key].pins == 0 and key not in keep:
                self.drop(key)
                self.stats.evictions += 1
                evicted.append(key)
        return evicted

    def reserve(self, nbytes: int, keep: Collection[str] = ()) -> None:
        self.make_room(nbytes, keep)
        self.reserved_bytes += nbytes
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.used_bytes + self.reserved_bytes)

    def release(self, nbytes: int) -> None:
        self.reserved_bytes -= nbytes

    def put(self, key: str, value: Any, nbytes: int, pins: int = 0) -> None:
        """Insert (or replace) an entry, evicting LRU unpinned entries to stay in budget."""
        if key in self._entries:
            pins += self._entries[key].pins
            self.drop(key)
        self.make_room(nbytes)
        self._entries[key] = _Entry(value, nbytes, pins)
        if self.evict_order is not None:
            self.evict_order.touch(key)
        self.used_bytes += nbytes
        self.stats.inserted_bytes += nbytes
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.used_bytes + self.reserved_bytes)

    def pin(self, key: str) -> None:
        self._entries[key].pins += 1

    def unpin(self, key: str) -> None:
        entry = self._entries.get(key)
        if entry is None or entry.pins == 0:
            raise RuntimeError(f"{self.name} tier: unpin of {key!r} which is not pinned")
        entry.pins -= 1

    def pinned(self) -> list[str]:
        return [k for k, e in self._entries.items() if e.pins]

    def drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        self.used_bytes -= entry.nbytes

    def clear(self) -> None:
        for key in [k for k, e in self._entries.items() if e.pins == 0]:
            self.drop(key)


class WeightCache:
    """The compute and host tiers (the disk tier is the files themselves), the residency
    policy, and disk stats.

    The scheduler's surface: `plan` (which units stay resident), `reserve` /
    `cancel_reservation` (room for a read in flight), `admit` (a loaded unit, pinned for its
    consumer), `acquire` / `release` (pin a resident unit for a step, and let it go). A
    resident unit holds one extra pin of its own for as long as it stays in the plan.
    """

    def __init__(self, config: CacheConfig) -> None:
        self.config = config
        self.compute = Tier("compute", config.compute_bytes,
                            evict_order=make_order(config.expert_policy))
        self.host = Tier("host", config.host_bytes)
        self.policy = make_policy(config.policy)
        self.resident: set[str] = set()
        self.disk_bytes_read = 0
        self.disk_reads = 0

    def plan(self, shape: PassShape, depth: int, set_aside: int = 0) -> set[str]:
        """Make the policy's plan for passes of this shape at this prefetch depth, and move the
        resident pins to it: units leaving the plan become evictable, units joining it that
        are already loaded stay. set_aside: bytes of the budget the plan leaves out (a pass's
        activations reserved for its duration)."""
        budget = self.compute.budget_bytes
        if self.compute.evict_order is not None:
            self.compute.evict_order.set_experts(
                {k for u in shape.steps if not isinstance(u, tuple) for k in u.candidates})
        new = self.policy.plan(shape, None if budget is None else budget - set_aside, depth)
        for key in self.resident - new:
            if key in self.compute:
                self.compute.unpin(key)
        for key in new - self.resident:
            if key in self.compute:
                self.compute.pin(key)
        self.resident = new
        return new

    def preview(self, shape: PassShape, depth: int) -> set[str]:
        """The policy's plan for this shape at this depth, without moving any pin (to weigh a
        depth before taking it)."""
        return self.policy.plan(shape, self.compute.budget_bytes, depth)

    def reserve(self, nbytes: int, keep: Collection[str] = ()) -> None:
        """Room in the compute tier for a load in flight (evicting unpinned units not in
        keep); raises BudgetError when it cannot fit."""
        self.compute.reserve(nbytes, keep)

    def cancel_reservation(self, nbytes: int) -> None:
        self.compute.release(nbytes)

    def admit(self, key: str, value: Any, nbytes: int) -> None:
        """A loaded unit: pinned once for the step that consumes it, and once more while it is
        in the resident plan."""
        self.compute.put(key, value, nbytes, pins=2 if key in self.resident else 1)

    def acquire(self, key: str) -> Any:
        """A unit in the compute tier, pinned for one step (a hit)."""
        value = self.compute.get(key)
        self.compute.pin(key)
        return value

    def release(self, key: str) -> None:
        self.compute.unpin(key)

    def record_read(self, nbytes: int) -> None:
        self.disk_bytes_read += nbytes
        self.disk_reads += 1
