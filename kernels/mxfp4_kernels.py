"""Numba kernels on MXFP4 weights (kernels/mxfp4.py): dequantize rows (exact), and the decode
matvec x @ dequantize(w).T as explicit LLVM vector IR (a numba intrinsic, in the manner of
kernels/simd.py), never materialising the weight; _matvec_reference decodes each row into a
buffer and dots it (the plain numba form, kept as the kernels' reference).

The vector form has no table lookup, so nothing to gather. A 4-bit e2m1 code c (sign bit 3,
magnitude m = c & 7) placed as float32 bits (m << 22) | (c & 8) << 28 is exactly its value times
2**-126: magnitudes 2..7 are normal floats with exponent field m >> 1 and mantissa bit m & 1, 0
and 1 the subnormals 0 and 2**-127 (0.5 * 2**-126). Times 2**127 that is gguf-py's doubled
kvalue (0, 1, 2, 3, 4, 6, 8, 12 with sign), exact. Per 32-element block: the 16 code bytes' low
nibbles against xa, high ones against xb (16 lanes each), fused into a block vector, scaled
lane-wise by 2**(e - 128) into the row's total; lanes summed once per row. ROWS weight rows per
call share each x load. The IR is target-independent (vector and, shift, or, bitcast,
llvm.fmuladd): LLVM splits the 16-lane vectors for AVX2 or NEON.

Every cached kernel here depends only on code in this file, so numba's per-file cache check
stays sound (kernels/jit_cache.py keys only the files it lists).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

from stream_run.kernels.mxfp4 import HALF_SCALES, KVALUES, MXFP4Weight

MATVEC_MAX_ROWS = 8  # above: dequantized tiles into BLAS
DEQUANT_BLOCK_ELEMENTS = 1 << 22  # 16 MB of float32 weight rows per dequantize+BLAS block

_JIT = {"parallel": True, "cache": True, "fastmath": False, "nogil": True}
_JIT_DOT = {**_JIT, "fastmath": {"reassoc"}}  # the dot products' lanes (not the decode)
CHUNKS = 256  # row chunks of the reference matvec: one decode buffer each


# -- the vector IR -------------------------------------------------------------------------
LANES = 16
ROWS = 4  # weight rows per dot_rows call
TILE = 16  # weight rows per parallel task

_F32, _I8, _I32, _I64 = ir.FloatType(), ir.IntType(8), ir.IntType(32), ir.IntType(64)
_VF, _VI8, _VI32 = (ir.VectorType(_F32, LANES), ir.VectorType(_I8, LANES),
                    ir.VectorType(_I32, LANES))


def _i64(v: int) -> ir.Constant:
    return ir.Constant(_I64, v)


def _vi32(v: int) -> ir.Constant:
    return ir.Constant(_VI32, [v] * LANES)


def _fmuladd(builder: ir.IRBuilder, a, b, c):
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_VF, [_VF, _VF, _VF]), f"llvm.fmuladd.v{LANES}f32")
    return builder.call(fn, [a, b, c])


def _splat(builder: ir.IRBuilder, s):
    v = builder.insert_element(ir.Constant(_VF, ir.Undefined), s, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(_VI32, [0] * LANES))


def _lane_sum(builder: ir.IRBuilder, v):
    n = LANES
    while n > 1:
        n //= 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(n))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n),
                                                      list(range(n, 2 * n))))
        v = builder.fadd(lo, hi)
    return builder.extract_element(v, ir.Constant(_I32, 0))


def _values(builder: ir.IRBuilder, nibbles):
    """<16 x i32> codes (0..15) -> their doubled e2m1 values, float32, exact."""
    m = builder.shl(builder.and_(nibbles, _vi32(7)), _vi32(22))
    sign = builder.shl(builder.and_(nibbles, _vi32(8)), _vi32(28))
    f = builder.bitcast(builder.or_(m, sign), _VF)
    return builder.fmul(f, ir.Constant(_VF, [2.0**127] * LANES))


def _emit_rows(builder, code_rows, exp_rows, block_stride, exp_stride, half, x_rows, n_blocks):
    """IR for the dot products of len(x_rows) rows of x ((xa, xb) pointers) with the weight rows
    -> their float32 values [weight row][x row]. Each block of a weight row is decoded once
    for every row of x."""
    zero = ir.Constant(_VF, None)
    totals = [[cgutils.alloca_once_value(builder, zero) for _ in x_rows] for _ in code_rows]
    with cgutils.for_range(builder, n_blocks) as block:
        b = block.index
        j = builder.mul(b, _i64(LANES))
        xs = [tuple(builder.load(builder.bitcast(builder.gep(p, [j]), _VF.as_pointer()), align=4)
                    for p in pair) for pair in x_rows]
        for code_row, exp_row, row_totals in zip(code_rows, exp_rows, totals, strict=True):
            ptr = builder.gep(code_row, [builder.mul(b, block_stride)])
            w = builder.zext(builder.load(builder.bitcast(ptr, _VI8.as_pointer()), align=1),
                             _VI32)
            low = _values(builder, builder.and_(w, _vi32(15)))
            high = _values(builder, builder.lshr(w, _vi32(4)))
            e = builder.zext(builder.load(builder.gep(exp_row, [builder.mul(b, exp_stride)])),
                             _I64)
            scale = _splat(builder, builder.load(builder.gep(half, [e])))
            for (x_a, x_b), total in zip(xs, row_totals, strict=True):
                dot = _fmuladd(builder, high, x_b, builder.fmul(low, x_a))
                builder.store(_fmuladd(builder, scale, dot, builder.load(total)), total)
    return [[_lane_sum(builder, builder.load(t)) for t in row] for row in totals]


def _check(name: str, ty, dtype, ndim: int) -> None:
    if not (isinstance(ty, types.Array) and ty.dtype == dtype and ty.ndim == ndim):
        raise TypingError(f"mxfp4 dot_rows: {name} must be a {ndim}-d {dtype} array, got {ty}")


def _make_dot_rows(n_rows: int, n_x: int):
    @intrinsic
    def dot_rows(typingctx, codes, exps, half, xa, xb, out, r, o):
        """out[r + k, o + i] = dot(x[r + k], row o + i of w) for i < n_rows, k < n_x: codes
        (out, in/32, 16) uint8 and exps (out, in/32) uint8 of any strides but the codes' last
        (1), half the HALF_SCALES table, xa / xb (N, in/2) float32 C-contiguous: the x elements
        of each block's low and high nibbles. No bounds checks: the caller keeps
        o + n_rows <= rows and r + n_x <= N."""
        _check("codes", codes, types.uint8, 3)
        _check("exps", exps, types.uint8, 2)
        for name, ty, ndim in (("half", half, 1), ("xa", xa, 2), ("xb", xb, 2),
                               ("out", out, 2)):
            _check(name, ty, types.float32, ndim)
        for name, ty in (("r", r), ("o", o)):
            if not isinstance(ty, types.Integer):
                raise TypingError(f"mxfp4 dot_rows: {name} must be an integer, got {ty}")
        sig = types.void(codes, exps, half, xa, xb, out, r, o)

        def codegen(context, builder, sig, args):
            r, o = (context.cast(builder, args[i], sig.args[i], types.int64) for i in (6, 7))
            arr = {i: context.make_array(sig.args[i])(context, builder, args[i])
                   for i in range(6)}
            codes, exps = arr[0], arr[1]
            c_row, c_block = (builder.extract_value(codes.strides, i) for i in (0, 1))
            e_row, e_block = (builder.extract_value(exps.strides, i) for i in (0, 1))
            n_blocks = builder.extract_value(codes.shape, 1)
            c_base = builder.bitcast(codes.data, ir.PointerType(_I8))
            e_base = builder.bitcast(exps.data, ir.PointerType(_I8))
            rows = [builder.add(o, _i64(i)) for i in range(n_rows)]
            code_rows = [builder.gep(c_base, [builder.mul(row, c_row)]) for row in rows]
            exp_rows = [builder.gep(e_base, [builder.mul(row, e_row)]) for row in rows]
            x_len = builder.extract_value(arr[3].shape, 1)
            x_rows = [tuple(builder.gep(arr[i].data, [builder.mul(builder.add(r, _i64(k)), x_len)])
                            for i in (3, 4)) for k in range(n_x)]
            values = _emit_rows(builder, code_rows, exp_rows, c_block, e_block, arr[2].data,
                                x_rows, n_blocks)
            n_cols = builder.extract_value(arr[5].shape, 1)
            for i, row in enumerate(values):
                for k, value in enumerate(row):
                    at = builder.add(builder.mul(builder.add(r, _i64(k)), n_cols),
                                     builder.add(o, _i64(i)))
                    builder.store(value, builder.gep(arr[5].data, [at]))

        return sig, codegen

    return dot_rows


# (weight rows, rows of x) per call: decode ROWS weight rows for one row of x; for several,
# fewer weight rows so the accumulators (rows x rows of x vectors) stay in registers
dot_rows_1, dot_row_1 = _make_dot_rows(ROWS, 1), _make_dot_rows(1, 1)
dot_rows_2, dot_row_2 = _make_dot_rows(2, 2), _make_dot_rows(1, 2)
dot_rows_4, dot_row_4 = _make_dot_rows(2, 4), _make_dot_rows(1, 4)


# -- the kernels ---------------------------------------------------------------------------
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


@njit(**_JIT)
def _matvec(xa, xb, codes, exps, half, y):
    """y (N, out) = x @ w.T, x given as xa, xb (split): rows of x by 4, then 2, then 1 per
    vector call, each decoding its weight rows once for them."""
    n_out, N = codes.shape[0], xa.shape[0]
    for t in prange((n_out + TILE - 1) // TILE):
        lo, hi = t * TILE, min(n_out, (t + 1) * TILE)
        n = 0
        while n + 4 <= N:
            o = lo
            while o + 2 <= hi:
                dot_rows_4(codes, exps, half, xa, xb, y, n, o)
                o += 2
            if o < hi:
                dot_row_4(codes, exps, half, xa, xb, y, n, o)
            n += 4
        if n + 2 <= N:
            o = lo
            while o + 2 <= hi:
                dot_rows_2(codes, exps, half, xa, xb, y, n, o)
                o += 2
            if o < hi:
                dot_row_2(codes, exps, half, xa, xb, y, n, o)
            n += 2
        if n < N:
            o = lo
            while o + ROWS <= hi:
                dot_rows_1(codes, exps, half, xa, xb, y, n, o)
                o += ROWS
            while o < hi:
                dot_row_1(codes, exps, half, xa, xb, y, n, o)
                o += 1


@njit(**_JIT_DOT)
def _matvec_reference(x, codes, exps, ggml, kv, half, y):
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


def matvec_reference(x: np.ndarray, w: MXFP4Weight) -> np.ndarray:
    """linear's matvec in plain numba: each row decoded exactly, then dotted (tests)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.empty((x.shape[0], w.shape[0]), dtype=np.float32)
    _matvec_reference(x, w.codes, w.exponents, w.ggml, KVALUES, HALF_SCALES, y)
    return y


def _split(x: np.ndarray, ggml: bool) -> tuple[np.ndarray, np.ndarray]:
    """x (N, in) -> the elements each block's low nibbles weigh, and its high ones' (N, in/2):
    HF's even and odd elements; ggml's first and second 16 of every 32."""
    if not ggml:
        return np.ascontiguousarray(x[:, 0::2]), np.ascontiguousarray(x[:, 1::2])
    blocks = x.reshape(x.shape[0], -1, 32)
    return (np.ascontiguousarray(blocks[:, :, :16]).reshape(x.shape[0], -1),
            np.ascontiguousarray(blocks[:, :, 16:]).reshape(x.shape[0], -1))


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
        xa, xb = _split(x, w.ggml)
        _matvec(xa, xb, w.codes, w.exponents, HALF_SCALES, y)
        return y
    step = max(1, DEQUANT_BLOCK_ELEMENTS // n_in)
    for lo in range(0, n_out, step):
        rows = np.arange(lo, min(lo + step, n_out), dtype=np.int64)
        np.matmul(x, dequantize_rows(w, rows).T, out=y[:, lo:lo + rows.size])
    return y


