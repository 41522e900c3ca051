"""Layer-major prefill (issue 24): a prompt goes through each unit once, its rows computed in
tiles inside each block and attention in query blocks, on every architecture, resident and
streamed, numpy and MLX. The reference is the chunked path: passes of a few rows each, the
cache advancing between them (what the engine ran before), and a resident one-tile pass."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from stream_run.cache import BudgetError
from stream_run.cli import run as cli_run
from stream_run.engine import Engine, EngineConfig, GenerationParams
from stream_run.kernels import available_backends
from stream_run.kernels import kv_cache as kv_module
from tests.tiny_models import write_tiny_model

BACKENDS = ["numpy"] + (["mlx"] if "mlx" in available_backends() else [])
PROMPT = [int(t) for t in np.random.default_rng(7).integers(3, 300, 45)]
TILE = 6  # rows per tile: 45 prompt rows are 8 tiles, the last one short
N_NEW = 10


def write_model(path, arch: str):
    """A tiny random checkpoint of arch; the HF-built ones (gemma, phi3) need torch."""
    if arch in ("llama", "qwen3"):
        write_tiny_model(path, arch)
    elif arch == "mistral_window":
        write_tiny_model(path, "mistral", config_overrides={"sliding_window": 7})
    elif arch in ("gemma2", "gemma3"):
        pytest.importorskip("transformers")
        from tests.models.test_gemma import write_gemma
        write_gemma(path, arch)
    else:
        pytest.importorskip("transformers")
        from tests.models.test_phi3 import CASES, write_phi3
        write_phi3(path, CASES["longrope" if arch == "phi3_longrope" else "sliding_window"])
    return path


ARCHS = ["llama", "qwen3", "mistral_window", "gemma2", "gemma3", "phi3_longrope", "phi3_window"]


@pytest.fixture(params=ARCHS)
def model(request, tmp_path_factory):
    return write_model(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture
def small_attention_blocks(monkeypatch):
    """Query blocks of a few rows: attention over 45 keys splits into many blocks."""
    monkeypatch.setattr(kv_module, "ATTN_SCORE_BYTES", 4 * 8 * 3 * len(PROMPT))


def tolerance(backend: str) -> dict:
    return {"rtol": 1e-4, "atol": 1e-4} if backend == "numpy" else {"rtol": 1e-3, "atol": 1e-3}


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiled_pass_equals_chunked_passes(model, backend, small_attention_blocks):
    async def go():
        engine = await Engine.open(str(model), EngineConfig(backend=backend, prefill_chunk=1024))
        try:
            one_tile = await engine.logits(PROMPT)
            kv = await engine.runner.make_kv_cache(len(PROMPT))
            chunked = []
            for a in range(0, len(PROMPT), TILE):  # the chunked path: a pass per chunk
                logits, _ = await engine.forward(np.asarray(PROMPT[a:a + TILE]), kv,
                                                 all_logits=True, span_end=len(PROMPT))
                chunked.append(logits[0])
            engine.runner.tile_rows = TILE
            tiled = await engine.logits(PROMPT)
            return one_tile, np.concatenate(chunked), tiled
        finally:
            await engine.aclose()

    one_tile, chunked, tiled = asyncio.run(go())
    assert tiled.shape == chunked.shape == (len(PROMPT), one_tile.shape[1])
    np.testing.assert_allclose(tiled, chunked, **tolerance(backend))
    np.testing.assert_allclose(one_tile, chunked, **tolerance(backend))


def complete(path, backend: str, prompt=PROMPT, **config):
    async def go():
        engine = await Engine.open(str(path), EngineConfig(backend=backend, **config))
        try:
            done = await engine.complete(prompt, GenerationParams(max_tokens=N_NEW,
                                                                  ignore_eos=True))
            return done, engine.model_bytes, engine.min_budget_bytes
        finally:
            await engine.aclose()
    return asyncio.run(go())


def pass_bytes(path) -> int:
    """The file bytes one pass reads at most: each call's units once (a tied embedding
    serves the embed and the head calls, so a streamed pass may read it twice)."""
    async def go():
        engine = await Engine.open(str(path), EngineConfig(backend="numpy"))
        try:
            return sum(engine.units.raw_nbytes(k) for units in engine.model.units()
                       for k in units)
        finally:
            await engine.aclose()
    return asyncio.run(go())


@pytest.mark.parametrize("backend", BACKENDS)
def test_streamed_prompt_reads_each_unit_once(model, backend, small_attention_blocks):
    resident, model_bytes, min_budget = complete(model, backend, prefill_chunk=1024)
    budget = max(min_budget, model_bytes // 2)
    streamed, _, _ = complete(model, backend, prefill_chunk=TILE, memory_budget_bytes=budget)
    assert streamed.token_ids == resident.token_ids
    s = streamed.stats
    assert (s.prefill_passes, s.prefill_split) == (1, "")
    assert resident.stats.prefill_bytes_read == model_bytes
    assert model_bytes <= s.prefill_bytes_read <= pass_bytes(model)
    # decoding re-reads the streamed units only: fewer bytes per token than the model
    assert s.bytes_read > model_bytes


def test_a_prompt_over_the_prefill_memory_takes_as_few_passes_as_fit(tmp_path):
    path = write_model(tmp_path, "llama")
    prompt = PROMPT * 4  # 180 rows
    one, _, _ = complete(path, "numpy", prompt, prefill_chunk=16)

    async def go(limit):
        engine = await Engine.open(str(path), EngineConfig(
            backend="numpy", prefill_chunk=16, prefill_memory_bytes=limit))
        try:
            runner = engine.runner
            need, whole = runner.tile_need_bytes, runner.activation_bytes([(0, len(prompt))], 1)
            if limit is None:
                return need, whole
            done = await engine.complete(prompt, GenerationParams(max_tokens=N_NEW,
                                                                  ignore_eos=True))
            return done, list(engine.batcher.passes), runner.prefill_rows([], 0, len(prompt))
        finally:
            await engine.aclose()

    need, whole = asyncio.run(go(None))
    limit = (need + whole) // 2  # more than a tile, less than the whole prompt
    split, passes, first_rows = asyncio.run(go(limit))
    assert one.stats.prefill_passes == 1
    s = split.stats
    assert s.prefill_passes >= 2 and s.prefill_split == "prefill memory"
    assert s.prefill_memory_bytes == limit
    assert s.prefill_passes == sum(r.n_prefill for r in passes)
    # as few as fit: the first pass took every row the limit allows, more than one tile
    assert passes[0].n_tokens == first_rows > 16
    np.testing.assert_array_equal(split.token_ids, one.token_ids)


def test_prefill_memory_below_one_tile_is_refused(tmp_path, capsys):
    path = write_model(tmp_path, "llama")
    with pytest.raises(BudgetError, match=r"--prefill-memory.*one tile of 512 prompt rows"):
        complete(path, "numpy", prefill_memory_bytes=1000)
    code = cli_run.main([str(path), "--prompt", "hi", "--max-tokens", "2",
                         "--prefill-memory", "1KB"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--prefill-memory" in err[0]
    assert cli_run.main([str(path), "--prompt", "hi", "--prefill-memory", "lots"]) == 2
    assert "--prefill-memory" in capsys.readouterr().err


def test_prompts_that_arrive_together_share_one_pass_cut_into_tiles(tmp_path):
    """Two prompts in one pass, a tile boundary inside each; each gets what it gets alone."""
    path = write_model(tmp_path, "mistral_window")
    prompts = [PROMPT[:13], PROMPT[20:29]]
    alone = [complete(path, "numpy", p, prefill_chunk=5)[0].token_ids for p in prompts]

    async def go():
        engine = await Engine.open(str(path), EngineConfig(backend="numpy", prefill_chunk=5))
        try:
            outs = await asyncio.gather(*(engine.complete(p, GenerationParams(
                max_tokens=N_NEW, ignore_eos=True)) for p in prompts))
            return outs, list(engine.batcher.passes)
        finally:
            await engine.aclose()

    outs, passes = asyncio.run(go())
    assert [o.token_ids for o in outs] == alone
    assert (passes[0].n_prefill, passes[0].n_tokens) == (2, 13 + 9)
    assert all(o.stats.prefill_passes == 1 for o in outs)


def test_a_prompt_joining_decoders_rides_their_passes_in_chunks(tmp_path):
    path = write_model(tmp_path, "llama")

    async def go():
        engine = await Engine.open(str(path), EngineConfig(backend="numpy", prefill_chunk=8))
        try:
            first = asyncio.create_task(engine.complete(PROMPT[:5], GenerationParams(
                max_tokens=40, ignore_eos=True)))
            while not any(r.n_prefill == 0 for r in engine.batcher.passes):
                await asyncio.sleep(0.001)
            late = await engine.complete(PROMPT, GenerationParams(max_tokens=N_NEW,
                                                                 ignore_eos=True))
            await first
            return late, list(engine.batcher.passes)
        finally:
            await engine.aclose()

    late, passes = asyncio.run(go())
    assert late.stats.prefill_split == "decoding"
    assert late.stats.prefill_passes == -(-len(PROMPT) // 8)
    # no decoder waited for more than a chunk of the prompt in any pass
    assert max(r.n_tokens - r.n_seqs for r in passes if r.n_prefill < r.n_seqs) <= 8 - 1
    assert late.token_ids == complete(path, "numpy", PROMPT)[0].token_ids
