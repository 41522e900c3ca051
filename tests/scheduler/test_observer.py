"""LayerScheduler.observer and unit_states: a watcher is told each compute call's units, in
pass order, and the snapshot it takes then agrees with the cache and the reads in flight."""

import pytest

from stream_run.scheduler.loop import UNIT_STATES
from tests.scheduler.test_loop import KEYS, make, make_steps


@pytest.mark.asyncio
async def test_observer_sees_each_compute_call_and_the_states_agree_with_the_cache():
    sched, cache, loader = make(budget=400, depth=2, adaptive=False, read_s=0.01)
    sched.plan_residency([(k,) for k in KEYS])
    calls, snaps = [], []

    def observe(units):
        calls.append(tuple(units))
        snaps.append((sched.unit_states(KEYS), set(cache.compute.keys()), set(cache.resident),
                      {k for k, t in sched._inflight.items() if not t.done()}))

    sched.observer = observe
    for _ in range(2):
        await sched.run(make_steps(KEYS), cyclic=True)
    # every unit, in pass order (resident runs of steps share one call)
    assert [k for c in calls for k in c] == KEYS * 2
    for (states, tier, plan, reading), units in zip(snaps, calls, strict=True):
        assert len(states) == len(KEYS) and set(states) <= set(UNIT_STATES)
        for key, letter in zip(KEYS, states, strict=True):
            if key in units:
                assert letter == "c"
            elif key in reading:
                assert letter == "r"
            elif key in tier:
                assert letter == ("R" if key in plan else "s")
            else:
                assert letter == "-"
    assert any("r" in s for s, *_ in snaps)  # prefetches were seen in flight
    await sched.drop_carried()
    assert not set(sched.unit_states(KEYS)) & set("cr")  # at rest: nothing computes or reads
    sched.observer, n = None, len(calls)
    await sched.run(make_steps(KEYS))
    assert len(calls) == n  # not told once it is gone
    sched.close()
