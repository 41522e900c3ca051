"""Scheduler behaviour with a fake loader: overlap, budgets, cancellation, errors."""

import asyncio
import collections
import threading
import time

import pytest

from stream_run.cache import BudgetError, CacheConfig, WeightCache
from stream_run.scheduler import LayerScheduler, SchedulerConfig, Step


class FakeLoader:
    prepare_off_compute_thread = True

    def __init__(self, sizes, read_s=0.0, fail=None, transient=0):
        self.sizes = sizes
        self.transient = transient  # raw bytes held while preparing, per unit
        self.read_s = read_s
        self.fail = fail
        self.reads = []
        self.expected = collections.Counter()  # reads announced and not yet started
        self.lock = threading.Lock()

    def expect(self, key):
        with self.lock:
            self.expected[key] += 1

    def forget(self, key):
        with self.lock:
            self.expected[key] -= 1

    def read(self, key):
        with self.lock:
            self.expected[key] -= 1  # the read takes its buffer
        time.sleep(self.read_s)
        if key == self.fail:
            raise OSError(f"injected failure reading {key}")
        with self.lock:
            self.reads.append(key)
        return key.upper()

    def prepare(self, key, raw):
        return raw, self.sizes[key]

    def raw_nbytes(self, key):
        return self.sizes[key]

    def prepared_nbytes(self, key):
        return self.sizes[key]

    def transient_nbytes(self, key):
        return self.transient


def make_steps(keys, compute_s=0.0, log=None):
    def run(key, weights):
        time.sleep(compute_s)
        if log is not None:
            log.append((key, weights[key]))
    return [Step((k,), lambda x, w, k=k: run(k, w), k) for k in keys]


def units_of(steps):
    return [s.units for s in steps]


KEYS = [f"u{i}" for i in range(8)]


def make(budget=None, depth=2, adaptive=True, max_depth=16, **kw):
    loader = FakeLoader({k: 100 for k in KEYS}, **kw)
    cache = WeightCache(CacheConfig(compute_bytes=budget))
    sched = LayerScheduler(cache, loader, SchedulerConfig(
        prefetch_depth=depth, adaptive=adaptive, max_prefetch_depth=max_depth))
    return sched, cache, loader


@pytest.mark.asyncio
async def test_runs_steps_in_order_with_their_weights():
    sched, cache, loader = make()
    log = []
    _, stats = await sched.run(make_steps(KEYS, log=log))
    assert log == [(k, k.upper()) for k in KEYS]
    assert stats.bytes_read == 800 and stats.units_read == 8
    _, stats = await sched.run(make_steps(KEYS))  # all resident now
    assert stats.bytes_read == 0 and stats.hits == 8
    assert cache.compute.pinned() == []
    sched.close()


@pytest.mark.asyncio
async def test_prefetch_overlaps_compute_and_hides_reads():
    sched, cache, loader = make(depth=2, read_s=0.03)
    sched.record_intervals = True
    _, stats = await sched.run(make_steps(KEYS, compute_s=0.03))
    reads = [(s, e) for kind, _, s, e in stats.intervals if kind == "read"]
    computes = [(s, e) for kind, _, s, e in stats.intervals if kind == "compute"]
    overlapping = sum(1 for rs, re_ in reads for cs, ce in computes if rs < ce and cs < re_)
    # the first depth + 1 reads start before any compute; every later one overlaps compute
    assert overlapping >= len(KEYS) - 3
    sched.close()


@pytest.mark.asyncio
async def test_budget_smaller_than_model_streams_and_holds_budget():
    sched, cache, loader = make(budget=300, depth=2)
    log = []
    for _ in range(3):
        await sched.run(make_steps(KEYS, log=log))
        assert cache.compute.used_bytes <= 300
        assert cache.compute.stats.peak_bytes <= 300
    assert [k for k, _ in log] == KEYS * 3
    assert cache.compute.pinned() == []
    sched.close()


@pytest.mark.asyncio
async def test_budget_below_one_unit_raises():
    sched, cache, loader = make(budget=50)
    with pytest.raises(BudgetError, match="cannot fit 100 bytes"):
        await sched.run(make_steps(KEYS))
    assert cache.compute.reserved_bytes == 0
    sched.close()


