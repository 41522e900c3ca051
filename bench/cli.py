"""stream-bench: disk and streaming studies on synthetic or real models.

    stream-bench synth --arch llama --shape 7b --dtype bf16 --out DIR
"""

from __future__ import annotations

import argparse
import os
import sys

from engine import BudgetError, MissingTensorError
from engine.config import format_size


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="stream-bench", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    s = sub.add_parser("synth", help="write a synthetic HF model with random weights")
    s.add_argument("--arch", default="llama", choices=("llama", "mistral", "qwen2", "qwen3"))
    s.add_argument("--shape", default="7b", help="7b, 13b, 70b, tiny, or custom")
    s.add_argument("--dtype", default="bf16", choices=("bf16", "f16", "f32"))
    s.add_argument("--out", required=True, help="output directory (must not exist)")
    s.add_argument("--seed", type=int, default=0)
    for name in ("hidden-size", "intermediate-size", "layers", "heads", "kv-heads", "vocab"):
        s.add_argument(f"--{name}", type=int, help="with --shape custom")
    t = sub.add_parser("stream", help="engine read rate and s/token vs the raw disk rate")
    t.add_argument("model")
    t.add_argument("--budget", default=None, help="compute-tier budget, e.g. 4GB")
    t.add_argument("--tokens", type=int, default=4)
    t.add_argument("--prefetch-depth", type=int, default=2)
    t.add_argument("--backend", default="numpy", choices=("numpy", "mlx", "auto"))
    t.add_argument("--io-workers", type=int, default=8)
    t.add_argument("--json", default=None, help="append the result as one JSON line here")
    return p


def stream(args: argparse.Namespace) -> int:
    import json
    import statistics

    from bench.env import run_metadata
    from bench.streaming import run_stream
    from engine.config import parse_size

    budget = None if args.budget is None else parse_size(args.budget)
    r = run_stream(args.model, budget, args.tokens, args.prefetch_depth, args.backend,
                   args.io_workers)
    s = r.summary()
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({**s, "meta": run_metadata()}) + "\n")
    med = statistics.median
    print("| model | budget | cache | raw GB/s | engine GB/s | engine/raw | s/token "
          "(median [min-max]) | bytes/token | I/O stall s | compute s | depth | peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {os.path.basename(r.model.rstrip('/'))} | "
          f"{format_size(budget) if budget else 'unlimited'} | {r.cache} | {r.raw_gbs:.2f} | "
          f"{r.engine_gbs:.2f} | {s['engine_vs_raw']:.2f} | {med(r.s_per_token):.2f} "
          f"[{min(r.s_per_token):.2f}-{max(r.s_per_token):.2f}] | "
          f"{format_size(med(r.bytes_per_token))} | {med(r.io_stall_s):.2f} | "
          f"{med(r.compute_s):.2f} | {r.prefetch_depth} | {format_size(r.peak_rss_bytes)} |")
    return 0


def synth(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from bench.synth import SynthSpec, synthesize

    if args.shape == "custom":
        fields = {"hidden_size": args.hidden_size, "intermediate_size": args.intermediate_size,
                  "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
                  "num_key_value_heads": args.kv_heads or args.heads, "vocab_size": args.vocab}
        missing = [k for k, v in fields.items() if v is None]
        if missing:
            raise ValueError(f"--shape custom needs {', '.join(missing)}")
        spec = SynthSpec(arch=args.arch, dtype=args.dtype, seed=args.seed, **fields)
    else:
        spec = SynthSpec.from_shape(args.shape, arch=args.arch, dtype=args.dtype, seed=args.seed)
    print(f"writing {args.out}: {args.arch} {args.shape} {args.dtype}, "
          f"{format_size(spec.nbytes)}", file=sys.stderr)
    with tqdm(total=spec.nbytes, unit="B", unit_scale=True, file=sys.stderr) as bar:
        synthesize(spec, args.out, progress=bar.update)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"synth": synth, "stream": stream}[args.command](args)
    except (ValueError, OSError, BudgetError, MissingTensorError) as exc:
        print(f"stream-bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nstream-bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
