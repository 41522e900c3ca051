"""The 4- and 8-bit dot products written as explicit LLVM vector IR (numba intrinsics).

numba's auto-vectorised loops reduced each group's dot product across SIMD lanes before scaling
it: a horizontal sum per group, on one serial chain. Here a group's products stay in a 16-lane
vector, the group scale is applied lane-wise, and the lanes are summed once per row; 8 weight
rows run at once, so each x load serves 8 rows and their accumulator chains overlap; and each
packed load prefetches the next block of rows. On this machine's AVX-512 (a microbenchmark in
one process, SmolLM2's shapes, hot weights) the 4-bit loop ran 2.5-3x and the 8-bit one 2x
faster than the auto-vectorised ones; `python -m stream_run.bench.matvec` measures the cold rate.

The IR is target-independent (vectors of 16 float32, `llvm.fmuladd`, `llvm.prefetch`): LLVM
splits the vectors for AVX2 or NEON and fuses the multiply-adds where the target has FMA.

Layout (kernels/quant.py): a 4-bit row's bytes hold two codes each, low nibble first; an 8-bit
row one code per byte; 16-byte chunks, group_size * bits / 128 of them per group. For 4-bit, x
arrives deinterleaved (numba_kernels.deinterleave): byte j's low nibble pairs with xe[j], its
high nibble with xo[j]. Per group: sum_k x_k (s q_k + b) = s dot(x, q) + b sum(x), with sum(x)
per group in xs. Scales and biases are float32, or float16 bits (uint16) widened exactly.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

LANES = 16  # float32 lanes per vector: one AVX-512 register, two AVX2 ones
CHUNK_BYTES = LANES  # packed bytes per vector step: 16 bytes = 32 codes = 2 vectors of products
ROWS = 8  # weight rows per dot_rows call (8 accumulator chains, 16 of 32 zmm registers)

_F32, _I8, _I32, _I64 = ir.FloatType(), ir.IntType(8), ir.IntType(32), ir.IntType(64)
_VF = ir.VectorType(_F32, LANES)
_VI8 = ir.VectorType(_I8, LANES)


def _i64(v: int) -> ir.Constant:
    return ir.Constant(_I64, v)


def _fmuladd(builder: ir.IRBuilder, a, b, c):
    """a * b + c, fused where the target has FMA (llvm.fmuladd: contract semantics)."""
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_VF, [_VF, _VF, _VF]), f"llvm.fmuladd.v{LANES}f32")
    return builder.call(fn, [a, b, c])


def _splat(builder: ir.IRBuilder, s):
    v = builder.insert_element(ir.Constant(_VF, ir.Undefined), s, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES))


def _lane_sum(builder: ir.IRBuilder, v):
    """Sum of a vector's lanes, halving it each step."""
    n = LANES
    while n > 1:
        n //= 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(n))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n),
                                                      list(range(n, 2 * n))))
        v = builder.fadd(lo, hi)
    return builder.extract_element(v, ir.Constant(_I32, 0))


def _check(name: str, ty, dtypes, ndim: int) -> None:
    if not (isinstance(ty, types.Array) and ty.dtype in dtypes and ty.ndim == ndim
            and ty.layout == "C"):
        raise TypingError(f"dot_rows: {name} must be a C-contiguous {ndim}-d array of "
                          f"{' or '.join(map(str, dtypes))}, got {ty}")


def _widen_ir(builder: ir.IRBuilder, value, half: bool):
    """float16 bits (i16) -> float, exact (one vcvtph2ps with F16C); a float passes through."""
    return builder.fpext(builder.bitcast(value, ir.HalfType()), _F32) if half else value


@intrinsic
def widen(typingctx, value):
    """A scale or bias as float32: float32 as is, float16 bits (uint16, see
    numba_kernels.kernel_array) widened exactly."""
    if value not in (types.float32, types.uint16):
        raise TypingError(f"widen: a float32 or uint16 (float16 bits) scalar, got {value}")

    def codegen(context, builder, sig, args):
        return _widen_ir(builder, args[0], sig.args[0] == types.uint16)

    return types.float32(value), codegen


def _load(builder: ir.IRBuilder, ptr, j, vector_type, align: int):
    return builder.load(builder.bitcast(builder.gep(ptr, [j]), vector_type.as_pointer()),
                        align=align)


def _prefetch(builder: ir.IRBuilder, ptr) -> None:
    """A read prefetch into every cache level: a hint, which never faults (past the end too)."""
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [ir.PointerType(_I8), _I32, _I32, _I32]),
        "llvm.prefetch.p0i8")
    builder.call(fn, [ptr, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])