@pytest.mark.asyncio
async def test_cancel_mid_run_leaves_nothing_pinned_or_pending():
    sched, cache, loader = make(budget=400, depth=3, read_s=0.02)
    task = asyncio.create_task(sched.run(make_steps(KEYS, compute_s=0.02)))
    await asyncio.sleep(0.07)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cache.compute.pinned() == []
    assert cache.compute.reserved_bytes == 0
    assert sched._inflight == {}
    await asyncio.sleep(0.05)  # a read already running when cancelled ends on its thread
    assert set(loader.expected.values()) <= {0}  # every announced read started or was forgotten
    log = []
    await sched.run(make_steps(KEYS, log=log))  # still usable
    assert [k for k, _ in log] == KEYS
    sched.close()


@pytest.mark.asyncio
async def test_read_error_propagates_and_engine_stays_usable():
    sched, cache, loader = make(budget=400, depth=2, fail="u5")
    with pytest.raises(OSError, match="injected failure reading u5"):
        await sched.run(make_steps(KEYS))
    assert cache.compute.pinned() == [] and cache.compute.reserved_bytes == 0
    loader.fail = None
    log = []
    await sched.run(make_steps(KEYS, log=log))
    assert len(log) == 8
    sched.close()


@pytest.mark.asyncio
async def test_host_tier_serves_units_evicted_from_compute():
    loader = FakeLoader({k: 100 for k in KEYS})
    cache = WeightCache(CacheConfig(compute_bytes=300, host_bytes=10_000))
    sched = LayerScheduler(cache, loader, SchedulerConfig(prefetch_depth=1))
    await sched.run(make_steps(KEYS))
    first = len(loader.reads)
    _, stats = await sched.run(make_steps(KEYS))
    assert first == 8 and len(loader.reads) == 8  # second pass: no disk reads
    assert stats.bytes_read == 0 and cache.host.stats.hits >= 5
    sched.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("budget", [800, 600, 400, 300])
async def test_cyclic_plan_reads_only_streamed_units_each_pass(budget):
    sched, cache, loader = make(budget=budget, depth=1, adaptive=False)
    steps = make_steps(KEYS)
    resident = sched.plan_residency(units_of(steps))
    streamed = [k for k in KEYS if k not in resident]
    assert len(resident) * 100 <= max(budget - 200, 0) or budget >= 800
    await sched.run(steps)  # first pass: cold
    for _ in range(3):
        before = list(loader.reads)
        _, stats = await sched.run(steps)
        assert sorted(loader.reads[len(before):]) == sorted(streamed)
        assert stats.bytes_read == 100 * len(streamed)
        assert cache.compute.used_bytes <= budget
    assert sorted(cache.compute.pinned()) == sorted(resident)
    sched.close()


def test_plan_spreads_streamed_units_evenly():
    sched, cache, loader = make(budget=600, depth=1)
    resident = sched.plan_residency(units_of(make_steps(KEYS)))
    streamed = [i for i, k in enumerate(KEYS) if k not in resident]
    assert len(streamed) == 4  # 600 - ring of 2 slots = 400 -> 4 resident
    assert streamed == [1, 3, 5, 7]
    sched.close()


@pytest.mark.asyncio
async def test_prefetch_deepens_when_reads_are_slower_than_compute():
    sched, cache, loader = make(budget=None, depth=1, read_s=0.02)
    cache.compute.budget_bytes = 400  # stream: nothing stays resident
    depths = []
    for _ in range(9):  # a deepening takes 3 stalled passes of the window of 4
        _, stats = await sched.run(make_steps(KEYS, compute_s=0.002))
        depths.append(sched.depth)
    assert depths == [1, 1, 2, 2, 2, 3, 3, 3, 4] and stats.prefetch_depth == 3
    sched.close()


