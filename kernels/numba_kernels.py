"""Numba CPU kernels on MLX-packed affine weights (layout and reference in kernels/quant.py).

qmatvec reads the packed bytes directly, so decode never materialises a float32 weight. Per
group it computes dot(x, q) and folds the affine terms in once:
sum_k x_k (s q_k + b) = s * dot(x, q) + b * sum(x), with sum(x) per group shared by all rows.

4- and 8-bit rows run as explicit LLVM vector IR (kernels/simd.py), 8 weight rows per call.
2-bit elements never straddle a byte, so that path decodes byte-wise, which LLVM vectorises.
3/5/6-bit elements do straddle, but 8 of them fill exactly `bits` bytes, so those
paths unpack whole 3- or 5-byte chunks with fixed shifts into a float32 stack buffer, then dot
(`_rows_chunked`, its bits switch once per segment, outside the unpack loops).
A switch on bits inside a group loop defeats the vectoriser, so each path has its own loops.
Loops are written `for i in range(n): j = start + i` for the same reason (range(start, stop)
does not vectorise here). Kernels compile lazily on first use and are
cached on disk (cache=True), in a directory keyed by the kernels' source (kernels/jit_cache.py).
"""

from __future__ import annotations

import os

# numba runs its parallel kernels on TBB where the pip `tbb` package is installed (a
# dependency; kernels/tbb_layer.py makes it loadable), else on OpenMP. OpenMP's workers spin
# after each parallel region by default, starving OpenBLAS's threads that run next (and vice
# versa): on 2 cores a prefill layer took 12x longer. Sleeping workers cost ~0.3 ms per
# short-context decode layer instead. Set before libgomp loads; TBB ignores it.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import platform  # noqa: E402

import llvmlite.binding as llvm  # noqa: E402
import numpy as np  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba import carray, njit, prange, types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

import stream_run.kernels.jit_cache  # noqa: E402, F401  (before any cached kernel: keys the cache)
import stream_run.kernels.tbb_layer  # noqa: E402, F401  (before any parallel launch: picks the layer)
from stream_run.kernels.quant import check_group_size  # noqa: E402
from stream_run.kernels.simd import ROWS, dot_row, dot_rows, widen  # noqa: E402

JIT = {"parallel": True, "cache": True, "fastmath": False, "nogil": True}
# Reassociation only (no nnan/ninf/contract): lets LLVM split each group's dot product across
# SIMD lanes, ~3x faster than a strictly sequential sum. NaN/Inf still propagate.
JIT_DOT = {**JIT, "fastmath": {"reassoc"}}
_ROW = {"cache": True, "fastmath": {"reassoc"}, "nogil": True}
_ROW_INLINE = {**_ROW, "inline": "always"}


@njit(inline="always")
def _element(words, k, bits):
    """Element k of a `bits`-bit little-endian stream stored in uint32 words."""
    bit = k * bits
    lo = bit >> 5
    hi = min(lo + 1, words.shape[0] - 1)  # the row's last element never straddles a word
    v = (np.int64(words[lo]) | (np.int64(words[hi]) << 32)) >> (bit & 31)
    return v & ((1 << bits) - 1)


@njit(inline="always")
def _dot_group_2(row_bytes, x, b0, n_bytes):
    """dot(x, q) over n_bytes bytes of a 2-bit stream from byte b0 (4 elements per byte)."""
    dot = np.float32(0)
    for i in range(n_bytes):
        j = b0 + i
        b = np.int32(row_bytes[j])  # int32 -> float32 converts faster than unsigned
        dot += (x[4 * j] * np.float32(b & 3) + x[4 * j + 1] * np.float32((b >> 2) & 3)) + (
            x[4 * j + 2] * np.float32((b >> 4) & 3) + x[4 * j + 3] * np.float32(b >> 6))
    return dot


# 3/5/6-bit rows are decoded a segment at a time into float32 codes on the stack, then dotted
# per group: one long decode loop and contiguous dots vectorise; decoding inside each short group
# loop did not (LLVM vectorised across chunks with costly shuffles), nor did a heap buffer pay
# (~50 ns of allocation per row).
SEGMENT = 2048  # elements per decode pass: an 8 KiB buffer, a multiple of every group size


