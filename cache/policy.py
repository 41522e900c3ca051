"""Residency policies: which units stay in the compute tier for good, and which stream.

A policy sees the shape of one pass (each step's units, in order, and their sizes) and the
budget; it returns the set to keep resident. The cache pins that set and lets the rest cycle
through the bytes left over. Plain LRU on a cyclic walk evicts exactly the unit needed soonest
and re-reads everything, hence the cyclic default. Later policies (experts held by frequency,
several models on one budget) plan from the same shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol


class LateLike(Protocol):
    """A step whose units are picked at run time: from these candidates, up to picks of them."""

    @property
    def candidates(self) -> tuple[str, ...]: ...

    @property
    def picks(self) -> int: ...


def late_need(late: LateLike, load_size: Callable[[str], int]) -> int:
    """Room a late-bound step may need: picks of its largest candidates."""
    sizes = sorted((load_size(k) for k in late.candidates), reverse=True)
    return sum(sizes[:late.picks])


@dataclass(frozen=True)
class PassShape:
    """What a plan is made from.

    steps: each step's units in pass order; a step whose units are known only at run time
        (late-bound, e.g. routed experts) is a LateLike: its candidates and how many it picks.
    size: bytes a unit holds in the compute tier.
    load_size: bytes a load reserves (the compute form plus raw bytes held while preparing).
    """

    steps: Sequence[tuple[str, ...] | LateLike]
    size: Callable[[str], int]
    load_size: Callable[[str], int]

    @property
    def known(self) -> list[tuple[str, ...]]:
        return [u for u in self.steps if isinstance(u, tuple)]

    @property
    def late_bytes(self) -> int:
        """Room kept free for the largest late-bound step's picks (0 when there is none)."""
        return max((late_need(u, self.load_size) for u in self.steps
                    if not isinstance(u, tuple)), default=0)

    @property
    def order(self) -> list[str]:
        return list(dict.fromkeys(k for units in self.known for k in units))

    @property
    def whole_bytes(self) -> int:
        """The budget that keeps everything resident: all units, plus the raw bytes the last
        load holds while it prepares (its compute form lands beside the others), plus late
        picks; late-bound candidates no step names (routed experts) count too, so they can
        stay once read."""
        order = self.order
        known = set(order)
        only_late = {k for u in self.steps if not isinstance(u, tuple)
                     for k in u.candidates if k not in known}
        transient = max((self.load_size(k) - self.size(k) for k in order), default=0)
        return (sum(self.size(k) for k in order) + sum(self.size(k) for k in only_late)
                + transient + self.late_bytes)

    def fits_whole(self, budget: int) -> bool:
        """Everything can stay resident within budget (whole_bytes)."""
        return self.whole_bytes <= budget

    def streamed_bytes(self, resident: set[str]) -> int:
        """Bytes a pass reads with this resident set: every known unit not in it, once (a
        late-bound step's picks are not counted: they do not depend on the depth)."""
        return sum(self.size(k) for k in self.order if k not in resident)

    def ring_bytes(self, resident: set[str], depth: int) -> int:
        """Room the streamed units need: depth + 1 of the largest, and at least one step;
        plus the room a late-bound step's picks may take."""
        known = self.known
        streamed = [self.load_size(k) for u in known for k in u if k not in resident]
        step_need = max((sum(self.load_size(k) for k in set(u) - resident) for u in known),
                        default=0)
        return max(step_need, (depth + 1) * max(streamed, default=0)) + self.late_bytes


class ResidencyPolicy(Protocol):
    name: str

    def plan(self, shape: PassShape, budget: int | None, depth: int) -> set[str]:
        """The units to keep resident. Called when the engine opens a model and again when the
        prefetch depth changes (a deeper window needs a larger ring)."""
        ...


class CyclicPolicy:
    """A fixed set stays pinned and the rest streams through a ring of (depth + 1) slots, so
    disk bytes per pass = streamed bytes. Units used more than once per pass (a tied embedding)
    go first; streamed blocks are spread evenly so their reads hide behind the compute of the
    resident blocks between them."""

    name = "cyclic"

    def plan(self, shape: PassShape, budget: int | None, depth: int) -> set[str]:
        order, size = shape.order, shape.size
        if budget is None or shape.fits_whole(budget):
            return set(order)
        uses = {k: sum(k in u for u in shape.known) for k in order}
        resident: set[str] = set()
        for k in sorted(order, key=lambda k: -uses[k]):
            if uses[k] > 1 and size(k) + shape.ring_bytes(resident | {k}, depth) <= budget:
                resident.add(k)
        ring = shape.ring_bytes(resident, depth)
        room = budget - ring - sum(size(k) for k in resident)
        rest = [k for k in order if k not in resident]
        smallest_first = sorted(map(size, rest))
        n_keep = sum(1 for i in range(len(rest)) if sum(smallest_first[: i + 1]) <= room)
        n_stream = len(rest) - n_keep
        streamed = {rest[int((i + 0.5) * len(rest) / n_stream)] for i in range(n_stream)}
        resident |= set(rest) - streamed
        return _fill(_fit(resident, order, size, budget - ring), order, size, budget - ring)


class LRUPolicy:
    """Nothing pinned unless the whole model fits: every unit competes in LRU order (a
    baseline for the cyclic policy, and the right one for access patterns that do not cycle)."""

    name = "lru"

    def plan(self, shape: PassShape, budget: int | None, depth: int) -> set[str]:
        if budget is None or shape.fits_whole(budget):
            return set(shape.order)
        return set()


POLICIES: dict[str, type[CyclicPolicy] | type[LRUPolicy]] = {
    "cyclic": CyclicPolicy, "lru": LRUPolicy}


def make_policy(name: str) -> ResidencyPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown cache policy {name!r}; choose from "
                         f"{', '.join(POLICIES)}") from None


def _fit(keys: set[str], order: list[str], size: Callable[[str], int], room: int) -> set[str]:
    """Drop keys (last in order first) until their sizes fit in room."""
    keep = set(keys)
    for k in reversed(order):
        if sum(size(x) for x in keep) <= room:
            break
        keep.discard(k)
    return keep


def _fill(keys: set[str], order: list[str], size: Callable[[str], int], room: int) -> set[str]:
    """Add units not in keys, largest first, while they fit in what room has left: every byte
    left over is a byte each pass reads that it need not (the even spread counts units and
    _fit drops whole ones, which left up to a unit's bytes unused)."""
    keep = set(keys)
    left = room - sum(size(k) for k in keep)
    for k in sorted((k for k in order if k not in keep), key=size, reverse=True):
        if size(k) <= left:
            keep.add(k)
            left -= size(k)
    return keep
