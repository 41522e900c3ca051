"""The fast GGUF block matvec kernels (kernels/gguf_blocks.py's matvec): explicit LLVM vector IR
per ggml type, in the manner of kernels/simd.py.

Two paths, both parallel over output rows, several weight rows per inner call (sharing each
x load), weights decoded once for all N rows of x:
- Integer (every type but Q8_0), llama.cpp's: x is quantized once per call to int8 per block
  of 32 (the 32-element types) or 256 (K types) elements, scale dx = max|x| / 127, as
  llama.cpp's Q8_0 / Q8_1 / Q8_K activations (dx kept float32 here). Per weight block: codes
  times x codes as int8 pairs summed to int16 (vpmaddubsw), times the integer sub-block scales
  summed to int32 (vpmaddwd), exact (vpdpbusd / vpdpwssd where the target has VNNI); then one
  float multiply-add per block by d dx (mins and offsets via precomputed group sums of x).
  Numerical effect: the result is x_q @ w.T within float32 rounding, x_q = dx rint(x / dx),
  |x - x_q| <= dx / 2 per element: an error up to sum_k |w_k| dx_k / 2, typically ~0.5-1 % of
  max|y| for Gaussian x (the tests check both bounds).
- Float (Q8_0): codes widened to 16-lane float32 vectors, block scale folded in, fused into
  float32 accumulators; no quantization of x.

Target intrinsics (AVX2 vpmaddubsw / vpmaddwd, VNNI, GFNI) are used where numba's target has
them; elsewhere plain IR with the same integer results (tests compile an AVX2-only and a
plain target).

A driver runs x against up to WEIGHTS weights of its type in one parallel region (q|k|v, gate|up:
one thread wake-up, one quantization of x), and takes x's codes from a driver before it where it
ran at the same block size (gguf_blocks.matvecs shares them across types, Q4_K with Q6_K).

Rows are processed in tiles of TILE per parallel task; within a tile, (weight rows, rows of x)
at a time: (8, 1), (2, 4) for 4..7 rows of x, (4, 2) for 2..3, (1, 8) for 8: 8 accumulator
chains each; each group of rows prefetches the next one into L2.

Every cached kernel here depends only on code in this file (and on constants), so numba's own
per-file cache check stays sound (kernels/jit_cache.py keys only the files it lists).
"""

from __future__ import annotations

import llvmlite.binding as llvm
import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

from stream_run.kernels.numba_kernels import HALF_SCALES
from stream_run.kernels.quant import GGUF_BLOCK_TYPES

QTYPES = tuple(GGUF_BLOCK_TYPES)  # a kernel's type id is its index here
TILE = 16  # weight rows per parallel task
# Weight rows per inner call for one row of x (decode). The float path shares each float32 x
# load across 8 rows; the integer path reads x as bytes and runs 2 rows: 8 interleaved rows
# ran up to 20 % slower on short rows (4096 x 11008 Q4_K / Q4_0, weights from RAM), one row
# at a time up to 25 % slower on long ones (11008 x 4096).
ROWS_INT = 2
# Q4_0, Q4_K and Q6_K: 4 rows per call (x's loads shared by twice the rows) ran 13-30 %
# (Q4_0), 5-13 % (Q4_K), 2-11 % (Q6_K) faster than 2 at 4096 x 4096, 11008 x 4096 and
# 4096 x 11008 (2 threads, min of 6 passes over 300 MB, machine loaded 4-4.7; 3 rows was
# slower than 2 for the K types). Q4_1 at SmolLM2's 1536 x 576 ran 15 % slower: 2 elsewhere.
ROWS_INT4 = 4
MIN_AHEAD = 4096  # prefetch distance floor, bytes: 2 rows of 324 B (576-in Q4_0) ran 10-25 % slower
LANES = 16  # float32 lanes per vector of the float path: one AVX-512 register, two AVX2 ones

_JIT = {"parallel": True, "cache": True, "fastmath": False, "nogil": True}
_INLINE = {"inline": "always", "cache": True}

_F32, _I8, _I16, _I32, _I64 = (ir.FloatType(), ir.IntType(8), ir.IntType(16), ir.IntType(32),
                               ir.IntType(64))
_VF, _VI8 = ir.VectorType(_F32, LANES), ir.VectorType(_I8, LANES)
_B32, _W16, _D8, _F8 = (ir.VectorType(_I8, 32), ir.VectorType(_I16, 16), ir.VectorType(_I32, 8),
                        ir.VectorType(_F32, 8))


def _target_features() -> frozenset[str]:
    """The ISA features numba compiles for: NUMBA_CPU_FEATURES where set, else the host's
    (numba keeps the host's features under NUMBA_CPU_NAME too)."""
    if numba.config.CPU_FEATURES is not None:
        return frozenset(f[1:] for f in numba.config.CPU_FEATURES.split(",") if f[:1] == "+")
    return frozenset(k for k, v in llvm.get_host_cpu_features().items() if v)


def _fast_half() -> bool:
    """Whether the target widens f16 in one instruction (x86 F16C; every aarch64 does)."""
    return HALF_SCALES if numba.config.CPU_FEATURES is None else (
        "f16c" in _target_features())


