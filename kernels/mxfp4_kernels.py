"""Numba kernels on MXFP4 weights (kernels/mxfp4.py): dequantize rows, and the decode matvec
x @ dequantize(w).T that decodes each row of codes once, never materialising the weight."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from stream_run.kernels.mxfp4 import HALF_SCALES, KVALUES, MXFP4Weight

MATVEC_MAX_ROWS = 8  # above: dequantized tiles into BLAS
DEQUANT_BLOCK_ELEMENTS = 1 << 22  # 16 MB of float32 weight rows per dequantize+BLAS block

_JIT = {"parallel": True, "cache": True, "fastmath": False, "nogil": True}


@njit(inline="always", cache=True)
def _decode_row(codes, exps, r, ggml, kv, half, out):
    for b in range(codes.shape[1]):
        d = half[exps[r, b]]
        o = b * 32
        for j in range(16):
            q = codes[r, b, j]
            lo, hi = kv[q & 15] * d, kv[q >> 4] * d
            if ggml:
                out[o + j] = lo
                out[o + 16 + j] = hi
            else:
                out[o + 2 * j] = lo
                out[o + 2 * j + 1] = hi


@njit(**_JIT)
def _dequantize_rows(codes, exps, ggml, rows, kv, half, out):
    for i in prange(rows.shape[0]):
        _decode_row(codes, exps, rows[i], ggml, kv, half, out[i])


@njit(**_JIT)
def _matvec(x, codes, exps, ggml, kv, half, y):
    """y (N, out) = x (N, in) @ w.T: each row of w decoded once into a buffer, dotted with
    every row of x."""
    n_in = codes.shape[1] * 32
    for r in prange(codes.shape[0]):
        row = np.empty(n_in, np.float32)
        _decode_row(codes, exps, r, ggml, kv, half, row)
        for n in range(x.shape[0]):
            acc = np.float32(0)
            for k in range(n_in):
                acc += x[n, k] * row[k]
            y[n, r] = acc


def dequantize_rows(w: MXFP4Weight, rows: np.ndarray | None = None) -> np.ndarray:
    """The float32 (len(rows), in) rows of w (all rows when rows is None)."""
    rows = np.arange(w.shape[0], dtype=np.int64) if rows is None \
        else np.asarray(rows, dtype=np.int64)
    out = np.empty((rows.size, w.shape[1]), np.float32)
    _dequantize_rows(w.codes, w.exponents, w.ggml, rows, KVALUES, HALF_SCALES, out)
    return out


def linear(x: np.ndarray, w: MXFP4Weight) -> np.ndarray:
    """x (N, in) float32 @ dequantize(w).T -> (N, out): the matvec kernel for few rows, else
    dequantized row blocks into BLAS.

    Raises:
        ValueError: x's width is not w's in.
    """
    n_out, n_in = w.shape
    if x.shape[-1] != n_in:
        raise ValueError(f"linear: x has {x.shape[-1]} features, MXFP4 weight {w.shape} wants "
                         f"{n_in}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.empty((x.shape[0], n_out), dtype=np.float32)
    if x.shape[0] <= MATVEC_MAX_ROWS:
        _matvec(x, w.codes, w.exponents, w.ggml, KVALUES, HALF_SCALES, y)
        return y
    step = max(1, DEQUANT_BLOCK_ELEMENTS // n_in)
    for lo in range(0, n_out, step):
        rows = np.arange(lo, min(lo + step, n_out), dtype=np.int64)
        np.matmul(x, dequantize_rows(w, rows).T, out=y[:, lo:lo + rows.size])
    return y


