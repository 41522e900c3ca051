"""What the scheduler runs: Steps, and the UnitLoader that brings their units in."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

Units = tuple[str, ...]


class StepLike(Protocol):
    """One piece of a pass: `run(x, weights) -> y` on the compute thread (Step below is one;
    so is models.base.Call, which the engine hands to the scheduler as it is).

    x is the previous step's output (the pass input for the first step), and weights maps each
    unit to its compute-tier value; the last step's output is the pass's result.

    units: the unit keys, or a function of x that returns them: late-bound units, resolved on
        the event loop once the step before has run (a router's choice of experts). It must be
        cheap: the expensive part of the choice belongs in the step before.
    """

    @property
    def units(self) -> Units | Callable[[Any], Units]: ...

    @property
    def run(self) -> Callable[[Any, Mapping[str, Any]], Any]: ...

    @property
    def name(self) -> str: ...


@dataclass(frozen=True)
class Step:
    """A StepLike as a plain record. A late-bound step may declare the units it picks from
    (candidates) and how many (picks): the budget then keeps room for them."""

    units: Units | Callable[[Any], Units]
    run: Callable[[Any, Mapping[str, Any]], Any]
    name: str = ""
    candidates: Units = ()
    picks: int = 1


def resolve(step: StepLike, x: Any) -> Units:
    """The step's units: as declared, or from the previous output x for a late-bound step."""
    if callable(step.units):
        return tuple(dict.fromkeys(step.units(x)))
    return step.units


class UnitLoader(Protocol):
    """What the scheduler needs to bring a unit into the compute tier (engine provides it)."""

    prepare_off_compute_thread: bool

    def read(self, key: str) -> Any:
        """Read the unit's raw bytes from disk. Called on an I/O thread; blocking."""
        ...

    def prepare(self, key: str, raw: Any) -> tuple[Any, int]:
        """Convert raw bytes to compute form; returns (value, nbytes). Called on the compute
        thread, or on an I/O thread when prepare_off_compute_thread is true."""
        ...

    def expect(self, key: str) -> None:
        """A read of the unit will start soon: room is reserved for it (units were evicted to
        make it). Called on the event loop; the loader may keep memory freed by the eviction
        for that read, and nothing else."""
        ...

    def forget(self, key: str) -> None:
        """The expected read of the unit will not come (its load was cancelled before the
        read started, or the unit came from the host tier). Called on the event loop."""
        ...

    def raw_nbytes(self, key: str) -> int:
        """Bytes read from disk for the unit."""
        ...

    def prepared_nbytes(self, key: str) -> int:
        """Bytes the unit holds in memory once prepared, known before reading it: its compute
        form, and the read buffer too when the compute form views it."""
        ...

    def transient_nbytes(self, key: str) -> int:
        """Bytes held beside those only while the unit is read and prepared: the read buffer
        when the compute form does not view it (0 when it does)."""
        ...