class _Emit:
    """IR helpers for one kernel body: constants, loads at byte offsets, the few vector ops
    the decoders need, as target intrinsics where the target has them (else plain IR with the
    same integer results)."""

    def __init__(self, builder: ir.IRBuilder) -> None:
        self.b = builder
        self.fast_half = _fast_half()
        features = _target_features()
        self.avx2, self.sse2 = "avx2" in features, "sse2" in features
        # 256-bit VNNI: AVX-VNNI, or AVX512-VNNI with VL (not AMX)
        self.vnni = "avxvnni" in features or {"avx512vnni", "avx512vl"} <= features
        self.gfni = {"gfni", "avx"} <= features

    def i8s(self, v: int, n: int = LANES) -> ir.Constant:
        return ir.Constant(ir.VectorType(_I8, n), [v] * n)

    def at(self, p, off, ty):
        off = ir.Constant(_I64, off) if isinstance(off, int) else off
        return self.b.bitcast(self.b.gep(p, [off]), ty.as_pointer())

    def load(self, p, off, ty):
        return self.b.load(self.at(p, off, ty), align=1)

    def bytes16(self, p, off: int):
        return self.load(p, off, _VI8)

    def half(self, p, off: int):
        """The f16 at p + off as float, exact, any alignment."""
        h = self.load(p, off, _I16)
        if self.fast_half:
            return self.b.fpext(self.b.bitcast(h, ir.HalfType()), _F32)
        return self._half_soft(self.b.zext(h, _I32))

    def _half_soft(self, h):
        """numba_kernels._f16 in IR: for targets without a half conversion instruction."""
        b, i32 = self.b, (lambda v: ir.Constant(_I32, v))
        mag = b.shl(b.and_(h, i32(0x7FFF)), i32(13))
        scaled = b.fmul(b.bitcast(mag, _F32), ir.Constant(_F32, 2.0**112))
        special = b.or_(mag, i32(0x7F800000))
        is_special = b.icmp_unsigned("==", b.and_(h, i32(0x7C00)), i32(0x7C00))
        bits = b.select(is_special, special, b.bitcast(scaled, _I32))
        return b.bitcast(b.or_(bits, b.shl(b.and_(h, i32(0x8000)), i32(16))), _F32)

    def splat(self, s, n: int = LANES):
        b = self.b
        v = b.insert_element(ir.Constant(ir.VectorType(s.type, n), ir.Undefined), s,
                             ir.Constant(_I32, 0))
        return b.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), [0] * n))

    def lanes(self, v, idx: list[int]):
        """The lanes idx of v, as a vector."""
        return self.b.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, len(idx)), idx))

    def call(self, name: str, ret, args):
        fn = cgutils.get_or_insert_function(self.b.module,
                                            ir.FunctionType(ret, [a.type for a in args]), name)
        return self.b.call(fn, args)

    def fma(self, a, x, c):
        """a * x + c, fused where the target has FMA (llvm.fmuladd); scalars or vectors."""
        suffix = f"v{a.type.count}f32" if isinstance(a.type, ir.VectorType) else "f32"
        return self.call(f"llvm.fmuladd.{suffix}", a.type, [a, x, c])

    def scaled(self, q, d):
        """Signed codes q (<16 x i8>) -> d q as float32 lanes."""
        return self.b.fmul(self.b.sitofp(q, _VF), self.splat(d))

    def bit_to_4(self, h, bit: int, n: int = LANES):
        """Bit `bit` of each byte of h moved to bit 4 (the fifth bit of a 5-bit code)."""
        shifted = self.b.shl(h, self.i8s(4 - bit, n)) if bit <= 4 else self.b.lshr(
            h, self.i8s(bit - 4, n))
        return self.b.and_(shifted, self.i8s(16, n))

    def nibbles(self, q):
        """16 bytes -> their low nibbles then their high ones (<32 x i8>). With GFNI: one
        vgf2p8affineqb on q in both halves, a bit matrix per half (x & 15, x >> 4)."""
        b = self.b
        if self.gfni:
            lo, hi = [0, 0, 0, 0, 8, 4, 2, 1], [0, 0, 0, 0, 128, 64, 32, 16]
            return self.call("llvm.x86.vgf2p8affineqb.256", _B32, [
                self.lanes(q, list(range(16)) * 2), ir.Constant(_B32, lo * 2 + hi * 2),
                ir.Constant(_I8, 0)])
        both = b.shuffle_vector(q, b.lshr(q, self.i8s(4)), ir.Constant(
            ir.VectorType(_I32, 32), list(range(32))))
        return b.and_(both, self.i8s(15, 32))

    def maddubs(self, a, x):
        """Unsigned bytes a times signed bytes x (<32 x i8>), adjacent pairs summed with int16
        saturation -> <16 x i16> (x86 vpmaddubsw; no pair reaches the limit here)."""
        if self.avx2:
            return self.call("llvm.x86.avx2.pmadd.ub.sw", _W16, [a, x])
        b, w32 = self.b, ir.VectorType(_I16, 32)
        prod = b.mul(b.zext(a, w32), b.sext(x, w32))
        return self.call("llvm.sadd.sat.v16i16", _W16, [self.lanes(prod, list(range(0, 32, 2))),
                                                      self.lanes(prod, list(range(1, 32, 2)))])

    def dot_pairs(self, acc, a, s):
        """acc + madd(a, s) (<8 x i32>): one vpdpwssd where the target has VNNI."""
        if self.vnni:
            return self.call("llvm.x86.avx512.vpdpwssd.256", _D8, [acc, self.b.bitcast(a, _D8),
                                                                   self.b.bitcast(s, _D8)])
        return self.b.add(acc, self.madd(a, s))

    def dot_bytes(self, acc, a, x):
        """acc + the sums of 4 adjacent products of unsigned bytes a and signed bytes x
        (<32 x i8>) -> <8 x i32>: one vpdpbusd where the target has VNNI."""
        if self.vnni:
            return self.call("llvm.x86.avx512.vpdpbusd.256", _D8, [acc, self.b.bitcast(a, _D8),
                                                                   self.b.bitcast(x, _D8)])
        return self.b.add(acc, self.madd(self.maddubs(a, x), ir.Constant(_W16, [1] * 16)))

    def madd(self, a, s):
        """int16 a times s (<2n x i16>), adjacent pairs summed -> <n x i32> (x86 vpmaddwd)."""
        n = a.type.count // 2
        if n == 8 and self.avx2:
            return self.call("llvm.x86.avx2.pmadd.wd", _D8, [a, s])
        if n == 4 and self.sse2:
            return self.call("llvm.x86.sse2.pmadd.wd", ir.VectorType(_I32, 4), [a, s])
        b, wide = self.b, ir.VectorType(_I32, 2 * n)
        prod = b.mul(b.sext(a, wide), b.sext(s, wide))
        return b.add(self.lanes(prod, list(range(0, 2 * n, 2))),
                     self.lanes(prod, list(range(1, 2 * n, 2))))


