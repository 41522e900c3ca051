"""Prefill on GGUF blocks: many rows of x (a prompt's) times a block-quantized weight, in int8,
with a GEMM's reuse of each weight byte (kernels/gguf_simd.py's matvec kernels serve 1..8 rows).

llama.cpp's arithmetic, laid out for a matrix of x:
- x is quantized to int8 per block of 32 elements, dx = max|x| / 127 (the decode kernels' rule
  for the 32-element types; finer than llama.cpp's 256 for the K types).
- Each tile of R weight rows (R = 16 where the target has AVX-512 VNNI, else 8) is unpacked
  once per call into unsigned codes q (bytes), a float scale s per group of G elements (32; 16
  for Q2_K, Q3_K and Q6_K), and either a float min m per group (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K:
  w = s q + m) or the type's integer offset c (Q4_0 -8, Q5_0 -16, Q8_0 -128 (codes q + 128),
  Q3_K -4, Q6_K -32: w = s (q + c)). s q + m, s (q + c) equal gguf-py's dequantization within
  float32 rounding of s and m (K types: s = d sc as llama.cpp computes it).
- Codes are interleaved 4 elements per row: 4 of row 0, 4 of row 1, ..., 4 of row R - 1, then
  the next 4. One R*4-byte load holds 4 codes of every row of the tile; one vpdpbusd against 4
  bytes of x, broadcast, adds their products to each row's int32 lane. A group of G elements is
  G / 4 such steps, exact in int32, started at c times the group's sum of x codes (exact); then
  per group one float multiply-add by s dx (and m dx sum(x codes) for the min types).
- Each weight load serves XR rows of x at a time. A row of x sums its groups in one order
  whatever rows it is computed with, so a prompt row's result does not depend on its batch.

Numerical effect: x_q @ w.T within float32 rounding, x_q = dx rint(x / dx) per block of 32, as
the decode kernels compute (|x - x_q| <= dx / 2 per element); their results differ only by the
float32 rounding of the per-group (here) or per-block (there) sums.

Other types, and targets where numba has no integer vectors, keep the dequantize + BLAS path
(kernels/numpy_backend.py). The unpacking costs one pass over the tile's blocks per call, paid
once for all rows of x.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

from stream_run.kernels.gguf_blocks import (
    _half,
    _i8,
    _qh32,
    _scale_min_k4,
    _scale_q3_k,
    check_blocks,
)
from stream_run.kernels.gguf_simd import _Emit, _literal, _target_features
from stream_run.kernels.quant import GGUF_BLOCK_TYPES, BlockWeight

__all__ = ["GEMM_TYPES", "gemm", "scratch_bytes"]

_FEATURES = _target_features()
_VNNI512 = {"avx512vnni", "avx512bw", "avx512f"} <= _FEATURES
R = 16 if _VNNI512 else 8  # weight rows per tile: the int32 lanes of one accumulator
XR = 4  # rows of x per weight load (2, 6, 8: no faster at 4096 x 4096 Q4_0, 512 rows)
XBLOCK = 32  # elements of x per scale
LO = 254  # x = dx (xh + xl / LO): |xl| = |rint(LO r)| <= 127 for |r| <= 1/2

_JIT = {"parallel": True, "cache": True, "fastmath": False, "nogil": True}
_INLINE = {"inline": "always", "cache": True}

# type -> (kernel id, group G, integer offset c, float mins): w = s (q + c), or s q + m with
# float mins (c unused, 1)
GEMM_TYPES = {"Q4_0": (0, 32, -8, False), "Q4_1": (1, 32, 1, True), "Q5_0": (2, 32, -16, False),
              "Q5_1": (3, 32, 1, True), "Q8_0": (4, 32, -128, False), "Q2_K": (5, 16, 1, True),
              "Q3_K": (6, 16, -4, False), "Q4_K": (7, 32, 1, True), "Q5_K": (8, 32, 1, True),
              "Q6_K": (9, 16, -32, False)}
_KINDS = tuple(GEMM_TYPES)
# the drivers' compile-time constants (numba freezes global tuples)
_Q4_0, _Q4_1, _Q5_0, _Q5_1, _Q8_0, _Q2_K, _Q3_K, _Q4_K, _Q5_K, _Q6_K = GEMM_TYPES.values()

_F32, _I8, _I32, _I64 = ir.FloatType(), ir.IntType(8), ir.IntType(32), ir.IntType(64)


# --- unpacking: one weight row (its blocks) into lane r of a tile ---------------------------


@njit(**_INLINE)
def _put(codes, r, k, q):
    """Code q of element k of the tile's row r (R rows, 4 elements per row at a time)."""
    codes[((k >> 2) * R + r) * 4 + (k & 3)] = np.uint8(q)


