"""Numba kernels on MXFP4 weights (kernels/mxfp4.py): dequantize rows, and the decode matvec
x @ dequantize(w).T that decodes each row of codes once, never materialising the weight."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from stream_run.kernels.mxfp4 import HALF_SCALES, KVALUES, MXFP4Weight

MATVEC_MAX_ROWS = 8  # above: dequantized tiles into BLAS
DEQUANT_BLOCK_ELEMENTS = 1 << 22  # 16 MB of float32 weight rows per dequantize+BLAS block

_JIT = {"parallel": True, "cache": True, "fastmath": False, "nogil": True}
_JIT_DOT = {**_JIT, "fastmath": {"reassoc"}}  # the dot products' lanes (not the decode)
CHUNKS = 256  # row chunks of a matvec: one decode buffer each


@njit(inline="always", cache=True)
def _decode_row(codes, exps, r, ggml, kv, half, out):
    """Row r of w into out (in,) float32: each value kvalue * 2**(e - 128), one rounding."""
    if ggml:
        for b in range(codes.shape[1]):
            d, o = half[exps[r, b]], b * 32
            for j in range(16):
                q = codes[r, b, j]
                out[o + j] = kv[q & 15] * d
                out[o + 16 + j] = kv[q >> 4] * d
    else:
        for b in range(codes.shape[1]):
            d, o = half[exps[r, b]], b * 32
            for j in range(16):
                q = codes[r, b, j]
                out[o + 2 * j] = kv[q & 15] * d
                out[o + 2 * j + 1] = kv[q >> 4] * d


@njit(**_JIT)
def _dequantize_rows(codes, exps, ggml, rows, kv, half, out):
    for i in prange(rows.shape[0]):
        _decode_row(codes, exps, rows[i], ggml, kv, half, out[i])


@njit(**_JIT_DOT)
def _matvec(x, codes, exps, ggml, kv, half, y):
    """y (N, out) = x (N, in) @ w.T: each row of w decoded once into a per-chunk buffer (the
    exact values), dotted with every row of x (lanes summed in any order)."""
    n_out, n_in = codes.shape[0], codes.shape[1] * 32
    n_chunks = min(n_out, CHUNKS)
    step = (n_out + n_chunks - 1) // n_chunks
    for c in prange(n_chunks):
        row = np.empty(n_in, np.float32)
        for r in range(c * step, min(n_out, (c + 1) * step)):
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


