"""A chat's second turn (issue 20): time to first token of turn 2 against turn 1, with the
prefix cache (--kv-cache-budget) and without it, in the same run.

Turn 1 is a prompt of N tokens of real text (the GPL-3 by default) with an answer of A tokens;
turn 2 is turn 1's prompt, its answer, and M new tokens: what a chat front-end sends. Each
repeat opens a fresh engine for each setting, so turn 1 always starts cold in the engine
(the page cache is as the previous repeat left it; say so when comparing with disk figures).

    stream-bench turns MODEL --tokens 2000 --memory-budget 50% --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys

SETTINGS = ("prefix cache", "no prefix cache")
DEFAULT_TEXT = "/usr/share/common-licenses/GPL-3"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model")
    p.add_argument("--tokens", type=int, default=2000, help="turn 1's prompt tokens")
    p.add_argument("--answer", type=int, default=16, help="tokens generated per turn")
    p.add_argument("--new", type=int, default=40, help="tokens turn 2 adds after the answer")
    p.add_argument("--text", default=DEFAULT_TEXT, help="where the prompt's tokens come from")
    p.add_argument("--memory-budget", default=None,
                   help="weights budget, e.g. 4GB, or a percentage of the model's compute "
                   "form, e.g. 50%%")
    p.add_argument("--kv-cache-budget", default="2GB", help="the prefix cache's budget")
    p.add_argument("--kv-bits", type=int, choices=(4, 8), default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)


async def _turns(args: argparse.Namespace, kv_cache_budget: int, budget: str | None) -> dict:
    from stream_run.engine import Engine, EngineConfig, GenerationParams
    from stream_run.engine.config import parse_size

    config = EngineConfig(kv_cache_budget_bytes=kv_cache_budget, kv_bits=args.kv_bits,
                          threads=args.threads)
    engine = await Engine.open(args.model, config)
    try:
        if budget is not None:
            nbytes = int(engine.model_bytes * float(budget[:-1]) / 100) \
                if budget.endswith("%") else parse_size(budget)
            engine.runner.set_memory_budget(max(nbytes, engine.min_budget_bytes))
        with open(args.text, encoding="utf-8") as f:
            ids = engine.tokenizer.encode(f.read())
        if len(ids) < args.tokens + args.new:
            raise ValueError(f"--text {args.text}: {len(ids)} tokens, fewer than --tokens + "
                             f"--new ({args.tokens + args.new})")
        params = GenerationParams(max_tokens=args.answer, ignore_eos=True)
        first = ids[:args.tokens]
        one = await engine.complete(first, params)
        second = first + one.token_ids + ids[args.tokens:args.tokens + args.new]
        two = await engine.complete(second, params)
        return {"ttft1": one.stats.ttft_s, "ttft2": two.stats.ttft_s,
                "read1": one.stats.prefill_bytes_read, "read2": two.stats.prefill_bytes_read,
                "reused": two.stats.prompt_tokens_reused, "prompt2": two.stats.prompt_tokens,
                "budget": engine.cache.compute.budget_bytes, "model": engine.model_bytes}
    finally:
        await engine.aclose()


def main_from_args(args: argparse.Namespace) -> int:
    from stream_run.engine.config import format_size, parse_size

    if args.repeats < 1 or args.tokens < 1 or args.answer < 1 or args.new < 1:
        raise ValueError("--repeats, --tokens, --answer and --new must be >= 1")
    kv_budget = parse_size(args.kv_cache_budget)
    rows: dict[str, list[dict]] = {s: [] for s in SETTINGS}
    for r in range(args.repeats):
        for setting in SETTINGS:
            res = asyncio.run(_turns(args, kv_budget if setting == SETTINGS[0] else 0,
                                     args.memory_budget))
            rows[setting].append(res)
            print(f"repeat {r + 1} {setting}: turn 1 ttft {res['ttft1']:.3f} s "
                  f"({format_size(res['read1'])} read), turn 2 ttft {res['ttft2']:.3f} s "
                  f"({format_size(res['read2'])} read, {res['reused']} of {res['prompt2']} "
                  "prompt tokens reused)", flush=True)
    first = rows[SETTINGS[0]][0]
    budget = first["budget"]
    print(f"\nmodel {args.model}: compute form {format_size(first['model'])}, budget "
          f"{format_size(budget) if budget else 'unlimited'}; turn 1 {args.tokens} tokens, "
          f"answers {args.answer}, turn 2 adds {args.new}; {args.repeats} repeats")
    print(f"{'setting':<16} {'turn 1 ttft s (med/min/max)':>28} {'turn 2 ttft s':>22} "
          f"{'turn2/turn1':>11}")
    for setting, rs in rows.items():
        t1 = [x["ttft1"] for x in rs]
        t2 = [x["ttft2"] for x in rs]
        ratio = statistics.median(b / a for a, b in zip(t1, t2, strict=True))
        print(f"{setting:<16} {_mmm(t1):>28} {_mmm(t2):>22} {ratio:>11.3f}")
    return 0


def _mmm(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f}/{min(xs):.3f}/{max(xs):.3f}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="stream-bench turns")
    add_arguments(parser)
    sys.exit(main_from_args(parser.parse_args()))
