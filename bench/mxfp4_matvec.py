"""The MXFP4 matvec alone (kernels/mxfp4_kernels.py) beside the GGUF Q4_0 one (kernels/
gguf_blocks.py, llama.cpp-style int8 dot products) on the same shapes: GB/s of weight bytes
read and the time per call, cold weights.

    python -m stream_run.bench.mxfp4_matvec [--shapes 2880x5760,2880x2880] [-n 1,4] [-r 5]
        [--footprint-mb 512] [--threads N] [--kinds MXFP4,MXFP4-ref,Q4_0]

Shapes are in x out: gpt-oss's expert gate_up (2880x5760) and down (2880x2880). Each (kind,
shape) gets random blocks (finite scales), copied until the copies fill --footprint-mb, and one
repetition times a pass of matvec over every copy, as decode reads each expert's weights once.
Prints per setting the median [min-max] GB/s over the repetitions and the median time per call.
MXFP4 is 17 bytes per 32 weights, Q4_0 18. MXFP4-ref: the plain-numba decode-then-dot kernel
(mxfp4_kernels.matvec_reference), the vector kernel's A/B baseline in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numba
import numpy as np

from stream_run.kernels import mxfp4, mxfp4_kernels
from stream_run.kernels.gguf_blocks import matvec as gguf_matvec
from stream_run.kernels.quant import BlockWeight


def mxfp4_weights(n_in: int, n_out: int, footprint: int, rng) -> list[mxfp4.MXFP4Weight]:
    n = max(2, footprint // (n_out * n_in // 32 * 17))
    codes = rng.integers(0, 256, (n, n_out, n_in // 32, 16), dtype=np.uint8)
    exps = rng.integers(118, 122, (n, n_out, n_in // 32), dtype=np.uint8)
    return [mxfp4.from_hf(c, e) for c, e in zip(codes, exps, strict=True)]


def q4_0_weights(n_in: int, n_out: int, footprint: int, rng) -> list[BlockWeight]:
    n = max(2, footprint // (n_out * n_in // 32 * 18))
    raw = rng.integers(0, 256, (n, n_out, n_in // 32, 18), dtype=np.uint8)
    raw[..., 0:2] = np.array([0.01], dtype="<f2").view(np.uint8)
    return [BlockWeight(c.reshape(n_out, -1), "Q4_0", n_in) for c in raw]


def run(kind: str, n_in: int, n_out: int, n_rows: int, reps: int, footprint: int) -> str:
    rng = np.random.default_rng(0)
    mx = kind.startswith("MXFP4")
    ws = mxfp4_weights(n_in, n_out, footprint, rng) if mx \
        else q4_0_weights(n_in, n_out, footprint, rng)
    x = rng.standard_normal((n_rows, n_in)).astype(np.float32)
    fn = {"MXFP4": mxfp4_kernels.linear, "MXFP4-ref": mxfp4_kernels.matvec_reference,
          "Q4_0": gguf_matvec}[kind]

    def call(w):
        return fn(x, w)

    call(ws[0])  # compile
    nbytes = sum(w.nbytes if mx else w.data.nbytes for w in ws)
    rates, per_call = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        for w in ws:
            call(w)
        dt = time.perf_counter() - t0
        rates.append(nbytes / dt / 1e9)
        per_call.append(dt / len(ws) * 1e6)
    return (f"{kind:9s} {n_in}x{n_out} N={n_rows}: {statistics.median(rates):6.2f} "
            f"[{min(rates):.2f}-{max(rates):.2f}] GB/s, {statistics.median(per_call):8.0f} "
            f"us/call ({len(ws)} copies)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="2880x5760,2880x2880")
    p.add_argument("-n", default="1,4", help="rows of x")
    p.add_argument("-r", "--reps", type=int, default=5)
    p.add_argument("--footprint-mb", type=int, default=512)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--kinds", default="MXFP4,MXFP4-ref,Q4_0")
    args = p.parse_args(argv)
    if args.threads:
        numba.set_num_threads(args.threads)
    print(f"numba threads {numba.get_num_threads()}")
    for shape in args.shapes.split(","):
        n_in, n_out = (int(v) for v in shape.split("x"))
        for n in (int(v) for v in args.n.split(",")):
            for kind in args.kinds.split(","):
                print(run(kind, n_in, n_out, n, args.reps, args.footprint_mb << 20), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
