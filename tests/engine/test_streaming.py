"""Streaming behaviour of the whole engine: bytes per decode step under budgets, overlap,
cancellation mid-layer, and read errors mid-stream."""

import asyncio
import os
import shutil
import time

import numpy as np
import pytest

from stream_run.engine import Engine, EngineConfig, GenerationParams, ReadError
from stream_run.scheduler import SchedulerConfig
from tests.reference_model import reference_greedy
from tests.tiny_models import write_tiny_model

PROMPT = [5, 17, 42, 99, 3, 250, 7]


def open_engine(path, **kw) -> Engine:
    return asyncio.run(Engine.open(str(path), EngineConfig(backend="numpy", **kw)))


async def decode_steps(engine: Engine, n: int):
    """Prefill PROMPT, then n decode steps; returns (tokens, per-step RunStats)."""
    kv = engine.model.make_kv_cache(len(PROMPT) + n + 1)
    logits, _ = await engine.forward(np.asarray([PROMPT]), kv, more=True)
    toks, stats = [], []
    for i in range(n):
        tok = int(np.argmax(logits[0, -1]))
        toks.append(tok)
        logits, rs = await engine.forward(np.asarray([[tok]]), kv, more=i + 1 < n)
        stats.append(rs)
    return toks, stats


def min_budget(path) -> int:
    """The smallest budget the model can run with (its largest step)."""
    engine = open_engine(path)
    try:
        return engine.min_budget_bytes
    finally:
        engine.close()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("m8")
    cfg, weights = write_tiny_model(path, "llama", n_layers=8)
    return path, cfg, weights


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.25, "min"])
def test_bytes_per_decode_step_equal_streamed_units(model, fraction, adaptive):
    """With a fixed depth, each decode step reads exactly the units the plan streams; an
    adaptive window reads at most what the plan of the deepest window it ran streams (a
    deepening on trial may be undone, scheduler/loop.py _adapt: a step at the deeper depth
    streams more than the final plan)."""
    path, cfg, weights = model
    probe = open_engine(path)
    total = probe.model_bytes
    probe.close()
    floor = min_budget(path) * (1 + 2 + 1)  # one unit + a window of depth 2 (+ slack)
    budget = floor if fraction == "min" else int(total * fraction)
    engine = open_engine(path, memory_budget_bytes=budget,
                         scheduler=SchedulerConfig(adaptive=adaptive))
    try:
        toks, stats = asyncio.run(decode_steps(engine, 12))
        streamed = [k for k in engine.source.index.units if k not in engine.scheduler.resident]
        expected = sum(engine.source.index.units[k].nbytes for k in streamed)
        sched = engine.scheduler
        deepest = max(
            sched._shape.streamed_bytes(engine.cache.preview(sched._shape, d))
            for d in {rs.prefetch_depth for rs in stats} | {sched.depth}) if sched._shape \
            else expected
        for rs in stats:
            if adaptive:
                assert rs.bytes_read <= 1.02 * max(expected, deepest)
            else:
                assert abs(rs.bytes_read - expected) <= 0.02 * expected
        assert engine.cache.compute.stats.peak_bytes <= budget
        assert engine.scheduler._inflight == {}  # the last pass carried nothing over
        assert sorted(engine.cache.compute.pinned()) == sorted(
            k for k in engine.scheduler.resident if k in engine.cache.compute)
        if fraction == 1.0:
            assert expected == 0
        else:
            assert 0 < expected
            pool = engine.reader.buffers  # streamed units land in recycled read buffers
            assert pool.reuses > pool.allocations
    finally:
        engine.close()
    assert toks == reference_greedy(cfg, weights, PROMPT, 12)


