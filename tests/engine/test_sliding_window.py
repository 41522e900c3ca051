"""Sliding-window attention end to end: mistral, qwen2 and qwen3 configs with windows shorter
than the prompt, through the engine, against the independent reference (tests/reference_model.py
masks each layer's window as transformers does; test_reference_selfcheck checks that)."""

import asyncio
import json

import numpy as np
import pytest

from stream_run import kernels
from stream_run.engine import Engine, EngineConfig, GenerationParams
from stream_run.kernels.numpy_backend import NumpyBackend
from stream_run.loaders import ModelSpec
from stream_run.models.llama import Model
from tests.reference_model import reference_greedy, reference_logits
from tests.tiny_models import make_config, write_mlx_quantized_model, write_tiny_model

BACKENDS = [
    "numpy",
    pytest.param("mlx", marks=pytest.mark.skipif(
        "mlx" not in kernels.available_backends(), reason="mlx is not installed")),
]
PROMPT = [5, 17, 42, 99, 3, 250, 7, 11, 64, 128, 31, 2, 77, 140]  # 14 tokens > every window
N_TOKENS = 20


def overrides(variant: str, n_layers: int) -> dict:
    """A sliding config per family: mistral slides every layer; qwen2 from layer 1 on; qwen3
    alternates through layer_types."""
    if variant == "mistral":
        return {"sliding_window": 4}
    if variant == "qwen2":
        return {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}
    return {"use_sliding_window": True, "sliding_window": 3,
            "layer_types": ["sliding_attention", "full_attention"] * (n_layers // 2)}


VARIANTS = ["mistral", "qwen2", "qwen3"]


async def generated_ids(engine: Engine, ids: list[int], n: int) -> list[int]:
    out: list[int] = []
    async for chunk in engine.generate(ids, GenerationParams(max_tokens=n, ignore_eos=True)):
        out += chunk.token_ids
    assert len(out) == n
    return out


def run_engine(path, backend: str, **kw) -> tuple[np.ndarray, list[int], Engine]:
    engine = asyncio.run(Engine.open(str(path), EngineConfig(backend=backend, **kw)))
    try:
        logits = asyncio.run(engine.logits(PROMPT))
        tokens = asyncio.run(generated_ids(engine, PROMPT, N_TOKENS))
    finally:
        engine.close()
    return logits, tokens, engine


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_sliding_window_matches_reference(tmp_path, variant, backend):
    cfg, weights = write_tiny_model(tmp_path, variant, config_overrides=overrides(variant, 2))
    logits, tokens, _ = run_engine(tmp_path, backend)
    want = reference_logits(cfg, weights, PROMPT)
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
    full = {k: v for k, v in cfg.items() if k not in overrides(variant, 2)}
    assert np.abs(want - reference_logits(full, weights, PROMPT)).max() > 1e-2  # window bites
    assert tokens == reference_greedy(cfg, weights, PROMPT, N_TOKENS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_sliding_window_streamed_under_a_budget(tmp_path, variant, backend):
    cfg, weights = write_tiny_model(tmp_path, variant, n_layers=8,
                                    config_overrides=overrides(variant, 8))
    full = asyncio.run(Engine.open(str(tmp_path), EngineConfig(backend=backend)))
    budget = full.model_bytes // 4
    full.close()
    logits, tokens, engine = run_engine(tmp_path, backend, memory_budget_bytes=budget)
    assert engine.cache.compute.stats.peak_bytes <= budget
    assert engine.cache.disk_bytes_read > engine.source.index.nbytes  # it really streamed
    np.testing.assert_allclose(logits, reference_logits(cfg, weights, PROMPT), rtol=1e-4,
                               atol=1e-4)
    assert tokens == reference_greedy(cfg, weights, PROMPT, N_TOKENS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", [1, 3, 4, 7])  # below, at and above the window of 4
def test_chunked_prefill_across_the_window(tmp_path, backend, chunk):
    cfg, weights = write_tiny_model(tmp_path, "mistral", config_overrides={"sliding_window": 4})
    _, tokens, _ = run_engine(tmp_path, backend, prefill_chunk=chunk)
    assert tokens == reference_greedy(cfg, weights, PROMPT, N_TOKENS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_sequences_each_keep_their_window(tmp_path, backend):
    """Batched passes: sequences at different offsets share each pass, each attends through
    its own cache's rings."""
    cfg, weights = write_tiny_model(tmp_path, "qwen2", n_layers=4,
                                    config_overrides=overrides("qwen2", 4))
    prompts, lengths = [PROMPT, PROMPT[3:5], PROMPT[::-1][:9]], [N_TOKENS, 12, 17]
    engine = asyncio.run(Engine.open(str(tmp_path), EngineConfig(backend=backend)))

    async def run():
        return await asyncio.gather(*(generated_ids(engine, p, n)
                                      for p, n in zip(prompts, lengths, strict=True)))

    try:
        results = asyncio.run(run())
        assert max(r.n_seqs for r in engine.batcher.passes) == 3
    finally:
        engine.close()
    for prompt, n, got in zip(prompts, lengths, results, strict=True):
        assert got == reference_greedy(cfg, weights, prompt, n)


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_numpy_blocks_on_sliding_layers(tmp_path, monkeypatch, variant):
    """Quantized weights take the fused kernels: a sliding layer's decode step runs the
    one-call block on its ring (fused.decoder_block), a prompt of several rows the three calls
    (kv.attend on the window)."""
    from stream_run.kernels import fused

    calls = []
    real = fused.decoder_block
    monkeypatch.setattr(fused, "decoder_block", lambda *a: calls.append(1) or real(*a))
    cfg, weights = write_mlx_quantized_model(tmp_path, variant, 4, 32)
    cfg.update(overrides(variant, 2))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    prompt = PROMPT[:7]  # <= 8 rows: the prompt's pass is fused too; 7 > every window
    engine = asyncio.run(Engine.open(str(tmp_path), EngineConfig(backend="numpy")))
    try:
        got = asyncio.run(generated_ids(engine, prompt, N_TOKENS))
    finally:
        engine.close()
    assert got == reference_greedy(cfg, weights, prompt, N_TOKENS)
    n_sliding = sum(w is not None for w in spec_windows(cfg))
    # every layer's decode steps in one call; the prompt's pass only on full layers
    assert len(calls) == (N_TOKENS - 1) * 2 + (2 - n_sliding)


def spec_windows(cfg: dict) -> list[int | None]:
    return Model(ModelSpec.from_dict(cfg), NumpyBackend()).layer_windows()


@pytest.mark.parametrize(("variant", "extra", "want"), [
    ("llama", {"sliding_window": 4}, [None] * 4),
    ("mistral", {"sliding_window": 4}, [4] * 4),
    ("mistral", {"sliding_window": None}, [None] * 4),
    ("qwen2", {"use_sliding_window": False, "sliding_window": 4, "max_window_layers": 1},
     [None] * 4),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2},
     [None, None, 4, 4]),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 4}, [None] * 4),  # HF default: 28
    ("qwen3", {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 3},
     [None, None, None, 3]),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 3,
               "layer_types": ["sliding_attention", "full_attention"] * 2}, [3, None, 3, None]),
])
def test_layer_windows_follow_the_config(variant, extra, want):
    assert spec_windows(make_config(variant, 4, extra)) == want


def test_layer_types_of_the_wrong_length_are_refused():
    cfg = make_config("qwen3", 4, {"use_sliding_window": True, "sliding_window": 3,
                                   "layer_types": ["sliding_attention"] * 3})
    with pytest.raises(ValueError, match="layer_types has 3 entries for 4 layers"):
        spec_windows(cfg)


def test_sliding_cache_memory_is_bounded_by_the_window(tmp_path):
    write_tiny_model(tmp_path, "mistral", config_overrides={"sliding_window": 4})
    engine = asyncio.run(Engine.open(str(tmp_path), EngineConfig(backend="numpy")))
    try:
        kv = engine.model.make_kv_cache(1000)
    finally:
        engine.close()
    assert kv.windows == [4, 4]
    assert kv.nbytes == 2 * 2 * 4 * 2 * 16 * 4  # layers * (k, v) * window * Hkv * D * float32
