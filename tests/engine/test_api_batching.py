"""Continuous batching: concurrent generations share each pass, keep their own KV caches,
sampling and stop conditions, and get the tokens each would get alone."""

import asyncio

import numpy as np
import pytest

from stream_run.engine import Engine, EngineConfig
from stream_run.kernels import available_backends
from stream_run.scheduler import SchedulerConfig
from tests.reference_model import reference_greedy
from tests.tiny_models import write_tiny_model

PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [11, 12], [200, 201, 202, 203, 204, 205, 206, 207, 208],
           [7], [42, 42, 42, 42], [1, 30, 60, 90, 120], [300, 4, 8], [77, 88, 99, 111, 222]]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("batch")
    cfg, weights = write_tiny_model(path, "llama", n_layers=6)
    return path, cfg, weights


def open_engine(path, **kw) -> Engine:
    return asyncio.run(Engine.open(str(path), EngineConfig(backend=kw.pop("backend", "numpy"),
                                                           **kw)))


async def ids_of(engine, prompt, **kw):
    out, last = [], None
    async for chunk in engine.generate(prompt, **kw):
        out += chunk.token_ids
        last = chunk
    return out, last


async def concurrently(engine, prompts, **kw):
    return await asyncio.gather(*(ids_of(engine, p, **kw) for p in prompts))


def test_eight_concurrent_greedy_requests_match_the_reference(model):
    path, cfg, weights = model
    engine = open_engine(path)
    try:
        lengths = [24, 9, 32, 17, 24, 5, 12, 20]  # requests leave the batch at different steps

        async def run():
            return await asyncio.gather(*(
                ids_of(engine, p, max_tokens=n, ignore_eos=True)
                for p, n in zip(PROMPTS, lengths, strict=True)))

        results = asyncio.run(run())
        assert max(r.n_seqs for r in engine.batcher.passes) == 8  # all decoded in one pass
        assert engine.batcher.n_active == 0 and engine.batcher.kv_bytes == 0
    finally:
        engine.close()
    for prompt, n, (ids, last) in zip(PROMPTS, lengths, results, strict=True):
        assert ids == reference_greedy(cfg, weights, prompt, n)
        assert last.finish_reason == "length"
        assert last.stats.prompt_tokens == len(prompt) and last.stats.generation_tokens == n


def test_requests_join_a_running_batch_between_steps(model):
    path, cfg, weights = model
    # prompts longer than 4 rows prefill in chunks of 4 while another request decodes; alone,
    # a prompt goes through the model in one pass (layer-major prefill)
    engine = open_engine(path, prefill_chunk=4)

    async def run():
        first = asyncio.create_task(ids_of(engine, PROMPTS[0], max_tokens=30, ignore_eos=True))
        while not any(r.n_seqs == 1 and r.n_prefill == 0 for r in engine.batcher.passes):
            await asyncio.sleep(0.001)  # the first request is decoding alone
        late = [asyncio.create_task(ids_of(engine, p, max_tokens=10, ignore_eos=True))
                for p in PROMPTS[1:4]]
        return await first, await asyncio.gather(*late)

    try:
        first, late = asyncio.run(run())
        joined = [r for r in engine.batcher.passes if r.n_prefill and r.n_seqs > r.n_prefill]
        assert joined  # a prompt chunk rode along with decoding rows
        assert max(r.n_tokens - r.n_seqs for r in joined) <= 4 - 1
        first_pass = engine.batcher.passes[0]
        assert (first_pass.n_seqs, first_pass.n_tokens) == (1, len(PROMPTS[0])) \
            and len(PROMPTS[0]) > 4  # the first prompt, alone: one pass, tiles of 4 rows
    finally:
        engine.close()
    assert first[0] == reference_greedy(cfg, weights, PROMPTS[0], 30)
    for prompt, (ids, _) in zip(PROMPTS[1:4], late, strict=True):
        assert ids == reference_greedy(cfg, weights, prompt, 10)


def test_per_request_parameters_in_one_batch(model):
    """Each request's params apply to it alone: the batch gives what each gets alone."""
    path, _, _ = model
    engine = open_engine(path)
    kinds = [dict(max_tokens=12, ignore_eos=True),
             dict(max_tokens=20, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True),
             dict(max_tokens=20, temperature=1.3, seed=123, ignore_eos=True),
             dict(max_tokens=3, ignore_eos=True),
             dict(max_tokens=25, repetition_penalty=1.3, ignore_eos=True)]

    async def run():
        alone = [await ids_of(engine, PROMPTS[i], **kw) for i, kw in enumerate(kinds)]
        together = await asyncio.gather(*(ids_of(engine, PROMPTS[i], **kw)
                                          for i, kw in enumerate(kinds)))
        return alone, together

    try:
        alone, together = asyncio.run(run())
    finally:
        engine.close()
    assert [a[0] for a in alone] == [t[0] for t in together]
    assert [len(t[0]) for t in together] == [12, 20, 20, 3, 25]


