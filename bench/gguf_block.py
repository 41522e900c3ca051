"""One decoder block's decode step on GGUF blocks, A/B in one process: the fine ops (numpy
small ops, one matvec per weight, x quantized per matvec) against the fused path (q|k|v and
gate|up as gguf_blocks.matvecs on one quantized x, numba norm/RoPE/residuals).

    python -m stream_run.bench.gguf_block --shape 7b --layout q4_0 -r 20

Random 7B- or SmolLM2-shaped layers (bench.gguf_matvec's random blocks), enough copies to
read the weights from RAM as decode does (each path runs over all of them in turn); the two
paths alternate, so both see the same load from whatever else runs. Prints us per block
(min, 25th percentile, median) and the ratios; the minimum is the least disturbed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from stream_run.bench.gguf_matvec import weights
from stream_run.kernels.numpy_backend import NumpyBackend
from stream_run.kernels.quant import GGUF_BLOCK_TYPES

SHAPES = {"7b": (4096, 32, 32, 128, 11008), "smollm2": (576, 9, 3, 64, 1536)}
LAYOUTS = {"q4_0": dict.fromkeys("qkvogud", "Q4_0"), "q4_1": dict.fromkeys("qkvogud", "Q4_1"),
           "q4_k_m": dict.fromkeys("qkogu", "Q4_K") | {"v": "Q6_K", "d": "Q6_K"}}
EPS = 1e-5


def layers(shape: str, layout: str, footprint: int, rng: np.random.Generator) -> list[dict]:
    E, H, HKV, D, inter = SHAPES[shape]
    dims = {"q": (E, H * D), "k": (E, HKV * D), "v": (E, HKV * D), "o": (H * D, E),
            "g": (E, inter), "u": (E, inter), "d": (inter, E)}
    one = sum(n_in * n_out // GGUF_BLOCK_TYPES[LAYOUTS[layout][name]][0]
              * GGUF_BLOCK_TYPES[LAYOUTS[layout][name]][1] for name, (n_in, n_out) in dims.items())
    n = max(2, footprint // one)
    per_name = {name: weights(LAYOUTS[layout][name], n_in, n_out, n * one, rng)[:n]
                for name, (n_in, n_out) in dims.items()}
    return [{name: ws[i] for name, ws in per_name.items()} for i in range(n)]


def fine(ops: NumpyBackend, w: dict, x: np.ndarray, ln: np.ndarray, kv, inv_freq: np.ndarray,
         heads: tuple[int, int, int]) -> np.ndarray:
    """models/llama.py's block through the fine ops (what GGUF decode ran before)."""
    H, HKV, D = heads
    offset = kv.offset
    h = ops.rms_norm(x, ln, EPS)
    q, k, v = (ops.linear(h, w[n]) for n in "qkv")
    q = q.reshape(1, 1, H, D).transpose(0, 2, 1, 3)
    k = k.reshape(1, 1, HKV, D).transpose(0, 2, 1, 3)
    v = v.reshape(1, 1, HKV, D).transpose(0, 2, 1, 3)
    q, k = ops.rope(q, offset, inv_freq), ops.rope(k, offset, inv_freq)
    keys, values = kv.update(0, k, v)
    o = ops.attention(q, keys, values, D**-0.5, offset).transpose(0, 2, 1, 3).reshape(1, 1, -1)
    x = ops.add(x, ops.linear(o, w["o"]))
    h = ops.rms_norm(x, ln, EPS)
    return ops.add(x, ops.linear(ops.silu_mul(ops.linear(h, w["g"]), ops.linear(h, w["u"])),
                                 w["d"]))


def fused(ops: NumpyBackend, w: dict, x: np.ndarray, ln: np.ndarray, kv, rope: tuple,
          heads: tuple[int, int, int]) -> np.ndarray:
    H, HKV, D = heads
    return ops.block_decode(x[0], ln, EPS, [w["q"], w["k"], w["v"]], [None] * 3, [None] * 2,
                            *rope, H, HKV, kv, 0, D**-0.5, w["o"], None, ln,
                            [w["g"], w["u"], w["d"]])[None]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stream_run.bench.gguf_block",
                                description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="q4_0")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("-r", "--repetitions", type=int, default=10, help="passes over the layers")
    p.add_argument("--context", type=int, default=64, help="positions already in the cache")
    p.add_argument("--footprint-mb", type=int, default=600)
    args = p.parse_args(argv)
    import numba

    numba.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    E, H, HKV, D, _ = SHAPES[args.shape]
    ls = layers(args.shape, args.layout, args.footprint_mb << 20, rng)
    ops = NumpyBackend(args.threads)
    kv = ops.make_kv_cache(1, 1, HKV, D, args.context + 1)
    kv.update(0, *(rng.standard_normal((2, 1, HKV, args.context, D)).astype(np.float32)))
    kv.advance(args.context)
    inv_freq = (1.0 / 10000 ** (np.arange(0, D, 2) / D)).astype(np.float32)
    freqs = np.float32(args.context) * inv_freq[None, :]
    rope = (np.cos(freqs), np.sin(freqs))
    ln = np.ones(E, np.float32)
    x = rng.standard_normal((1, 1, E)).astype(np.float32)
    heads = (H, HKV, D)
    paths = {"fine ops": lambda w: fine(ops, w, x, ln, kv, inv_freq, heads),
             "fused": lambda w: fused(ops, w, x, ln, kv, rope, heads)}
    for f in paths.values():  # compile, first touch
        for w in ls:
            f(w)
    times: dict[str, list[float]] = {name: [] for name in paths}
    for rep in range(args.repetitions):  # a path over every layer, then the other: cold reads
        for name, f in (paths.items() if rep % 2 == 0 else reversed(paths.items())):
            for w in ls:
                t0 = time.perf_counter()
                f(w)
                times[name].append(time.perf_counter() - t0)
    mb = sum(w.nbytes for w in ls[0].values()) / 1e6
    print(f"{args.shape} {args.layout}: {len(ls)} layers of {mb:.1f} MB, {args.threads} threads, "
          f"context {args.context}, load {os.getloadavg()[0]:.2f} (after)")
    base = None
    for name, t in times.items():
        t.sort()
        mn, q1, med = t[0] * 1e6, t[len(t) // 4] * 1e6, statistics.median(t) * 1e6
        base = base or (mn, q1, med)
        print(f"| {name} | min {mn:.0f} us | p25 {q1:.0f} us | median {med:.0f} us | "
              f"min x{base[0] / mn:.3f} p25 x{base[1] / q1:.3f} median x{base[2] / med:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
