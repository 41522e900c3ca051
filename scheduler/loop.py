"""The asyncio layer loop: acquire each step's units, prefetch the next ones, run compute.

A forward pass is a list of Steps (embed, each block, head); each step's output is the next
one's input, and the last one's is the pass's result. For step i the scheduler awaits its units
in the compute tier, runs the step on the single compute thread, and meanwhile keeps reads for
the units of the next depth steps in flight on the I/O pool. Steps after i whose units are
already in the tier run in the same compute-thread call (no await between them). A late-bound
step's units are resolved from the previous step's output when the pass reaches it.

Which units stay resident is the cache's policy (cache/policy.py); the scheduler hands it the
shape of a pass and asks again when the prefetch depth changes.
"""

from __future__ import annotations

import asyncio
import collections
import statistics
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from stream_run.cache import PassShape, WeightCache
from stream_run.cache.policy import LateLike, late_need
from stream_run.scheduler.step import StepLike, UnitLoader, Units, resolve


def _run_steps(calls: Sequence[tuple[StepLike, Units]], x: Any, weights: dict[str, Any],
               settle: Callable[[Any], None] | None = None
               ) -> tuple[Any, list[tuple[float, float]]]:
    """Run (step, its units) in order on the compute thread, each on the previous one's
    output; returns the last output and each step's (start, end) time. The last output, if
    any, goes to settle (once per call, not per step).

    weights is emptied before returning: the executor's work item keeps its arguments until
    after the result is set, and by then the event loop may evict these units and read into
    their buffers, which must be free (a unit kept alive here held its buffer outside the
    budget)."""
    times = []
    try:
        for step, units in calls:
            t0 = time.perf_counter()
            x = step.run(x, {k: weights[k] for k in units})
            times.append((t0, time.perf_counter()))
        if settle is not None and x is not None:
            settle(x)
    finally:
        weights.clear()
    return x, times


def _prepare_boxed(prepare: Callable[[str, Any], tuple[Any, int]], key: str, box: list[Any]
                   ) -> tuple[Any, int]:
    """prepare(key, raw) with raw taken out of box: the executor's work item, which outlives
    the call, holds only the empty box, not the read buffer (free once prepare returns)."""
    return prepare(key, box.pop())


# LayerScheduler.unit_states' letters
UNIT_STATES = {
    "c": "computing (its step runs on the compute thread)",
    "r": "reading (its load is in flight)",
    "R": "resident (in the compute tier, kept there by the residency plan)",
    "s": "streamed (in the compute tier for now; the plan does not keep it)",
    "h": "in the host-RAM tier only",
    "-": "on disk only",
}


TRIAL_COOLDOWN = 64  # passes a failed deepening keeps the depth below its trial's
STALL_WINDOW = 4  # steady passes whose stalls decide a deepening (all but one must stall)


@dataclass(frozen=True)
class SchedulerConfig:
    """prefetch_depth: steps read ahead to start with. adaptive: deepen by one when compute
    waited on reads for more than 5 % of its time in 3 of the last 4 passes, up to
    max_prefetch_depth, when the deeper window pays (LayerScheduler._deeper_pays: its ring
    slot is free, or the disk sat idle long enough to read what the plan would stop keeping
    resident); a deepening that costs resident units is undone if it did not halve the stall
    (LayerScheduler._adapt)."""

    prefetch_depth: int = 2
    io_workers: int = 8
    adaptive: bool = True
    max_prefetch_depth: int = 16

    def __post_init__(self) -> None:
        if not 0 <= self.prefetch_depth <= 16:
            raise ValueError(f"prefetch_depth must be in 0..16, got {self.prefetch_depth}")
        if not self.prefetch_depth <= self.max_prefetch_depth <= 16:
            raise ValueError(f"max_prefetch_depth must be in prefetch_depth..16, got "
                             f"{self.max_prefetch_depth}")
        if not 1 <= self.io_workers <= 64:
            raise ValueError(f"io_workers must be in 1..64, got {self.io_workers}")