@pytest.mark.asyncio
async def test_prefetch_stays_when_compute_hides_reads():
    """The adaptation rule on recorded figures (a timed run would depend on the machine's
    load): stalls within 5 % of compute keep the depth, larger ones deepen it."""
    from stream_run.scheduler.loop import RunStats

    sched, _, _ = make(budget=400, depth=2)
    for _ in range(6):
        sched._adapt(RunStats(compute_s=1.0, io_stall_s=0.04, units_read=8))
    assert sched.depth == 2
    sched._adapt(RunStats(compute_s=1.0, io_stall_s=0.2, units_read=8))
    sched._adapt(RunStats(compute_s=1.0, io_stall_s=0.2, units_read=8))
    assert sched.depth == 2  # two stalled passes of the last four: not yet the rule
    sched._adapt(RunStats(compute_s=1.0, io_stall_s=0.2, units_read=8))
    assert sched.depth == 3
    for _ in range(4):
        sched._adapt(RunStats(compute_s=1.0, io_stall_s=0.2, units_read=0))  # nothing read
    assert sched.depth == 3
    sched.close()


@pytest.mark.asyncio
async def test_one_stalled_pass_among_quiet_ones_does_not_deepen():
    """A stall spike of one pass (a loaded machine: 0.3 ms typical, 22-73 ms once) is not a
    reason to read further ahead; stalls in 3 of the last 4 passes are."""
    from stream_run.scheduler.loop import RunStats

    sched, _, _ = make(budget=400, depth=2)
    for i in range(40):
        stall = 0.3 if i % 4 == 3 else 0.001
        sched._adapt(RunStats(compute_s=1.0, io_stall_s=stall, units_read=8))
    assert sched.depth == 2
    sched.close()


@pytest.mark.asyncio
async def test_a_deepening_that_costs_resident_units_and_does_not_help_is_undone():
    """Giving up a resident unit for a deeper ring is a trial: when the next steady pass
    stalls more than half as long as before, the depth and the plan go back and the depth
    stays below the trial's for TRIAL_COOLDOWN passes; when it helps, it stays."""
    from stream_run.scheduler.loop import TRIAL_COOLDOWN, RunStats

    idle = dict(compute_s=1.0, io_stall_s=2.0, wall_s=3.0, disk_busy_s=1.0, bytes_read=400,
                units_read=4)
    sched, _, _ = make(budget=600, depth=1)
    sched.plan_residency(units_of(make_steps(KEYS)))
    before = set(sched.resident)
    for _ in range(3):
        sched._adapt(RunStats(**idle))
    assert sched.depth == 2 and len(sched.resident) == 3
    sched._adapt(RunStats(**{**idle, "resident_reads": 1}))  # the new plan's warm-up: no verdict
    assert sched.depth == 2
    sched._adapt(RunStats(**{**idle, "io_stall_s": 1.9}))  # no better: undone
    assert sched.depth == 1 and sched.resident == before
    for _ in range(TRIAL_COOLDOWN - 1):
        sched._adapt(RunStats(**idle))
    assert sched.depth == 1  # not tried again during the cooldown
    sched._adapt(RunStats(**idle))  # the cooldown's end: the stalls are still the rule
    assert sched.depth == 2
    sched._adapt(RunStats(**{**idle, "io_stall_s": 0.5}))  # the stall fell by 3/4: kept
    assert sched.depth == 2 and len(sched.resident) == 3
    sched.close()


@pytest.mark.asyncio
async def test_cyclic_run_carries_reads_for_the_next_pass():
    sched, cache, loader = make(budget=500, depth=2, adaptive=False)
    steps = make_steps(KEYS)
    resident = sched.plan_residency(units_of(steps))
    streamed = [k for k in KEYS if k not in resident]
    await sched.run(steps, cyclic=True)
    carried = set(sched._inflight)
    assert carried and carried <= set(streamed[:3])  # the next pass's first streamed units
    _, stats = await sched.run(steps, cyclic=False)
    # every streamed unit was read once per pass: the carried ones were not read twice
    assert sorted(loader.reads) == sorted(streamed * 2 + sorted(resident))
    assert stats.bytes_read == 100 * len(streamed)  # carried reads count where they are used
    assert sched._inflight == {} and sorted(cache.compute.pinned()) == sorted(resident)
    sched.close()