def _emit_rows(builder: ir.IRBuilder, bits: int, w_rows, s_rows, b_rows, half, xa, xb, xs,
               n_groups, chunks, ahead) -> list:
    """IR for the dot products of x with len(w_rows) weight rows -> their float32 values.

    Per 16-byte chunk: 4-bit, 32 codes against xa (even x) and xb (odd x); 8-bit, 16 codes
    against xa. Products stay in vectors; each group's is scaled lane-wise into the row's total,
    and the lanes are summed once at the end. half: (scales, biases) are float16 bits.
    Each packed load also prefetches the byte `ahead` bytes on: the next block of rows, so each
    block starts on bytes in flight (the hardware prefetcher sees only short row streams).
    """
    zero = ir.Constant(_VF, None)
    low, shift = ir.Constant(_VI8, [15] * LANES), ir.Constant(_VI8, [4] * LANES)
    # cgutils puts these in the entry block, where LLVM promotes them to registers
    totals = [cgutils.alloca_once_value(builder, zero) for _ in w_rows]
    group_dots = [cgutils.alloca_once_value(builder, zero) for _ in w_rows]
    bias_terms = [cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0)) for _ in w_rows]
    with cgutils.for_range(builder, n_groups) as group:
        g = group.index
        for acc in group_dots:
            builder.store(zero, acc)
        with cgutils.for_range(builder, chunks) as chunk:
            j = builder.mul(builder.add(builder.mul(g, chunks), chunk.index), _i64(CHUNK_BYTES))
            x_a = _load(builder, xa, j, _VF, 4)
            x_b = _load(builder, xb, j, _VF, 4) if bits == 4 else None
            for w_row, acc in zip(w_rows, group_dots, strict=True):
                _prefetch(builder, builder.gep(w_row, [builder.add(j, ahead)]))
                w = _load(builder, w_row, j, _VI8, 1)
                if bits == 4:
                    dot = _fmuladd(builder, builder.uitofp(builder.and_(w, low), _VF), x_a,
                                   builder.load(acc))
                    dot = _fmuladd(builder, builder.uitofp(builder.lshr(w, shift), _VF), x_b,
                                   dot)
                else:
                    dot = _fmuladd(builder, builder.uitofp(w, _VF), x_a, builder.load(acc))
                builder.store(dot, acc)
        x_sum = builder.load(builder.gep(xs, [g]))
        for s_row, b_row, acc, total, bias_term in zip(s_rows, b_rows, group_dots, totals,
                                                       bias_terms, strict=True):
            scale = _widen_ir(builder, builder.load(builder.gep(s_row, [g])), half[0])
            builder.store(_fmuladd(builder, _splat(builder, scale), builder.load(acc),
                                   builder.load(total)), total)
            b = builder.fmul(_widen_ir(builder, builder.load(builder.gep(b_row, [g])), half[1]),
                             x_sum)
            builder.store(builder.fadd(builder.load(bias_term), b), bias_term)
    return [builder.fadd(_lane_sum(builder, builder.load(total)), builder.load(bias_term))
            for total, bias_term in zip(totals, bias_terms, strict=True)]


def _make_dot_rows(n_rows: int):
    @intrinsic
    def dot_rows(typingctx, bits, packed, o, xa, xb, scales, biases, xs, out, r, col):
        """out[r, col + i] = dot(x, row o + i of a 4- or 8-bit weight) for i < n_rows, x given
        as xa, xb (4-bit: x's even and odd elements; 8-bit: x, and xb unused) and xs, its group
        sums; scales and biases float32 or float16 bits (uint16). No bounds checks: the caller
        keeps o + n_rows <= rows, col + n_rows <= columns of out, and bits in (4, 8)."""
        for name, ty in (("bits", bits), ("o", o), ("r", r), ("col", col)):
            if not isinstance(ty, types.Integer):
                raise TypingError(f"dot_rows: {name} must be an integer, got {ty}")
        _check("packed", packed, (types.uint32,), 2)
        for name, ty, ndim in (("xa", xa, 1), ("xb", xb, 1), ("xs", xs, 1), ("out", out, 2)):
            _check(name, ty, (types.float32,), ndim)
        for name, ty in (("scales", scales), ("biases", biases)):
            _check(name, ty, (types.float32, types.uint16), 2)
        sig = types.void(bits, packed, o, xa, xb, scales, biases, xs, out, r, col)

        def codegen(context, builder, sig, args):
            bits, o, r, col = (context.cast(builder, args[i], sig.args[i], types.int64)
                               for i in (0, 2, 9, 10))
            arrays = {i: context.make_array(sig.args[i])(context, builder, args[i])
                      for i in (1, 3, 4, 5, 6, 7, 8)}
            packed, xa, xb, scales, biases, xs, out = (arrays[i].data
                                                       for i in (1, 3, 4, 5, 6, 7, 8))
            row_bytes = builder.mul(builder.extract_value(arrays[1].shape, 1), _i64(4))
            n_groups = builder.extract_value(arrays[5].shape, 1)
            chunks = builder.udiv(row_bytes, builder.mul(n_groups, _i64(CHUNK_BYTES)))
            base = builder.bitcast(packed, ir.PointerType(_I8))
            rows = [builder.add(o, _i64(i)) for i in range(n_rows)]
            w_rows = [builder.gep(base, [builder.mul(row, row_bytes)]) for row in rows]
            s_rows = [builder.gep(scales, [builder.mul(row, n_groups)]) for row in rows]
            b_rows = [builder.gep(biases, [builder.mul(row, n_groups)]) for row in rows]
            half = tuple(sig.args[i].dtype == types.uint16 for i in (5, 6))
            ahead = builder.mul(row_bytes, _i64(n_rows))
            out_at = builder.add(builder.mul(r, builder.extract_value(arrays[8].shape, 1)), col)
            with builder.if_else(builder.icmp_signed("==", bits, _i64(4))) as (four, eight):
                for branch, b in ((four, 4), (eight, 8)):
                    with branch:
                        values = _emit_rows(builder, b, w_rows, s_rows, b_rows, half, xa, xb,
                                            xs, n_groups, chunks, ahead)
                        for i, value in enumerate(values):
                            builder.store(value, builder.gep(out, [builder.add(out_at,
                                                                               _i64(i))]))

        return sig, codegen

    return dot_rows


dot_rows = _make_dot_rows(ROWS)
dot_row = _make_dot_rows(1)  # the rows of a tile past its last multiple of ROWS