# Float path (Q8_0): a decoder gives a block's unit u (one vector step of the inner loop) as
# (element offset in the block, 16 float32 weights) pairs; units = block elems / 16 / pairs.


def _ir_q8_0(e: _Emit, p, u: int) -> list:
    d = e.half(p, 0)
    return [(0, e.scaled(e.bytes16(p, 2), d)), (16, e.scaled(e.bytes16(p, 18), d))]


_FLOAT = {"Q8_0": (_ir_q8_0, 1)}  # name -> (decoder, units per block)


# Integer path (llama.cpp's): x quantized once per call to int8 per block (_quantize_x), each
# weight block's codes times x's as int8 pairs summed to int16 (vpmaddubsw), times the integer
# sub-block scales summed to int32 (vpmaddwd), exact; one float multiply-add per block. Each
# decoder adds a weight row's block to the accumulators of every row of x.


class _XBlock:
    """One row of quantized x at the current block: xq (i8*, its first element), dx (its
    scale), bs (i16*, its group sums, times the type's offset for Q4_0 / Q5_0), xf (float*:
    dx times its sums per 4 elements, for the min terms of Q4_1 / Q5_1; else None)."""

    def __init__(self, xq, dx, bs, xf) -> None:
        self.xq, self.dx, self.bs, self.xf = xq, dx, bs, xf


def _int_q4_0(e: _Emit, p, xs: list, accs: list) -> None:
    """Q4_0: sum (q - 8) x = sum q x - 8 sum x, the second from x's sums per 4 elements (the
    lanes of the dot), -8 times each, as the accumulator's start: exact in int32."""
    _int_32(e, p, xs, accs, e.nibbles(e.bytes16(p, 2)), e.half(p, 0), None)


def _int_q4_1(e: _Emit, p, xs: list, accs: list) -> None:
    """Q4_1: sum (d q + m) x = d dx sum q xq + m sum x, the second from x's lane sums."""
    _int_32(e, p, xs, accs, e.nibbles(e.bytes16(p, 4)), e.half(p, 0), e.half(p, 2))


def _int_q5_0(e: _Emit, p, xs: list, accs: list) -> None:
    """Q5_0: as Q4_0 with bit l of the u32 qh as code l's bit 4, offset -16."""
    q = e.b.or_(e.nibbles(e.bytes16(p, 6)), _bits_to_16(e, p, 2))
    _int_32(e, p, xs, accs, q, e.half(p, 0), None)


def _int_q5_1(e: _Emit, p, xs: list, accs: list) -> None:
    q = e.b.or_(e.nibbles(e.bytes16(p, 8)), _bits_to_16(e, p, 4))
    _int_32(e, p, xs, accs, q, e.half(p, 0), e.half(p, 2))