def test_stop_strings_and_eos_per_request(model):
    path, _, _ = model
    engine = open_engine(path)

    async def run():
        free, _ = await ids_of(engine, PROMPTS[0], max_tokens=16, ignore_eos=True)
        text = engine.tokenizer.decode(free)
        stop = text[len(text) // 2:len(text) // 2 + 2]
        assert stop.strip()
        results = await asyncio.gather(
            engine.complete(PROMPTS[0], max_tokens=16, ignore_eos=True, stop=stop),
            engine.complete(PROMPTS[0], max_tokens=16, ignore_eos=True))
        return text, stop, results

    try:
        text, stop, (cut, full) = asyncio.run(run())
    finally:
        engine.close()
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert text.startswith(cut.text) and len(cut.text) < len(full.text)
    assert full.text == text and full.finish_reason == "length"


@pytest.mark.parametrize("n_requests", [1, 4])
def test_bytes_read_per_decode_step_do_not_grow_with_requests(model, n_requests):
    path, _, _ = model
    probe = open_engine(path)
    total, floor = probe.model_bytes, probe.min_budget_bytes
    probe.close()
    engine = open_engine(path, memory_budget_bytes=max(total // 2, 4 * floor),
                         scheduler=SchedulerConfig(adaptive=False))
    try:
        streamed = [k for k in engine.source.index.units if k not in engine.scheduler.resident]
        expected = sum(engine.source.index.units[k].nbytes for k in streamed)
        asyncio.run(concurrently(engine, PROMPTS[:n_requests], max_tokens=10, ignore_eos=True))
        decode = [r for r in engine.batcher.passes if r.n_prefill == 0]
        assert len(decode) == 9 and all(r.n_seqs == n_requests for r in decode)
        assert expected > 0
        assert [r.bytes_read for r in decode[1:]] == [expected] * 8  # the first has no carry
        assert engine.cache.compute.stats.peak_bytes <= engine.config.memory_budget_bytes
    finally:
        engine.close()


def test_full_queue_is_refused(model):
    from stream_run.engine import QueueFullError

    path, _, _ = model
    engine = open_engine(path, max_batch=1, max_queue=1)

    async def run():
        a = asyncio.create_task(ids_of(engine, PROMPTS[0], max_tokens=40, ignore_eos=True))
        b = asyncio.create_task(ids_of(engine, PROMPTS[1], max_tokens=4, ignore_eos=True))
        await asyncio.sleep(0)  # both submitted: one running, one waiting
        with pytest.raises(QueueFullError, match="queue is full"):
            await ids_of(engine, PROMPTS[2], max_tokens=4)
        return await a, await b

    try:
        (ids_a, _), (ids_b, _) = asyncio.run(run())
        assert max(r.n_seqs for r in engine.batcher.passes) == 1
    finally:
        engine.close()
    assert len(ids_a) == 40 and len(ids_b) == 4


@pytest.mark.skipif("mlx" not in available_backends(), reason="mlx is not installed")
def test_mlx_backend_batches_too(model):
    path, cfg, weights = model
    engine = open_engine(path, backend="mlx")
    try:
        results = asyncio.run(concurrently(engine, PROMPTS[:3], max_tokens=12, ignore_eos=True))
        assert max(r.n_seqs for r in engine.batcher.passes) == 3
        assert engine.batcher.kv_bytes == 0
    finally:
        engine.close()
    for prompt, (ids, _) in zip(PROMPTS[:3], results, strict=True):
        assert ids == reference_greedy(cfg, weights, prompt, 12)


def test_batched_logits_match_single_passes(model):
    """The batched pass computes the same logits as one pass per sequence (float tolerance:
    BLAS may round differently for a different number of rows)."""
    from stream_run.models.base import Batch, SeqRows

    path, _, _ = model
    engine = open_engine(path)
    seqs = [PROMPTS[0], PROMPTS[1], PROMPTS[3]]

    async def batched():
        kvs = [engine.model.make_kv_cache(16) for _ in seqs]
        rows = Batch([SeqRows(np.asarray(s), kv) for s, kv in zip(seqs, kvs, strict=True)])
        logits, _ = await engine.runner.run(rows)
        return logits, kvs

    try:
        logits, kvs = asyncio.run(batched())
        single = [asyncio.run(engine.logits(s))[-1] for s in seqs]
    finally:
        engine.close()
    assert [kv.offset for kv in kvs] == [len(s) for s in seqs]
    np.testing.assert_allclose(logits, np.stack(single), rtol=1e-5, atol=1e-5)
