"""A prompt's linear on GGUF blocks (kernels/gguf_gemm.py) against the dequantize + BLAS path it
replaced, in one process, alternating, so both see the same load from other work.

    python -m stream_run.bench.gguf_gemm [--types Q4_0,Q4_K,Q6_K] [--rows 512]
        [--shapes 4096x4096,4096x11008,11008x4096] [-r 5]

Shapes are in x out (a 7B's q/o, gate/up, down). Weights: gguf-py's quantization of normal
values where it has one (else random codes with fixed f16 scales). Prints per setting the
min and median ms of each path over the repetitions, as GOP/s (2 x rows x in x out per call),
and the GEMM's speed-up on the medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from stream_run.bench.gguf_matvec import weights
from stream_run.kernels import gguf_blocks, gguf_gemm
from stream_run.kernels.numpy_backend import DEQUANT_BLOCK_ELEMENTS
from stream_run.kernels.quant import BlockWeight


def blocks(qtype: str, n_out: int, n_in: int, rng: np.random.Generator) -> np.ndarray:
    """gguf-py's quantization of normal values where it has one, else random codes with
    bench/gguf_matvec.py's fixed f16 scale fields."""
    try:
        from gguf import GGMLQuantizationType
        from gguf.quants import quantize

        w = rng.standard_normal((n_out, n_in)).astype(np.float32)
        return quantize(w, GGMLQuantizationType[qtype])
    except (ImportError, NotImplementedError):
        return weights(qtype, n_in, n_out, 0, rng)[0].data


def dequant_blas(x: np.ndarray, w: BlockWeight) -> np.ndarray:
    """The path before the GEMM: float32 blocks of rows, then BLAS."""
    n_out, n_in = w.shape
    y = np.empty((x.shape[0], n_out), dtype=np.float32)
    step = max(1, DEQUANT_BLOCK_ELEMENTS // n_in)
    for lo in range(0, n_out, step):
        rows = np.arange(lo, min(lo + step, n_out), dtype=np.int64)
        np.matmul(x, gguf_blocks.dequantize_rows(w, rows).T, out=y[:, lo:lo + rows.size])
    return y


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--types", default="Q4_0,Q4_K,Q6_K")
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--shapes", default="4096x4096,4096x11008,11008x4096")
    p.add_argument("-r", "--repeats", type=int, default=5)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"{'type':5s} {'in x out':>11s} {'rows':>5s}  {'gemm ms min/med':>16s} "
          f"{'GOP/s':>6s}  {'BLAS ms min/med':>16s} {'GOP/s':>6s}  speed-up")
    for qtype in args.types.split(","):
        for shape in args.shapes.split(","):
            n_in, n_out = (int(v) for v in shape.split("x"))
            w = BlockWeight(blocks(qtype, n_out, n_in, rng), qtype, n_in)
            x = rng.standard_normal((args.rows, n_in)).astype(np.float32)
            paths = {"gemm": lambda x=x, w=w: gguf_gemm.gemm(x, w),
                     "blas": lambda x=x, w=w: dequant_blas(x, w)}
            for f in paths.values():
                f()  # compile, warm
            times: dict[str, list[float]] = {name: [] for name in paths}
            for _ in range(args.repeats):
                for name, f in paths.items():
                    t = time.perf_counter()
                    f()
                    times[name].append(time.perf_counter() - t)
            ops = 2 * args.rows * n_in * n_out / 1e9
            cells = []
            for name in paths:
                lo, med = min(times[name]), statistics.median(times[name])
                cells.append(f"{lo * 1e3:7.1f}/{med * 1e3:7.1f} {ops / med:6.0f}")
            ratio = statistics.median(times["blas"]) / statistics.median(times["gemm"])
            print(f"{qtype:5s} {shape:>11s} {args.rows:5d}  {cells[0]}  {cells[1]}  {ratio:.2f}x",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
