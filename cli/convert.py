"""stream-convert: an HF, MLX-quantized, GGUF or packed model -> the packed layer format
(convert/convert.py holds the library half)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from stream_run.cli.common import USER_ERRORS, OneLineParser
from stream_run.cli.signals import exit_status, sigterm_raises
from stream_run.convert.calibrate import DEFAULT_TOKENS, GPTQ
from stream_run.convert.convert import QUANTIZER_NAMES, convert_model
from stream_run.convert.repack import DEFAULT_QUANTIZER
from stream_run.engine.errors import ConvertError
from stream_run.kernels.quant import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES

log = logging.getLogger("stream_run.convert")


def build_parser() -> argparse.ArgumentParser:

    p = OneLineParser(prog="stream-convert", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="HF or MLX model directory, .gguf file, or packed directory")
    p.add_argument("out", help="output directory (must not exist unless --force)")
    p.add_argument("--bits", type=int, choices=SUPPORTED_BITS, default=4)
    p.add_argument("--group-size", type=int, choices=SUPPORTED_GROUP_SIZES, default=None,
                   help="default 64; a tensor already in affine blocks at no more bits (a "
                   "Q4_1 GGUF at --bits 4) then keeps its own group size: an exact copy")
    p.add_argument("--recipe", default="uniform",
                   help="uniform | mixed (embeddings and head 8-bit) | none | a JSON recipe "
                   "file (format: see convert/recipes.py)")
    p.add_argument("--quantizer", choices=QUANTIZER_NAMES, default=DEFAULT_QUANTIZER,
                   help="how weights that cannot be copied losslessly are requantized: rtn "
                   "(default; min/max round-to-nearest, identical to mx.quantize), mse (per "
                   "group a clip search and least-squares scale and bias: lower squared weight "
                   "error, about 4x slower, but measured worse perplexity at 3-5 bits) or gptq "
                   "(GPTQ on the linears, calibrated on --calibration text: slower, needs the "
                   "text; the lowest perplexity measured on SmolLM2)")
    p.add_argument("--calibration", metavar="FILE", default=None,
                   help="UTF-8 text for --quantizer gptq (any text like what the model will "
                   "read; not the text you evaluate on)")
    p.add_argument("--calibration-tokens", metavar="N", type=int, default=DEFAULT_TOKENS,
                   help=f"gptq uses the first N tokens of --calibration (default "
                   f"{DEFAULT_TOKENS}), in windows of up to 512")
    p.add_argument("--force", action="store_true",
                   help="replace an existing stream-convert output at OUT")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--verbose", "-v", action="store_true")
    return p



def main(argv: list[str] | None = None) -> int:

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quantizer == GPTQ and args.calibration is None:
        parser.error("--quantizer gptq needs --calibration FILE (a text to calibrate on)")
    if args.quantizer != GPTQ and args.calibration is not None:
        parser.error(f"--calibration is only used by --quantizer gptq, not {args.quantizer}")
    if args.calibration_tokens < 1:
        parser.error(f"--calibration-tokens must be >= 1, got {args.calibration_tokens}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    t0, started = time.perf_counter(), time.time()
    try:
        with sigterm_raises():  # so SIGTERM, too, removes the half-written output
            manifest = convert_model(args.src, args.out, bits=args.bits,
                                     group_size=args.group_size, recipe=args.recipe,
                                     force=args.force, progress=not args.quiet,
                                     quantizer=args.quantizer, calibration=args.calibration,
                                     calibration_tokens=args.calibration_tokens)
    except (ConvertError, *USER_ERRORS) as exc:
        if args.verbose:
            log.exception("details")
        print(f"stream-convert: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        # the signal is held while OUT is swapped, so OUT is either as it was or complete
        done = _written_since(args.out, started)
        print(f"\nstream-convert: interrupted; {args.out} "
              f"{'was written before it' if done else 'is as it was'}", file=sys.stderr)
        return exit_status(exc)
    from stream_run.engine.config import format_size

    print(f"stream-convert: wrote {args.out}: {len(manifest['units'])} units, "
          f"{format_size(manifest['nbytes'])}, recipe {manifest['recipe']['name']}, "
          f"quantizer {manifest['quantizer']}, {manifest['tensors']['copied_exactly']} "
          f"quantized tensors copied exactly and {manifest['tensors']['requantized']} "
          f"re-quantized, in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


def _written_since(out: str, t: float) -> bool:
    try:
        return os.stat(os.path.join(out, "manifest.json")).st_mtime >= t
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
