"""MLX variants side by side, in one process: the compiled block halves on or off, through
the engine and as a direct pass. The check of issue 7's MLX path on a GPU.

    python -m stream_run.bench.mlx_variants MODEL [MODEL ...] -p 128 -n 128 -r 3

Each variant opens its own engine on the same model (resident, default budget), runs one
warm-up of each test, then r repetitions; the variants are interleaved rep by rep so a drift of
the machine spreads over all of them. "direct" decodes greedily by calling the model's steps in
a plain loop on the compute thread, with the engine's resident weights and no scheduler,
sampler or asyncio: what the engine adds is the difference. Prints a Markdown table per model:
tok/s median [min-max].
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

import numpy as np

from stream_run.bench.decode import run_test
from stream_run.engine import Engine, EngineConfig
from stream_run.models.base import Batch, SeqRows

VARIANTS = {"compiled": True, "ops": False}  # name: compiled block halves on decode passes


async def _open(model: str, compiled: bool) -> Engine:
    engine = await Engine.open(model, EngineConfig(backend="mlx"))
    engine.backend.compile_blocks = compiled
    return engine


def _direct_decode(engine: Engine, n: int) -> float:
    """n greedy decode steps as a plain loop over the model's steps (on the compute thread,
    every unit resident); returns tok/s."""
    model, tier = engine.model, engine.cache.compute
    kv = model.make_kv_cache(n + 1)
    tok = 1
    t0 = time.perf_counter()
    for _ in range(n):
        x = None
        for call in model.calls(Batch([SeqRows(np.asarray([tok]), kv)])):
            weights = {k: tier.peek(k) for k in call.units}
            assert all(v is not None for v in weights.values()), "model not resident"
            x = call.run(x, weights)
        kv.advance(1)
        tok = int(np.argmax(x[-1]))
    return n / (time.perf_counter() - t0)


async def bench(model: str, tests: list[tuple[str, int]], reps: int,
                names: list[str]) -> dict[tuple[str, str], list[float]]:
    engines = {name: await _open(model, VARIANTS[name]) for name in names}
    loop = asyncio.get_running_loop()
    rates: dict[tuple[str, str], list[float]] = {}
    try:
        rng = np.random.default_rng(0)
        for kind, n in tests:
            for engine in engines.values():
                await run_test(engine, kind, n, rng)  # warm-up: compile, kernels, caches
            for _ in range(reps):
                for name, engine in engines.items():
                    seconds, _ = await run_test(engine, kind, n, rng)
                    rates.setdefault((name, f"{kind}{n}"), []).append(n / seconds)
                    if kind == "tg":
                        rate = await loop.run_in_executor(engine.scheduler._compute,
                                                          _direct_decode, engine, n)
                        rates.setdefault((name, f"direct tg{n}"), []).append(rate)
    finally:
        for engine in engines.values():
            engine.close()
    return rates


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stream_run.bench.mlx_variants", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+")
    p.add_argument("-p", type=int, default=128, help="prompt tokens (0: skip)")
    p.add_argument("-n", type=int, default=128, help="generated tokens (0: skip)")
    p.add_argument("-r", type=int, default=3, help="repetitions after one warm-up")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma list of {', '.join(VARIANTS)}")
    args = p.parse_args(argv)
    names = args.variants.split(",")
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        p.error(f"--variants: unknown {', '.join(bad)}; expected some of {', '.join(VARIANTS)}")
    import mlx.core as mx

    print(f"# mlx {mx.__version__}, default device {mx.default_device()}")
    tests = [(k, n) for k, n in (("pp", args.p), ("tg", args.n)) if n > 0]
    columns = [f"{k}{n}" for k, n in tests] + ([f"direct tg{args.n}"] if args.n > 0 else [])
    for model in args.models:
        rates = asyncio.run(bench(model, tests, args.r, names))
        print(f"\n## {model}\n\n| variant | " + " | ".join(f"{c} tok/s" for c in columns)
              + " |\n|---|" + "---|" * len(columns))
        for name in names:
            cells = []
            for c in columns:
                r = rates[(name, c)]
                cells.append(f"{statistics.median(r):.1f} [{min(r):.1f}-{max(r):.1f}]")
            print(f"| {name} | " + " | ".join(cells) + " |")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