def test_reads_overlap_compute_in_the_engine(model):
    path, _, _ = model
    engine = open_engine(path, memory_budget_bytes=min_budget(path) * 4)
    engine.scheduler.record_intervals = True
    engine.reader.fault_hook = lambda *a: time.sleep(0.01)  # a slow disk
    try:
        _, stats = asyncio.run(decode_steps(engine, 3))
    finally:
        engine.close()
    rs = stats[-1]
    reads = [(a, b) for kind, _, a, b in rs.intervals if kind == "read"]
    computes = [(a, b) for kind, _, a, b in rs.intervals if kind == "compute"]
    assert reads and any(ra < cb and ca < rb for ra, rb in reads for ca, cb in computes)


def test_cancel_mid_layer_then_generate_again(model):
    path, cfg, weights = model
    engine = open_engine(path, memory_budget_bytes=min_budget(path) * 4)
    engine.reader.fault_hook = lambda *a: time.sleep(0.005)
    params = GenerationParams(max_tokens=20, ignore_eos=True)

    async def consume():
        async for _ in engine.generate(PROMPT, params):
            pass

    async def cancel_midway():
        task = asyncio.create_task(consume())
        await asyncio.sleep(0.15)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    async def tokens():
        out = []
        async for chunk in engine.generate(PROMPT, GenerationParams(max_tokens=8,
                                                                    ignore_eos=True)):
            out += chunk.token_ids
        return out

    try:
        asyncio.run(cancel_midway())
        assert engine.scheduler._inflight == {}
        assert engine.cache.compute.reserved_bytes == 0
        assert sorted(engine.cache.compute.pinned()) == sorted(
            k for k in engine.scheduler.resident if k in engine.cache.compute)
        engine.reader.fault_hook = None
        assert asyncio.run(tokens()) == reference_greedy(cfg, weights, PROMPT, 8)
    finally:
        engine.close()


def test_file_truncated_while_running(tmp_path):
    write_tiny_model(tmp_path / "m", "llama", n_layers=6)
    path = tmp_path / "m" / "model.safetensors"
    backup = tmp_path / "backup.safetensors"
    shutil.copy(path, backup)
    engine = open_engine(tmp_path / "m", memory_budget_bytes=min_budget(tmp_path / "m") * 4)
    try:
        asyncio.run(decode_steps(engine, 2))
        os.truncate(path, os.path.getsize(path) // 3)
        with pytest.raises(ReadError, match=r"model\.safetensors: unexpected end of file at "
                                            r"byte \d+ while reading unit 'layers\.\d'"):
            asyncio.run(decode_steps(engine, 2))
        shutil.copy(backup, path)  # the user restores the file; the engine is still usable
        toks, _ = asyncio.run(decode_steps(engine, 3))
        assert len(toks) == 3
    finally:
        engine.close()


def test_prefetch_depth_zero_still_streams(model):
    path, cfg, weights = model
    engine = open_engine(path, memory_budget_bytes=min_budget(path) * 2,
                         scheduler=SchedulerConfig(prefetch_depth=0))
    try:
        toks, _ = asyncio.run(decode_steps(engine, 6))
    finally:
        engine.close()
    assert toks == reference_greedy(cfg, weights, PROMPT, 6)


def test_generation_ending_early_leaves_no_read_in_flight(model):
    path, _, _ = model
    engine = open_engine(path, memory_budget_bytes=min_budget(path) * 4)

    async def stop_after_two_tokens():
        agen = engine.generate(PROMPT, GenerationParams(max_tokens=10, ignore_eos=True))
        seen = 0
        async for chunk in agen:
            seen += len(chunk.token_ids)
            if seen >= 2:
                carried = dict(engine.scheduler._inflight)
                break
        await agen.aclose()
        return carried

    try:
        carried = asyncio.run(stop_after_two_tokens())
        assert carried  # reads for the next pass were in flight when the consumer stopped
        assert engine.scheduler._inflight == {}
        assert engine.cache.compute.reserved_bytes == 0
        assert sorted(engine.cache.compute.pinned()) == sorted(
            k for k in engine.scheduler.resident if k in engine.cache.compute)
    finally:
        engine.close()
