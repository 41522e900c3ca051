"""Issue 18's bytes/token check on a `limit_compare --passes` log: each engine row's decode
passes against the active experts' bytes x (1 - expert hit rate) + the streamed dense bytes.

    python -m stream_run.bench.limit_compare MODEL.gguf --limit 4GiB --passes > run.log
    python -m stream_run.bench.moe_formula MODEL.gguf run.log --tokens 8

Per row (its last --tokens passes, summed): the routed experts' hits and misses, the bytes
read (all, and the routed experts'), the dense bytes read (the rest), and the residency
plan's streamed dense units. Predicted: the model's active experts' bytes (sparse layers x
top-k x an expert unit's bytes) x (1 - hit rate) + the dense bytes read; also with the
plan's streamed dense bytes in their place.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys

PASS_LINE = re.compile(r"\s+pass (\d+): (.*)")


def parse_rows(text: str) -> list[list[dict]]:
    """The per-pass records of each engine row in a limit_compare --passes log (a row starts
    at its pass 0)."""
    rows: list[list[dict]] = []
    for line in text.splitlines():
        m = PASS_LINE.match(line)
        if not m:
            continue
        if m.group(1) == "0" or not rows:
            rows.append([])
        rec = {}
        for kv in m.group(2).split(", "):
            k, v = kv.rsplit(" ", 1)
            rec[k] = 0.0 if v == "None" else float(v)
        rows[-1].append(rec)
    return rows


def check(passes: list[dict], tokens: int, active_bytes: float) -> dict:
    """bytes/token measured and predicted over the last `tokens` passes."""
    dec = passes[-tokens:]
    n = len(dec)

    def total(k: str) -> float:
        return sum(p.get(k, 0.0) for p in dec)

    picks = total("late_hits") + total("late_misses")
    hit = total("late_hits") / picks if picks else 0.0
    measured = total("bytes_read") / n
    dense = measured - total("late_bytes_read") / n
    plan = total("streamed_file_bytes") / n
    experts = active_bytes * (1 - hit)
    return {"passes": n, "hit_rate": hit, "measured": measured, "dense_read": dense,
            "plan_dense": plan, "predicted_experts": experts,
            "ratio": measured / (experts + dense) if experts + dense else 0.0,
            "ratio_plan": measured / (experts + plan) if experts + plan else 0.0}


def active_expert_bytes(model: str) -> tuple[float, int]:
    """Sparse layers x top-k x the mean expert unit's bytes; and the dense units' bytes."""
    from stream_run.models import moe, open_model

    index = open_model(model).index
    args = moe.moe_args(index.spec.model_type, index.spec.config)
    experts = [u.nbytes for k, u in index.units.items() if ".mlp.experts." in k]
    dense = sum(u.nbytes for k, u in index.units.items() if ".mlp.experts." not in k)
    return sum(args.sparse) * args.top_k * statistics.mean(experts), dense


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stream_run.bench.moe_formula",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("log", help="a limit_compare --passes log")
    p.add_argument("--tokens", type=int, default=8, help="decode passes per row (limit_compare "
                                                         "--tokens)")
    args = p.parse_args(argv)
    try:
        with open(args.log) as f:
            rows = parse_rows(f.read())
        if not rows:
            raise ValueError(f"{args.log}: no pass lines (run limit_compare with --passes)")
        active, dense_total = active_expert_bytes(args.model)
    except (OSError, ValueError) as exc:
        print(f"moe_formula: error: {exc}", file=sys.stderr)
        return 2
    print(f"active experts {active / 1e9:.4f} GB/token; dense units {dense_total / 1e9:.3f} GB")
    for i, passes in enumerate(rows):
        r = check(passes, args.tokens, active)
        print(f"row {i}: {r['passes']} passes, expert hit {100 * r['hit_rate']:.1f} %, "
              f"measured {r['measured'] / 1e9:.4f} GB/token; predicted experts "
              f"{r['predicted_experts'] / 1e9:.4f} + dense read {r['dense_read'] / 1e9:.4f}: "
              f"ratio {r['ratio']:.3f}; with the plan's streamed dense "
              f"{r['plan_dense'] / 1e9:.4f}: {r['ratio_plan']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