@njit(**_INLINE)
def _unpack_q4_0(b, r, codes, s, m):
    for blk in range(s.shape[0]):
        o, k = 18 * blk, 32 * blk
        for i in range(16):
            v = np.int32(b[o + 2 + i])
            _put(codes, r, k + i, v & 15)
            _put(codes, r, k + 16 + i, v >> 4)
        s[blk, r] = _half(b, o)


@njit(**_INLINE)
def _unpack_q4_1(b, r, codes, s, m):
    for blk in range(s.shape[0]):
        o, k = 20 * blk, 32 * blk
        for i in range(16):
            v = np.int32(b[o + 4 + i])
            _put(codes, r, k + i, v & 15)
            _put(codes, r, k + 16 + i, v >> 4)
        s[blk, r] = _half(b, o)
        m[blk, r] = _half(b, o + 2)


@njit(**_INLINE)
def _five_bits(b, r, codes, k, q0, qh):
    """A 5-bit block's 32 codes: nibbles at b[q0..q0 + 16], bit 4 from the u32 qh."""
    for i in range(16):
        v = np.int32(b[q0 + i])
        _put(codes, r, k + i, (v & 15) | (np.int32((qh >> i) & 1) << 4))
        _put(codes, r, k + 16 + i, (v >> 4) | (np.int32((qh >> (16 + i)) & 1) << 4))


@njit(**_INLINE)
def _unpack_q5_0(b, r, codes, s, m):
    for blk in range(s.shape[0]):
        o = 22 * blk
        _five_bits(b, r, codes, 32 * blk, o + 6, _qh32(b, o + 2))
        s[blk, r] = _half(b, o)


@njit(**_INLINE)
def _unpack_q5_1(b, r, codes, s, m):
    for blk in range(s.shape[0]):
        o = 24 * blk
        _five_bits(b, r, codes, 32 * blk, o + 8, _qh32(b, o + 4))
        s[blk, r] = _half(b, o)
        m[blk, r] = _half(b, o + 2)


@njit(**_INLINE)
def _unpack_q8_0(b, r, codes, s, m):
    for blk in range(s.shape[0]):
        o, k = 34 * blk, 32 * blk
        for i in range(32):
            _put(codes, r, k + i, b[o + 2 + i] ^ 128)  # q + 128: offset -128
        s[blk, r] = _half(b, o)