@dataclass
class RunStats:
    """Timings and bytes of one scheduler run (one forward pass)."""

    compute_s: float = 0.0
    io_stall_s: float = 0.0  # compute thread idle, waiting for units
    read_s: float = 0.0  # summed over reads (may exceed wall time when reads overlap)
    prepare_s: float = 0.0
    prefetch_depth: int = 0
    bytes_read: int = 0
    units_read: int = 0
    resident_reads: int = 0  # reads of units the plan keeps resident (a warm-up pass)
    hits: int = 0
    misses: int = 0
    # the units of late-bound steps (routed experts): acquisitions and bytes read for them
    late_hits: int = 0
    late_misses: int = 0
    late_bytes_read: int = 0
    # expert lookahead (a late-bound step's guessed units, read before its router ran):
    # guesses read, those the step then picked, and the bytes read for the others
    lookahead_reads: int = 0
    lookahead_used: int = 0
    lookahead_wasted_bytes: int = 0
    scratch_over_bytes: int = 0  # activations that did not fit in the budget beside a step
    wall_s: float = 0.0
    disk_busy_s: float = 0.0  # wall time with at least one read in flight
    # (kind, label, start, end) with kind "read" | "compute", perf_counter seconds
    intervals: list[tuple[str, str, float, float]] = field(default_factory=list)

    def add(self, other: RunStats) -> None:
        self.prefetch_depth = max(self.prefetch_depth, other.prefetch_depth)
        self.intervals.extend(other.intervals)
        self.scratch_over_bytes = max(self.scratch_over_bytes, other.scratch_over_bytes)
        for name in ("compute_s", "io_stall_s", "read_s", "prepare_s", "bytes_read",
                     "units_read", "resident_reads", "hits", "misses", "wall_s",
                     "disk_busy_s", "late_hits", "late_misses", "late_bytes_read",
                     "lookahead_reads", "lookahead_used", "lookahead_wasted_bytes"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class _Load:
    """One unit's load in flight: the bytes reserved for it, and whether its read started."""

    key: str
    nbytes: int
    reserved: bool = True
    started: bool = False


@dataclass
class _RunState:
    stats: RunStats
    held: list[str] = field(default_factory=list)  # pins owned by this run


class LayerScheduler:
    """Runs forward passes as step lists; owns the I/O pool, the compute thread and the
    prefetch window. The cache is touched only from the event loop thread."""

    def __init__(self, cache: WeightCache, loader: UnitLoader, config: SchedulerConfig,
                 compute_init: Callable[[], None] | None = None,
                 settle: Callable[[Any], None] | None = None) -> None:
        """compute_init runs once on the compute thread before any step (e.g. to give the
        thread its own MLX stream). settle(result) runs on the compute thread at the end of
        each compute call, with the result of its last step (MLX: start evaluating it, so the
        arrays of a unit released after the call are consumed; once per call rather than per
        step, since every mx.async_eval costs about as much as a small block on a GPU)."""
        self.cache = cache
        self._settle = settle
        self.loader = loader
        self.config = config
        self.record_intervals = False
        self._io = ThreadPoolExecutor(config.io_workers, thread_name_prefix="stream-io")
        self._compute = ThreadPoolExecutor(1, thread_name_prefix="stream-compute",
                                           initializer=compute_init)
        self._inflight: dict[str, asyncio.Task[RunStats]] = {}
        self._shape: PassShape | None = None  # the pass the residency plan was made for
        self.depth = config.prefetch_depth  # current prefetch depth (adaptive)
        # a deepening that gave up resident bytes, on trial: (the depth before, the median
        # stall of the window that asked for it); the depth a deepening may not pass, with the
        # passes left before it may be tried again; the last steady passes' stalls, negative
        # where they were within 5 % of compute (_adapt)
        self._trial: tuple[int, float] | None = None
        self._cap, self._cap_passes = config.max_prefetch_depth, 0
        self._stalls: collections.deque[float] = collections.deque(maxlen=STALL_WINDOW)
        self._reading = 0  # reads in flight, and the disk's busy time (_disk_busy)
        self._busy_from = 0.0
        self._busy_s = 0.0
        # a watcher (engine.monitor) told, on the event loop, as each compute call starts, with
        # the units it computes; None: nobody watches (one attribute test per call)
        self.observer: Callable[[Sequence[str]], None] | None = None
        self._computing: tuple[str, ...] = ()
        # expert lookahead: guessed units whose loads started (their bytes), and wrong guesses
        # whose loads still hold their pin (released once done: _sweep_guesses)
        self._guessed: dict[str, int] = {}
        self._orphans: set[str] = set()

    @property
    def resident(self) -> set[str]:
        """Units kept pinned across passes (the cache's plan)."""
        return self.cache.resident

    def unit_states(self, keys: Sequence[str]) -> str:
        """A snapshot of where each unit is, one letter per key (call on the event loop, e.g.
        from the observer; cheap: set lookups). UNIT_STATES names the letters."""
        tier, host, plan, computing = (self.cache.compute, self.cache.host, self.cache.resident,
                                       set(self._computing))

        def state(key: str) -> str:
            if key in computing:
                return "c"
            load = self._inflight.get(key)
            if load is not None and not load.done():
                return "r"
            if key in tier:
                return "R" if key in plan else "s"
            return "h" if key in host else "-"

        return "".join(state(k) for k in keys)

    def plan_residency(self, steps: Sequence[Units | LateLike]) -> set[str]:
        """Ask the cache's policy which units stay resident when passes of these steps (each
        step's units in order; a late-bound step as its candidates and picks) are walked
        cyclically, for the current prefetch depth. Asked again whenever the depth changes."""
        self._shape = PassShape(list(steps), self.loader.prepared_nbytes, self._load_bytes)
        return self.cache.plan(self._shape, self.depth)

    def _load_bytes(self, key: str) -> int:
        """Bytes a load reserves: the compute form plus raw bytes held while preparing."""
        return self.loader.prepared_nbytes(key) + self.loader.transient_nbytes(key)

    def min_budget_bytes(self, steps: Sequence[Units | LateLike]) -> int:
        """The smallest compute budget that can run these steps (the largest step's units,
        with the raw bytes their loads hold while preparing; a late-bound step's largest
        picks)."""
        return max(sum(self._load_bytes(k) for k in set(units)) if isinstance(units, tuple)
                   else late_need(units, self._load_bytes) for units in steps)

    def call_on_compute(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn on the compute thread and wait for it (set-up before any pass, from a thread
        that is not running the event loop)."""
        return self._compute.submit(fn, *args).result()

    def whole_bytes(self, steps: Sequence[Units | LateLike]) -> int:
        """The smallest compute budget that keeps every unit of these steps resident."""
        return PassShape(list(steps), self.loader.prepared_nbytes, self._load_bytes).whole_bytes

    async def run_on_compute(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn on the compute thread (for work outside a step list, e.g. sampling)."""
        return await asyncio.get_running_loop().run_in_executor(self._compute, fn, *args)

    async def run(self, steps: Sequence[StepLike], x: Any = None, cyclic: bool = False,
                  scratch_bytes: int = 0) -> tuple[Any, RunStats]:
        """Run the steps in order with prefetch, the first on x and each on the output of the
        one before; returns the last step's output and the run's stats. On error or
        cancellation, in-flight reads are cancelled and awaited and every pin taken by this
        run is released.

        cyclic: another pass over the same units follows (decoding), so the prefetch window
        wraps around into it and reads for its first units stay in flight when this run ends.
        scratch_bytes: memory the steps' computation takes beside the weights (a prefill
        chunk's activations), reserved in the compute tier for the run: the residency plan
        shrinks for it and units are evicted to make room. Capped so the largest step's units
        still fit (what is left is over the budget, stats.scratch_over_bytes).
        """
        stats = RunStats(prefetch_depth=self.depth)
        rs = _RunState(stats)
        t_run, busy0 = time.perf_counter(), self._disk_busy()
        compute_future: asyncio.Future[Any] | None = None
        carry: set[str] = set()  # loads for the next pass, left in flight on success
        loop = asyncio.get_running_loop()
        scratch = self._reserve_scratch(steps, scratch_bytes)
        if self.cache.compute.budget_bytes is not None:  # no budget: nothing to exceed
            stats.scratch_over_bytes = scratch_bytes - scratch
        try:
            idx = 0
            # each step's units known before the pass (none for a late-bound one), and the
            # room a late-bound step's picks may need (kept free by prefetches before it)
            known: list[Units] = [() if callable(s.units) else s.units for s in steps]
            late = [0 if known[i] else self._late_room(s) for i, s in enumerate(steps)]
            while idx < len(steps):
                units = resolve(steps[idx], x)  # late-bound: from the previous output
                if callable(steps[idx].units):
                    self._settle_guesses(units, rs)
                self._schedule(known, late, idx, cyclic, units,
                               getattr(x, "lookahead", ()), stats)
                t0 = time.perf_counter()
                before = (stats.hits, stats.misses, stats.bytes_read)
                weights = {k: await self._acquire(k, rs, units) for k in units}
                if callable(steps[idx].units):
                    stats.late_hits += stats.hits - before[0]
                    stats.late_misses += stats.misses - before[1]
                    stats.late_bytes_read += stats.bytes_read - before[2]
                end = self._resident_run_end(steps, known, idx + 1)
                calls = [(steps[idx], units)] + [(steps[i], known[i]) for i in range(idx + 1, end)]
                for _, more in calls[1:]:  # hits: pinned now, run in the same call
                    weights.update((k, self._acquire_hit(k, rs)) for k in more)
                t1 = time.perf_counter()
                stats.io_stall_s += t1 - t0
                self._schedule(known, late, end, cyclic)
                if self.observer is not None:
                    self._computing = tuple(k for _, held in calls for k in held)
                    self.observer(self._computing)
                compute_future = loop.run_in_executor(self._compute, _run_steps, calls, x,
                                                      weights, self._settle)
                x, times = await asyncio.shield(compute_future)
                compute_future, self._computing = None, ()
                stats.compute_s += time.perf_counter() - t1
                if self.record_intervals:
                    stats.intervals += [("compute", step.name, a, b)
                                        for (step, _), (a, b) in zip(calls, times, strict=True)]
                for _, held in calls:
                    for k in held:
                        rs.held.remove(k)
                        self.cache.release(k)
                # Let go of the steps' weights now: the next schedule may evict them, and a
                # unit kept alive here would hold its read buffer outside the budget.
                weights = {}
                idx = end
            self._settle_guesses((), rs)  # guesses for a step that never came are wrong
            stats.wall_s = time.perf_counter() - t_run
            stats.disk_busy_s = self._disk_busy() - busy0
            self._adapt(stats)
            carry = set(self._inflight) if cyclic else set()
        finally:
            if compute_future is not None:  # a cancelled run finishes its compute call
                await asyncio.gather(compute_future, return_exceptions=True)
            self._computing = ()
            await self._cancel_inflight(keep=carry)
            self._orphans &= carry
            self._guessed.clear()
            for k in rs.held:
                self.cache.release(k)
            if scratch:
                self.cache.cancel_reservation(scratch)
                if self._shape is not None:
                    self.cache.plan(self._shape, self.depth)
        return x, stats

    def _reserve_scratch(self, steps: Sequence[StepLike], nbytes: int) -> int:
        """Reserve up to nbytes in the compute tier for a run's activations, leaving room for
        its largest step; returns what was reserved (0 without a budget)."""
        tier = self.cache.compute
        if nbytes <= 0 or tier.budget_bytes is None:
            return 0
        need = self.min_budget_bytes([self._late_or_units(s) for s in steps])
        nbytes = min(nbytes, max(0, tier.budget_bytes - need))
        if self._shape is not None:
            self.cache.plan(self._shape, self.depth, set_aside=nbytes)
        nbytes = min(nbytes, max(0, int(tier.free_bytes()) + tier.evictable_bytes()))
        if nbytes:
            self.cache.reserve(nbytes)
        return nbytes

    def _late_or_units(self, step: StepLike) -> Units | LateLike:
        if not callable(step.units):
            return step.units
        return step if getattr(step, "candidates", ()) else ()  # type: ignore[return-value]

    def _adapt(self, stats: RunStats) -> None:
        """Read further ahead after a pass in which compute waited on reads, if that pays; the
        residency plan is remade for the deeper window (its ring of streamed slots grows).

        A stall is a reason only when it is the rule: in STALL_WINDOW - 1 of the last
        STALL_WINDOW steady passes (no resident reads). A deepening that gives up resident
        bytes is then a trial: the next steady pass must stall at most half the window's
        median, else the depth goes back and stays below the trial's for TRIAL_COOLDOWN
        passes. With one pass deciding, stall spikes of single passes on a loaded machine
        (0.3 ms typical, 22-73 ms once) deepened a SmolLM2 at 75 MB from 3 to 10 over six
        requests while its reads per token grew from 31 to 46 MB."""
        if not self.config.adaptive or not stats.units_read:
            return
        if self._cap_passes > 0:
            self._cap_passes -= 1
            if self._cap_passes == 0:
                self._cap = self.config.max_prefetch_depth
        if stats.resident_reads:
            return  # a warm-up pass (a new plan's first) says nothing about the ring
        if self._trial is not None:
            before, stall = self._trial
            self._trial = None
            if stats.io_stall_s > 0.5 * stall:
                self.depth, self._cap, self._cap_passes = before, before, TRIAL_COOLDOWN
                if self._shape is not None:
                    self.cache.plan(self._shape, self.depth)
                return
        stalled = stats.io_stall_s > 0.05 * stats.compute_s
        self._stalls.append(stats.io_stall_s if stalled else -stats.io_stall_s)
        if (self.depth < min(self.config.max_prefetch_depth, self._cap) and stalled
                and sum(s > 0 for s in self._stalls) >= STALL_WINDOW - 1
                and (self._shape is None or self._deeper_pays(self._shape, stats))):
            if self._shape is not None and self._gives_up_resident(self._shape):
                self._trial = (self.depth, statistics.median(abs(s) for s in self._stalls))
            self._stalls.clear()
            self.depth += 1
            if self._shape is not None:
                self.cache.plan(self._shape, self.depth)

    def _gives_up_resident(self, shape: PassShape) -> bool:
        """Whether the plan at depth + 1 streams more bytes than the plan at depth."""
        return (shape.streamed_bytes(self.cache.preview(shape, self.depth + 1))
                > shape.streamed_bytes(self.cache.preview(shape, self.depth)))

    def _deeper_pays(self, shape: PassShape, stats: RunStats) -> bool:
        """Whether one more step of prefetch is worth its ring slot, judged on the pass just run.

        Free when the plan at depth + 1 keeps as many bytes resident. Otherwise every pass
        would also read the units the plan gives up, and a deeper window only starts reads
        earlier: it can hide at most the stall during which the disk sat idle (no read in
        flight), which must be twice the time to read those units. A pass whose disk was busy
        throughout waited on the disk, not on the window, so the depth stays (deepening there
        shrank the resident set and read more per token).
        """
        extra = (shape.streamed_bytes(self.cache.preview(shape, self.depth + 1))
                 - shape.streamed_bytes(self.cache.preview(shape, self.depth)))
        if extra <= 0:
            return True
        if stats.resident_reads or stats.disk_busy_s <= 0 or stats.bytes_read <= 0:
            return False  # a warm-up pass (the first) also reads the resident set: not the ring
        idle_s = max(0.0, stats.wall_s - stats.disk_busy_s)
        rate = stats.bytes_read / stats.disk_busy_s  # bytes/s while reading
        # twice: the gain is an upper bound, and one pass's timing is noisy (on a loaded
        # machine an f16 7B deepened 2 -> 4 on 0.1-0.3 s gaps, for no gain measured)
        return min(stats.io_stall_s, idle_s) > 2 * extra / rate

    def _disk_busy(self) -> float:
        """Seconds so far with at least one read in flight (as the event loop sees them)."""
        return self._busy_s + (time.perf_counter() - self._busy_from if self._reading else 0.0)

    def _count_read(self, start: bool) -> None:
        now = time.perf_counter()
        if start:
            if not self._reading:
                self._busy_from = now
            self._reading += 1
            return
        self._reading -= 1
        if not self._reading:
            self._busy_s += now - self._busy_from

    def _late_room(self, step: StepLike) -> int:
        """Room a late-bound step declares it may need (Step.candidates, Step.picks; 0 when
        it declares no candidates)."""
        if not getattr(step, "candidates", ()):
            return 0
        return late_need(step, self._load_bytes)  # type: ignore[arg-type]

    def _schedule(self, known: Sequence[Units], late: Sequence[int], start: int,
                  cyclic: bool = False, current: Units = (), guesses: Units = (),
                  stats: RunStats | None = None) -> None:
        """Start loads for the units of steps start..start+depth, in order, while they fit.

        Loads start in step order and stop at the first unit that does not fit, and a load
        never evicts a unit of the window, so a prefetch is never in the way of an earlier step.
        A late-bound step's units are not known yet and are skipped (current: the resolved
        units of steps[start], kept too); loads past one leave room for its picks.
        guesses: units a later late-bound step is guessed to pick (expert lookahead), loaded
        last, into the room kept for that step's picks, when the window's loads all started.
        """
        tier = self.cache.compute
        idx = list(range(start, min(start + self.depth + 1, len(known))))
        if cyclic:  # the next pass walks the same units: read its first ones early
            idx += list(range(min(start, max(0, start + self.depth + 1 - len(known)))))
        keep = {k for i in idx for k in known[i]} | set(current)
        room_for_late = 0  # the steps ahead's late-bound picks, still to come
        resolved = start if current else -1  # its picks are `current`, loading first
        for units, late_room in [(current, 0), *((known[i], 0 if i == resolved else late[i])
                                                 for i in idx)]:
            room_for_late += late_room
            for key in units:
                if key in tier or key in self._inflight:
                    continue
                if not tier.can_fit(self._load_bytes(key) + room_for_late, keep):
                    return
                self._start_load(key, keep)
        # the guessed step's own room (the first late-bound step after start) takes them
        later = [late[i] for i in idx if i != resolved and late[i]]
        room_for_late -= later[0] if later else 0
        for key in guesses:
            if key in tier or key in self._inflight:
                continue
            if not tier.can_fit(self._load_bytes(key) + room_for_late, keep):
                return
            self._start_load(key, keep)
            self._guessed[key] = self.loader.raw_nbytes(key)
            if stats is not None:
                stats.lookahead_reads += 1

    def _settle_guesses(self, picked: Units, rs: _RunState) -> None:
        """A late-bound step resolved to `picked`: its guessed loads that it picked are
        used (its acquire takes their pin); the others are wrong, their pins released as
        their loads end (_sweep_guesses), their bytes counted as wasted."""
        if self._guessed:
            chosen = set(picked)
            for key, nbytes in self._guessed.items():
                if key in chosen:
                    rs.stats.lookahead_used += 1
                else:
                    rs.stats.lookahead_wasted_bytes += nbytes
                    self._orphans.add(key)
            self._guessed.clear()
        self._sweep_guesses(rs)

    def _sweep_guesses(self, rs: _RunState) -> None:
        """Release the pins of wrong guesses whose loads ended (the unit stays cached,
        unpinned); their read stats go to this run."""
        self._orphans &= self._inflight.keys()  # cancelled and released with the others
        for key in [k for k in self._orphans if self._inflight[k].done()]:
            self._orphans.discard(key)
            task = self._inflight.pop(key)
            if not task.cancelled() and task.exception() is None:
                read = task.result()
                rs.stats.add(read)
                rs.stats.late_bytes_read += read.bytes_read  # routed experts' bytes too
                self.cache.release(key)
                self.cache.compute.demote(key)  # its insert counted as a use: undo that

    def _resident_run_end(self, steps: Sequence[StepLike], known: Sequence[Units],
                          start: int) -> int:
        """End of the run of steps from start whose units are all in the compute tier and not
        loading: they need no await, so they run in the same compute call as the step before
        (one thread hop per run instead of per step, which matters when the model fits)."""
        tier, end = self.cache.compute, start
        while end < len(steps) and not callable(steps[end].units) and all(
                k in tier and k not in self._inflight for k in known[end]):
            end += 1
        return end

    def _acquire_hit(self, key: str, rs: _RunState) -> Any:
        """A unit already in the compute tier, pinned for the current step (or run of steps)."""
        value = self.cache.acquire(key)
        rs.stats.hits += 1
        rs.held.append(key)
        return value

    def _start_load(self, key: str, keep: Collection[str] = ()) -> None:
        """Reserve room for the unit's load (evicting what must go), tell the loader a read is
        coming (so a buffer freed by the eviction waits for it), and start the load."""
        load = _Load(key, self._load_bytes(key))
        self.cache.reserve(load.nbytes, keep)
        self.loader.expect(key)
        task = asyncio.get_running_loop().create_task(self._load(load))
        # also when the task is cancelled before it runs (its finally would never run)
        task.add_done_callback(lambda _: self._end_load(load))
        self._inflight[key] = task

    def _end_load(self, load: _Load) -> None:
        """Give back what a load still holds: its reservation, and the loader's expectation
        of a read that never started."""
        if load.reserved:
            load.reserved = False
            self.cache.cancel_reservation(load.nbytes)
        if not load.started:
            load.started = True
            self.loader.forget(load.key)

    async def _acquire(self, key: str, rs: _RunState, keep: Collection[str]) -> Any:
        """The unit's compute-tier value, pinned once for the current step.

        A load task stays in the in-flight map until its step consumes it, so a failed
        prefetch surfaces here instead of being silently retried.
        """
        tier = self.cache.compute
        task = self._inflight.get(key)
        self._orphans.discard(key)  # a wrong guess picked later: its pin is this step's
        if task is None:
            if key in tier:
                return self._acquire_hit(key, rs)
            self._start_load(key, keep)  # raises BudgetError if it cannot fit
            task = self._inflight[key]
        else:
            tier.stats.misses += 1
        rs.stats.misses += 1
        rs.stats.add(await asyncio.shield(task))
        del self._inflight[key]
        rs.held.append(key)  # the load's pin becomes this step's pin
        return tier.peek(key)

    async def _load(self, load: _Load) -> RunStats:
        """Read and prepare one unit into the compute tier, pinned once for its consumer.

        Returns the read's statistics; the run that consumes the unit adds them to its own
        (a load carried over from the previous pass counts in the pass that uses it).
        """
        loop = asyncio.get_running_loop()
        stats = RunStats()
        key = load.key

        def read() -> Any:
            load.started = True  # on the I/O thread, before the read takes a buffer
            return self.loader.read(key)

        try:
            raw = self.cache.host.get(key)
            if raw is None:
                t0 = time.perf_counter()
                self._count_read(True)
                try:
                    raw = await loop.run_in_executor(self._io, read)
                finally:
                    self._count_read(False)
                t1 = time.perf_counter()
                nbytes = self.loader.raw_nbytes(key)
                stats.read_s += t1 - t0
                stats.bytes_read += nbytes
                stats.units_read += 1
                stats.resident_reads += key in self.cache.resident
                self.cache.record_read(nbytes)
                if self.record_intervals:
                    stats.intervals.append(("read", key, t0, t1))
                if self.cache.host.can_fit(nbytes):
                    self.cache.host.put(key, raw, nbytes)
            else:  # a host-tier hit: no read will take a buffer
                load.started = True
                self.loader.forget(key)
            pool = self._io if self.loader.prepare_off_compute_thread else self._compute
            t2 = time.perf_counter()
            box = [raw]
            del raw  # the read buffer goes back to the pool unless the value views it
            value, nbytes = await loop.run_in_executor(pool, _prepare_boxed,
                                                       self.loader.prepare, key, box)
            stats.prepare_s += time.perf_counter() - t2
        finally:
            self._end_load(load)
        self.cache.admit(key, value, nbytes)  # pinned once for the step that consumes it
        return stats

    async def drop_carried(self) -> None:
        """Cancel reads carried over for a pass that will not come (the generation ended)."""
        await self._cancel_inflight()

    async def _cancel_inflight(self, keep: Collection[str] = ()) -> None:
        """Cancel the loads not in keep; release the pin of any that had already landed."""
        drop = {k: t for k, t in self._inflight.items() if k not in keep}
        for key in drop:
            del self._inflight[key]
        for t in drop.values():
            t.cancel()
        if drop:
            await asyncio.gather(*drop.values(), return_exceptions=True)
        for key, t in drop.items():
            if not t.cancelled() and t.exception() is None:
                self.cache.release(key)

    def close(self) -> None:
        self._io.shutdown(wait=True, cancel_futures=True)
        self._compute.shutdown(wait=True, cancel_futures=True)
