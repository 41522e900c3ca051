"""Numba kernels that compute directly on GGUF (ggml) quantized blocks (kernels/quant.py,
BlockWeight): dequantize rows, and the decode matvec x @ dequantize(w).T without ever
materialising the float32 weight.

Block layouts (ggml's, as gguf-py's gguf.quants reads them; f16 = IEEE half, little-endian):
- Q4_0 (32 elems, 18 B): d f16, qs[16]; elem l is d ((qs[l] & 15) - 8), elem 16 + l
  d ((qs[l] >> 4) - 8).
- Q4_1 (32, 20): d, m f16, qs[16]; d q + m.        Q8_0 (32, 34): d f16, qs int8[32]; d q.
- Q5_0 (32, 22): d, qh u32, qs[16]; bit l of qh is bit 4 of elem l; d (q - 16).
- Q5_1 (32, 24): d, m, qh, qs[16]; d q + m.
- Q2_K (256, 84): scales[16] (lo nibble: scale, hi: min, per 16 elems), qs[64] (2 bits), d, dmin.
- Q3_K (256, 110): hmask[32], qs[64], scales[12] (16 6-bit, offset 32), d; q = low 2 bits
  - 4 where the hmask bit is clear.
- Q4_K (256, 144): d, dmin, scales[12] (8 6-bit scales and mins), qs[128]: 4 chunks of 32
  bytes, low nibbles are the chunk's first 32 elems, high nibbles the next 32; d sc q - dmin m.
- Q5_K (256, 176): as Q4_K plus qh[32] before qs: bit 2c (2c + 1) of qh[l] tops chunk c's low
  (high) nibble of byte l.
- Q6_K (256, 210): ql[128], qh[64], scales int8[16] (per 16 elems), d; per half of 128 elems:
  ql holds 4 bits, qh 2 more, q - 32.

Every f16 field is read byte-wise: the rows are views of the file's bytes and need not be 2- or
4-byte aligned.

dequantize_rows decodes each block with the reference's own float32 operations in its order
(products and sums rounded separately, no FMA), so it equals gguf.quants.dequantize bit for bit.

matvec runs the fast kernels of kernels/gguf_simd.py: integer dot products on x quantized to
int8 per block as llama.cpp does (every type but Q8_0, whose kernel keeps x float32); see
there, and matvec's accuracy note. matvec(..., generic=True) runs the reference instead: each
block decoded exactly into a stack buffer, then dotted in float32.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import numpy as np
from numba import carray, njit, prange

from stream_run.kernels.gguf_simd import FAST_KERNELS, QTYPES, QUANTIZED_X, TILE, WEIGHTS
from stream_run.kernels.numba_kernels import _f16, _stack_segment
from stream_run.kernels.quant import GGUF_BLOCK_TYPES, BlockWeight

__all__ = ["FAST_KERNELS", "QUANTIZED_X", "check_blocks", "dequantize_rows", "matvec",
           "matvecs"]

MAX_X_ROWS = 8  # matvec's largest N

_JIT = {"parallel": True, "cache": True, "fastmath": False, "nogil": True}
_JIT_DOT = {**_JIT, "fastmath": {"reassoc"}}  # lane-split dot products (not the dequant)
_INLINE = {"inline": "always", "cache": True}


def check_blocks(data: np.ndarray, qtype: str, shape: tuple[int, int]) -> np.ndarray:
    """The bytes of a GGUF block-quantized (out, in) tensor as the kernels read them.

    Args:
        data: the tensor's bytes, uint8 of any shape (usually a view of the read buffer).
        qtype: a GGUF_BLOCK_TYPES name ("Q4_K", ...).
        shape: (out, in), in elements.

    Returns:
        A uint8 (out, in // block * block_bytes) view of data (a copy only where data is not
        contiguous).

    Raises:
        ValueError: an unknown type, in not a multiple of the block, or a size that does not
            match (one line: the type, the shape, the bytes got and expected).
    """
    if qtype not in GGUF_BLOCK_TYPES:
        raise ValueError(f"unknown GGUF block type {qtype!r}; expected one of {QTYPES}")
    out, n_in = (int(s) for s in shape)
    elems, nbytes = GGUF_BLOCK_TYPES[qtype]
    if out < 0 or n_in <= 0 or n_in % elems:
        raise ValueError(f"{qtype} ({out}, {n_in}): in must be a positive multiple of the "
                         f"{elems}-element block")
    data = np.asarray(data)
    if data.dtype != np.uint8:
        raise ValueError(f"{qtype} ({out}, {n_in}): data must be uint8 bytes, got {data.dtype}")
    row_bytes = n_in // elems * nbytes
    if data.size != out * row_bytes:
        short = " (truncated)" if data.size < out * row_bytes else ""
        raise ValueError(f"{qtype} ({out}, {n_in}): got {data.size} bytes, expected "
                         f"{out * row_bytes}{short}")
    return np.ascontiguousarray(data).reshape(out, row_bytes)


# --- exact block decoders: out[k:k + block] = the block at byte o of row b, as gguf-py does ---


@njit(**_INLINE)
def _half(b, j):
    """The f16 at bytes j, j + 1 as float32 (exact; any alignment)."""
    return _f16(np.uint16(b[j]) | np.uint16(np.uint16(b[j + 1]) << 8))


@njit(**_INLINE)
def _i8(v):
    """A byte as a signed int8 value (int32)."""
    return (np.int32(v) ^ 128) - 128


@njit(**_INLINE)
def _dq_q4_0(b, o, out, k):
    d = _half(b, o)
    for i in range(16):
        v = np.int32(b[o + 2 + i])
        out[k + i] = d * np.float32((v & 15) - 8)
        out[k + 16 + i] = d * np.float32((v >> 4) - 8)


@njit(**_INLINE)
def _dq_q4_1(b, o, out, k):
    d, m = _half(b, o), _half(b, o + 2)
    for i in range(16):
        v = np.int32(b[o + 4 + i])
        out[k + i] = d * np.float32(v & 15) + m
        out[k + 16 + i] = d * np.float32(v >> 4) + m


@njit(**_INLINE)
def _qh32(b, j):
    """The little-endian uint32 at bytes j..j+3 (any alignment)."""
    return np.uint32(b[j]) | (np.uint32(b[j + 1]) << 8) | (np.uint32(b[j + 2]) << 16) | (
        np.uint32(b[j + 3]) << 24)


@njit(**_INLINE)
def _dq_q5_0(b, o, out, k):
    d = _half(b, o)
    qh = _qh32(b, o + 2)
    for i in range(16):
        v = np.int32(b[o + 6 + i])
        lo = (v & 15) | (np.int32((qh >> i) & 1) << 4)
        hi = (v >> 4) | (np.int32((qh >> (16 + i)) & 1) << 4)
        out[k + i] = d * np.float32(lo - 16)
        out[k + 16 + i] = d * np.float32(hi - 16)


@njit(**_INLINE)
def _dq_q5_1(b, o, out, k):
    d, m = _half(b, o), _half(b, o + 2)
    qh = _qh32(b, o + 4)
    for i in range(16):
        v = np.int32(b[o + 8 + i])
        lo = (v & 15) | (np.int32((qh >> i) & 1) << 4)
        hi = (v >> 4) | (np.int32((qh >> (16 + i)) & 1) << 4)
        out[k + i] = d * np.float32(lo) + m
        out[k + 16 + i] = d * np.float32(hi) + m


@njit(**_INLINE)
def _dq_q8_0(b, o, out, k):
    d = _half(b, o)
    for i in range(32):
        out[k + i] = np.float32(_i8(b[o + 2 + i])) * d


@njit(**_INLINE)
def _dq_q2_k(b, o, out, k):
    d, dmin = _half(b, o + 80), _half(b, o + 82)
    for e in range(256):  # e = 128 c + 32 s + l: bits 2s of qs[32 c + l]
        c, s, lane = e >> 7, (e >> 5) & 3, e & 31
        sc = np.int32(b[o + (e >> 4)])
        q = (np.int32(b[o + 16 + 32 * c + lane]) >> (2 * s)) & 3
        dl = d * np.float32(sc & 15)
        ml = dmin * np.float32(sc >> 4)
        out[k + e] = dl * np.float32(q) - ml


@njit(**_INLINE)
def _scale_q3_k(b, o, j):
    """Q3_K's 6-bit scale j (0..15) minus 32: low 4 bits in bytes 96..103, high 2 in 104..107."""
    lo = np.int32(b[o + 96 + (j & 7)]) >> (4 * (j >> 3)) & 15
    hi = (np.int32(b[o + 104 + (j & 3)]) >> (2 * (j >> 2))) & 3
    return (lo | (hi << 4)) - 32


