"""Run in a fresh process by test_memory.py: warm up on a tiny model, then generate from a
larger one under a budget; print JSON with the RSS baseline, the peak and the KV cache bytes.

Usage: python -m tests.engine.rss_probe BIG_DIR TINY_DIR BUDGET_BYTES|none TOKENS
"""

import asyncio
import gc
import json
import sys

from stream_run.engine import Engine, EngineConfig, GenerationParams
from stream_run.engine.stats import peak_rss_bytes, rss_bytes

PROMPT = [1, 2, 3, 4, 5, 6, 7, 8]


async def generate(path: str, budget: int | None, tokens: int) -> dict:
    engine = await Engine.open(path, EngineConfig(backend="numpy", memory_budget_bytes=budget))
    try:
        async for _ in engine.generate(PROMPT, GenerationParams(max_tokens=tokens,
                                                                 ignore_eos=True)):
            pass
        kv = engine.model.make_kv_cache(len(PROMPT) + tokens)
        return {"kv_bytes": kv.nbytes, "model_bytes": engine.model_bytes,
                "cache_peak_bytes": engine.cache.compute.stats.peak_bytes}
    finally:
        engine.close()


def main() -> None:
    big, tiny, budget_arg, tokens = sys.argv[1:5]
    budget = None if budget_arg == "none" else int(budget_arg)
    asyncio.run(generate(tiny, None, 2))  # imports, kernel compilation, thread pools
    gc.collect()
    base = rss_bytes()
    out = asyncio.run(generate(big, budget, int(tokens)))
    print(json.dumps({**out, "base_rss_bytes": base, "peak_rss_bytes": peak_rss_bytes()}))


if __name__ == "__main__":
    main()
