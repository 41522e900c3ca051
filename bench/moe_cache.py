"""The expert cache on a Mixture-of-Experts model (issue 18): expert hit rate, bytes/token and
s/token per memory budget and expert eviction order (--expert-cache lru | lfru), and the check
of bytes/token against the active experts' bytes x (1 - hit rate) + the streamed dense bytes.

Each (budget, order) runs in a fresh engine: a warm-up request (a prompt and a few tokens, so
the cache holds what a running server's would), then a measured request of one prompt token
and --tokens generated ones, every pass one row (decode-shaped), sampled at temperature 1
(seeded: every point sees the same tokens while the engine's output is the same). Reads use
O_DIRECT with --direct-io (cold disk reads each time; else the page cache may serve them).

    python -m stream_run.bench.moe_cache MODEL --budgets 40%,70% --tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys

import numpy as np

from stream_run.engine import Engine, EngineConfig, GenerationParams
from stream_run.engine.config import format_size, parse_size
from stream_run.engine.sampling import SamplingParams
from stream_run.loaders import LoaderConfig
from stream_run.models import open_model


def budget_bytes(text: str, model_bytes: int) -> int:
    """'40%' of the model's compute bytes, or a size ('1.5GB')."""
    text = text.strip()
    if text.endswith("%"):
        return int(float(text[:-1]) / 100 * model_bytes)
    return parse_size(text)


async def run_point(path: str, budget: int | None, order: str, tokens: int, warmup: int,
                    direct_io: bool, seed: int) -> dict:
    cfg = EngineConfig(backend="numpy", memory_budget_bytes=budget, expert_cache=order,
                       loader=LoaderConfig(direct_io=direct_io))
    rng = np.random.default_rng(seed)
    async with await Engine.open(path, cfg) as eng:
        warm = rng.integers(0, 256, 16).tolist()
        await eng.complete(warm, GenerationParams(max_tokens=warmup, ignore_eos=True,
                                                  sampling=SamplingParams(1.0, seed=seed + 1)))
        first = len(eng.batcher.passes)
        # sampled (temperature 1, seeded): greedy decoding of random weights loops on a few
        # tokens, so its routing would repeat and any cache would hit
        sampling = SamplingParams(temperature=1.0, seed=seed)
        done = await eng.complete([int(rng.integers(0, 256))],
                                  GenerationParams(max_tokens=tokens, ignore_eos=True,
                                                   sampling=sampling))
        passes = list(eng.batcher.passes)[first:]
        resident = set(eng.cache.resident)
        model_bytes = eng.model_bytes
    s = done.stats
    n = max(1, len(passes))
    return {"budget": budget, "order": order, "passes": n, "model_bytes": model_bytes,
            "expert_hit_rate": s.expert_hit_rate, "expert_picks": s.expert_hits + s.expert_misses,
            "bytes_per_token": s.bytes_read / n, "expert_bytes_per_token": s.expert_bytes_read / n,
            "s_per_token": statistics.median(p.wall_s for p in passes) if passes else 0.0,
            "resident": sorted(resident)}


async def record_picks(path: str, tokens: int, seed: int) -> list[str]:
    """The expert units the router picks, in order, over one sampled request of `tokens`
    tokens (unlimited budget). Wraps the MoE model's experts call: a bench-only probe."""
    from stream_run.models import moe

    trace: list[str] = []
    original = moe.Model._experts

    def record(self, layer_idx, tile_rows, r, units):
        trace.extend(moe.expert_key(layer_idx, int(e)) for e in r.idx.reshape(-1))
        return original(self, layer_idx, tile_rows, r, units)

    moe.Model._experts = record
    try:
        async with await Engine.open(path, EngineConfig(backend="numpy")) as eng:
            await eng.complete([int(np.random.default_rng(seed).integers(0, 256))],
                               GenerationParams(max_tokens=tokens, ignore_eos=True,
                                                sampling=SamplingParams(1.0, seed=seed)))
    finally:
        moe.Model._experts = original
    return trace


def replay(trace: list[str], n_experts: int, fractions: list[float]) -> list[dict]:
    """Hit rates of LRU and LFRU tiers holding a fraction of the model's experts (each one
    unit of size), over the trace: the eviction order alone, without the engine's pins."""
    from stream_run.cache import Tier
    from stream_run.cache.experts import LFRUOrder, LRUOrder

    keys = sorted(set(trace))
    rows = []
    for frac in fractions:
        row: dict = {"fraction": frac, "capacity": max(1, int(frac * n_experts))}
        for order in (LRUOrder(), LFRUOrder(half_life=4.0 * n_experts)):  # the engine's default
            order.set_experts(keys)
            tier = Tier("compute", row["capacity"], evict_order=order)
            for key in trace:
                if tier.get(key) is None:
                    tier.put(key, None, 1)
            row[order.name] = tier.stats.hit_rate
        rows.append(row)
    return rows