@njit(**_INLINE)
def _dq_q3_k(b, o, out, k):
    d = _half(b, o + 108)
    for e in range(256):  # e = 128 c + 32 s + l; its hmask bit is bit e >> 5 of hmask[l]
        c, s, lane = e >> 7, (e >> 5) & 3, e & 31
        q = (np.int32(b[o + 32 + 32 * c + lane]) >> (2 * s)) & 3
        high = (np.int32(b[o + lane]) >> (e >> 5)) & 1
        dl = d * np.float32(_scale_q3_k(b, o, e >> 4))
        out[k + e] = dl * np.float32(q - 4 * (high ^ 1))


@njit(**_INLINE)
def _scale_min_k4(b, o, j):
    """Q4_K/Q5_K's 6-bit (scale, min) j (0..7) from the 12 bytes at o + 4."""
    s = o + 4
    if j < 4:
        return np.int32(b[s + j]) & 63, np.int32(b[s + j + 4]) & 63
    sc = (np.int32(b[s + j + 4]) & 15) | ((np.int32(b[s + j - 4]) >> 6) << 4)
    m = (np.int32(b[s + j + 4]) >> 4) | ((np.int32(b[s + j]) >> 6) << 4)
    return sc, m


@njit(**_INLINE)
def _dq_q4_k(b, o, out, k):
    d, dmin = _half(b, o), _half(b, o + 2)
    for j in range(8):  # sub-block j = 2 c + s: nibble s of qs[32 c + l]
        sc, m = _scale_min_k4(b, o, j)
        dl = d * np.float32(sc)
        ml = dmin * np.float32(m)
        q0 = o + 16 + 32 * (j >> 1)
        shift = 4 * (j & 1)
        for i in range(32):
            q = (np.int32(b[q0 + i]) >> shift) & 15
            out[k + 32 * j + i] = dl * np.float32(q) - ml


