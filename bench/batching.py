"""Aggregate decode throughput of 1, 2, 4, 8 concurrent streams under a memory budget.

    python -m stream_run.bench.batching                      # a ~530 MB bf16 synthetic llama
    python -m stream_run.bench.batching --model DIR --budget-fraction 0.5 -g 32 --streams 1,2,4,8

Each row runs N generations at once (random prompt ids, fixed seed, EOS ignored, greedy) on
one engine whose compute budget is a fraction of the model, so every decode step streams the
non-resident layers; the batcher decodes the N streams in one pass per step. Decode tok/s
counts the passes without prompt rows: tokens (one per stream per pass) / their wall time.
Without --model a synthetic model is written under --work-dir and deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from stream_run.bench.synth import SynthSpec, synthesize
from stream_run.engine import Engine, EngineConfig, format_size
from stream_run.loaders import LoaderConfig
from stream_run.scheduler import SchedulerConfig

SYNTH = SynthSpec(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                  num_attention_heads=16, num_key_value_heads=8, vocab_size=32000)


async def run_streams(engine: Engine, n: int, prompt_len: int, gen: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(300, engine.spec.vocab_size, prompt_len).tolist() for _ in range(n)]
    first = len(engine.batcher.passes)
    t0 = time.perf_counter()
    done = await asyncio.gather(*(engine.complete(p, max_tokens=gen, ignore_eos=True)
                                  for p in prompts))
    wall = time.perf_counter() - t0
    passes = list(engine.batcher.passes)[first:]
    decode = [r for r in passes if r.n_prefill == 0]
    tokens = sum(r.n_seqs for r in decode)
    decode_s = sum(r.wall_s for r in decode)
    assert all(len(c.token_ids) == gen for c in done)
    return {"streams": n, "decode_tok_s": tokens / decode_s,
            "step_ms": 1e3 * decode_s / len(decode),
            "bytes_per_step": int(np.median([r.bytes_read for r in decode])),
            "end_to_end_tok_s": n * gen / wall, "passes": len(passes)}


async def bench(args: argparse.Namespace, model: str) -> list[dict]:
    probe = await Engine.open(model, EngineConfig(backend="numpy"))
    total = probe.model_bytes
    probe.close()
    budget = int(total * args.budget_fraction)
    config = EngineConfig(backend="numpy", memory_budget_bytes=budget,
                          max_batch=max(args.streams), prefill_chunk=512,
                          scheduler=SchedulerConfig(adaptive=not args.fixed_prefetch),
                          loader=LoaderConfig(direct_io=args.direct_io))
    print(f"model {model}: {format_size(total)} compute form, budget {format_size(budget)}"
          f"{', O_DIRECT reads' if args.direct_io else ''}", file=sys.stderr)
    rows = []
    async with await Engine.open(model, config) as engine:
        # warm-up: JIT, and the adaptive prefetch depth settles (it only grows)
        await engine.complete([300] * 8, max_tokens=3 * args.gen, ignore_eos=True)
        trials: dict[int, list[dict]] = {n: [] for n in args.streams}
        for seed in range(args.trials):  # rows interleaved, so a burst of load hits them all
            for n in args.streams:
                trial = await run_streams(engine, n, args.prompt_len, args.gen, seed)
                trials[n].append(trial)
                print(json.dumps(trial), file=sys.stderr)
        for n in args.streams:
            row = {k: float(np.median([t[k] for t in trials[n]])) for k in trials[n][0]}
            row["best_decode_tok_s"] = max(t["decode_tok_s"] for t in trials[n])
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    base = rows[0]["decode_tok_s"]
    best = rows[0]["best_decode_tok_s"]
    lines = ["| streams | decode tok/s (aggregate, median) | x of 1 stream | best of trials "
             "(x of 1) | ms per step | MB read per step | end-to-end tok/s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {int(r['streams'])} | {r['decode_tok_s']:.1f} | "
                     f"{r['decode_tok_s'] / base:.2f}x | {r['best_decode_tok_s']:.1f} "
                     f"({r['best_decode_tok_s'] / best:.2f}x) | {r['step_ms']:.0f} | "
                     f"{r['bytes_per_step'] / 1e6:.0f} | {r['end_to_end_tok_s']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model dir/.gguf (default: synthesize one)")
    p.add_argument("--work-dir", default="/work/models", help="where a synthetic model goes")
    p.add_argument("--budget-fraction", type=float, default=0.5)
    p.add_argument("--streams", default="1,2,4,8")
    p.add_argument("-p", "--prompt-len", type=int, default=16)
    p.add_argument("-g", "--gen", type=int, default=32)
    p.add_argument("-n", "--trials", type=int, default=3)
    p.add_argument("--direct-io", action="store_true")
    p.add_argument("--fixed-prefetch", action="store_true")
    args = p.parse_args()
    args.streams = [int(s) for s in args.streams.split(",")]
    model, tmp = args.model, None
    if model is None:
        tmp = model = os.path.join(args.work_dir, "tmp-batch")
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(args.work_dir, exist_ok=True)
        synthesize(SYNTH, tmp)
    try:
        rows = asyncio.run(bench(args, model))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(table(rows))
    print("load:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