@njit(**_INLINE)
def _unpack_q2_k(b, r, codes, s, m):
    for blk in range(s.shape[0] // 16):
        o, k = 84 * blk, 256 * blk
        d, dmin = _half(b, o + 80), _half(b, o + 82)
        for g in range(16):
            sc = np.int32(b[o + g])
            s[16 * blk + g, r] = d * np.float32(sc & 15)
            m[16 * blk + g, r] = -(dmin * np.float32(sc >> 4))
        for c in range(2):  # e = 128 c + 32 sh + l: bits 2 sh of qs[32 c + l]
            for lane in range(32):
                qs = np.int32(b[o + 16 + 32 * c + lane])
                for sh in range(4):
                    _put(codes, r, k + 128 * c + 32 * sh + lane, (qs >> (2 * sh)) & 3)


@njit(**_INLINE)
def _unpack_q3_k(b, r, codes, s, m):
    for blk in range(s.shape[0] // 16):
        o, k = 110 * blk, 256 * blk
        d = _half(b, o + 108)
        for g in range(16):
            s[16 * blk + g, r] = d * np.float32(_scale_q3_k(b, o, g))
        for c in range(2):  # e = 128 c + 32 sh + l; q - 4 (hmask bit clear) = (q + 4 high) - 4
            for lane in range(32):
                qs, hm = np.int32(b[o + 32 + 32 * c + lane]), np.int32(b[o + lane])
                for sh in range(4):
                    high = (hm >> (4 * c + sh)) & 1
                    _put(codes, r, k + 128 * c + 32 * sh + lane, ((qs >> (2 * sh)) & 3) + 4 * high)


@njit(**_INLINE)
def _unpack_k4(b, r, codes, s, m, nbytes, qs, five):
    """Q4_K (five False) / Q5_K: 8 groups of 32, 6-bit scales and mins."""
    for blk in range(s.shape[0] // 8):
        o, k = nbytes * blk, 256 * blk
        d, dmin = _half(b, o), _half(b, o + 2)
        for j in range(8):
            sc, mn = _scale_min_k4(b, o, j)
            s[8 * blk + j, r] = d * np.float32(sc)
            m[8 * blk + j, r] = -(dmin * np.float32(mn))
            q0, shift = o + qs + 32 * (j >> 1), 4 * (j & 1)
            for i in range(32):
                q = (np.int32(b[q0 + i]) >> shift) & 15
                if five:
                    q |= ((np.int32(b[o + 16 + i]) >> j) & 1) << 4
                _put(codes, r, k + 32 * j + i, q)


@njit(**_INLINE)
def _unpack_q4_k(b, r, codes, s, m):
    _unpack_k4(b, r, codes, s, m, 144, 16, False)


@njit(**_INLINE)
def _unpack_q5_k(b, r, codes, s, m):
    _unpack_k4(b, r, codes, s, m, 176, 48, True)


@njit(**_INLINE)
def _unpack_q6_k(b, r, codes, s, m):
    for blk in range(s.shape[0] // 16):
        o, k = 210 * blk, 256 * blk
        d = _half(b, o + 208)
        for g in range(16):
            s[16 * blk + g, r] = d * np.float32(_i8(b[o + 192 + g]))
        for h in range(2):  # e = 128 h + 32 j + l: ql[64 h + (32 j + l) % 64] nibble j // 2,
            for lane in range(32):  # bits 2 j of qh[32 h + l]
                qh = np.int32(b[o + 128 + 32 * h + lane])
                for j in range(4):
                    ql = np.int32(b[o + 64 * h + 32 * (j & 1) + lane])
                    q = ((ql >> (4 * (j >> 1))) & 15) | (((qh >> (2 * j)) & 3) << 4)
                    _put(codes, r, k + 128 * h + 32 * j + lane, q)


# --- x: int8 per block of 32, per group its scale and its sum term ---------------------------


@njit(cache=True, nogil=True)
def _quantize_x(x, group, offset, mins):
    """x (N, in) float32 -> two int8 codes per element, x = dx (xh + xl / LO) within dx / (2 LO)
    (dx = the block of 32's max|x| / 127, xh = rint(x / dx), xl = rint(LO (x / dx - xh)));
    ex (N, in / group): the group's dx / LO; xs: mins -> float32 dx / LO times the group's
    sum of (LO xh + xl), else int32 offset times that sum (exact). NaN dx where a block holds
    a NaN or inf."""
    n, n_in = x.shape
    n_groups = n_in // group
    xh = np.empty((n, n_in), dtype=np.int8)
    xl = np.empty((n, n_in), dtype=np.int8)
    ex = np.empty((n, n_groups), dtype=np.float32)
    xf = np.zeros((n, n_groups if mins else 0), dtype=np.float32)
    xi = np.zeros((n, 0 if mins else n_groups), dtype=np.int32)
    for row in range(n):
        bits = x[row].view(np.int32)
        for blk in range(n_in // XBLOCK):
            k0 = blk * XBLOCK
            top = np.int32(0)
            for i in range(XBLOCK):
                top = max(top, bits[k0 + i] & 0x7FFFFFFF)
            amax = np.int32(top).view(np.float32)
            inv = np.float32(127) / amax if 0 < top < 0x7F800000 else np.float32(0)
            dx = amax / np.float32(127) if top < 0x7F800000 else np.float32(np.nan)
            for i in range(XBLOCK):
                u = x[row, k0 + i] * inv
                hi = np.rint(u)
                xh[row, k0 + i] = np.int32(hi)
                xl[row, k0 + i] = np.int32(np.rint((u - hi) * np.float32(LO)))
            for g in range(k0 // group, (k0 + XBLOCK) // group):
                total = np.int32(0)
                for i in range(group):
                    total += LO * np.int32(xh[row, g * group + i]) + np.int32(
                        xl[row, g * group + i])
                ex[row, g] = dx / np.float32(LO)
                if mins:
                    xf[row, g] = ex[row, g] * np.float32(total)
                else:
                    xi[row, g] = total * offset
    return xh, xl, ex, xf, xi


# --- the tile kernel: vector IR -------------------------------------------------------------


def _c64(v: int) -> ir.Constant:
    return ir.Constant(_I64, v)


def _dot4(e: _Emit, acc, a, x):
    """acc (<R x i32>) + the sums of 4 adjacent products of unsigned bytes a and signed bytes
    x (<4R x i8>): vpdpbusd where the target has it, else exact int16 products (|q x| <=
    255 * 128 fits), pairs summed by vpmaddwd, then adjacent pairs."""
    b = e.b
    n = a.type.count
    vec = ir.VectorType(_I32, n // 4)
    if n == 64 and _VNNI512:
        return e.call("llvm.x86.avx512.vpdpbusd.512", vec, [acc, b.bitcast(a, vec),
                                                            b.bitcast(x, vec)])
    if n == 32 and e.vnni:
        return e.call("llvm.x86.avx512.vpdpbusd.256", vec, [acc, b.bitcast(a, vec),
                                                            b.bitcast(x, vec)])
    w16 = ir.VectorType(ir.IntType(16), n)
    prod = b.mul(b.zext(a, w16), b.sext(x, w16))
    pairs = e.madd(prod, ir.Constant(w16, [1] * n))  # <n/2 x i32>
    return b.add(acc, b.add(e.lanes(pairs, list(range(0, n // 2, 2))),
                            e.lanes(pairs, list(range(1, n // 2, 2)))))


@intrinsic(prefer_literal=True)
def _rows(typingctx, kind, n_x, codes, s, m, xh, xl, ex, xf, xi, r0, out):
    """out[r0 + j, :R] = the tile (codes, s, m) against rows r0 + j of x, j < n_x (kind: an
    index of _KINDS, n_x: compile-time constants). No bounds checks: the caller keeps rows in
    range and every array C-contiguous."""
    k = _literal(kind, "kind")
    n_xs = _literal(n_x, "n_x")
    _, group, _, mins = GEMM_TYPES[_KINDS[k]]
    for name, ty in (("codes", codes), ("s", s), ("m", m), ("xh", xh), ("xl", xl), ("ex", ex),
                     ("xf", xf), ("xi", xi), ("out", out)):
        if not (isinstance(ty, types.Array) and ty.layout == "C"):
            raise TypingError(f"_rows: {name} must be a C-contiguous array, got {ty}")
    sig = types.void(kind, n_x, codes, s, m, xh, xl, ex, xf, xi, r0, out)

    def codegen(context, builder, sig, args):
        arr = [context.make_array(sig.args[i])(context, builder, args[i]) for i in range(12)
               if i not in (0, 1, 10)]
        codes_a, s_a, m_a, xh_a, xl_a, ex_a, xf_a, xi_a, out_a = arr
        r0v = context.cast(builder, args[10], sig.args[10], types.int64)
        e = _Emit(builder)
        n_in = builder.extract_value(xh_a.shape, 1)
        n_groups = builder.extract_value(ex_a.shape, 1)
        vf, vi = ir.VectorType(_F32, R), ir.VectorType(_I32, R)
        xrows = [builder.add(r0v, _c64(j)) for j in range(n_xs)]
        faccs = [cgutils.alloca_once_value(builder, ir.Constant(vf, None)) for _ in xrows]
        steps = group // 4
        with cgutils.for_range(builder, n_groups) as loop:
            g = loop.index
            gx = [builder.add(builder.mul(row, n_groups), g) for row in xrows]
            his = [ir.Constant(vi, None) for _ in xrows]
            if mins:
                los = [ir.Constant(vi, None) for _ in xrows]
            else:
                los = [e.splat(builder.load(builder.gep(xi_a.data, [i])), R) for i in gx]
            w0 = builder.mul(g, _c64(steps * R * 4))
            x0 = [builder.add(builder.mul(row, n_in), builder.mul(g, _c64(group)))
                  for row in xrows]
            for st in range(steps):
                w = e.load(codes_a.data, builder.add(w0, _c64(st * R * 4)),
                           ir.VectorType(_I8, 4 * R))
                for j, xo in enumerate(x0):
                    at = builder.add(xo, _c64(4 * st))
                    for accs, xa in ((his, xh_a), (los, xl_a)):
                        xb = e.load(xa.data, at, _I32)
                        accs[j] = _dot4(e, accs[j], w, builder.bitcast(
                            e.splat(xb, R), ir.VectorType(_I8, 4 * R)))
            iaccs = [builder.add(builder.mul(h, ir.Constant(vi, [LO] * R)), lo)
                     for h, lo in zip(his, los, strict=True)]
            sg = builder.mul(g, _c64(R))
            scale = e.load(s_a.data, sg, vf)
            for j, i in enumerate(gx):
                dx = builder.load(builder.gep(ex_a.data, [i]))
                v = e.fma(builder.sitofp(iaccs[j], vf), builder.fmul(scale, e.splat(dx, R)),
                          builder.load(faccs[j]))
                if mins:
                    v = e.fma(e.load(m_a.data, sg, vf),
                              e.splat(builder.load(builder.gep(xf_a.data, [i])), R), v)
                builder.store(v, faccs[j])
        for j, row in enumerate(xrows):
            at = builder.bitcast(builder.gep(out_a.data, [builder.mul(row, _c64(R))]),
                                 vf.as_pointer())
            builder.store(builder.load(faccs[j]), at, align=4)

    return sig, codegen


@njit(**_INLINE)
def _tile_rows(kind, codes, s, m, xs, out):
    """The tile against every row of x, XR rows at a time, then one."""
    xh, xl, ex, xf, xi = xs
    n = xh.shape[0]
    full = n // XR
    for i in range(full):
        _rows(kind, XR, codes, s, m, xh, xl, ex, xf, xi, XR * i, out)
    for r in range(XR * full, n):
        _rows(kind, 1, codes, s, m, xh, xl, ex, xf, xi, r, out)


@njit(**_INLINE)
def _tile_buffers(n_in, group, n_x):
    codes = np.zeros(n_in * R, dtype=np.uint8)
    s = np.zeros((n_in // group, R), dtype=np.float32)
    m = np.zeros((n_in // group, R), dtype=np.float32)
    return codes, s, m, np.empty((n_x, R), dtype=np.float32)


@njit(**_INLINE)
def _store(out, o0, tout):
    for row in range(out.shape[0]):
        for i in range(min(R, out.shape[1] - o0)):
            out[row, o0 + i] = tout[row, i]


# One parallel driver per type: the type must be a compile-time constant down to _rows. A
# tile's rows past the weight's end keep zero codes and scales.


@njit(**_JIT)
def _gemm_q4_0(x, data, out):
    xs = _quantize_x(x, _Q4_0[1], _Q4_0[2], _Q4_0[3])
    for t in prange((data.shape[0] + R - 1) // R):
        codes, s, m, tout = _tile_buffers(x.shape[1], _Q4_0[1], x.shape[0])
        for r in range(min(R, data.shape[0] - R * t)):
            _unpack_q4_0(data[R * t + r], r, codes, s, m)
        _tile_rows(_Q4_0[0], codes, s, m, xs, tout)
        _store(out, R * t, tout)


@njit(**_JIT)
def _gemm_q4_1(x, data, out):
    xs = _quantize_x(x, _Q4_1[1], _Q4_1[2], _Q4_1[3])
    for t in prange((data.shape[0] + R - 1) // R):
        codes, s, m, tout = _tile_buffers(x.shape[1], _Q4_1[1], x.shape[0])
        for r in range(min(R, data.shape[0] - R * t)):
            _unpack_q4_1(data[R * t + r], r, codes, s, m)
        _tile_rows(_Q4_1[0], codes, s, m, xs, tout)
        _store(out, R * t, tout)


@njit(**_JIT)
def _gemm_q5_0(x, data, out):
    xs = _quantize_x(x, _Q5_0[1], _Q5_0[2], _Q5_0[3])
    for t in prange((data.shape[0] + R - 1) // R):
        codes, s, m, tout = _tile_buffers(x.shape[1], _Q5_0[1], x.shape[0])
        for r in range(min(R, data.shape[0] - R * t)):
            _unpack_q5_0(data[R * t + r], r, codes, s, m)
        _tile_rows(_Q5_0[0], codes, s, m, xs, tout)
        _store(out, R * t, tout)


@njit(**_JIT)
def _gemm_q5_1(x, data, out):
    xs = _quantize_x(x, _Q5_1[1], _Q5_1[2], _Q5_1[3])
    for t in prange((data.shape[0] + R - 1) // R):
        codes, s, m, tout = _tile_buffers(x.shape[1], _Q5_1[1], x.shape[0])
        for r in range(min(R, data.shape[0] - R * t)):
            _unpack_q5_1(data[R * t + r], r, codes, s, m)
        _tile_rows(_Q5_1[0], codes, s, m, xs, tout)
        _store(out, R * t, tout)


@njit(**_JIT)
def _gemm_q8_0(x, data, out):
    xs = _quantize_x(x, _Q8_0[1], _Q8_0[2], _Q8_0[3])
    for t in prange((data.shape[0] + R - 1) // R):
        codes, s, m, tout = _tile_buffers(x.shape[1], _Q8_0[1], x.shape[0])
        for r in range(min(R, data.shape[0] - R * t)):
            _unpack_q8_0(data[R * t + r], r, codes, s, m)
        _tile_rows(_Q8_0[0], codes, s, m, xs, tout)
        _store(out, R * t, tout)


@njit(**_JIT)
def _gemm_q2_k(x, data, out):
    xs = _quantize_x(x, _Q2_K[1], _Q2_K[2], _Q2_K[3])
    for t in prange((data.shape[0] + R - 1) // R):
        codes, s, m, tout = _tile_buffers(x.shape[1], _Q2_K[1], x.shape[0])
        for r in range(min(R, data.shape[0] - R * t)):
            _unpack_q2_k(data[R * t + r], r, codes, s, m)
        _tile_rows(_Q2_K[0], codes, s, m, xs, tout)
        _store(out, R * t, tout)


@njit(**_JIT)
def _gemm_q3_k(x, data, out):
    xs = _quantize_x(x, _Q3_K[1], _Q3_K[2], _Q3_K[3])
    for t in prange((data.shape[0] + R - 1) // R):
        codes, s, m, tout = _tile_buffers(x.shape[1], _Q3_K[1], x.shape[0])
        for r in range(min(R, data.shape[0] - R * t)):
            _unpack_q3_k(data[R * t + r], r, codes, s, m)
        _tile_rows(_Q3_K[0], codes, s, m, xs, tout)
        _store(out, R * t, tout)


@njit(**_JIT)
def _gemm_q4_k(x, data, out):
    xs = _quantize_x(x, _Q4_K[1], _Q4_K[2], _Q4_K[3])
    for t in prange((data.shape[0] + R - 1) // R):
        codes, s, m, tout = _tile_buffers(x.shape[1], _Q4_K[1], x.shape[0])
        for r in range(min(R, data.shape[0] - R * t)):
            _unpack_q4_k(data[R * t + r], r, codes, s, m)
        _tile_rows(_Q4_K[0], codes, s, m, xs, tout)
        _store(out, R * t, tout)


@njit(**_JIT)
def _gemm_q5_k(x, data, out):
    xs = _quantize_x(x, _Q5_K[1], _Q5_K[2], _Q5_K[3])
    for t in prange((data.shape[0] + R - 1) // R):
        codes, s, m, tout = _tile_buffers(x.shape[1], _Q5_K[1], x.shape[0])
        for r in range(min(R, data.shape[0] - R * t)):
            _unpack_q5_k(data[R * t + r], r, codes, s, m)
        _tile_rows(_Q5_K[0], codes, s, m, xs, tout)
        _store(out, R * t, tout)


@njit(**_JIT)
def _gemm_q6_k(x, data, out):
    xs = _quantize_x(x, _Q6_K[1], _Q6_K[2], _Q6_K[3])
    for t in prange((data.shape[0] + R - 1) // R):
        codes, s, m, tout = _tile_buffers(x.shape[1], _Q6_K[1], x.shape[0])
        for r in range(min(R, data.shape[0] - R * t)):
            _unpack_q6_k(data[R * t + r], r, codes, s, m)
        _tile_rows(_Q6_K[0], codes, s, m, xs, tout)
        _store(out, R * t, tout)

_KERNELS = {"Q4_0": _gemm_q4_0, "Q4_1": _gemm_q4_1, "Q5_0": _gemm_q5_0, "Q5_1": _gemm_q5_1,
            "Q8_0": _gemm_q8_0, "Q2_K": _gemm_q2_k, "Q3_K": _gemm_q3_k, "Q4_K": _gemm_q4_k,
            "Q5_K": _gemm_q5_k, "Q6_K": _gemm_q6_k}


def scratch_bytes(rows: int, n_in: int, threads: int) -> int:
    """What gemm allocates beside x and its result, at most: x's two codes and per group its
    scale and sum term (groups of 16 at the least), and per thread one tile's codes, scales,
    mins and rows of output."""
    return rows * (2 * n_in + 2 * 4 * (n_in // 16)) + threads * (
        R * n_in + 2 * 4 * R * (n_in // 16) + 4 * R * rows)


def gemm(x: np.ndarray, w: BlockWeight, out: np.ndarray | None = None) -> np.ndarray:
    """x (N, in) float32 -> x_q @ dequantize(w).T, (N, out) float32, on w's blocks (see the
    module docstring for x_q). Parallel over tiles of R weight rows.

    Raises:
        ValueError: w's type has no kernel here (GEMM_TYPES), or x's shape does not fit w.
    """
    if w.qtype not in _KERNELS:
        raise ValueError(f"gemm: no integer kernel for {w.qtype}; expected one of "
                         f"{tuple(_KERNELS)}")
    data = check_blocks(w.data, w.qtype, w.shape)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != w.n_in or w.n_in % GGUF_BLOCK_TYPES[w.qtype][0]:
        raise ValueError(f"gemm: x must be (N, {w.n_in}), got {x.shape} for a {w.qtype} "
                         f"{w.shape} weight")
    if out is None:
        out = np.empty((x.shape[0], data.shape[0]), dtype=np.float32)
    _KERNELS[w.qtype](x, data, out)
    return out
