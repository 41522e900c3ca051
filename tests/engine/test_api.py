"""The embedding API: Engine.open keywords, generate / complete, cancellation, shutdown, the
synchronous wrapper and the example script."""

import asyncio
import gc
import pathlib
import subprocess
import sys
import threading
import time
import weakref

import pytest

from stream_run.engine import (
    ContextLengthError,
    Engine,
    EngineConfig,
    GenerationParams,
    SamplingParams,
    parse_size,
)
from stream_run.engine import sync as stream_sync
from tests.reference_model import reference_greedy
from tests.tiny_models import write_tiny_model

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROMPT = [5, 17, 42, 99, 3, 250, 7]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("api")
    cfg, weights = write_tiny_model(path, "llama", n_layers=4)
    return path, cfg, weights


@pytest.mark.asyncio
async def test_open_with_keywords_generate_and_complete(model):
    path, cfg, weights = model
    async with await Engine.open(str(path), memory_budget="1MB", backend="numpy",
                                 max_batch=4) as engine:
        assert engine.config.memory_budget_bytes == parse_size("1MB")
        assert engine.backend.name == "numpy" and engine.config.max_batch == 4
        chunks = [c async for c in engine.generate(PROMPT, max_tokens=12, ignore_eos=True)]
        done = await engine.complete(PROMPT, GenerationParams(max_tokens=12, ignore_eos=True))
    ids = [t for c in chunks for t in c.token_ids]
    assert ids == reference_greedy(cfg, weights, PROMPT, 12) == done.token_ids
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].finish_reason == "length" and chunks[-1].stats.generation_tokens == 12
    assert all(c.stats is None for c in chunks[:-1])
    assert done.text == "".join(c.text for c in chunks)
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (len(PROMPT), 12)
    assert done.usage.total_tokens == len(PROMPT) + 12


@pytest.mark.asyncio
async def test_keywords_override_params_and_config(model):
    path, _, _ = model
    cfg = EngineConfig(backend="numpy", max_context=64)
    with pytest.raises(TypeError):
        await Engine.open(str(path), cfg, no_such_option=1)
    async with await Engine.open(str(path), cfg, prefill_chunk=3) as engine:
        assert engine.max_context == 64 and engine.config.prefill_chunk == 3
        base = GenerationParams(max_tokens=5, sampling=SamplingParams(temperature=0.5, seed=1))
        p = engine.make_params(base, temperature=0.0, stop="x", top_p=None)
        assert (p.max_tokens, p.sampling.temperature, p.sampling.seed, p.stop) == \
            (5, 0.0, 1, ("x",))
        with pytest.raises(ValueError, match="top_p must be in"):
            engine.make_params(top_p=0.0)
        with pytest.raises(ContextLengthError, match="exceeds the context length 64"):
            await engine.complete(PROMPT, max_tokens=60)
        with pytest.raises(ValueError, match="prompt is empty"):
            await engine.complete("", max_tokens=2)


@pytest.mark.asyncio
async def test_chat_messages_use_the_template(model):
    path, _, _ = model
    async with await Engine.open(str(path), backend="numpy") as engine:
        messages = [{"role": "user", "content": "hello world"}]
        ids = engine.encode_prompt(messages, system_prompt="be brief")
        text = engine.tokenizer.decode(ids)
        assert text.startswith("<|im_start|>system\nbe brief<|im_end|>")
        assert text.endswith("<|im_start|>assistant\n")
        a = await engine.complete(messages, system_prompt="be brief", max_tokens=6)
        b = await engine.complete(ids, max_tokens=6)
    assert a.token_ids == b.token_ids


@pytest.mark.asyncio
async def test_cancelling_the_consumer_frees_its_slot_and_kv_cache(model):
    """The consumer is cancelled while its pass waits on a read: the pass stops at that layer
    boundary, the request's KV cache is freed and the engine is left consistent."""
    path, cfg, weights = model
    engine = await Engine.open(str(path), backend="numpy",
                               memory_budget_bytes=2 * 10**5)  # streams: every pass reads
    gate = threading.Event()
    gate.set()
    engine.reader.fault_hook = lambda *a: gate.wait(30)
    try:
        async def consume():
            async for _ in engine.generate(PROMPT, max_tokens=200, ignore_eos=True):
                pass

        task = asyncio.create_task(consume())
        while len(engine.batcher.passes) < 3:  # decoding
            await asyncio.sleep(0.002)
        gate.clear()  # the next read blocks: the pass is mid-way when the consumer goes
        await asyncio.sleep(0.02)
        kv = weakref.ref(engine.batcher.active[0].kv)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.set()
        gc.collect()
        assert kv() is None
        assert (engine.batcher.n_active, engine.batcher.kv_bytes) == (0, 0)
        assert engine.batcher.finished["cancelled"] == 1
        assert engine.batcher.passes_cancelled == 1
        assert engine.scheduler._inflight == {} and engine.cache.compute.reserved_bytes == 0
        assert sorted(engine.cache.compute.pinned()) == sorted(
            k for k in engine.scheduler.resident if k in engine.cache.compute)
        engine.reader.fault_hook = None
        again = await engine.complete(PROMPT, max_tokens=8, ignore_eos=True)
        assert again.token_ids == reference_greedy(cfg, weights, PROMPT, 8)
    finally:
        gate.set()
        await engine.aclose()


@pytest.mark.asyncio
async def test_closing_the_iterator_early_cancels(model):
    path, _, _ = model
    async with await Engine.open(str(path), backend="numpy") as engine:
        agen = engine.generate(PROMPT, max_tokens=50, ignore_eos=True)
        async for _ in agen:
            break
        await agen.aclose()
        assert engine.batcher.n_active == 0
        assert engine.batcher.finished == {"cancelled": 1}


@pytest.mark.asyncio
async def test_shutdown_ends_running_generations_as_cancelled(model):
    path, _, _ = model
    engine = await Engine.open(str(path), backend="numpy")
    engine.reader.fault_hook = lambda *a: time.sleep(0.001)
    chunks = []

    async def consume():
        async for chunk in engine.generate(PROMPT, max_tokens=200, ignore_eos=True):
            chunks.append(chunk)

    task = asyncio.create_task(consume())
    while not chunks:
        await asyncio.sleep(0.005)
    await engine.aclose()
    await task
    assert chunks[-1].finish_reason == "cancelled"
    assert 0 < chunks[-1].stats.generation_tokens < 200


def test_sync_wrapper(model):
    path, cfg, weights = model
    want = reference_greedy(cfg, weights, PROMPT, 10)
    with stream_sync.open(str(path), backend="numpy") as llm:
        ids = [t for c in llm.generate(PROMPT, max_tokens=10, ignore_eos=True)
               for t in c.token_ids]
        assert ids == want
        assert llm.complete(PROMPT, max_tokens=10, ignore_eos=True).token_ids == want
        for _ in llm.generate(PROMPT, max_tokens=100, ignore_eos=True):
            break  # closing the iterator cancels the generation
        assert llm.engine.batcher.finished["cancelled"] == 1
        with pytest.raises(ContextLengthError):
            next(iter(llm.generate(PROMPT, max_tokens=10**6)))


def test_example_script_runs(model, tmp_path):
    path, _, _ = model
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "python_api.py"), str(path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "[length]" in proc.stdout or "[stop]" in proc.stdout
    assert proc.stdout.count("->") == 3
