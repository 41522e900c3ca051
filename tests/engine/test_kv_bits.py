"""--kv-bits through the engine (issue 20, item 3): a prompt in one pass and one token at a time
agree (the pass's rows attend from the cache either way), the logits stay near the float32
cache's, the budget counts the bytes the cache really takes, and bad settings exit 2."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from stream_run.cli import run as cli_run
from stream_run.engine import Engine, EngineConfig, GenerationParams
from stream_run.kernels import available_backends
from tests.tiny_models import write_tiny_model

BACKENDS = ["numpy"] + (["mlx"] if "mlx" in available_backends() else [])
PROMPT = [int(t) for t in np.random.default_rng(11).integers(3, 300, 40)]
# qwen3: head_dim 32 (groups of 32); llama with one head of 64 (a group of 64 at 8 bits);
# mistral with a window on every layer, qwen2 with sliding layers from layer 1: rings stay
# float32 beside quantized full layers
MODELS = {"qwen3": ("qwen3", {}),
          "llama64": ("llama", {"num_attention_heads": 1, "num_key_value_heads": 1}),
          "qwen2_sliding": ("qwen2", {"num_attention_heads": 2, "num_key_value_heads": 1,
                                      "use_sliding_window": True, "sliding_window": 9,
                                      "max_window_layers": 1})}


@pytest.fixture(params=list(MODELS))
def model(request, tmp_path_factory):
    variant, overrides = MODELS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    write_tiny_model(path, variant, config_overrides=overrides)
    return path


async def prompt_logits(path, backend: str, kv_bits: int | None):
    """(logits of the prompt in one pass, the same one token per pass, cache bytes, the bytes
    the runner counts for it)."""
    engine = await Engine.open(str(path), EngineConfig(backend=backend, kv_bits=kv_bits))
    try:
        whole = await engine.logits(PROMPT)
        kv = await engine.runner.make_kv_cache(len(PROMPT))
        steps = []
        for t in PROMPT:
            logits, _ = await engine.forward(np.asarray([t]), kv, all_logits=True)
            steps.append(logits[0])
        return whole, np.concatenate(steps), kv.nbytes, engine.runner.kv_bytes(len(PROMPT))
    finally:
        await engine.aclose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantized_cache_paths_agree_and_stay_near_float32(model, backend):
    ref, ref_steps, ref_bytes, _ = asyncio.run(prompt_logits(model, backend, None))
    errors = {}
    for bits in (8, 4):
        whole, steps, nbytes, counted = asyncio.run(prompt_logits(model, backend, bits))
        tol = 1e-4 if backend == "numpy" else 1e-3
        np.testing.assert_allclose(steps, whole, rtol=tol, atol=tol)
        assert nbytes == counted < ref_bytes
        errors[bits] = np.abs(whole - ref).max()
    spread = ref.std()
    assert errors[8] < 0.1 * spread, errors
    assert errors[8] < errors[4], errors  # coarser codes, larger error: the cache is in use
    np.testing.assert_allclose(ref_steps, ref, rtol=1e-3, atol=1e-3)


def test_generation_and_stats_with_kv_bits(tmp_path, capsys):
    write_tiny_model(tmp_path, "qwen3")

    async def go():
        async with await Engine.open(str(tmp_path), kv_bits=8) as engine:
            return await engine.complete(
                PROMPT, GenerationParams(max_tokens=6, ignore_eos=True))

    out = asyncio.run(go())
    assert out.stats.generation_tokens == 6
    assert cli_run.main([str(tmp_path), "--prompt", "hello", "--max-tokens", "3",
                         "--kv-bits", "4"]) == 0


def test_bad_kv_bits_settings_exit_2(tmp_path, capsys):
    write_tiny_model(tmp_path, "llama")  # head_dim 16: no group of 32 fits
    assert cli_run.main([str(tmp_path), "--prompt", "hi", "--kv-bits", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--kv-bits needs a head_dim that is a multiple of 32, got 16" \
        in err[0]
    with pytest.raises(SystemExit) as exc:
        cli_run.main([str(tmp_path), "--prompt", "hi", "--kv-bits", "3"])
    assert exc.value.code == 2
    assert "--kv-bits" in capsys.readouterr().err
    with pytest.raises(ValueError, match="kv_bits must be one of 4, 8"):
        EngineConfig(kv_bits=3)
