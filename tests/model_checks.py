"""The engine side of the model-file tests (tests/models/): one run (logits of a long prompt,
greedy tokens, bytes read), and requests through stream-serve that must share passes."""

from __future__ import annotations

import asyncio

from stream_run.engine import Engine, EngineConfig, GenerationParams


def run_engine(path, prompt: list[int], n_new: int, backend: str = "numpy",
               budget: int | None = None):
    """(logits of prompt * 3, greedy tokens after prompt, bytes read, model bytes)."""
    async def go():
        engine = await Engine.open(str(path), EngineConfig(backend=backend,
                                                            memory_budget_bytes=budget))
        try:
            logits = await engine.logits(prompt * 3)
            done = await engine.complete(prompt, GenerationParams(max_tokens=n_new,
                                                                  ignore_eos=True))
            return logits, done.token_ids, done.stats.bytes_read, engine.model_bytes
        finally:
            engine.close()
    return asyncio.run(go())


def assert_requests_share_passes(path, prompts: list[list[int]]) -> None:
    """The same completions one at a time and all at once through stream-serve (greedy), and
    the concurrent ones shared passes."""
    import openai

    from stream_run.server.app import ServerConfig
    from tests.server.harness import ServerThread

    name = "tiny"
    server = ServerThread.for_model(path, ServerConfig(name, max_tokens_cap=64), max_batch=4)
    try:
        server.wait_loaded()
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0,
                               timeout=60)
        alone = [client.completions.create(model=name, prompt=p, max_tokens=20,
                                           temperature=0).choices[0].text for p in prompts]
        before = len(server.engine.batcher.passes)

        async def together():
            async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="x",
                                          max_retries=0, timeout=60) as aclient:
                outs = await asyncio.gather(*(aclient.completions.create(
                    model=name, prompt=p, max_tokens=20, temperature=0) for p in prompts))
            return [o.choices[0].text for o in outs]

        assert asyncio.run(together()) == alone
        passes = list(server.engine.batcher.passes)[before:]
        assert max(r.n_seqs for r in passes) >= 2
    finally:
        server.close()


def convert_8bit_reference(model, src, out) -> tuple[dict, dict]:
    """stream-convert src to 8-bit group 32 at out; returns the HF model's state dict with each
    weight the packed file quantized replaced by what it dequantizes to (the reference the
    engine on the packed model must equal), and the packed tensors by name."""
    import torch
    from safetensors.numpy import load_file

    from stream_run.convert.convert import convert_model
    from stream_run.kernels.quant import QuantizedWeight, dequantize

    convert_model(str(src), str(out), bits=8, group_size=32, progress=False)
    packed = {}
    for f in out.glob("*.safetensors"):
        packed.update(load_file(str(f)))
    state = {}
    for name, value in model.state_dict().items():
        stem = name.removesuffix(".weight")
        if f"{stem}.scales" in packed:
            qw = QuantizedWeight(packed[name], packed[f"{stem}.scales"],
                                 packed[f"{stem}.biases"], 8, 32)
            state[name] = torch.from_numpy(dequantize(qw).reshape(value.shape))
        else:
            state[name] = value
    return state, packed