@pytest.mark.asyncio
async def test_cancel_after_cyclic_run_releases_carried_loads():
    sched, cache, loader = make(budget=500, depth=2, read_s=0.01)
    steps = make_steps(KEYS)
    resident = sched.plan_residency(units_of(steps))
    await sched.run(steps, cyclic=True)
    task = asyncio.create_task(sched.run(steps))
    await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sched._inflight == {} and cache.compute.reserved_bytes == 0
    await asyncio.sleep(0.03)  # a read already running when cancelled ends on its thread
    assert set(loader.expected.values()) <= {0}
    assert resident  # the plan may have changed as the window deepened: pins follow the plan
    assert sorted(cache.compute.pinned()) == sorted(k for k in sched.resident
                                                    if k in cache.compute)
    sched.close()


@pytest.mark.asyncio
async def test_raw_bytes_held_while_preparing_count_against_the_budget():
    """A load that converts (GGUF blocks, MLX copies) holds its raw buffer beside the compute
    form until prepare() ends: the reservation covers both, so the tier never exceeds it."""
    loader = FakeLoader({k: 100 for k in KEYS}, transient=50)
    probe = LayerScheduler(WeightCache(CacheConfig()), loader, SchedulerConfig())
    assert probe.min_budget_bytes(units_of(make_steps(KEYS))) == 150
    probe.close()
    for budget in (150, 420):
        cache = WeightCache(CacheConfig(compute_bytes=budget))
        sched = LayerScheduler(cache, loader, SchedulerConfig(prefetch_depth=2))
        steps = make_steps(KEYS)
        sched.plan_residency(units_of(steps))
        for _ in range(3):
            await sched.run(steps, cyclic=True)
        await sched.drop_carried()
        assert cache.compute.stats.peak_bytes <= budget
        assert cache.compute.reserved_bytes == 0
        sched.close()
    with pytest.raises(BudgetError):
        cache = WeightCache(CacheConfig(compute_bytes=149))
        sched = LayerScheduler(cache, loader, SchedulerConfig())
        try:
            await sched.run(make_steps(KEYS))
        finally:
            sched.close()


@pytest.mark.asyncio
async def test_settle_gets_the_last_result_of_each_compute_call():
    """settle (MLX: start evaluating) runs once per compute call, on the compute thread, with
    the result of the call's last step: per streamed step while units stream, once for a run of
    resident steps."""
    settled = []

    def settle(out):
        settled.append((out, threading.current_thread().name))

    loader = FakeLoader({k: 100 for k in KEYS})
    cache = WeightCache(CacheConfig(compute_bytes=None))
    sched = LayerScheduler(cache, loader, SchedulerConfig(prefetch_depth=2), settle=settle)
    steps = [Step((k,), lambda x, w, k=k: f"out-{k}", k) for k in KEYS]
    await sched.run(steps)  # cold: every step waits on its own read, so most calls hold one
    assert settled and settled[-1][0] == "out-u7"
    assert all(name.startswith("stream-compute") for _, name in settled)
    cold_calls = len(settled)
    settled.clear()
    await sched.run(steps)  # all resident: one compute call for the whole pass
    assert settled == [("out-u7", settled[0][1])]
    assert cold_calls > 1
    settled.clear()
    await sched.run([*steps[:-1], Step(("u7",), lambda x, w: None, "head")])
    assert settled == []  # a call whose last step returns nothing has nothing to settle
    sched.close()


@pytest.mark.asyncio
async def test_deeper_prefetch_replans_residency_and_bytes_still_match_the_plan():
    """When a deeper window pays (here: a recorded pass whose disk sat idle while compute
    waited), the cache's policy re-plans for the larger ring (fewer resident units, more bytes
    in flight), and every later pass reads exactly the units the new plan streams."""
    from stream_run.scheduler.loop import RunStats

    sched, cache, loader = make(budget=600, depth=1, max_depth=2, adaptive=True)
    steps = make_steps(KEYS, compute_s=0.001)
    first = set(sched.plan_residency(units_of(steps)))
    assert len(first) == 4  # 600 - ring of 2 slots = 400
    await sched.run(steps, cyclic=True)
    # 400 bytes in 0.1 s of reading, 0.5 s stalled of which 0.4 s with no read in flight:
    # giving up a 100-byte unit (0.025 s of reading) pays
    for _ in range(3):  # the rule: 3 of the last 4 passes stalled
        sched._adapt(RunStats(compute_s=0.1, io_stall_s=0.5, wall_s=0.6, disk_busy_s=0.1,
                              bytes_read=400, units_read=4))
    assert sched.depth == 2
    assert len(sched.resident) == 3  # 600 - ring of 3 slots = 300
    streamed = [k for k in KEYS if k not in sched.resident]
    await sched.run(steps, cyclic=True)  # reads the units that joined the plan
    for _ in range(3):
        before = len(loader.reads)
        _, stats = await sched.run(steps, cyclic=True)
        assert sorted(set(loader.reads[before:])) == sorted(streamed)
        assert cache.compute.used_bytes + cache.compute.reserved_bytes <= 700
    assert stats.bytes_read == 100 * len(streamed)
    await sched.drop_carried()
    assert cache.compute.reserved_bytes == 0
    assert sorted(cache.compute.pinned()) == sorted(sched.resident)
    sched.close()


