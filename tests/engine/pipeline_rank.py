"""One rank of a pipeline test, started by mlx.launch (tests/engine/test_pipeline.py).

argv: MODEL N_TOKENS BUDGET_BYTES|none SPLIT|none [forever] [short] [streams=K] [microbatches=M]
[timeout=S] (the link's --pipeline-timeout, default 30).
Rank 0 generates N_TOKENS greedy tokens (EOS ignored) after fixed prompts of token ids, K at
once (concurrent requests, default 2: PROMPTS), and prints `RESULT {json}` with the ids and
`OVERLAPPED n` (passes sent on while another was in flight); every rank prints `MEMORY {json}`
(peak RSS, baseline, budget, KV). "forever": rank 0 generates until it is killed (the
killed-rank test); "idle": rank 0 waits after its first result (the ranks past it wait for
the next pass); "cancel": first a round whose first stream leaves after one chunk (`KEPT`);
"spec": prompt-lookup speculative decoding (`DRAFTED n`: draft tokens verified).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from stream_run.cli.pipeline import on_sigterm
from stream_run.engine.config import EngineConfig
from stream_run.engine.pipeline import Link, PipelineEngine, init_group
from stream_run.engine.stats import peak_rss_bytes

PROMPT = [5, 17, 42, 99, 7, 3, 64, 11]
PROMPTS = [PROMPT, PROMPT[:5], PROMPT[:6], PROMPT[2:], PROMPT[:3], PROMPT[1:7]]
# "short": prompts of 4, so two of them prefill in a pass of 8 rows, within the few-row
# kernels (kernels/numpy_backend.MATVEC_MAX_ROWS) whose rows do not depend on their batch; a
# pass of more rows takes the float BLAS path, which rounds otherwise (issue 19)
SHORT = [PROMPT[:4], PROMPT[1:5], PROMPT[2:6], PROMPT[4:8]]


def _line(text: str) -> None:
    """One write of one line: the ranks share the pipe."""
    sys.stdout.flush()
    os.write(1, (text + "\n").encode())


async def _cancel_one(engine, params, streams: int) -> None:
    """Streams of PROMPTS at once, the first closed after its first chunk (mid-flight when
    micro-batched); prints `KEPT {json}`: the others' ids."""
    async def first_chunk() -> None:
        async with engine.submit(PROMPTS[0], params) as gen:
            async for _ in gen:
                break

    outs = await asyncio.gather(first_chunk(), *(engine.complete(p, params)
                                                 for p in PROMPTS[1:streams]))
    _line("KEPT " + json.dumps([o.token_ids for o in outs[1:]]))


async def main() -> None:
    model, n, budget, split = sys.argv[1:5]
    opts = dict(a.split("=") for a in sys.argv[5:] if "=" in a)
    forever = "forever" in sys.argv[5:]
    streams = int(opts.get("streams", 2))
    microbatches = int(opts["microbatches"]) if "microbatches" in opts else None
    config = EngineConfig(memory_budget_bytes=None if budget == "none" else int(budget))
    group = init_group(30)
    on_sigterm(group.rank())
    counts = None if split == "none" else [int(v) for v in split.split(",")]
    timeout = float(opts.get("timeout", 30))
    engine = await PipelineEngine.open_stage(model, config, Link(group, timeout), counts,
                                             microbatches)
    if engine.link.rank == 0:
        params = engine.make_params(max_tokens=int(n), ignore_eos=True,
                                    speculative="prompt_lookup" if "spec" in sys.argv[5:]
                                    else None)
        if "cancel" in sys.argv[5:]:  # the first stream leaves after its first chunk
            await _cancel_one(engine, params, streams)
        prompts = SHORT if "short" in sys.argv[5:] else PROMPTS
        while True:
            outs = await asyncio.gather(*(engine.complete(p, params)
                                          for p in prompts[:streams]))
            _line("RESULT " + json.dumps([o.token_ids for o in outs]))
            _line(f"OVERLAPPED {getattr(engine.batcher, 'passes_overlapped', 0)}")
            _line(f"DRAFTED {sum(o.stats.draft_tokens for o in outs)}")
            if "idle" in sys.argv[5:]:  # a server with no request: wait until killed
                await asyncio.sleep(3600)
            if not forever:
                break
        kv = engine.runner.kv_bytes(len(PROMPT) + int(n)) * streams
        engine.close()
    else:
        await engine.serve()
        kv = engine.runner.kv_bytes(engine.served_positions) * 2
        engine.close()
    stage = engine.stage
    share = (stage.stop - stage.start) / engine.spec.num_hidden_layers
    _line("MEMORY " + json.dumps({
        "rank": stage.rank, "layers": [stage.start, stage.stop], "peak": peak_rss_bytes(),
        "baseline": engine.runner.baseline_rss_bytes, "budget": engine.config.memory_budget_bytes,
        "kv": int(kv * share) if stage.rank else kv}))


if __name__ == "__main__":
    asyncio.run(main())
