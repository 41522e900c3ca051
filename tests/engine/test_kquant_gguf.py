"""A GGUF with every block type (K-quants, Q4_0..Q8_0) runs as read, on both backends, against
HF transformers in float32 on the weights gguf-py dequantizes the file to (the independent
reference): logits of a long prompt (blocks dequantized into BLAS tiles, exact) and greedy
tokens (the decode path: kernels on the blocks, x rounded to int8 per block as llama.cpp)."""

import asyncio

import numpy as np
import pytest

from stream_run.engine import Engine, EngineConfig, GenerationParams
from tests.hf_reference import hf_greedy, hf_logits
from tests.packed_models import kquant_config, write_kquant_gguf

# a long prompt: the exact dequantize + BLAS path
PROMPT = [(37 * i + 5) % 250 + 2 for i in range(72)]
N_STEPS = 12


@pytest.fixture(scope="module")
def kquant(tmp_path_factory):
    path = tmp_path_factory.mktemp("kq") / "kquant.gguf"
    hf = write_kquant_gguf(path)
    transformers = pytest.importorskip("transformers")
    import torch

    cfg = transformers.LlamaConfig(**{k: v for k, v in kquant_config().items()
                                      if k != "model_type"})
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in hf.items()},
                          strict=False)
    return path, model


async def _run(path, backend):
    async with await Engine.open(str(path), EngineConfig(backend=backend)) as engine:
        logits = await engine.logits(PROMPT)
        tokens: list[int] = []
        params = GenerationParams(max_tokens=N_STEPS, ignore_eos=True)  # greedy
        async for chunk in engine.generate(PROMPT, params):
            tokens += chunk.token_ids
        return np.asarray(logits), tokens


@pytest.mark.parametrize("backend", ["numpy", "mlx"])
def test_every_block_type_runs_as_read_against_transformers(kquant, backend):
    path, model = kquant
    logits, tokens = asyncio.run(_run(path, backend))
    ref = hf_logits(model, PROMPT)
    scale = np.abs(ref).max()
    # numpy: blocks exact; MLX: Q2_K/Q3_K/Q6_K are float16 at read (about 1e-3 relative)
    tol = 2e-4 if backend == "numpy" else 5e-3
    np.testing.assert_allclose(logits.reshape(ref.shape), ref, atol=tol * scale, rtol=0)
    if backend == "numpy":
        assert tokens == hf_greedy(model, PROMPT, N_STEPS)