@pytest.mark.asyncio
async def test_prefetch_does_not_deepen_into_the_resident_set_when_reads_are_bandwidth_bound():
    """Issue 16: reads slower than compute under a tight budget. Deepening the window would
    take ring room from the resident set, so every pass would read more: the disk was busy
    throughout, so a deeper window could not hide the stall, and the depth and the plan stay.
    (Before, the depth grew every pass and the resident set shrank with it.)"""
    sched, cache, loader = make(budget=600, depth=1, max_depth=16, read_s=0.02)
    steps = make_steps(KEYS, compute_s=0.001)
    resident = set(sched.plan_residency(units_of(steps)))
    assert len(resident) == 4
    await sched.run(steps, cyclic=True)  # cold: reads the resident units too
    reads = []
    for _ in range(4):
        _, stats = await sched.run(steps, cyclic=True)
        assert stats.io_stall_s > 0.05 * stats.compute_s  # compute did wait on reads
        reads.append(stats.bytes_read)
    await sched.drop_carried()
    assert sched.depth == 1 and sched.resident == resident
    assert reads == [400] * 4  # the 4 streamed units, once per pass
    assert sorted(cache.compute.pinned()) == sorted(resident)
    sched.close()


@pytest.mark.asyncio
async def test_adaptation_weighs_a_deeper_window_against_the_residency_it_costs():
    """The rule on recorded figures: a deeper ring that comes out of free budget is taken on
    any stall; one that evicts resident units only when the stall the disk sat idle through is
    longer than reading those units would take."""
    from stream_run.scheduler.loop import RunStats

    busy = dict(compute_s=1.0, io_stall_s=2.0, wall_s=3.0, bytes_read=400, units_read=4)
    sched, _, _ = make(budget=600, depth=1)
    sched.plan_residency(units_of(make_steps(KEYS)))
    sched._adapt(RunStats(disk_busy_s=3.0, **busy))  # disk busy throughout
    assert sched.depth == 1 and len(sched.resident) == 4
    sched._adapt(RunStats(disk_busy_s=2.9, **busy))  # 0.1 s idle < 0.725 s to read 100 bytes
    assert sched.depth == 1
    sched._adapt(RunStats(disk_busy_s=2.0, **busy))  # 1 s idle < twice 0.5 s: too close
    assert sched.depth == 1
    sched._adapt(RunStats(disk_busy_s=1.0, resident_reads=4, **busy))  # the cold first pass
    assert sched.depth == 1  # it read the resident set too: its idle disk is not the ring's
    sched._adapt(RunStats(disk_busy_s=1.0, **busy))  # 2 s idle > twice 0.25 s to read 100 bytes
    assert sched.depth == 2 and len(sched.resident) == 3
    sched.close()
    sched, _, _ = make(budget=200, depth=1)  # nothing resident at any depth: the ring is free
    sched.plan_residency(units_of(make_steps(KEYS)))
    for _ in range(3):
        sched._adapt(RunStats(disk_busy_s=3.0, **busy))
    assert sched.depth == 2 and sched.resident == set()
    sched.close()


