"""deepseek_v3 decode reads kv_b_proj per head as stored (kernels' head_linear and
head_linear_t): no pass of at most HEAD_ROWS rows dequantizes it (models/deepseek.py
absorbable), and its tokens are those of the dequantize-once path a prompt takes."""

import asyncio

import pytest

from stream_run.engine import Engine, EngineConfig, GenerationParams
from stream_run.models import deepseek
from tests.models.test_deepseek_v3 import BACKENDS, PROMPT, write_deepseek

pytest.importorskip("torch")


def complete(path, backend: str) -> list[int]:
    async def go():
        engine = await Engine.open(str(path), EngineConfig(backend=backend))
        try:
            done = await engine.complete(PROMPT, GenerationParams(max_tokens=16,
                                                                  ignore_eos=True))
            return done.token_ids
        finally:
            engine.close()
    return asyncio.run(go())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [4, 8])
def test_decode_reads_kv_b_as_stored_with_the_tokens_of_dequantizing_it(
        tmp_path, monkeypatch, backend, bits):
    from stream_run.convert.convert import convert_model

    write_deepseek(tmp_path / "hf", v_head_dim=16, q_lora_rank=64)  # groups of 32
    convert_model(str(tmp_path / "hf"), str(tmp_path / "q"), bits=bits, group_size=32,
                  progress=False)
    calls = []
    real = deepseek.absorbable

    def counted(ops, w, heads, cols):
        calls.append(w.shape)
        return real(ops, w, heads, cols)

    monkeypatch.setattr(deepseek, "absorbable", counted)
    assert len(PROMPT) <= deepseek.HEAD_ROWS
    tokens = complete(tmp_path / "q", backend)
    assert calls == []  # prompt and decode passes: kv_b_proj never dequantized
    monkeypatch.setattr(deepseek, "HEAD_ROWS", 0)  # every pass dequantizes it once
    assert complete(tmp_path / "q", backend) == tokens
    assert calls
