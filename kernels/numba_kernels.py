"""Numba CPU kernels on MLX-packed affine weights (layout in kernels/quant.py).

qmatvec reads the packed words directly, so decode never materialises a float32 weight.
Per group it computes dot(x, q) and folds the affine terms in once:
sum_k x_k (s q_k + b) = s * dot(x, q) + b * sum(x), with sum(x) per group shared by all rows.
Eight independent accumulators per group stand in for the SIMD lanes fastmath would allow.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from kernels.quant import CHUNK

_JIT = {"parallel": True, "cache": True, "fastmath": False, "nogil": True}


@njit(inline="always")
def _decode_chunk(row_bytes, chunk, bits):
    """The `bits` little-endian bytes of 8-element chunk `chunk` -> one uint64."""
    v = np.uint64(0)
    base = chunk * bits
    for t in range(bits):
        v |= np.uint64(row_bytes[base + t]) << np.uint64(8 * t)
    return v


@njit(inline="always")
def _dot_group_4(words, x, w0, n_words, k0):
    """dot(x[k0:], q) over n_words 4-bit words starting at words[w0]."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0)
    k = k0
    for i in range(w0, w0 + n_words):
        w = words[i]
        a0 += x[k] * np.float32(w & 15)
        a1 += x[k + 1] * np.float32((w >> 4) & 15)
        a2 += x[k + 2] * np.float32((w >> 8) & 15)
        a3 += x[k + 3] * np.float32((w >> 12) & 15)
        a4 += x[k + 4] * np.float32((w >> 16) & 15)
        a5 += x[k + 5] * np.float32((w >> 20) & 15)
        a6 += x[k + 6] * np.float32((w >> 24) & 15)
        a7 += x[k + 7] * np.float32(w >> 28)
        k += 8
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


@njit(inline="always")
def _dot_group_8(words, x, w0, n_words, k0):
    """dot(x[k0:], q) over n_words 8-bit words (two words per step) starting at words[w0]."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0)
    k = k0
    for i in range(w0, w0 + n_words, 2):
        w = words[i]
        u = words[i + 1]
        a0 += x[k] * np.float32(w & 255)
        a1 += x[k + 1] * np.float32((w >> 8) & 255)
        a2 += x[k + 2] * np.float32((w >> 16) & 255)
        a3 += x[k + 3] * np.float32(w >> 24)
        a4 += x[k + 4] * np.float32(u & 255)
        a5 += x[k + 5] * np.float32((u >> 8) & 255)
        a6 += x[k + 6] * np.float32((u >> 16) & 255)
        a7 += x[k + 7] * np.float32(u >> 24)
        k += 8
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


@njit(inline="always")
def _dot_group_any(row_bytes, x, c0, n_chunks, k0, bits):
    """dot(x[k0:], q) over n_chunks 8-element chunks of a `bits`-bit stream from chunk c0."""
    mask = np.uint64((1 << bits) - 1)
    s1 = np.uint64(bits)
    s2 = s1 + s1
    s3 = s2 + s1
    s4 = s2 + s2
    s5 = s4 + s1
    s6 = s4 + s2
    s7 = s4 + s3
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0)
    k = k0
    for c in range(c0, c0 + n_chunks):
        v = _decode_chunk(row_bytes, c, bits)
        a0 += x[k] * np.float32(v & mask)
        a1 += x[k + 1] * np.float32((v >> s1) & mask)
        a2 += x[k + 2] * np.float32((v >> s2) & mask)
        a3 += x[k + 3] * np.float32((v >> s3) & mask)
        a4 += x[k + 4] * np.float32((v >> s4) & mask)
        a5 += x[k + 5] * np.float32((v >> s5) & mask)
        a6 += x[k + 6] * np.float32((v >> s6) & mask)
        a7 += x[k + 7] * np.float32((v >> s7) & mask)
        k += 8
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


@njit(**_JIT)
def _qmatvec(x, xsum, packed, scales, biases, bits, group_size, out):
    n = x.shape[0]
    n_out = packed.shape[0]
    n_groups = scales.shape[1]
    words_per_group = group_size * bits // 32
    chunks_per_group = group_size // CHUNK
    for o in prange(n_out):
        words = packed[o]
        row_bytes = words.view(np.uint8)
        for r in range(n):
            xr = x[r]
            acc = np.float32(0)
            for g in range(n_groups):
                k0 = g * group_size
                if bits == 4:
                    dot = _dot_group_4(words, xr, g * words_per_group, words_per_group, k0)
                elif bits == 8:
                    dot = _dot_group_8(words, xr, g * words_per_group, words_per_group, k0)
                else:
                    dot = _dot_group_any(
                        row_bytes, xr, g * chunks_per_group, chunks_per_group, k0, bits
                    )
                acc += scales[o, g] * dot + biases[o, g] * xsum[r, g]
            out[r, o] = acc


def qmatvec(
    x: np.ndarray,
    packed: np.ndarray,
    scales: np.ndarray,
    biases: np.ndarray,
    bits: int,
    group_size: int,
) -> np.ndarray:
    """x (n, in) float32 (n small: decode) @ dequantize(packed, scales, biases).T -> (n, out).

    Parallel over output rows; the weight is read once per call, straight from the packed words.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, n_in = x.shape
    xsum = x.reshape(n, n_in // group_size, group_size).sum(axis=-1, dtype=np.float32)
    out = np.empty((n, packed.shape[0]), dtype=np.float32)
    _qmatvec(x, xsum, packed, scales, biases, int(bits), int(group_size), out)
    return out


@njit(**_JIT)
def _dequantize_rows(packed, scales, biases, bits, group_size, rows, out):
    n_chunks = out.shape[1] // CHUNK
    mask = np.uint64((1 << bits) - 1)
    b = np.uint64(bits)
    for i in prange(rows.shape[0]):
        r = rows[i]
        row_bytes = packed[r].view(np.uint8)
        for c in range(n_chunks):
            v = _decode_chunk(row_bytes, c, bits)
            k = c * CHUNK
            g = k // group_size
            s = scales[r, g]
            bias = biases[r, g]
            for p in range(CHUNK):
                q = np.float32((v >> (np.uint64(p) * b)) & mask)
                out[i, k + p] = s * q + bias


def dequantize_rows(
    packed: np.ndarray,
    scales: np.ndarray,
    biases: np.ndarray,
    bits: int,
    group_size: int,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """Rows `rows` (all when None) of the (out, in) weight -> (len(rows), in) float32.

    Bit-identical to quant.dequantize (scales * q + biases, two roundings). Used for the
    prefill path (dequantize, then BLAS) and for embedding row gathers.
    """
    if rows is None:
        rows = np.arange(packed.shape[0], dtype=np.int64)
    rows = np.ascontiguousarray(rows, dtype=np.int64).reshape(-1)
    n_in = packed.shape[1] * 32 // bits
    out = np.empty((rows.shape[0], n_in), dtype=np.float32)
    _dequantize_rows(packed, scales, biases, int(bits), int(group_size), rows, out)
    return out