@njit(**_INLINE)
def _dq_q5_k(b, o, out, k):
    d, dmin = _half(b, o), _half(b, o + 2)
    for j in range(8):  # as Q4_K, plus bit j of qh[l] as bit 4
        sc, m = _scale_min_k4(b, o, j)
        dl = d * np.float32(sc)
        ml = dmin * np.float32(m)
        q0 = o + 48 + 32 * (j >> 1)
        shift = 4 * (j & 1)
        for i in range(32):
            q = ((np.int32(b[q0 + i]) >> shift) & 15) | (((np.int32(b[o + 16 + i]) >> j) & 1) << 4)
            out[k + 32 * j + i] = dl * np.float32(q) - ml


@njit(**_INLINE)
def _dq_q6_k(b, o, out, k):
    d = _half(b, o + 208)
    for e in range(256):  # e = 128 h + t: ql[64 h + t % 64] nibble t // 64, qh[32 h + t % 32]
        h, t = e >> 7, e & 127
        lo = (np.int32(b[o + 64 * h + (t & 63)]) >> (4 * (t >> 6))) & 15
        hi = (np.int32(b[o + 128 + 32 * h + (t & 31)]) >> (2 * (t >> 5))) & 3
        dl = d * np.float32(_i8(b[o + 192 + (e >> 4)]))
        out[k + e] = dl * np.float32((lo | (hi << 4)) - 32)


@njit(**_INLINE)
def _decode(tid, b, o, out, k):
    """The block of type QTYPES[tid] at byte o of b -> out[k:k + block elems], exactly."""
    if tid == 0:
        _dq_q4_0(b, o, out, k)
    elif tid == 1:
        _dq_q4_1(b, o, out, k)
    elif tid == 2:
        _dq_q5_0(b, o, out, k)
    elif tid == 3:
        _dq_q5_1(b, o, out, k)
    elif tid == 4:
        _dq_q8_0(b, o, out, k)
    elif tid == 5:
        _dq_q2_k(b, o, out, k)
    elif tid == 6:
        _dq_q3_k(b, o, out, k)
    elif tid == 7:
        _dq_q4_k(b, o, out, k)
    elif tid == 8:
        _dq_q5_k(b, o, out, k)
    else:
        _dq_q6_k(b, o, out, k)