def formula(index, row: dict) -> dict:
    """bytes/token predicted from the hit rate: active experts' bytes x (1 - hit rate) + the
    dense units the plan streams (all on-disk bytes)."""
    from stream_run.models import moe

    spec = index.spec
    args = moe.moe_args(spec.model_type, spec.config)
    experts = [k for k in index.units if ".mlp.experts." in k]
    expert_bytes = statistics.mean(index.units[k].nbytes for k in experts)
    active = sum(args.sparse) * args.top_k * expert_bytes
    resident = set(row["resident"])
    planned = sum(u.nbytes for k, u in index.units.items()
                  if ".mlp.experts." not in k and k not in resident)
    measured_dense = row["bytes_per_token"] - row["expert_bytes_per_token"]
    experts = active * (1 - row["expert_hit_rate"])
    predicted = experts + measured_dense
    return {"active_expert_bytes": active, "planned_dense_bytes": planned,
            "dense_bytes_per_token": measured_dense, "predicted_expert_bytes": experts,
            "predicted_bytes_per_token": predicted,
            "measured_over_predicted": row["bytes_per_token"] / predicted if predicted else 0.0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stream_run.bench.moe_cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--budgets", default="40%,70%",
                   help="memory budgets: percent of the model's compute bytes, or sizes")
    p.add_argument("--orders", default="lru,lfru", help="expert eviction orders to compare")
    p.add_argument("--tokens", type=int, default=32, help="generated tokens measured")
    p.add_argument("--warmup", type=int, default=8, help="tokens of the warm-up request")
    p.add_argument("--direct-io", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="append one JSON line per point")
    p.add_argument("--replay", type=int, default=0,
                   help="also record the router's picks over this many sampled tokens and "
                   "replay them through LRU and LFRU tiers of 10-60 %% of the experts")
    args = p.parse_args(argv)
    try:
        index = open_model(args.model).index
        orders = args.orders.split(",")
        bad = [o for o in orders if o not in ("lru", "lfru")]
        if bad:
            raise ValueError(f"--orders: unknown {bad[0]!r}; choose from lru, lfru")
        if args.tokens < 2:
            raise ValueError(f"--tokens must be >= 2, got {args.tokens}")
        probe = asyncio.run(run_point(args.model, None, "lru", 2, 1, False, args.seed))
        budgets = [budget_bytes(b, probe["model_bytes"]) for b in args.budgets.split(",")]
    except (ValueError, OSError) as exc:
        print(f"moe_cache: error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.model}: {format_size(index.nbytes)} on disk, "
          f"{format_size(probe['model_bytes'])} in compute form; {args.tokens} tokens per point")
    print("GB/token: read per token; experts: of it, routed experts' (predicted: the active "
          "experts' bytes x (1 - hit rate)); dense: the rest (plan: the dense units the "
          "residency plan streams, an upper bound: LRU keeps some in the leftover room); "
          "meas/pred: GB/token over predicted experts + dense")
    print(f"{'budget':>10} {'order':>5} {'hit rate':>8} {'GB/token':>9} {'experts':>9} "
          f"{'predicted':>9} {'dense':>9} {'plan':>9} {'meas/pred':>9} {'s/token':>8}")
    if args.replay:
        trace = asyncio.run(record_picks(args.model, args.replay, args.seed))
        n_experts = sum(".mlp.experts." in k for k in index.units)
        print(f"replay: {len(trace)} picks over {args.replay} tokens, {n_experts} experts")
        print(f"{'cached':>7} {'experts':>7} {'lru':>6} {'lfru':>6}")
        for r in replay(trace, n_experts, [0.1, 0.2, 0.3, 0.4, 0.6]):
            print(f"{100 * r['fraction']:6.0f}% {r['capacity']:7d} {100 * r['lru']:5.1f}% "
                  f"{100 * r['lfru']:5.1f}%")
    for budget in budgets:
        for order in orders:
            row = asyncio.run(run_point(args.model, budget, order, args.tokens, args.warmup,
                                        args.direct_io, args.seed))
            row.update(formula(index, row))
            gb = [row[k] / 1e9 for k in ("bytes_per_token", "expert_bytes_per_token",
                                         "predicted_expert_bytes", "dense_bytes_per_token",
                                         "planned_dense_bytes")]
            print(f"{format_size(budget):>10} {order:>5} {100 * row['expert_hit_rate']:7.1f}% "
                  + " ".join(f"{g:9.4f}" for g in gb)
                  + f" {row['measured_over_predicted']:9.3f} {row['s_per_token']:8.3f}",
                  flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps({k: v for k, v in row.items() if k != "resident"}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
