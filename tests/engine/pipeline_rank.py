"""One rank of a pipeline test, started by mlx.launch (tests/engine/test_pipeline.py).

argv: MODEL N_TOKENS BUDGET_BYTES|none SPLIT|none [forever]. Rank 0 generates N_TOKENS greedy
tokens (EOS ignored) after a fixed prompt of token ids, twice at once (two concurrent
requests), and prints `RESULT {json}` with the ids; every rank prints `MEMORY {json}` (peak RSS,
baseline, budget, KV). "forever": rank 0 generates until it is killed (the killed-rank test).
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


def _line(text: str) -> None:
    """One write of one line: the ranks share the pipe."""
    sys.stdout.flush()
    os.write(1, (text + "\n").encode())


async def main() -> None:
    model, n, budget, split = sys.argv[1:5]
    forever = sys.argv[5:] == ["forever"]
    config = EngineConfig(memory_budget_bytes=None if budget == "none" else int(budget))
    group = init_group(30)
    on_sigterm(group.rank())
    counts = None if split == "none" else [int(v) for v in split.split(",")]
    engine = await PipelineEngine.open_stage(model, config, Link(group, 30), counts)
    if engine.link.rank == 0:
        params = engine.make_params(max_tokens=int(n), ignore_eos=True)
        while True:
            outs = await asyncio.gather(engine.complete(PROMPT, params),
                                        engine.complete(PROMPT[:5], params))
            _line("RESULT " + json.dumps([o.token_ids for o in outs]))
            if not forever:
                break
        kv = engine.runner.kv_bytes(len(PROMPT) + int(n)) * 2
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
