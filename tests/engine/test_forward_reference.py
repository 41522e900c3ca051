"""The streamed engine against the independent numpy reference (tests/reference_model.py) on
tiny random models written as real HF checkpoints."""

import asyncio

import numpy as np
import pytest

from stream_run.engine import Engine, EngineConfig, GenerationParams, ReadError
from stream_run.scheduler import SchedulerConfig
from tests.reference_model import reference_greedy, reference_logits
from tests.tiny_models import write_mlx_quantized_model, write_tiny_model

BACKENDS = ["numpy", "mlx"]
VARIANTS = ["llama", "llama_tied", "llama3_rope", "mistral", "qwen2", "qwen3"]
PROMPT = [5, 17, 42, 99, 3, 250, 7, 11, 64, 128, 31]


async def generated_ids(engine: Engine, ids: list[int], n: int) -> list[int]:
    out: list[int] = []
    last = None
    async for chunk in engine.generate(ids, GenerationParams(max_tokens=n, ignore_eos=True)):
        out += chunk.token_ids
        last = chunk
    assert last is not None and last.finish_reason == "length"
    assert last.stats.generation_tokens == n == len(out)
    return out


def open_engine(path, backend="numpy", **kw) -> Engine:
    return asyncio.run(Engine.open(str(path), EngineConfig(backend=backend, **kw)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_reference(tmp_path, variant, backend):
    cfg, weights = write_tiny_model(tmp_path, variant)
    engine = open_engine(tmp_path, backend)
    try:
        got = asyncio.run(engine.logits(PROMPT))
    finally:
        engine.close()
    want = reference_logits(cfg, weights, PROMPT)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["llama", "qwen3"])
def test_greedy_tokens_match_reference_for_32_steps(tmp_path, variant, backend):
    cfg, weights = write_tiny_model(tmp_path, variant)
    engine = open_engine(tmp_path, backend)
    try:
        got = asyncio.run(generated_ids(engine, PROMPT, 32))
    finally:
        engine.close()
    want = reference_greedy(cfg, weights, PROMPT, 32)
    assert got == want


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_and_sharded_checkpoints(tmp_path, dtype):
    cfg, weights = write_tiny_model(tmp_path, "llama", sharded=True, dtype=dtype)
    engine = open_engine(tmp_path)
    try:
        got = asyncio.run(engine.logits(PROMPT))
        assert len({t.path for u in engine.source.index.units.values()
                    for t in u.tensors.values()}) > 1
    finally:
        engine.close()
    np.testing.assert_allclose(got, reference_logits(cfg, weights, PROMPT), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_quarter_budget_gives_identical_tokens(tmp_path, backend):
    write_tiny_model(tmp_path, "llama", n_layers=8)
    full = open_engine(tmp_path, backend)
    try:
        want = asyncio.run(generated_ids(full, PROMPT, 32))
        model_bytes = full.model_bytes
    finally:
        full.close()
    small = open_engine(tmp_path, backend, memory_budget_bytes=model_bytes // 4)
    try:
        got = asyncio.run(generated_ids(small, PROMPT, 32))
        assert small.cache.compute.stats.peak_bytes <= model_bytes // 4
        assert small.cache.disk_bytes_read > small.source.index.nbytes  # it really streamed
    finally:
        small.close()
    assert got == want


def test_chunked_prefill_equals_one_shot(tmp_path):
    write_tiny_model(tmp_path, "qwen2")
    one = open_engine(tmp_path)
    chunked = open_engine(tmp_path, prefill_chunk=3)
    try:
        a = asyncio.run(generated_ids(one, PROMPT, 12))
        b = asyncio.run(generated_ids(chunked, PROMPT, 12))
    finally:
        one.close()
        chunked.close()
    assert a == b


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetch_depth_does_not_change_tokens(tmp_path, depth):
    cfg, weights = write_tiny_model(tmp_path, "mistral")
    engine = open_engine(tmp_path, scheduler=SchedulerConfig(prefetch_depth=depth))
    try:
        got = asyncio.run(generated_ids(engine, PROMPT, 8))
    finally:
        engine.close()
    assert got == reference_greedy(cfg, weights, PROMPT, 8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits, group", [(4, 32), (8, 64), (3, 64), (6, 64), (5, 32), (2, 32)])
def test_mlx_quantized_checkpoint_matches_reference(tmp_path, backend, bits, group):
    cfg, weights = write_mlx_quantized_model(tmp_path, "llama", bits, group)
    engine = open_engine(tmp_path, backend)
    try:
        got = asyncio.run(engine.logits(PROMPT))
    finally:
        engine.close()
    np.testing.assert_allclose(got, reference_logits(cfg, weights, PROMPT), rtol=1e-4, atol=1e-4)


def test_read_error_mid_stream_names_file_and_unit_and_engine_recovers(tmp_path):
    write_tiny_model(tmp_path, "llama", n_layers=4)
    full = open_engine(tmp_path)
    small = open_engine(tmp_path, memory_budget_bytes=full.model_bytes // 2)
    full.close()

    def fail(path, offset, nbytes):
        raise OSError(5, "Input/output error")

    try:
        small.reader.fault_hook = fail
        with pytest.raises(ReadError, match=r"model\.safetensors: read of unit '\w+(\.\d+)?' "
                                            r"failed at byte \d+: Input/output error"):
            asyncio.run(generated_ids(small, PROMPT, 4))
        assert small.cache.compute.pinned() == sorted(
            k for k in small.scheduler.resident if k in small.cache.compute)
        small.reader.fault_hook = None
        assert len(asyncio.run(generated_ids(small, PROMPT, 4))) == 4
    finally:
        small.close()


@pytest.mark.parametrize("variant", ["llama", "llama_tied", "qwen2", "qwen3"])
def test_fused_decode_blocks_match_reference(tmp_path, monkeypatch, variant):
    """Quantized blocks on few rows take the fused kernels (kernels/fused.py; one sequence:
    the whole block in one call): a 6-token prompt and every decode step; the tokens must
    still be the reference's."""
    from stream_run.kernels import fused

    calls = []
    real = fused.decoder_block
    monkeypatch.setattr(fused, "decoder_block", lambda *a: calls.append(1) or real(*a))
    cfg, weights = write_mlx_quantized_model(tmp_path, variant, 4, 32)
    engine = open_engine(tmp_path)
    try:
        got = asyncio.run(generated_ids(engine, PROMPT[:6], 16))
    finally:
        engine.close()
    assert got == reference_greedy(cfg, weights, PROMPT[:6], 16)
    assert len(calls) == 16 * cfg["num_hidden_layers"]  # prefill + 15 decode passes, all fused


@pytest.mark.skipif("mlx" not in __import__("stream_run.kernels").kernels.available_backends(),
                    reason="mlx is not installed")
@pytest.mark.parametrize("variant", ["llama", "llama_tied", "qwen2", "qwen3"])
@pytest.mark.parametrize("quantized", [True, False])
def test_mlx_compiled_blocks_match_reference(tmp_path, monkeypatch, variant, quantized):
    """On MLX, decode passes run each block as two mx.compile'd halves around attention, for
    packed and float weights alike; the tokens must still be the reference's."""
    from stream_run.kernels.mlx_backend import MLXBackend

    calls = []
    real = MLXBackend.block_attention_input
    monkeypatch.setattr(MLXBackend, "block_attention_input",
                        lambda self, *a: calls.append(1) or real(self, *a))
    if quantized:
        cfg, weights = write_mlx_quantized_model(tmp_path, variant, 4, 32)
    else:
        cfg, weights = write_tiny_model(tmp_path, variant)
    engine = open_engine(tmp_path, "mlx")
    try:
        got = asyncio.run(generated_ids(engine, PROMPT[:6], 16))
    finally:
        engine.close()
    assert got == reference_greedy(cfg, weights, PROMPT[:6], 16)
    assert len(calls) == 16 * cfg["num_hidden_layers"]  # prefill + 15 decode passes, all fused
