"""The numba decode matvec alone: GB/s of packed weight read per second, cold weights.

    python -m stream_run.bench.matvec [--threads 1,2] [--bits 4,8] [--group-size 32]
        [--layers 30] [-r 7]

Random weights of SmolLM2-135M's decoder shapes (q, k, v, o, gate, up, down, 30 layers:
~66 MB at 4-bit group 32 with float16 scales, twice the L3 of this project's VM) and its 8-bit
tied head, run one after another through kernels.numba_kernels.qmatvec with one row of x,
as decode does. Each repetition times one pass over every matrix; prints the median [min-max]
GB/s per setting, against the RAM read rate measured the same way as stream-bench's bound.
Every layer has its own arrays (packed words XORed, scales and biases copied), so a pass reads
no array twice; the tied head (32 MB at 8-bit) is as large as the L3, so part of it may hit.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numba
import numpy as np

from stream_run.bench.env import memory_bandwidth_gbs
from stream_run.kernels.numba_kernels import qmatvec
from stream_run.kernels.quant import QuantizedWeight, quantize

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576),
          (576, 1536)]  # q, k, v, o, gate, up, down of one SmolLM2 block
HEAD = (49152, 576)


def _weights(bits: int, group_size: int, shapes: list[tuple[int, int]], n_copies: int,
             rng: np.random.Generator) -> list[QuantizedWeight]:
    out = []
    for shape in shapes:
        q = quantize(rng.standard_normal(shape).astype(np.float32), bits, group_size)
        scales, biases = q.scales.astype(np.float16), q.biases.astype(np.float16)
        out += [QuantizedWeight(q.packed ^ np.uint32(i * 2654435761 % 2**32), scales.copy(),
                                biases.copy(), bits, group_size) for i in range(n_copies)]
    return out


def _pass_s(weights: list[QuantizedWeight], xs: dict[int, np.ndarray]) -> float:
    t0 = time.perf_counter()
    for w in weights:
        qmatvec(xs[w.shape[1]], w.packed, w.scales, w.biases, w.bits, w.group_size)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stream_run.bench.matvec",
                                description=__doc__.split("\n")[0])
    p.add_argument("--threads", default="1,2", help="comma list (default 1,2)")
    p.add_argument("--bits", default="4,8", help="comma list of 4 and 8 (default 4,8)")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--layers", type=int, default=30, help="decoder blocks (default 30)")
    p.add_argument("-r", "--repetitions", type=int, default=7)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    xs = {n: rng.standard_normal((1, n)).astype(np.float32) for n in (576, 1536)}
    print(f"RAM read bandwidth: {memory_bandwidth_gbs():.2f} GB/s")
    print("| weights | bits | threads | MB per pass | GB/s median [min-max] |")
    print("|---|---:|---:|---:|---|")
    for bits in (int(b) for b in args.bits.split(",")):
        for name, shapes, copies in ((f"{args.layers} blocks", SHAPES, args.layers),
                                     ("tied head", [HEAD], 1)):
            weights = _weights(bits, args.group_size, shapes, copies, rng)
            nbytes = sum(w.nbytes for w in weights)
            for threads in (int(t) for t in args.threads.split(",")):
                numba.set_num_threads(threads)
                _pass_s(weights, xs)  # compile, first touch
                rates = [nbytes / _pass_s(weights, xs) / 1e9 for _ in range(args.repetitions)]
                print(f"| {name} | {bits} | {threads} | {nbytes / 1e6:.1f} | "
                      f"{statistics.median(rates):.1f} [{min(rates):.1f}-{max(rates):.1f}] |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