@njit(**_JIT)
def _dequantize_rows(data, tid, elems, nbytes, rows, out):
    for i in prange(rows.shape[0]):
        b = data[rows[i]]
        row = out[i]
        for blk in range(out.shape[1] // elems):
            _decode(tid, b, blk * nbytes, row, blk * elems)


def _type_id(qtype: str) -> int:
    if qtype not in GGUF_BLOCK_TYPES:
        raise ValueError(f"unknown GGUF block type {qtype!r}; expected one of {QTYPES}")
    return QTYPES.index(qtype)


def dequantize_rows(w: BlockWeight, rows: np.ndarray | None = None) -> np.ndarray:
    """Rows `rows` (all when None) of w -> float32 (len(rows), in), equal bit for bit to
    gguf.quants.dequantize. Parallel over rows.

    Raises:
        ValueError: w's bytes do not match its type and shape (check_blocks), or a row index
            out of range.
    """
    data = check_blocks(w.data, w.qtype, w.shape)
    n_out = data.shape[0]
    if rows is None:
        rows = np.arange(n_out, dtype=np.int64)
    rows = np.ascontiguousarray(rows, dtype=np.int64).reshape(-1)
    if rows.size and (rows.min() < -n_out or rows.max() >= n_out):
        raise ValueError(f"{w.qtype} {w.shape}: row index out of range [{-n_out}, {n_out})")
    rows = np.where(rows < 0, rows + n_out, rows)
    elems, nbytes = GGUF_BLOCK_TYPES[w.qtype]
    out = np.empty((rows.shape[0], w.n_in), dtype=np.float32)
    _dequantize_rows(data, _type_id(w.qtype), elems, nbytes, rows, out)
    return out


# --- generic matvec: decode each block into a stack buffer, dot it with every row of x ---


@njit(**_INLINE)
def _dot(x, kx, q, n):
    acc = np.float32(0)
    for i in range(n):
        acc += x[kx + i] * q[i]
    return acc


@njit(**_JIT_DOT)
def _matvec_generic(x, data, tid, elems, nbytes, out):
    n_out = data.shape[0]
    for t in prange((n_out + TILE - 1) // TILE):
        q = carray(_stack_segment(), elems)
        for i in range(min(TILE, n_out - t * TILE)):
            o = t * TILE + i
            b = data[o]
            for r in range(x.shape[0]):
                out[r, o] = 0
            for blk in range(x.shape[1] // elems):
                _decode(tid, b, blk * nbytes, q, 0)
                for r in range(x.shape[0]):
                    out[r, o] += _dot(x[r], blk * elems, q, elems)


_NO_CODES = (np.zeros((0, 0), np.int8), np.zeros((0, 0), np.float32))  # a driver computes them
_NO_DATA, _NO_OUT = np.zeros((0, 1), np.uint8), np.zeros((0, 0), np.float32)


def _check_x(x: np.ndarray, w: BlockWeight) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or not 1 <= x.shape[0] <= MAX_X_ROWS or x.shape[1] != w.n_in:
        raise ValueError(f"matvec: x must be (N, {w.n_in}) with 1 <= N <= {MAX_X_ROWS}, got "
                         f"{x.shape} for a {w.qtype} {w.shape} weight")
    return x


def matvec(x: np.ndarray, w: BlockWeight, *, generic: bool = False) -> np.ndarray:
    """x (N, in) float32, 1 <= N <= 8 -> x @ dequantize(w).T, (N, out) float32, computed on the
    blocks; parallel over output rows, each weight byte read from memory once for all N rows.

    Accuracy (see the module docstring): the integer types quantize x to int8 per block
    (QUANTIZED_X) as llama.cpp does: the result is x_q @ w.T, |x - x_q| <= dx / 2 per element
    (dx = the block's max|x| / 127), within float32 rounding; for Gaussian x that is ~0.5-1 %
    of max|y|. Q8_0 and the generic path keep x float32: within (in / 16 + 8) (Q8_0) or
    (block + in / block + 8) (generic) * 2**-24 * (|x| @ (|w| + |mins|).T) of x @ w.T.

    Args:
        generic: use the exact-decode reference path even where a fast kernel exists.

    Raises:
        ValueError: x's shape does not fit w, N outside 1..8, or w's bytes do not match it.
    """
    data = check_blocks(w.data, w.qtype, w.shape)
    x = _check_x(x, w)
    out = np.empty((x.shape[0], data.shape[0]), dtype=np.float32)
    kernel = None if generic else FAST_KERNELS.get(w.qtype)
    if kernel is not None:
        kernel(x, *_NO_CODES, (data, _NO_DATA, _NO_DATA), (out, _NO_OUT, _NO_OUT))
    else:
        elems, nbytes = GGUF_BLOCK_TYPES[w.qtype]
        _matvec_generic(x, data, _type_id(w.qtype), elems, nbytes, out)
    return out


# Per list of weights (a block's q|k|v, gate|up, o, down), its plan: made once per resident
# unit rather than per call (checking the bytes and grouping by type cost ~8 us of a 40 us
# 576-wide q|k|v). Keyed on the first weight; the others held weakly, checked by identity.
_PLANS: weakref.WeakKeyDictionary[BlockWeight, tuple] = weakref.WeakKeyDictionary()


def _plan(ws: Sequence[BlockWeight]) -> list[tuple]:
    """[(kernel or None, block, indices into ws, datas)]: one step per fast type, WEIGHTS
    weights at most (datas padded with empty ones), or per weight of a generic type."""
    hit = _PLANS.get(ws[0])
    if hit is not None and len(hit[0]) == len(ws) - 1 and all(
            r() is w for r, w in zip(hit[0], ws[1:], strict=True)):
        return hit[1]
    datas = [check_blocks(w.data, w.qtype, w.shape) for w in ws]
    by_type: dict[str, list[int]] = {}
    for i, w in enumerate(ws):
        by_type.setdefault(w.qtype, []).append(i)
    steps = []
    for qtype, idx in by_type.items():
        kernel = FAST_KERNELS.get(qtype)
        if kernel is None:
            steps += [(None, qtype, (i,), (datas[i],)) for i in idx]
            continue
        for lo in range(0, len(idx), WEIGHTS):
            part = tuple(idx[lo:lo + WEIGHTS])
            steps.append((kernel, QUANTIZED_X.get(qtype), part, tuple(datas[i] for i in part)
                          + (_NO_DATA,) * (WEIGHTS - len(part))))
    if all(np.may_share_memory(d, w.data) for d, w in zip(datas, ws, strict=True)):
        # views only: a copy (non-contiguous bytes) kept here would be memory off the budget
        _PLANS[ws[0]] = (tuple(weakref.ref(w) for w in ws[1:]), steps)
    return steps


def matvecs(x: np.ndarray, ws: Sequence[BlockWeight]) -> list[np.ndarray]:
    """[matvec(x, w) for w in ws], bit for bit, with fewer passes: the weights of one fast type
    run in one parallel region (up to WEIGHTS at a time), and x is quantized once per block
    size (QUANTIZED_X: 32 or 256), shared across types (a Q4_K_M file's Q4_K and Q6_K).

    Raises:
        ValueError: as matvec, for any of ws.
    """
    x = _check_x(x, ws[0])
    for w in ws[1:]:
        if w.n_in != ws[0].n_in:
            _check_x(x, w)
    outs = [np.empty((x.shape[0], w.shape[0]), dtype=np.float32) for w in ws]
    codes: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # block size -> x's (xq, dx)
    for kernel, block, idx, datas in _plan(ws):
        if kernel is None:
            elems, nbytes = GGUF_BLOCK_TYPES[block]
            _matvec_generic(x, datas[0], _type_id(block), elems, nbytes, outs[idx[0]])
            continue
        got = kernel(x, *codes.get(block, _NO_CODES), datas,
                     tuple(outs[i] for i in idx) + (_NO_OUT,) * (WEIGHTS - len(idx)))
        if block is not None:
            codes[block] = got
    return outs