@intrinsic
def _stack_segment(typingctx):
    """A float32 pointer to SEGMENT elements in the calling function's frame (static alloca)."""

    def codegen(context, builder, signature, args):
        # in the entry block, so not once per loop trip; unlike cgutils.alloca_once, not zeroed
        # (a memset per call cost as much as the matvec of a short row)
        with builder.goto_entry_block():
            buf = builder.alloca(ir.ArrayType(ir.FloatType(), SEGMENT))
        return builder.bitcast(buf, ir.PointerType(ir.FloatType()))

    return types.CPointer(types.float32)(), codegen


@njit(inline="always")
def _u24(row_bytes, j):
    """Bytes j..j+2 as a little-endian 24-bit value (int32: twice the SIMD lanes of int64)."""
    return np.int32(row_bytes[j]) | (np.int32(row_bytes[j + 1]) << 8) | (
        np.int32(row_bytes[j + 2]) << 16)


@njit(inline="always")
def _unpack_3(row_bytes, k0, n, q):
    """q[:n] = elements k0.. of a 3-bit stream (k0, n multiples of 8): 3 bytes hold 8 elements."""
    c0 = k0 // 8
    for i in range(n // 8):
        j = 3 * (c0 + i)
        v = _u24(row_bytes, j)
        for t in range(8):  # constant trip count: unrolled, fixed shifts
            q[8 * i + t] = np.float32(np.int32((v >> (3 * t)) & 7))


@njit(inline="always")
def _unpack_6(row_bytes, k0, n, q):
    """q[:n] = elements k0.. of a 6-bit stream (k0, n multiples of 4): 3 bytes hold 4 elements."""
    c0 = k0 // 4
    for i in range(n // 4):
        j = 3 * (c0 + i)
        v = _u24(row_bytes, j)
        for t in range(4):
            q[4 * i + t] = np.float32(np.int32((v >> (6 * t)) & 63))


@njit(inline="always")
def _unpack_5(row_bytes, k0, n, q):
    """q[:n] = elements k0.. of a 5-bit stream (k0, n multiples of 8): 5 bytes hold 8 elements,
    read as two overlapping 24-bit values (bits 0-23 and 16-39) so every lane stays int32."""
    c0 = k0 // 8
    for i in range(n // 8):
        j = 5 * (c0 + i)
        lo, hi = _u24(row_bytes, j), _u24(row_bytes, j + 2)
        for t in range(4):
            q[8 * i + t] = np.float32(np.int32((lo >> (5 * t)) & 31))
            q[8 * i + 4 + t] = np.float32(np.int32((hi >> (5 * t + 4)) & 31))


@njit(inline="always")
def _dot_dense(x, q, kx, kq, n):
    """dot(x[kx:kx+n], q[kq:kq+n]) for float32 q."""
    dot = np.float32(0)
    for i in range(n):
        dot += x[kx + i] * q[kq + i]
    return dot


@njit(**_ROW_INLINE)
def _rows_2(x, xsum, row_bytes, srow, brow, per_group, out, col):
    for r in range(x.shape[0]):
        xr = x[r]
        acc = np.float32(0)
        for g in range(srow.shape[0]):
            dot = _dot_group_2(row_bytes, xr, g * per_group, per_group)
            acc += widen(srow[g]) * dot + widen(brow[g]) * xsum[r, g]
        out[r, col] = acc


@njit(**_ROW_INLINE)
def _rows_segment(x, xsum, q, n, srow, brow, group_size, k0, out, col):
    """Adds the groups of elements k0..k0+n (decoded in q[:n]) to out[r, col], every row r."""
    g0 = k0 // group_size
    for r in range(x.shape[0]):
        xr = x[r]
        acc = out[r, col]
        for g in range(n // group_size):
            dot = _dot_dense(xr, q, k0 + g * group_size, g * group_size, group_size)
            acc += widen(srow[g0 + g]) * dot + widen(brow[g0 + g]) * xsum[r, g0 + g]
        out[r, col] = acc


# Segments are counted, not stepped with range(0, n, SEGMENT), and q is never sliced: either
# form left these loops scalar (3x slower).


@njit(**_ROW_INLINE)
def _rows_chunked(x, xsum, row_bytes, srow, brow, group_size, bits, out, col):
    """3/5/6-bit rows: decode a segment, then dot it. The bits switch sits outside the
    unpack loops (once per segment), so each loop still vectorises."""
    q = carray(_stack_segment(), SEGMENT)
    out[:, col] = 0
    for s in range((x.shape[1] + SEGMENT - 1) // SEGMENT):
        k0 = s * SEGMENT
        n = min(SEGMENT, x.shape[1] - k0)
        if bits == 3:
            _unpack_3(row_bytes, k0, n, q)
        elif bits == 5:
            _unpack_5(row_bytes, k0, n, q)
        else:
            _unpack_6(row_bytes, k0, n, q)
        _rows_segment(x, xsum, q, n, srow, brow, group_size, k0, out, col)


TILE = 16  # weight rows per qdot_tile call: one call's argument passing per 16 rows, not per row


@njit(**_ROW)
def qdot_tile(x, xd, xsum, w, o0, o1, out, col0):
    """out[r, col0 + i] = dot(x[r], row o0 + i of w) for o0 <= o0 + i < o1 and every row r of
    x; w = (packed, scales, biases, bits, group_size), xd = deinterleave(x) (read by 4-bit
    weights), xsum (n, groups) the group sums of x.

    Per group: dot(x, q) once, then the affine terms: sum_k x_k (s q_k + b) = s dot + b sum(x).
    A tile of rows per call: a call passes some 60 machine words of array descriptors, which
    per row cost about a fifth of a small matvec.
    """
    packed, scales, biases, bits, group_size = w
    per_group = group_size * bits // 8  # bytes
    if bits == 4 or bits == 8:  # explicit vector IR (kernels/simd.py), ROWS rows per call
        # One loop over the n_full blocks, then the single rows, with rows of x inside: the
        # plainer form (rows of x outside, a loop of blocks, a loop of single rows) decoded
        # SmolLM2 15-26 % slower (3 alternating runs).
        n_full = (o1 - o0) // ROWS
        for i in range(o1 - o0 - (ROWS - 1) * n_full):  # n_full blocks, then single rows
            block = i < n_full
            o = o0 + ROWS * i if block else o0 + (ROWS - 1) * n_full + i
            for r in range(x.shape[0]):
                xa = xd[r, 0] if bits == 4 else x[r]
                xb = xd[r, 1] if bits == 4 else x[r]
                if block:
                    dot_rows(bits, packed, o, xa, xb, scales, biases, xsum[r], out, r,
                             o - o0 + col0)
                else:
                    dot_row(bits, packed, o, xa, xb, scales, biases, xsum[r], out, r,
                            o - o0 + col0)
    elif bits == 2:
        for i in range(o1 - o0):
            o = o0 + i
            _rows_2(x, xsum, packed[o].view(np.uint8), scales[o], biases[o], per_group, out,
                    col0 + i)
    else:  # 3, 5, 6 (qmatvec and the loaders refuse other widths)
        for i in range(o1 - o0):
            o = o0 + i
            _rows_chunked(x, xsum, packed[o].view(np.uint8), scales[o], biases[o], group_size,
                          bits, out, col0 + i)


@njit(**_ROW)
def deinterleave(x):
    """(n, in) -> (n, 2, in / 2): each row's even elements, and its odd ones (4-bit rows pair
    byte j with elements 2j and 2j + 1)."""
    n, m = x.shape
    half = m // 2
    out = np.empty((n, 2, half), dtype=np.float32)
    for r in range(n):
        for i in range(half):
            out[r, 0, i] = x[r, 2 * i]
            out[r, 1, i] = x[r, 2 * i + 1]
    return out


@njit(**_ROW)
def group_sums(x, group_size):
    """(n, in) -> (n, in // group_size): the per-group sums of x the affine terms need."""
    n_groups = x.shape[1] // group_size
    out = np.empty((x.shape[0], n_groups), dtype=np.float32)
    for r in range(x.shape[0]):
        for g in range(n_groups):
            s = np.float32(0)
            for i in range(group_size):
                s += x[r, g * group_size + i]
            out[r, g] = s
    return out


@njit(**JIT_DOT)
def _qmatvec(x, xsum, w, out):
    xd = deinterleave(x)
    n_out = out.shape[1]
    for t in prange((n_out + TILE - 1) // TILE):
        o0 = t * TILE
        qdot_tile(x, xd, xsum, w, o0, min(o0 + TILE, n_out), out, o0)


def _hardware_half() -> bool:
    """Whether this CPU widens float16 in one instruction (x86 F16C; every aarch64 does)."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    return bool(llvm.get_host_cpu_features().get("f16c", False))


# Whether the numpy backend keeps float16 group scales and biases as float16 (kernels widen
# them per group, exactly): 4 bytes per group of 32-128 weights instead of 8.
HALF_SCALES = _hardware_half()


def kernel_array(a: np.ndarray) -> np.ndarray:
    """An array as the kernels read it: C-contiguous (the vector code needs it; a no-op for the
    usual mmap'd or converted weights), float16 as its bits (numba has no float16), any other
    float as float32."""
    a = np.ascontiguousarray(a)
    if a.dtype == np.float16:
        return a.view(np.uint16)
    return a.astype(np.float32, copy=False) if a.dtype.kind == "f" else a


def kernel_weight(
    packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group_size: int
) -> tuple:
    """The weight tuple the kernels take: (packed, scales, biases, bits, group_size)."""
    return (kernel_array(packed), kernel_array(scales), kernel_array(biases), int(bits),
            int(group_size))


def qmatvec(
    x: np.ndarray,
    packed: np.ndarray,
    scales: np.ndarray,
    biases: np.ndarray,
    bits: int,
    group_size: int,
) -> np.ndarray:
    """x (n, in) float32, n small (decode) @ dequantize(packed, scales, biases).T -> (n, out).

    Parallel over output rows; reads the packed weight straight from memory once per row of x
    (the row is hot in L1 after the first).
    """
    if bits not in (2, 3, 4, 5, 6, 8) or x.shape[-1] * bits != packed.shape[1] * 32:
        raise ValueError(f"qmatvec: x has {x.shape[-1]} features, a {bits}-bit weight of "
                         f"{packed.shape[1]} words per row holds {packed.shape[1] * 32 // bits}")
    check_group_size(group_size)  # the vector code steps whole 16-byte chunks per group
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((x.shape[0], packed.shape[0]), dtype=np.float32)
    xsum = x.reshape(x.shape[0], -1, group_size).sum(axis=-1, dtype=np.float32)
    _qmatvec(x, xsum, kernel_weight(packed, scales, biases, bits, group_size), out)
    return out


@njit(**JIT)
def _dequantize_rows_4(packed, scales, biases, group_size, rows, out):
    half = group_size // 2
    for i in prange(rows.shape[0]):
        r = rows[i]
        row_bytes = packed[r].view(np.uint8)
        for g in range(scales.shape[1]):
            s = widen(scales[r, g])
            b = widen(biases[r, g])
            for t in range(half):
                j = g * half + t
                v = np.int32(row_bytes[j])
                out[i, 2 * j] = s * np.float32(v & 15) + b
                out[i, 2 * j + 1] = s * np.float32(v >> 4) + b


@njit(**JIT)
def _dequantize_rows_8(packed, scales, biases, group_size, rows, out):
    for i in prange(rows.shape[0]):
        r = rows[i]
        row_bytes = packed[r].view(np.uint8)
        for g in range(scales.shape[1]):
            s = widen(scales[r, g])
            b = widen(biases[r, g])
            for t in range(group_size):
                j = g * group_size + t
                out[i, j] = s * np.float32(row_bytes[j]) + b


@njit(**JIT)
def _dequantize_rows_any(packed, scales, biases, bits, group_size, rows, out):
    for i in prange(rows.shape[0]):
        r = rows[i]
        words = packed[r]
        for g in range(scales.shape[1]):
            s = widen(scales[r, g])
            b = widen(biases[r, g])
            for t in range(group_size):
                j = g * group_size + t
                out[i, j] = s * np.float32(_element(words, j, bits)) + b


def dequantize_rows(
    packed: np.ndarray,
    scales: np.ndarray,
    biases: np.ndarray,
    bits: int,
    group_size: int,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """Rows `rows` (all when None) of the (out, in) weight -> (len(rows), in) float32.

    Bit-identical to quant.dequantize (scales * q + biases, two roundings, no FMA). Used for
    the prefill path (dequantize, then BLAS) and for embedding row gathers.
    """
    if rows is None:
        rows = np.arange(packed.shape[0], dtype=np.int64)
    rows = np.ascontiguousarray(rows, dtype=np.int64).reshape(-1)
    n_in = packed.shape[1] * 32 // bits
    out = np.empty((rows.shape[0], n_in), dtype=np.float32)
    scales, biases = kernel_array(scales), kernel_array(biases)
    if bits == 4:
        _dequantize_rows_4(packed, scales, biases, int(group_size), rows, out)
    elif bits == 8:
        _dequantize_rows_8(packed, scales, biases, int(group_size), rows, out)
    else:
        _dequantize_rows_any(packed, scales, biases, int(bits), int(group_size), rows, out)
    return out


# --- 16-bit dense weights (HalfWeight): data as uint16 bit patterns, widened on the fly. ---

_F16_SCALE = np.float32(2.0**112)  # 2**(127 - 15): float32 bias minus float16 bias


@njit(inline="always")
def _bf16(h):
    """bf16 bits -> float32 (exact): the top half of the float32 pattern."""
    return np.uint32(np.uint32(h) << 16).view(np.float32)


@njit(inline="always")
def _f16(h):
    """float16 bits -> float32, exact for every pattern (subnormals, inf, nan), branch-free.

    Moving exponent and mantissa up 13 bits and multiplying by 2**112 rebiases normals and
    normalises subnormals in one exact product; exponent 31 (inf/nan) is forced to 255.
    """
    h = np.uint32(h)
    mag = np.uint32((h & 0x7FFF) << 13)
    scaled = np.float32(mag.view(np.float32) * _F16_SCALE).view(np.uint32)
    special = np.uint32(mag | 0x7F800000)
    bits = special if (h & 0x7C00) == 0x7C00 else scaled
    return np.uint32(bits | ((h & 0x8000) << 16)).view(np.float32)


@njit(**JIT_DOT)
def _hmatvec_bf16(x, w, out):
    for o in prange(w.shape[0]):
        row = w[o]
        for r in range(x.shape[0]):
            xr = x[r]
            acc = np.float32(0)
            for k in range(row.shape[0]):
                acc += xr[k] * _bf16(row[k])
            out[r, o] = acc


@njit(**JIT_DOT)
def _hmatvec_f16(x, w, out):
    for o in prange(w.shape[0]):
        row = w[o]
        for r in range(x.shape[0]):
            xr = x[r]
            acc = np.float32(0)
            for k in range(row.shape[0]):
                acc += xr[k] * _f16(row[k])
            out[r, o] = acc


@njit(**JIT)
def _half_rows_bf16(w, rows, out):
    for i in prange(rows.shape[0]):
        row = w[rows[i]]
        for k in range(row.shape[0]):
            out[i, k] = _bf16(row[k])


@njit(**JIT)
def _half_rows_f16(w, rows, out):
    for i in prange(rows.shape[0]):
        row = w[rows[i]]
        for k in range(row.shape[0]):
            out[i, k] = _f16(row[k])


def _bits(data: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(data).view(np.uint16)


def half_matvec(x: np.ndarray, data: np.ndarray, dtype: str) -> np.ndarray:
    """x (n, in) float32, n small (decode) @ w.T for a 16-bit w (out, in) -> (n, out) float32.

    data is float16 (dtype "F16") or bf16 bit patterns as uint16 ("BF16"). Each element is
    widened exactly and accumulated in float32; parallel over output rows.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((x.shape[0], data.shape[0]), dtype=np.float32)
    kernel = _hmatvec_bf16 if dtype == "BF16" else _hmatvec_f16
    kernel(x, _bits(data), out)
    return out


def half_rows(data: np.ndarray, dtype: str, rows: np.ndarray | None = None) -> np.ndarray:
    """Rows `rows` (all when None) of a 16-bit (out, in) weight -> (len(rows), in) float32.

    Exact widening; used for the prefill path (widen blocks, then BLAS) and embedding gathers.
    """
    if rows is None:
        rows = np.arange(data.shape[0], dtype=np.int64)
    rows = np.ascontiguousarray(rows, dtype=np.int64).reshape(-1)
    out = np.empty((rows.shape[0], data.shape[1]), dtype=np.float32)
    kernel = _half_rows_bf16 if dtype == "BF16" else _half_rows_f16
    kernel(_bits(data), rows, out)
    return out


# --- per-head products on row blocks (MLA's absorbed kv_b_proj, models/deepseek.py) ---------
# w (H * rho, in): head h owns rows h * rho .. (h + 1) * rho. head_t's x (H, L, n) weights n
# rows of each head's block from `start`: out[h, l] = sum_j x[h, l, j] * w[h * rho + start + j],
# the transposed product (x @ W_h), accumulated row by row on the stored weight.


@njit(**JIT_DOT)
def _qhead_t_4(x, packed, scales, biases, group_size, rho, start, out):
    # sum_j x_j (s_jg q_jk + b_jg) = sum_j (x_j s_jg) q_jk + sum_j x_j b_jg: the biases' term
    # is one number per group, added after the rows. Byte i holds elements 2i and 2i + 1: the
    # even and odd elements accumulate apart (contiguous, so the loop vectorises), then
    # interleave.
    half = group_size // 2
    n_groups = scales.shape[1]
    n_bytes = n_groups * half
    for h in prange(x.shape[0]):
        even = np.empty(n_bytes, dtype=np.float32)
        odd = np.empty(n_bytes, dtype=np.float32)
        bsum = np.empty(n_groups, dtype=np.float32)
        for li in range(x.shape[1]):
            even[:] = 0
            odd[:] = 0
            bsum[:] = 0
            for j in range(x.shape[2]):
                xj = x[h, li, j]
                r = h * rho + start + j
                row_bytes = packed[r].view(np.uint8)
                for g in range(n_groups):
                    s = widen(scales[r, g]) * xj
                    bsum[g] += widen(biases[r, g]) * xj
                    b0 = g * half
                    for t in range(half):
                        i = b0 + t
                        v = np.int32(row_bytes[i])
                        even[i] += s * np.float32(v & 15)
                        odd[i] += s * np.float32(v >> 4)
            acc = out[h, li]
            for g in range(n_groups):
                b = bsum[g]
                b0 = g * half
                for t in range(half):
                    i = b0 + t
                    acc[2 * i] = even[i] + b
                    acc[2 * i + 1] = odd[i] + b


@njit(**JIT_DOT)
def _qhead_t_8(x, packed, scales, biases, group_size, rho, start, out):
    n_groups = scales.shape[1]
    for h in prange(x.shape[0]):
        bsum = np.empty(n_groups, dtype=np.float32)
        for li in range(x.shape[1]):
            acc = out[h, li]
            acc[:] = 0
            bsum[:] = 0
            for j in range(x.shape[2]):
                xj = x[h, li, j]
                r = h * rho + start + j
                row_bytes = packed[r].view(np.uint8)
                for g in range(n_groups):
                    s = widen(scales[r, g]) * xj
                    bsum[g] += widen(biases[r, g]) * xj
                    k0 = g * group_size
                    for t in range(group_size):
                        acc[k0 + t] += s * np.float32(row_bytes[k0 + t])
            for g in range(n_groups):
                k0 = g * group_size
                for t in range(group_size):
                    acc[k0 + t] += bsum[g]


@njit(**JIT_DOT)
def _qhead_t_any(x, packed, scales, biases, bits, group_size, rho, start, out):
    for h in prange(x.shape[0]):
        for li in range(x.shape[1]):
            acc = out[h, li]
            acc[:] = 0
            for j in range(x.shape[2]):
                xj = x[h, li, j]
                r = h * rho + start + j
                words = packed[r]
                for g in range(scales.shape[1]):
                    s = widen(scales[r, g]) * xj
                    b = widen(biases[r, g]) * xj
                    for t in range(group_size):
                        k = g * group_size + t
                        acc[k] += s * np.float32(_element(words, k, bits)) + b


def qhead_t(x: np.ndarray, packed: np.ndarray, scales: np.ndarray, biases: np.ndarray,
            bits: int, group_size: int, rho: int, start: int) -> np.ndarray:
    """x (H, L, n) float32 -> (H, L, in): per head h, x[h] @ dequantize(rows h * rho + start ..
    + n), read from the packed rows (no float32 weight)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_in = packed.shape[1] * 32 // bits
    out = np.empty((x.shape[0], x.shape[1], n_in), dtype=np.float32)
    packed, scales, biases = kernel_array(packed), kernel_array(scales), kernel_array(biases)
    if bits == 4:
        _qhead_t_4(x, packed, scales, biases, int(group_size), int(rho), int(start), out)
    elif bits == 8:
        _qhead_t_8(x, packed, scales, biases, int(group_size), int(rho), int(start), out)
    else:
        _qhead_t_any(x, packed, scales, biases, int(bits), int(group_size), int(rho),
                     int(start), out)
    return out


@njit(**JIT_DOT)
def _hhead_t_bf16(x, w, rho, start, out):
    for h in prange(x.shape[0]):
        for li in range(x.shape[1]):
            acc = out[h, li]
            acc[:] = 0
            for j in range(x.shape[2]):
                xj = x[h, li, j]
                row = w[h * rho + start + j]
                for k in range(row.shape[0]):
                    acc[k] += xj * _bf16(row[k])


@njit(**JIT_DOT)
def _hhead_t_f16(x, w, rho, start, out):
    for h in prange(x.shape[0]):
        for li in range(x.shape[1]):
            acc = out[h, li]
            acc[:] = 0
            for j in range(x.shape[2]):
                xj = x[h, li, j]
                row = w[h * rho + start + j]
                for k in range(row.shape[0]):
                    acc[k] += xj * _f16(row[k])


def half_head_t(x: np.ndarray, data: np.ndarray, dtype: str, rho: int, start: int
                ) -> np.ndarray:
    """qhead_t for a 16-bit weight (HalfWeight's data and dtype)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((x.shape[0], x.shape[1], data.shape[1]), dtype=np.float32)
    kernel = _hhead_t_bf16 if dtype == "BF16" else _hhead_t_f16
    kernel(x, _bits(data), int(rho), int(start), out)
    return out


@njit(**JIT_DOT)
def _qhead(x, w, rho, start, n, out):
    tiles = (n + TILE - 1) // TILE
    for p in prange(x.shape[0] * tiles):
        h = p // tiles
        t = p - h * tiles
        xh = x[h]
        xd = deinterleave(xh)
        xs = group_sums(xh, w[4])
        o0 = h * rho + start + t * TILE
        qdot_tile(xh, xd, xs, w, o0, min(o0 + TILE, h * rho + start + n), out[h], t * TILE)


def qhead(x: np.ndarray, packed: np.ndarray, scales: np.ndarray, biases: np.ndarray,
          bits: int, group_size: int, rho: int, start: int, n: int) -> np.ndarray:
    """x (H, L, in) float32 -> (H, L, n): per head h, qmatvec of x[h] on rows h * rho + start
    .. + n of the packed weight, all heads' row tiles in one parallel loop."""
    if bits not in (2, 3, 4, 5, 6, 8) or x.shape[-1] * bits != packed.shape[1] * 32:
        raise ValueError(f"qhead: x has {x.shape[-1]} features, a {bits}-bit weight of "
                         f"{packed.shape[1]} words per row holds {packed.shape[1] * 32 // bits}")
    check_group_size(group_size)
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((x.shape[0], x.shape[1], n), dtype=np.float32)
    _qhead(x, kernel_weight(packed, scales, biases, bits, group_size), int(rho), int(start),
           int(n), out)
    return out
