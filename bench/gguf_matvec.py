"""The GGUF block matvec alone (kernels/gguf_blocks.py): GB/s of weight bytes read, cold weights,
against the machine's read bandwidth measured with all cores.

    python -m stream_run.bench.gguf_matvec [--types Q4_0,Q8_0,Q4_K,Q5_K,Q6_K] [-n 1,4]
        [--shapes 4096x4096,4096x11008,11008x4096,576x1536,1536x576] [--threads N] [-r 9]
        [--footprint-mb 1024] [--generic] [--gguf MODEL.gguf]

Shapes are in x out: a 7B model's q/o 4096x4096, gate/up 4096x11008, down 11008x4096, and
SmolLM2's gate/up 576x1536 and down 1536x576 (K types need in % 256 == 0: 576 is skipped).
Each (type, shape) gets random blocks with finite f16 scales, copied until the copies fill
--footprint-mb (over twice the 480 MB L3 this VM reports), and one repetition times a pass of
matvec over every copy, as decode reads each layer's weights once. Prints per setting the
median [min-max] GB/s of weight bytes over the repetitions, the per-call time, and the
median rate as a share of the bound: a numba prange sum over a uint8 array of the same
footprint (read as 8-byte words) with the same threads (default: every CPU), its passes
alternating with the matvec passes so that both see the same load from other work on the
machine. The bound is a simple reader, not a ceiling: the matvec, which prefetches, can beat it.
With --gguf, one row per N: a pass over the file's matrices that decode multiplies each token
(every 2-D block-quantized tensor but token_embd), read from its mmap as the engine would.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numba
import numpy as np

from stream_run.bench.env import _parallel_sum  # the RAM bound's read pass
from stream_run.kernels.gguf_blocks import FAST_KERNELS, matvec
from stream_run.kernels.quant import GGUF_BLOCK_TYPES, BlockWeight

SHAPES = "4096x4096,4096x11008,11008x4096,576x1536,1536x576"
HALF_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
               "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def weights(qtype: str, n_in: int, n_out: int, footprint: int,
            rng: np.random.Generator) -> list[BlockWeight]:
    """Copies of random (n_out, n_in) blocks filling about footprint bytes, one buffer."""
    elems, nbytes = GGUF_BLOCK_TYPES[qtype]
    row_bytes = n_in // elems * nbytes
    n_copies = max(2, footprint // (n_out * row_bytes))
    raw = rng.integers(0, 256, (n_copies, n_out, n_in // elems, nbytes), dtype=np.uint8)
    scale = np.array([0.01, -0.003], dtype="<f2").view(np.uint8)
    for i, off in enumerate(HALF_FIELDS[qtype]):
        raw[..., off:off + 2] = scale[2 * i:2 * i + 2]
    return [BlockWeight(copy.reshape(n_out, row_bytes), qtype, n_in) for copy in raw]


def model_weights(path: str) -> list[BlockWeight]:
    """The block-quantized matrices of a .gguf file that decode multiplies every token (all 2-D
    ones but token_embd, which decode only gathers a row of), in file order, as views."""
    from gguf import GGUFReader

    out = []
    for t in GGUFReader(path).tensors:
        if t.tensor_type.name in GGUF_BLOCK_TYPES and len(t.shape) == 2 and \
                not t.name.startswith("token_embd"):
            data = np.asarray(t.data)
            out.append(BlockWeight(data.reshape(int(t.shape[1]), -1), t.tensor_type.name,
                                   int(t.shape[0])))
    return out


def pass_s(ws: list[BlockWeight], xs: dict[int, np.ndarray], generic: bool) -> float:
    t0 = time.perf_counter()
    for w in ws:
        matvec(xs[w.n_in], w, generic=generic)
    return time.perf_counter() - t0


def row(label: str, ws: list[BlockWeight], xs: dict[int, np.ndarray], generic: bool,
        words: np.ndarray, repetitions: int) -> str:
    """One table row: passes over ws alternate with read passes over words (the bound), so
    both see the same load from whatever else runs on the machine."""
    pass_s(ws[:2], xs, generic)  # compile or load, first touch
    pass_s(ws, xs, generic)
    _parallel_sum(words, 256)
    times, bounds = [], []
    for _ in range(repetitions):
        times.append(pass_s(ws, xs, generic))
        t0 = time.perf_counter()
        _parallel_sum(words, 256)
        bounds.append(words.nbytes / (time.perf_counter() - t0) / 1e9)
    rates = [sum(w.nbytes for w in ws) / t / 1e9 for t in times]
    med, bound = statistics.median(rates), statistics.median(bounds)
    n = next(iter(xs.values())).shape[0]
    path = "generic" if generic or ws[0].qtype not in FAST_KERNELS else "fast"
    return (f"| {label} | {n} | {path} | {statistics.median(times) / len(ws) * 1e6:.0f} | "
            f"{med:.1f} [{min(rates):.1f}-{max(rates):.1f}] | {bound:.1f} [{min(bounds):.1f}-"
            f"{max(bounds):.1f}] | {100 * med / bound:.0f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stream_run.bench.gguf_matvec",
                                description=__doc__.split("\n")[0])
    p.add_argument("--types", default="Q4_0,Q8_0,Q4_K,Q5_K,Q6_K")
    p.add_argument("--shapes", default=SHAPES, help=f"in x out, comma list (default {SHAPES})")
    p.add_argument("-n", "--rows", default="1,4", help="rows of x, comma list (default 1,4)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("-r", "--repetitions", type=int, default=9)
    p.add_argument("--footprint-mb", type=int, default=1024)
    p.add_argument("--generic", action="store_true",
                   help="also time the generic decode-and-dot path of the fast types")
    p.add_argument("--gguf", help="time one pass over this .gguf's matrices instead (per token)")
    args = p.parse_args(argv)
    numba.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    footprint = args.footprint_mb << 20
    print(f"threads {args.threads}, footprint {args.footprint_mb} MB per setting, "
          f"load {os.getloadavg()[0]:.2f}")
    print("| type | in x out | N | path | us/call | GB/s median [min-max] | "
          "bound GB/s median [min-max] | % of bound |")
    print("|---|---|---:|---|---:|---|---:|---:|")
    words = np.ones(footprint // 8, dtype=np.uint64)
    if args.gguf:
        ws = model_weights(args.gguf)
        mix = "+".join(sorted({w.qtype for w in ws}))
        label = f"{mix} | {os.path.basename(args.gguf)}: {len(ws)} matrices"
        for n in (int(s) for s in args.rows.split(",")):
            xs = {k: rng.standard_normal((n, k)).astype(np.float32) for k in {w.n_in for w in ws}}
            print(row(label, ws, xs, False, words, args.repetitions), flush=True)
        return 0
    for qtype in args.types.split(","):
        for shape in args.shapes.split(","):
            n_in, n_out = (int(s) for s in shape.split("x"))
            if n_in % GGUF_BLOCK_TYPES[qtype][0]:
                print(f"| {qtype} | {shape} | - | in is not a multiple of the block | | | | |")
                continue
            ws = weights(qtype, n_in, n_out, footprint, rng)
            paths = [False] + ([True] if args.generic and qtype in FAST_KERNELS else [])
            for n in (int(s) for s in args.rows.split(",")):
                xs = {n_in: rng.standard_normal((n, n_in)).astype(np.float32)}
                for generic in paths:
                    print(row(f"{qtype} | {shape}", ws, xs, generic, words, args.repetitions),
                          flush=True)
            del ws
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
