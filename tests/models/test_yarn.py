"""YaRN RoPE scaling (Qwen2.5/Qwen3 long-context configs) through the engine, against HF
transformers in float32: the frequencies and the attention factor both matter."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from stream_run.engine import Engine, EngineConfig, GenerationParams
from stream_run.kernels import available_backends
from tests.hf_reference import hf_greedy
from tests.tiny_models import write_tiny_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT = [5, 17, 42, 99, 3, 250, 7, 11] * 3
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
BACKENDS = ["numpy"] + (["mlx"] if "mlx" in available_backends() else [])


async def engine_logits(path, backend):
    engine = await Engine.open(str(path), EngineConfig(backend=backend))
    try:
        logits = await engine.logits(PROMPT)
        done = await engine.complete(PROMPT[:8], GenerationParams(max_tokens=24,
                                                                  ignore_eos=True))
        return logits, done.token_ids
    finally:
        engine.close()


@pytest.mark.reference
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["qwen2", "qwen3", "llama"])
def test_yarn_matches_transformers(tmp_path, variant, backend):
    write_tiny_model(tmp_path, variant, config_overrides={"rope_scaling": YARN})
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path),
                                                              dtype=torch.float32).eval()
    assert model.model.rotary_emb.attention_scaling != 1.0
    with torch.no_grad():
        want = model(torch.tensor([PROMPT])).logits[0].numpy()
    logits, tokens = asyncio.run(engine_logits(tmp_path, backend))
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
    assert tokens == hf_greedy(model, PROMPT[:8], 24)


def test_longrope_is_refused_for_llama_family(tmp_path):
    write_tiny_model(tmp_path, "llama", config_overrides={"rope_scaling": {
        "rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
        "original_max_position_embeddings": 16}})
    with pytest.raises(ValueError, match="rope_scaling type 'longrope' is not supported"):
        asyncio.run(Engine.open(str(tmp_path), EngineConfig(backend="numpy")))
