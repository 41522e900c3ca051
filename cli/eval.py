"""stream-eval: perplexity of a model over a text file with a sliding window, streamed like
generation (any --memory-budget), and a --compare table of quantization recipes against it.

The text is tokenized whole, as plain text (no chat template; BOS only if the tokenizer adds
one to plain text, as stream-run does for a raw prompt). Windows of ctx tokens advance by
stride; each starts from a fresh KV cache and scores only the tokens the previous window did
not (the HF "perplexity of fixed-length models" scheme), so every token after the first is
scored exactly once. log-softmax runs in float64.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from stream_run.cli.common import (
    OneLineParser,
    UsageError,
    add_engine_flags,
    engine_config,
    run_main,
)
from stream_run.convert.calibrate import GPTQ
from stream_run.convert.calibrate import read_text as read_calibration
from stream_run.convert.repack import QUANTIZERS
from stream_run.engine.config import EngineConfig, format_size
from stream_run.engine.engine import Engine
from stream_run.engine.perplexity import (
    DEFAULT_CTX,
    EvalResult,
    check_window,
    encode_text,
    evaluate,
    perplexity,
    storage_label,
)
from stream_run.kernels import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES

log = logging.getLogger(__name__)

DEFAULT_BITS = 4  # the base bits of a mixed or file recipe (attention and MLP in `mixed`)
DEFAULT_GROUP_SIZE = 64


@dataclass(frozen=True)
class RecipeSpec:
    """A --compare entry: convert_model(bits=, group_size=, recipe=) and its table label."""

    label: str
    bits: int
    group_size: int
    recipe: str  # "uniform" | "mixed" | a recipe file path

    @property
    def bits_label(self) -> str:
        kind = {"uniform": str(self.bits), "mixed": "mixed"}.get(self.recipe, "file")
        return f"{kind}/g{self.group_size}"


@dataclass
class CompareRow:
    label: str
    bits_label: str
    result: EvalResult
    change_pct: float  # perplexity change vs the source model


def parse_recipe(spec: str) -> RecipeSpec:
    """'8', '4:g32', 'mixed', 'mixed:g128', 'PATH' or 'PATH:g32' -> RecipeSpec (a bit width or
    `mixed` wins over a file of the same name; write ./8 for the file).

    Raises:
        ValueError: not a bit width, `mixed` or an existing file, or a bad group size.
    """
    base, sep, suffix = spec.rpartition(":g")
    if not sep:
        base, suffix = spec, str(DEFAULT_GROUP_SIZE)
    group = int(suffix) if suffix.isdigit() else None
    if group in SUPPORTED_GROUP_SIZES:
        assert group is not None
        if base == "mixed":
            return RecipeSpec(spec, DEFAULT_BITS, group, "mixed")
        if base.isdigit() and int(base) in SUPPORTED_BITS:
            return RecipeSpec(spec, int(base), group, "uniform")
        if os.path.isfile(base):
            return RecipeSpec(spec, DEFAULT_BITS, group, base)
    if os.path.isfile(spec):  # a recipe file whose own name ends in ":g..."
        return RecipeSpec(spec, DEFAULT_BITS, DEFAULT_GROUP_SIZE, spec)
    raise ValueError(
        f"unknown recipe {spec!r}: expected one of {', '.join(map(str, SUPPORTED_BITS))} or "
        f"mixed, optionally with :g{'|:g'.join(map(str, SUPPORTED_GROUP_SIZES))}, or a recipe "
        "file")


async def compare(model: str, text: str | Sequence[int], recipes: Sequence[RecipeSpec],
                  config: EngineConfig | None = None, *, ctx: int | None = None,
                  stride: int | None = None, max_tokens: int | None = None,
                  work_dir: str | None = None, quantize: dict[str, Any] | None = None
                  ) -> list[CompareRow]:
    """Perplexity of model, then of model converted with each recipe (one at a time, in a
    temp dir under work_dir, deleted after use). All score the same ids: text encoded by the
    source model's tokenizer, or token ids used as they are. quantize: more convert_model
    arguments (quantizer, calibration, calibration_tokens).

    Raises:
        ValueError: a conversion failed (the message names the recipe).
    """
    from stream_run.convert.convert import convert_model  # lazy: only --compare needs the converter

    engine = await Engine.open(model, config)
    try:
        ids = await encode_text(engine, text, max_tokens)
        source = await perplexity(engine, ids, ctx, stride)
        source_label = storage_label(engine.source.index)
    finally:
        engine.close()
    rows = [CompareRow("source", source_label, source, 0.0)]
    with tempfile.TemporaryDirectory(prefix="stream-eval-", dir=work_dir) as tmp:
        for i, r in enumerate(recipes):
            out = os.path.join(tmp, f"recipe-{i}")
            log.info("converting %s with %s", model, r.label)
            try:
                await asyncio.to_thread(convert_model, model, out, bits=r.bits,
                                        group_size=r.group_size, recipe=r.recipe, force=False,
                                        progress=False, **(quantize or {}))
            except (ValueError, KeyError, OSError, NotImplementedError) as exc:
                raise ValueError(f"recipe {r.label}: conversion failed: {exc}") from exc
            res = await evaluate(out, ids, config, ctx=source.ctx, stride=source.stride)
            res.model = f"{model} ({r.label})"
            change = 100.0 * (res.perplexity / source.perplexity - 1.0)
            rows.append(CompareRow(r.label, r.bits_label, res, change))
            shutil.rmtree(out, ignore_errors=True)
    return rows


def compare_table(rows: Sequence[CompareRow]) -> str:
    """A Markdown table: recipe, bits/group, file size, perplexity, change, tokens/s; rows[0]
    is the source model the others are compared with."""
    lines = ["| recipe | bits/group | size | perplexity | vs source | tok/s |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for i, row in enumerate(rows):  # rows[0] is the source model
        r = row.result
        change = "ref" if i == 0 else f"{row.change_pct:+.2f} %"
        lines.append(f"| {row.label} | {row.bits_label} | {format_size(r.file_bytes)} | "
                     f"{r.perplexity:.4f} | {change} | {r.tokens_per_s:.1f} |")
    return "\n".join(lines)


def summary_line(r: EvalResult) -> str:
    windows = f"{r.n_windows} window" + ("s" if r.n_windows != 1 else "")
    return (f"perplexity {r.perplexity:.4f}, NLL {r.nll:.4f} nats/token over {r.n_scored} "
            f"tokens ({windows}, ctx {r.ctx}, stride {r.stride}), "
            f"{r.tokens_per_s:.1f} tokens/s ({r.forward_s:.2f} s forward, backend {r.backend})"
            f", model {format_size(r.file_bytes)}")


# ---- CLI ----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="stream-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="model directory or .gguf file")
    p.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file to score")
    p.add_argument("--ctx", type=int, default=None,
                   help=f"window length in tokens (default min({DEFAULT_CTX}, model context))")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens each window advances (default ctx // 2; below ctx)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="score only the first N tokens of the text")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--compare", nargs="+", metavar="RECIPE", default=None,
                   help="convert MODEL with each recipe (8, 6, 4, 4:g32, mixed, 3, 2, "
                   "mixed:g32, or a recipe file) and print a table against MODEL")
    p.add_argument("--convert-dir", default=None,
                   help="where --compare writes converted models (default: the temp dir)")
    p.add_argument("--quantizer", choices=(*QUANTIZERS, GPTQ), default=None,
                   help="--compare converts with this stream-convert --quantizer (default rtn)")
    p.add_argument("--calibration", metavar="FILE", default=None,
                   help="--compare: the calibration text of --quantizer gptq")
    p.add_argument("--calibration-tokens", metavar="N", type=int, default=None,
                   help="--compare: gptq uses the first N tokens of --calibration")
    add_engine_flags(p)
    return p


def read_text(path: str) -> str:
    """The --text file; raises UsageError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise UsageError(f"--text {path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"--text {path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise UsageError(f"--text {path}: {exc.strerror or exc}") from None
    if not text.strip():
        raise UsageError(f"--text {path}: the text is empty")
    return text


def quantize_flags(args: argparse.Namespace) -> dict[str, Any]:
    """--quantizer / --calibration / --calibration-tokens as convert_model arguments (only
    those given, checked here so that a bad flag fails before the source's long pass)."""
    given = {k: v for k, v in (("quantizer", args.quantizer), ("calibration", args.calibration),
                               ("calibration_tokens", args.calibration_tokens)) if v is not None}
    if given and not args.compare:
        flag = "--" + next(iter(given)).replace("_", "-")
        raise UsageError(f"{flag} is only used with --compare")
    gptq = given.get("quantizer") == GPTQ
    if gptq and args.calibration is None:
        raise UsageError("--quantizer gptq needs --calibration FILE (a text to calibrate on)")
    if not gptq and (args.calibration is not None or args.calibration_tokens is not None):
        raise UsageError("--calibration and --calibration-tokens are only used by --quantizer "
                         "gptq")
    if args.calibration_tokens is not None and args.calibration_tokens < 1:
        raise UsageError(f"--calibration-tokens must be >= 1, got {args.calibration_tokens}")
    if gptq:
        read_calibration(args.calibration)  # names the file if it cannot be read
    return given


def _flag_error(exc: ValueError) -> UsageError:
    """check_window's message -> one naming the flag."""
    return UsageError(f"--{str(exc).split()[0]}: {exc}")


async def run(args: argparse.Namespace) -> int:
    config = engine_config(args)
    if args.max_tokens is not None and args.max_tokens < 2:
        raise UsageError(f"--max-tokens must be >= 2, got {args.max_tokens}")
    recipes = []
    for spec in args.compare or ():
        try:
            recipes.append(parse_recipe(spec))
        except ValueError as exc:
            raise UsageError(f"--compare: {exc}") from None
    if args.convert_dir is not None and not os.path.isdir(args.convert_dir):
        raise UsageError(f"--convert-dir {args.convert_dir}: not a directory")
    quantize = quantize_flags(args)
    text = read_text(args.text)
    engine = await Engine.open(args.model, config)
    try:  # check the text and window flags before any long pass
        ids = await encode_text(engine, text, args.max_tokens)
        if len(ids) < 2:
            raise UsageError(f"--text {args.text}: {len(ids)} token(s); perplexity needs >= 2")
        try:
            ctx, stride = check_window(args.ctx, args.stride, engine.max_context)
        except ValueError as exc:
            raise _flag_error(exc) from None
        result = None if recipes else await perplexity(engine, ids, ctx, stride)
    finally:
        engine.close()
    if result is not None:
        print(json.dumps({"text": args.text, **result.to_dict()}) if args.json
              else summary_line(result))
        return 0
    rows = await compare(args.model, ids, recipes, config, ctx=ctx, stride=stride,
                         work_dir=args.convert_dir, quantize=quantize)
    if args.json:
        print(json.dumps({"text": args.text, "rows": [
            {"recipe": r.label, "bits": r.bits_label, "change_pct": r.change_pct,
             **r.result.to_dict()} for r in rows]}))
    else:
        src = rows[0].result
        print(f"{args.text}: {src.n_scored} tokens scored, ctx {src.ctx}, stride {src.stride}, "
              f"backend {src.backend}\n")
        print(compare_table(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main("stream-eval", run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
