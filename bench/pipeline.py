"""Pipeline overhead on this machine (issue 21): decode s/token of one stream, and aggregate
tok/s of several concurrent streams (2-token prompts: see _decode), for one process
at a budget against N ranks (stream-run --pipeline's stages on 127.0.0.1) at budget / N each,
with --microbatches passes in flight around the ring (default: auto, as stream-run's).

    python -m stream_run.bench.pipeline MODEL --budget 80MB --tokens 24 --streams 4 --ranks 2

prints one line per configuration, and the machine's load average before and after.
`--link ROUNDS` times only the hand-off (a one-row message around the ring).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

from stream_run.cli import pipeline as cli_pipeline
from stream_run.engine.config import EngineConfig, parse_size

PROMPT = [1, 504, 3158, 282, 4649, 30, 2]  # any ids: the same for every configuration


async def _decode(engine, tokens: int, streams: int, repeats: int) -> tuple[float, float]:
    """(best decode s/token of one stream, best aggregate tok/s of `streams` concurrent streams
    from submission to the last token). Their prompts are 2 tokens each: a pass of more than
    8 rows takes the prefill kernels (seconds for SmolLM2's Q4_1 on this machine, and noisy),
    which would swamp the decoding this compares."""
    params = engine.make_params(max_tokens=tokens, ignore_eos=True)
    prompt = [t % engine.spec.vocab_size for t in PROMPT]  # a tiny test model's too
    await engine.complete(prompt, params.replace(max_tokens=2))  # warm-up
    one, many = float("inf"), 0.0
    for _ in range(repeats):
        c = await engine.complete(prompt, params)
        one = min(one, 1 / c.stats.generation_tps)
        t0 = time.perf_counter()
        outs = await asyncio.gather(*(engine.complete(prompt[i % 6:i % 6 + 2], params)
                                      for i in range(streams)))
        wall = time.perf_counter() - t0
        many = max(many, sum(len(o.token_ids) for o in outs) / wall)
    return one, many


def _link_round_trips(model: str, rounds: int) -> None:
    """Ranks only: the round trip of a one-row decode message from rank 0 around the ring
    (the Link, as a pass sends it) against the ring backend's bare send/recv of as many
    bytes; rank 0 prints both (best of 3 runs of `rounds`)."""
    import mlx.core as mx
    import numpy as np

    from stream_run.engine.pipeline_link import (
        PASS,
        Link,
        Message,
        frame_bytes_for,
        init_group,
    )
    from stream_run.models import open_model

    group = init_group(60)
    link = Link(group, 60)
    width = open_model(model).index.spec.hidden_size
    link.frame_bytes = frame_bytes_for(width)
    meta = {"seqs": [[0, 10, [5], None, 100, 1]], "all_logits": False, "more": True,
            "drop": []}
    rows = np.ones((1, width), np.float32)
    bare = mx.array(np.zeros(link.frame_bytes, np.uint8))

    def via_link() -> None:
        if link.rank == 0:
            link.send(Message(PASS, meta, rows), link.next)
            link.recv(link.prev)
        else:
            msg = link.recv(link.prev, False)
            link.send(msg, link.next)

    def via_ring() -> None:
        if link.rank != 0:
            mx.eval(mx.distributed.recv_like(bare, link.prev, group=group, stream=mx.cpu))
        mx.eval(mx.distributed.send(bare, link.next, group=group, stream=mx.cpu))
        if link.rank == 0:
            mx.eval(mx.distributed.recv_like(bare, link.prev, group=group, stream=mx.cpu))

    for name, fn in (("link (one frame, select, watchdog)", via_link),
                     ("bare mx.distributed send/recv", via_ring)):
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(rounds):
                fn()
            best = min(best, (time.perf_counter() - t0) / rounds)
        if link.rank == 0:
            print(f"{group.size()} ranks, {name}: {best * 1e6:.0f} us per round trip of a "
                  f"{width}-wide row; load {os.getloadavg()[0]:.2f}", flush=True)


async def _run(args: argparse.Namespace) -> None:
    from stream_run.engine.engine import Engine
    from stream_run.engine.pipeline import Link, PipelineEngine, init_group

    budget = parse_size(args.budget)
    if cli_pipeline.in_rank():
        group = init_group(60)
        cli_pipeline.on_sigterm(group.rank())
        n = group.size()
        engine = await PipelineEngine.open_stage(args.model, EngineConfig(
            memory_budget_bytes=budget // n, threads=args.threads), Link(group, 600),
            microbatches=args.microbatches)
        if group.rank() != 0:
            await engine.serve()
            engine.close()
            return
        what = f"{n} ranks, {args.budget} / {n} each, layers per rank " \
               f"{[b - a for a, b in engine.stage_ranges]}, micro-batches " + (
                   f"auto ({engine.microbatches if engine.runner.all_resident() else 1})"
                   if engine.microbatches_auto else str(engine.microbatches))
    else:
        engine = await Engine.open(args.model, EngineConfig(memory_budget_bytes=budget,
                                                            threads=args.threads))
        what = f"1 process, {args.budget}"
    try:
        one, many = await _decode(engine, args.tokens, args.streams, args.repeats)
    finally:
        engine.close()
    print(f"{what}: one stream {one:.4f} s/token; {args.streams} streams {many:.2f} tok/s "
          f"aggregate; load {os.getloadavg()[0]:.2f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="stream-bench pipeline", description=__doc__)
    p.add_argument("model")
    p.add_argument("--budget", required=True, help="the total budget (each rank: / ranks)")
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--microbatches", type=int, default=None,
                   help="passes in flight around the ring (default: auto, as "
                   "--pipeline-microbatches)")
    p.add_argument("--threads", type=int, default=None,
                   help="compute threads of each process (default: the physical cores)")
    p.add_argument("--no-single", action="store_true",
                   help="skip the one-process baseline (compare runs of the pipeline)")
    p.add_argument("--link", type=int, default=0, metavar="ROUNDS",
                   help="only time the hand-off: ROUNDS round trips of a one-row message "
                   "around the ring, the link's against bare mx.distributed send/recv")
    args = p.parse_args(argv)
    if cli_pipeline.in_rank():
        if args.link:
            _link_round_trips(args.model, args.link)
        else:
            asyncio.run(_run(args))
        return 0
    print(f"load average before: {os.getloadavg()}", flush=True)
    if not args.no_single and not args.link:
        asyncio.run(_run(args))
    launch = argparse.Namespace(pipeline=args.ranks, hostfile=None)
    rc = cli_pipeline.launch(launch, "stream_run.bench.pipeline", list(sys.argv[1:]
                                                                        if argv is None else argv))
    print(f"load average after: {os.getloadavg()}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