@pytest.mark.asyncio
async def test_late_bound_step_reads_the_units_its_input_names():
    """A step whose units are a function of the previous step's output: resolved once that
    step has run, read under the budget, and handed the chosen units only."""
    sched, cache, loader = make(budget=400, depth=2)
    seen = []

    def pick(x, w):
        return x + 1  # the "router": names the unit for the next step

    def use(x, w):
        seen.append(sorted(w))
        return x * 10

    steps = [Step(("u0",), lambda x, w: 2, "router"), Step(("u1",), pick, "pick"),
             Step(lambda x: (f"u{x}",), use, "late"), Step(("u7",), lambda x, w: x + 5, "head")]
    sched.plan_residency(units_of([s for s in steps if not callable(s.units)]))
    out, stats = await sched.run(steps)
    assert out == 35 and seen == [["u3"]]
    assert "u3" in loader.reads
    assert cache.compute.reserved_bytes == 0
    assert sorted(cache.compute.pinned()) == sorted(sched.resident) == ["u0", "u1", "u7"]
    sched.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("budget", [200, 300, 350])
async def test_late_bound_step_with_declared_candidates_fits_a_tight_budget(budget):
    """The plan and the prefetches keep room for a late-bound step's picks: with every known
    unit fitting the budget, the router's choice still gets a slot (it did not before)."""
    loader = FakeLoader({k: 100 for k in ["u0", "u1", "u2", "u3"]})
    cache = WeightCache(CacheConfig(compute_bytes=budget))
    sched = LayerScheduler(cache, loader, SchedulerConfig(prefetch_depth=2, adaptive=False))
    late = Step(lambda x: (f"u{x}",), lambda x, w: sorted(w), "late", candidates=("u1", "u3"))
    steps = [Step(("u0",), lambda x, w: 1, "u0"), late,
             Step(("u2",), lambda x, w: x, "u2"), Step(("u3",), lambda x, w: x, "u3")]
    assert sched.min_budget_bytes([("u0",), late, ("u2",), ("u3",)]) == 100
    resident = sched.plan_residency([("u0",), late, ("u2",), ("u3",)])
    assert 100 * len(resident) <= budget - 100 - 100  # ring + the late step's pick stay free
    for _ in range(3):
        out, _ = await sched.run(steps, cyclic=True)
        assert out == ["u1"]
    await sched.drop_carried()
    assert cache.compute.reserved_bytes == 0
    sched.close()


def test_compute_call_lets_go_of_its_weights_before_its_result_is_set():
    """The executor's work item keeps its arguments until after the result is set, when the
    event loop may already evict the units and read into their buffers: the call empties the
    weights it was given."""
    from stream_run.scheduler.loop import _run_steps

    weights = {"u0": object(), "u1": object()}
    out, times = _run_steps([(Step(("u0", "u1"), lambda x, w: len(w)), ("u0", "u1"))], None,
                            weights)
    assert out == 2 and len(times) == 1 and weights == {}


@pytest.mark.asyncio
async def test_a_pass_reserves_its_activations_in_the_budget():
    """scratch_bytes (a prefill chunk's activations) is reserved for the run: residents make
    room, reads fit beside it, and the plan comes back after."""
    sched, cache, loader = make(budget=600, depth=2, adaptive=False)
    steps = make_steps(KEYS)
    resident = set(sched.plan_residency(units_of(steps)))
    seen = []
    probe = [Step(s.units, lambda x, w, s=s: seen.append(
        (cache.compute.reserved_bytes, cache.compute.used_bytes)) or s.run(x, w), s.name)
        for s in steps]
    _, stats = await sched.run(probe, scratch_bytes=300)
    assert stats.scratch_over_bytes == 0
    assert all(reserved >= 300 and reserved + used <= 600 for reserved, used in seen)
    assert cache.compute.reserved_bytes == 0 and sched.resident == resident
    _, stats = await sched.run(make_steps(KEYS), scratch_bytes=10_000)  # capped: a step fits
    assert stats.scratch_over_bytes == 10_000 - 500
    assert cache.compute.reserved_bytes == 0
    sched.close()


@pytest.mark.asyncio
async def test_without_a_budget_activations_are_never_over_it():
    """No budget: nothing is reserved and nothing is over (stream-run warned 'more than the
    memory budget leaves' on every 7B-wide prompt of an unlimited run)."""
    sched, cache, _ = make(budget=None, depth=2, adaptive=False)
    _, stats = await sched.run(make_steps(KEYS), scratch_bytes=10_000)
    assert stats.scratch_over_bytes == 0 and cache.compute.reserved_bytes == 0
    sched.close()
