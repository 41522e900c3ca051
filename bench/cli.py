"""stream-bench: disk and streaming studies on synthetic or real models.

    stream-bench synth --arch llama --shape 7b --dtype bf16 --out DIR
"""

from __future__ import annotations

import argparse
import sys

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
    return p


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
        return {"synth": synth}[args.command](args)
    except (ValueError, OSError) as exc:
        print(f"stream-bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nstream-bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