def _bits_to_16(e: _Emit, p, off: int):
    """The 32 bits at p + off (little-endian) as 32 bytes, 16 where the bit is set, else 0."""
    b = e.b
    spread = e.lanes(e.load(p, off, ir.VectorType(_I8, 4)), [k // 8 for k in range(32)])
    bit = b.and_(spread, ir.Constant(_B32, [1 << (k % 8) for k in range(32)]))
    return b.select(b.icmp_unsigned("!=", bit, e.i8s(0, 32)), e.i8s(16, 32), e.i8s(0, 32))


def _int_32(e: _Emit, p, xs: list, accs: list, q, d, m) -> None:
    """A 32-element block of unsigned codes q (<32 x i8>, in order), scale d, and min m (or
    None: the offset is in x's group sums, the accumulator's start)."""
    b = e.b
    for x, acc in zip(xs, accs, strict=True):
        start = ir.Constant(_D8, None) if m is not None else b.sext(
            e.load(x.bs, 0, ir.VectorType(_I16, 8)), _D8)
        dot = e.dot_bytes(start, q, e.load(x.xq, 0, _B32))
        v = e.fma(b.sitofp(dot, _F8), e.splat(b.fmul(d, x.dx), 8), b.load(acc))
        if m is not None:
            v = e.fma(e.load(x.xf, 0, _F8), e.splat(m, 8), v)
        b.store(v, acc)


def _k4_scales(e: _Emit, p):
    """Q4_K/Q5_K's 8 scales and 8 mins as <16 x i16> (llama.cpp's 32-bit unpacking)."""
    b, c = e.b, (lambda v: ir.Constant(_I32, v))
    u0, u1, u2 = (e.load(p, 4 + 4 * k, _I32) for k in range(3))
    m6, m4, m2 = c(0x3F3F3F3F), c(0x0F0F0F0F), c(0x03030303)
    words = (b.and_(u0, m6),
             b.or_(b.and_(u2, m4), b.shl(b.and_(b.lshr(u0, c(6)), m2), c(4))),
             b.and_(u1, m6),
             b.or_(b.and_(b.lshr(u2, c(4)), m4), b.shl(b.and_(b.lshr(u1, c(6)), m2), c(4))))
    v = ir.Constant(ir.VectorType(_I32, 4), None)
    for k, word in enumerate(words):
        v = b.insert_element(v, word, c(k))
    return b.zext(b.bitcast(v, ir.VectorType(_I8, 16)), _W16)


def _in_memory(e: _Emit, value, name: str):
    """value stored in a stack slot of the kernel's frame, behind a compiler barrier: LLVM then
    reloads its lanes from memory (a broadcast load folds into the instruction using it)
    instead of rebuilding them with shuffles."""
    b = e.b
    slot = cgutils.alloca_once(b, value.type, name=name)
    b.store(value, slot, align=32)
    barrier = ir.InlineAsm(ir.FunctionType(ir.VoidType(), [slot.type]), "", "r,~{memory}",
                           side_effect=True)
    b.call(barrier, [slot])
    return b.bitcast(slot, _I32.as_pointer())


def _int_k4(e: _Emit, p, xs: list, accs: list, qh: bool) -> None:
    """Q4_K (qh False) or Q5_K: chunk c's low nibbles are sub-block 2c, high ones 2c + 1."""
    b = e.b
    d, dmin = e.half(p, 0), e.half(p, 2)
    scales = _k4_scales(e, p)
    wide = b.zext(e.lanes(scales, list(range(8))), _D8)  # the scales as 8 x i32
    pairs = _in_memory(e, b.or_(wide, b.shl(wide, ir.Constant(_D8, [16] * 8))), "k4_scales")
    high = e.load(p, 16, _B32) if qh else None
    terms = []  # (codes <32 x i8>, element offset, scale <16 x i16>)
    for c in range(4):
        w = e.load(p, (48 if qh else 16) + 32 * c, _B32)
        for s in range(2):
            q = b.and_(w if s == 0 else b.lshr(w, e.i8s(4, 32)), e.i8s(15, 32))
            if qh:
                q = b.or_(q, e.bit_to_4(high, 2 * c + s, 32))
            word = b.load(b.gep(pairs, [ir.Constant(_I64, 2 * c + s)]), align=4)
            terms.append((q, 64 * c + 32 * s, b.bitcast(e.splat(word, 8), _W16)))
    mins = e.lanes(scales, list(range(8, 16)))
    for x, acc in zip(xs, accs, strict=True):
        dot = ir.Constant(_D8, None)
        for q, off, scale in terms:
            dot = e.dot_pairs(dot, e.maddubs(q, e.load(x.xq, off, _B32)), scale)
        m = e.madd(mins, e.load(x.bs, 0, ir.VectorType(_I16, 8)))  # <4 x i32>
        m = b.shuffle_vector(m, ir.Constant(m.type, None), ir.Constant(
            ir.VectorType(_I32, 8), list(range(8))))
        v = e.fma(b.sitofp(dot, _F8), e.splat(b.fmul(d, x.dx), 8), b.load(acc))
        b.store(e.fma(b.sitofp(m, _F8), e.splat(b.fneg(b.fmul(dmin, x.dx)), 8), v), acc)


def _int_q4_k(e: _Emit, p, xs: list, accs: list) -> None:
    _int_k4(e, p, xs, accs, False)


def _int_q5_k(e: _Emit, p, xs: list, accs: list) -> None:
    _int_k4(e, p, xs, accs, True)


def _int_q6_k(e: _Emit, p, xs: list, accs: list) -> None:
    """Q6_K: per half h, ql[64 h + l] and ql[64 h + 32 + l] give 4 low bits (low nibbles: the
    half's elements l and 32 + l; high: 64 + l, 96 + l), qh[32 h + l] 2 bits each; q - 32."""
    b = e.b
    terms = []
    for h in range(2):
        a, a2 = e.load(p, 64 * h, _B32), e.load(p, 64 * h + 32, _B32)
        top = e.load(p, 128 + 32 * h, _B32)
        for k, src in enumerate((a, a2, a, a2)):
            low = b.and_(src if k < 2 else b.lshr(src, e.i8s(4, 32)), e.i8s(15, 32))
            hi2 = b.shl(b.and_(b.lshr(top, e.i8s(2 * k, 32)), e.i8s(3, 32)), e.i8s(4, 32))
            terms.append((b.or_(low, hi2), 128 * h + 32 * k))
    scales = b.sext(e.load(p, 192, ir.VectorType(_I8, 16)), _W16)
    _dot_k16(e, xs, accs, terms, scales, e.half(p, 208), 32)


def _int_q3_k(e: _Emit, p, xs: list, accs: list) -> None:
    """Q3_K: element 128 c + 32 s + l has bits 2s of qs[32 c + l] and bit 4c + s of hmask[l]
    as bit 2; q - 4. Its 16 6-bit scales (minus 32) unpacked as llama.cpp does."""
    b, c32 = e.b, (lambda v: ir.Constant(_I32, v))
    hmask = e.load(p, 0, _B32)
    terms = []
    for c in range(2):
        qs = e.load(p, 32 + 32 * c, _B32)
        for s in range(4):
            low = b.and_(b.lshr(qs, e.i8s(2 * s, 32)), e.i8s(3, 32))
            high = b.shl(b.and_(b.lshr(hmask, e.i8s(4 * c + s, 32)), e.i8s(1, 32)), e.i8s(2, 32))
            terms.append((b.or_(low, high), 128 * c + 32 * s))
    a0, a1, a2 = (e.load(p, 96 + 4 * k, _I32) for k in range(3))
    m4, m2 = c32(0x0F0F0F0F), c32(0x03030303)
    words = (b.or_(b.and_(a0, m4), b.shl(b.and_(a2, m2), c32(4))),
             b.or_(b.and_(a1, m4), b.shl(b.and_(b.lshr(a2, c32(2)), m2), c32(4))),
             b.or_(b.and_(b.lshr(a0, c32(4)), m4), b.shl(b.and_(b.lshr(a2, c32(4)), m2), c32(4))),
             b.or_(b.and_(b.lshr(a1, c32(4)), m4), b.shl(b.and_(b.lshr(a2, c32(6)), m2), c32(4))))
    v = ir.Constant(ir.VectorType(_I32, 4), None)
    for k, word in enumerate(words):
        v = b.insert_element(v, word, c32(k))
    scales = b.sub(b.zext(b.bitcast(v, ir.VectorType(_I8, 16)), _W16),
                   ir.Constant(_W16, [32] * 16))
    _dot_k16(e, xs, accs, terms, scales, e.half(p, 108), 4)


def _int_q2_k(e: _Emit, p, xs: list, accs: list) -> None:
    """Q2_K: element 128 c + 32 s + l is bits 2s of qs[32 c + l]; per 16 elements a 4-bit
    scale (low nibble of scales[j]) and min (high nibble): d sc q - dmin m."""
    b = e.b
    terms = []
    for c in range(2):
        qs = e.load(p, 16 + 32 * c, _B32)
        for s in range(4):
            terms.append((b.and_(b.lshr(qs, e.i8s(2 * s, 32)), e.i8s(3, 32)), 128 * c + 32 * s))
    raw = e.load(p, 0, ir.VectorType(_I8, 16))
    scales = b.zext(b.and_(raw, e.i8s(15)), _W16)
    mins = b.zext(b.lshr(raw, e.i8s(4)), _W16)
    _dot_k16(e, xs, accs, terms, scales, e.half(p, 80), 0, mins, e.half(p, 82))


def _dot_k16(e: _Emit, xs: list, accs: list, terms: list, scales, d, offset: int,
             mins=None, dmin=None) -> None:
    """A 256-element block with a scale per 16 elements: terms (codes <32 x i8>, element
    offset: the vector covers sub-blocks off / 16 and off / 16 + 1), scales <16 x i16>; the
    codes' value is code - offset; mins (<16 x i16>, times dmin) subtracted where given."""
    b = e.b
    pairs = [e.lanes(scales, [off // 16] * 8 + [off // 16 + 1] * 8) for _, off in terms]
    for x, acc in zip(xs, accs, strict=True):
        sums = e.load(x.bs, 0, _W16)  # x's sums per 16 elements
        dot = ir.Constant(_D8, None)
        if offset:  # sum_j sc_j * offset * (sum of x's group j), subtracted
            dot = b.mul(e.madd(scales, sums), ir.Constant(_D8, [-offset] * 8))
        for (q, off), scale in zip(terms, pairs, strict=True):
            dot = e.dot_pairs(dot, e.maddubs(q, e.load(x.xq, off, _B32)), scale)
        v = e.fma(b.sitofp(dot, _F8), e.splat(b.fmul(d, x.dx), 8), b.load(acc))
        if mins is not None:
            m = b.sitofp(e.madd(mins, sums), _F8)
            v = e.fma(m, e.splat(b.fneg(b.fmul(dmin, x.dx)), 8), v)
        b.store(v, acc)


# name -> (decoder, x block elements, elements per x group sum, factor of the group sums)
_INT = {"Q4_0": (_int_q4_0, 32, 4, -8), "Q4_1": (_int_q4_1, 32, 4, 1),
        "Q5_0": (_int_q5_0, 32, 4, -16), "Q5_1": (_int_q5_1, 32, 4, 1),
        "Q2_K": (_int_q2_k, 256, 16, 1), "Q3_K": (_int_q3_k, 256, 16, 1),
        "Q4_K": (_int_q4_k, 256, 32, 1), "Q5_K": (_int_q5_k, 256, 32, 1),
        "Q6_K": (_int_q6_k, 256, 16, 1)}


def _prefetch(builder: ir.IRBuilder, ptr) -> None:
    """A read prefetch into L2 (prefetcht1): a hint, which never faults. Into L1 it ran up to
    10 % slower (48 KB of L1 holds the current rows, x, and the prefetched ones hardly)."""
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [ir.PointerType(_I8), _I32, _I32, _I32]),
        "llvm.prefetch.p0i8")
    builder.call(fn, [ptr, ir.Constant(_I32, 0), ir.Constant(_I32, 2), ir.Constant(_I32, 1)])


def _lane_sum(builder: ir.IRBuilder, v):
    n = v.type.count
    while n > 1:
        n //= 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(n))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n),
                                                      list(range(n, 2 * n))))
        v = builder.fadd(lo, hi)
    return builder.extract_element(v, ir.Constant(_I32, 0))


def _prefetch_rows(builder, blk, blocks, nbytes: int, ahead) -> None:
    """Prefetch each block's lines `ahead` bytes on: the same block of the next group of rows
    (the hardware prefetcher sees only short row streams). Blocks under 64 bytes prefetch
    every 64 // nbytes blocks, at a stride under a line, so every line still gets one."""
    every = max(1, 64 // nbytes)
    if every > 1:
        due = builder.icmp_unsigned("==", builder.urem(blk, ir.Constant(_I64, every)),
                                    ir.Constant(_I64, 0))
        with builder.if_then(due):
            _prefetch_rows(builder, blk, blocks, 64, ahead)
        return
    for p in blocks:
        for line in range(0, nbytes, 64):
            _prefetch(builder, builder.gep(p, [builder.add(ahead, ir.Constant(_I64, line))]))


def _emit_float(builder, qtype: str, w_rows, x_rows, n_blocks, ahead) -> list:
    """IR: dot products of rows x_rows of x (float32) with weight rows w_rows (float path)
    -> [[float] * len(x_rows)] per weight row."""
    decode, units = _FLOAT[qtype]
    elems, nbytes = GGUF_BLOCK_TYPES[qtype]
    e = _Emit(builder)
    zero = ir.Constant(_VF, None)
    accs = [[cgutils.alloca_once_value(builder, zero) for _ in x_rows] for _ in w_rows]
    with cgutils.for_range(builder, n_blocks) as loop:
        blk = loop.index
        k0 = builder.mul(blk, ir.Constant(_I64, elems))
        blocks = [builder.gep(w, [builder.mul(blk, ir.Constant(_I64, nbytes))]) for w in w_rows]
        _prefetch_rows(builder, blk, blocks, nbytes, ahead)
        for u in range(units):
            x_vecs = {}
            for i, p in enumerate(blocks):
                for off, w in decode(e, p, u):
                    if off not in x_vecs:  # loaded once per unit, shared by the weight rows
                        at = builder.add(k0, ir.Constant(_I64, off))
                        x_vecs[off] = [builder.load(builder.bitcast(
                            builder.gep(xr, [at]), _VF.as_pointer()), align=4) for xr in x_rows]
                    for j, acc in enumerate(accs[i]):
                        builder.store(e.fma(w, x_vecs[off][j], builder.load(acc)), acc)
    return [[_lane_sum(builder, builder.load(acc)) for acc in row] for row in accs]


def _emit_int(builder, qtype: str, w_rows, x_rows: list, n_blocks, ahead) -> list:
    """IR: the integer path's dot products; x_rows: (xq, dx, bs[, xf]) row pointers of x.

    32-element blocks alternate two accumulators per (weight row, x row) pair, two blocks a
    step: one multiply-add chain of 4 cycles a block bounded the few-pair calls. Every call
    does so, whatever its pairs, so a row of x sums its blocks in one order however many rows
    it is computed with: a token's logits do not depend on its batch or on the draft rows of a
    speculative pass (with one chain for calls of 4+ pairs, greedy tokens flipped at near ties
    between a pass of one row and a pass of several). Cost: 8 rows of x ran ~13 % slower
    (4096 x 4096 Q4_0, 2 threads), 1 and 2 rows no slower."""
    elems, _ = GGUF_BLOCK_TYPES[qtype]
    e = _Emit(builder)
    chains = 2 if elems == 32 else 1
    accs = [[[cgutils.alloca_once_value(builder, ir.Constant(_F8, None)) for _ in x_rows]
             for _ in w_rows] for _ in range(chains)]
    steps = builder.udiv(n_blocks, ir.Constant(_I64, chains))
    with cgutils.for_range(builder, steps) as loop:
        for c in range(chains):
            blk = builder.add(builder.mul(loop.index, ir.Constant(_I64, chains)),
                              ir.Constant(_I64, c))
            _emit_block(e, qtype, w_rows, x_rows, blk, ahead, accs[c])
    if chains == 2:  # an odd block count: the last block
        odd = builder.icmp_unsigned("!=", builder.urem(n_blocks, ir.Constant(_I64, 2)),
                                    ir.Constant(_I64, 0))
        with builder.if_then(odd):
            last = builder.sub(n_blocks, ir.Constant(_I64, 1))
            _emit_block(e, qtype, w_rows, x_rows, last, ahead, accs[0])
    sums = [[builder.load(acc) for acc in row] for row in accs[0]]
    for c in range(1, chains):
        sums = [[builder.fadd(v, builder.load(acc)) for v, acc in zip(row, acc_row, strict=True)]
                for row, acc_row in zip(sums, accs[c], strict=True)]
    return [[_lane_sum(builder, v) for v in row] for row in sums]


def _emit_block(e: _Emit, qtype: str, w_rows, x_rows: list, blk, ahead, accs) -> None:
    """IR: block blk of every weight row, added to accs (per weight row, per row of x)."""
    builder = e.b
    decode, _, group, _ = _INT[qtype]
    elems, nbytes = GGUF_BLOCK_TYPES[qtype]
    xs = [_XBlock(builder.gep(xq, [builder.mul(blk, ir.Constant(_I64, elems))]),
                  builder.load(builder.gep(dx, [blk])),
                  builder.gep(bs, [builder.mul(blk, ir.Constant(_I64, elems // group))]),
                  builder.gep(xr[3], [builder.mul(blk, ir.Constant(_I64, elems // 4))])
                  if len(xr) > 3 else None)
          for xr in x_rows for xq, dx, bs in [xr[:3]]]
    blocks = [builder.gep(w, [builder.mul(blk, ir.Constant(_I64, nbytes))]) for w in w_rows]
    _prefetch_rows(builder, blk, blocks, nbytes, ahead)
    for p, row_accs in zip(blocks, accs, strict=True):
        decode(e, p, xs, row_accs)


def _literal(ty, name: str) -> int:
    if not isinstance(ty, types.IntegerLiteral):
        raise TypingError(f"_rows: {name} must be a compile-time integer, got {ty}")
    return int(ty.literal_value)


@intrinsic(prefer_literal=True)
def _rows(typingctx, kind, n_rows, n_x, data, o, xs, r0, out):
    """out[r0 + j, o + i] = dot(x[r0 + j], dequantized row o + i of data) for i < n_rows,
    j < n_x; kind (an index of QTYPES; the float path for QTYPES[kind - 100]), n_rows, n_x
    compile-time constants; xs: (x,) for the float path, (xq, dx, bs[, xf]) for the integer one.
    No bounds checks: the caller keeps the rows in range and every array C-contiguous."""
    k = _literal(kind, "kind")
    qtype, floats = QTYPES[k % 100], k >= 100
    for name, ty in (("data", data), ("out", out), *(("xs", a) for a in xs)):
        if not (isinstance(ty, types.Array) and ty.layout == "C" and ty.ndim == 2):
            raise TypingError(f"_rows: {name} must be C-contiguous 2-d arrays, got {ty}")
    rows, n_xs = _literal(n_rows, "n_rows"), _literal(n_x, "n_x")
    elems, nbytes = GGUF_BLOCK_TYPES[qtype]
    sig = types.void(kind, n_rows, n_x, data, o, xs, r0, out)

    def codegen(context, builder, sig, args):
        data_a, out_a = (context.make_array(sig.args[i])(context, builder, args[i])
                         for i in (3, 7))
        x_arrays = [context.make_array(ty)(context, builder, v) for ty, v in zip(
            sig.args[5], cgutils.unpack_tuple(builder, args[5]), strict=True)]
        o, r0 = (context.cast(builder, args[i], sig.args[i], types.int64) for i in (4, 6))
        row_bytes = builder.extract_value(data_a.shape, 1)
        n_in = builder.extract_value(x_arrays[0].shape, 1)
        n_out = builder.extract_value(out_a.shape, 1)
        n_blocks = builder.udiv(n_in, ir.Constant(_I64, elems))
        w_rows = [builder.gep(data_a.data, [builder.mul(builder.add(o, ir.Constant(_I64, i)),
                                                        row_bytes)]) for i in range(rows)]
        x_rows = []
        for j in range(n_xs):
            r = builder.add(r0, ir.Constant(_I64, j))
            x_rows.append(tuple(builder.gep(a.data, [builder.mul(r, builder.extract_value(
                a.shape, 1))]) for a in x_arrays))
        # prefetch the next group of rows, at least MIN_AHEAD bytes on (short rows)
        ahead = builder.mul(row_bytes, ir.Constant(_I64, rows))
        near = builder.icmp_unsigned("<", ahead, ir.Constant(_I64, MIN_AHEAD))
        ahead = builder.select(near, ir.Constant(_I64, MIN_AHEAD), ahead)
        if floats:
            sums = _emit_float(builder, qtype, w_rows, [x[0] for x in x_rows], n_blocks, ahead)
        else:
            sums = _emit_int(builder, qtype, w_rows, x_rows, n_blocks, ahead)
        for i, row in enumerate(sums):
            for j, s in enumerate(row):
                at = builder.add(builder.mul(builder.add(r0, ir.Constant(_I64, j)), n_out),
                                 builder.add(o, ir.Constant(_I64, i)))
                builder.store(s, builder.gep(out_a.data, [at]))

    return sig, codegen


@njit(**_INLINE)
def _group(kind, n_rows, n_x, xs, r0, data, o0, o1, out):
    """Rows o0..o1 of the weight against rows r0..r0 + n_x of x: n_rows at a time, then one."""
    n_full = (o1 - o0) // n_rows
    for i in range(n_full):
        _rows(kind, n_rows, n_x, data, o0 + n_rows * i, xs, r0, out)
    for i in range(o1 - o0 - n_rows * n_full):
        _rows(kind, 1, n_x, data, o0 + n_rows * n_full + i, xs, r0, out)


@njit(**_INLINE)
def _tile(kind, rows1, xs, data, o0, o1, out):
    """Rows o0..o1 of the weight against every row of x, in groups of 8, 4, 2, 1 rows of x;
    a single row of x against rows1 weight rows at a time (a compile-time constant)."""
    r0 = 0
    n = xs[0].shape[0]
    while r0 < n:
        left = n - r0
        if left >= 8:
            _group(kind, 1, 8, xs, r0, data, o0, o1, out)
            r0 += 8
        elif left >= 4:
            _group(kind, 2, 4, xs, r0, data, o0, o1, out)
            r0 += 4
        elif left >= 2:
            _group(kind, 4, 2, xs, r0, data, o0, o1, out)
            r0 += 2
        else:
            _group(kind, rows1, 1, xs, r0, data, o0, o1, out)
            r0 += 1


@njit(cache=True, nogil=True)
def _codes(x, block):
    """x (N, in) float32 -> int8 codes xq = rint(x / dx) and per block of x its scale
    dx = max|x| / 127 (NaN where the block holds a NaN or inf). |x - dx xq| <= dx / 2 (plus a
    few float32 ulps of x) per element.

    Integer reductions only (max|x| over the bit patterns): they vectorise without fastmath.
    """
    n, n_in = x.shape
    xq = np.empty((n, n_in), dtype=np.int8)
    dx = np.empty((n, n_in // block), dtype=np.float32)
    for r in range(n):
        bits = x[r].view(np.int32)
        for blk in range(n_in // block):
            k0 = blk * block
            top = np.int32(0)
            for i in range(block):
                top = max(top, bits[k0 + i] & 0x7FFFFFFF)
            amax = np.int32(top).view(np.float32)  # |x| max, or inf/NaN
            inv = np.float32(127) / amax if 0 < top < 0x7F800000 else np.float32(0)
            for i in range(block):
                xq[r, k0 + i] = np.int32(np.rint(x[r, k0 + i] * inv))
            dx[r, blk] = amax / np.float32(127) if top < 0x7F800000 else np.float32(np.nan)
    return xq, dx


@njit(cache=True, nogil=True)
def _group_sums(xq, group, factor):
    """Per group of `group` elements of each row of xq, the sum of its codes times factor,
    as int16 (N, in / group). Groups of 4 summed from one 32-bit word each, longer ones over
    a slice: both vectorise (element-indexed loops ran 4-7x slower)."""
    n, n_in = xq.shape
    ng = n_in // group
    bs = np.empty((n, ng), dtype=np.int16)
    for r in range(n):
        qr, br = xq[r], bs[r]
        if group == 4:
            words = qr.view(np.uint32)
            for g in range(ng):
                v = words[g]
                s = (np.int32(np.int8(v & 0xFF)) + np.int32(np.int8((v >> 8) & 0xFF))
                     + np.int32(np.int8((v >> 16) & 0xFF)) + np.int32(np.int8(v >> 24)))
                br[g] = s * factor
        else:
            for g in range(ng):
                qg = qr[g * group:g * group + group]
                s = np.int32(0)
                for i in range(group):
                    s += np.int32(qg[i])
                br[g] = s * factor
    return bs


@njit(cache=True, nogil=True)
def _quantize_x(x, block, group, factor):
    """x (N, in) float32 -> (xq, dx, bs): _codes(x, block) and their _group_sums(group,
    factor): what the integer kernels take."""
    xq, dx = _codes(x, block)
    return xq, dx, _group_sums(xq, group, factor)


@njit(**_INLINE)
def _codes_of(x, xq, dx, block):
    """x's codes and scales per block: xq, dx as given where they hold x's rows (a driver
    before this one quantized the same x to the same block size), else computed."""
    if xq.shape[0] == x.shape[0] and xq.shape[1] == x.shape[1]:
        return xq, dx
    return _codes(x, block)


@njit(**_INLINE)
def _n_tiles(datas):
    n = 0
    for i in range(len(datas)):
        n += (datas[i].shape[0] + TILE - 1) // TILE
    return n


@njit(**_INLINE)
def _which(t, datas):
    """Task t over the tiles of datas in order -> (weight index, its tile)."""
    i, first = 0, 0
    while i < len(datas) - 1:
        n = (datas[i].shape[0] + TILE - 1) // TILE
        if t < first + n:
            break
        first += n
        i += 1
    return i, t - first


# One parallel driver per fast type: the type must be a compile-time constant down to _rows.
# A driver runs x against several weights of its type (datas, outs: tuples of WEIGHTS arrays,
# unused ones with 0 rows) in one parallel region, over all their tiles: q|k|v or gate|up share
# one quantization of x and one thread wake-up. xq, dx: x's codes where a caller has them
# (_codes_of), else any arrays of another shape; the driver returns the codes it used.
WEIGHTS = 3


@njit(**_INLINE)
def _task(kind, rows1, xs, datas, outs, t):
    """Tile t of the tiles of datas in order."""
    i, j = _which(t, datas)
    d = datas[i]
    _tile(kind, rows1, xs, d, j * TILE, min(j * TILE + TILE, d.shape[0]), outs[i])


@njit(**_JIT)
def _matvec_q4_0(x, xq, dx, datas, outs):
    xq, dx = _codes_of(x, xq, dx, 32)
    xs = (xq, dx, _group_sums(xq, 4, -8))
    for t in prange(_n_tiles(datas)):
        _task(0, ROWS_INT4, xs, datas, outs, t)
    return xq, dx


@njit(cache=True, nogil=True)
def _lane_sums(xq, dx, block):
    """dx times the sums of xq per 4 elements, float32 (N, in / 4): Q4_1 / Q5_1's min terms."""
    n, n_in = xq.shape
    xf = np.empty((n, n_in // 4), dtype=np.float32)
    for r in range(n):
        for g in range(n_in // 4):
            s = np.int32(xq[r, 4 * g]) + np.int32(xq[r, 4 * g + 1]) + np.int32(
                xq[r, 4 * g + 2]) + np.int32(xq[r, 4 * g + 3])
            xf[r, g] = dx[r, 4 * g // block] * np.float32(s)
    return xf


@njit(**_JIT)
def _matvec_q4_1(x, xq, dx, datas, outs):
    xq, dx = _codes_of(x, xq, dx, 32)
    xs = (xq, dx, _group_sums(xq, 4, 1), _lane_sums(xq, dx, 32))
    for t in prange(_n_tiles(datas)):
        _task(1, ROWS_INT, xs, datas, outs, t)
    return xq, dx


@njit(**_JIT)
def _matvec_q5_0(x, xq, dx, datas, outs):
    xq, dx = _codes_of(x, xq, dx, 32)
    xs = (xq, dx, _group_sums(xq, 4, -16))
    for t in prange(_n_tiles(datas)):
        _task(2, ROWS_INT, xs, datas, outs, t)
    return xq, dx


@njit(**_JIT)
def _matvec_q5_1(x, xq, dx, datas, outs):
    xq, dx = _codes_of(x, xq, dx, 32)
    xs = (xq, dx, _group_sums(xq, 4, 1), _lane_sums(xq, dx, 32))
    for t in prange(_n_tiles(datas)):
        _task(3, ROWS_INT, xs, datas, outs, t)
    return xq, dx


@njit(**_JIT)
def _matvec_q8_0(x, xq, dx, datas, outs):
    for t in prange(_n_tiles(datas)):
        _task(104, 8, (x,), datas, outs, t)
    return xq, dx


@njit(**_JIT)
def _matvec_q2_k(x, xq, dx, datas, outs):
    xq, dx = _codes_of(x, xq, dx, 256)
    xs = (xq, dx, _group_sums(xq, 16, 1))
    for t in prange(_n_tiles(datas)):
        _task(5, ROWS_INT, xs, datas, outs, t)
    return xq, dx


@njit(**_JIT)
def _matvec_q3_k(x, xq, dx, datas, outs):
    xq, dx = _codes_of(x, xq, dx, 256)
    xs = (xq, dx, _group_sums(xq, 16, 1))
    for t in prange(_n_tiles(datas)):
        _task(6, ROWS_INT, xs, datas, outs, t)
    return xq, dx


@njit(**_JIT)
def _matvec_q4_k(x, xq, dx, datas, outs):
    xq, dx = _codes_of(x, xq, dx, 256)
    xs = (xq, dx, _group_sums(xq, 32, 1))
    for t in prange(_n_tiles(datas)):
        _task(7, ROWS_INT4, xs, datas, outs, t)
    return xq, dx


@njit(**_JIT)
def _matvec_q5_k(x, xq, dx, datas, outs):
    xq, dx = _codes_of(x, xq, dx, 256)
    xs = (xq, dx, _group_sums(xq, 32, 1))
    for t in prange(_n_tiles(datas)):
        _task(8, ROWS_INT, xs, datas, outs, t)
    return xq, dx


@njit(**_JIT)
def _matvec_q6_k(x, xq, dx, datas, outs):
    xq, dx = _codes_of(x, xq, dx, 256)
    xs = (xq, dx, _group_sums(xq, 16, 1))
    for t in prange(_n_tiles(datas)):
        _task(9, ROWS_INT4, xs, datas, outs, t)
    return xq, dx


QUANTIZED_X = {name: block for name, (_, block, _, _) in _INT.items()}
FAST_KERNELS = {"Q4_0": _matvec_q4_0, "Q4_1": _matvec_q4_1, "Q5_0": _matvec_q5_0,
                "Q5_1": _matvec_q5_1, "Q8_0": _matvec_q8_0, "Q2_K": _matvec_q2_k,
                "Q3_K": _matvec_q3_k, "Q4_K": _matvec_q4_k, "Q5_K": _matvec_q5_k,
                "Q6_K": _matvec_q6_k}
