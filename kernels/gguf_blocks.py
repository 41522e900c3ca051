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

matvec has two paths. The fast one (Q4_0, Q8_0, Q4_K, Q5_K, Q6_K) is explicit LLVM vector IR
(like kernels/simd.py): per block or 32-byte chunk, the codes are widened to 16-lane float32
vectors with the (sub-)block scale folded in (w = d q or d sc q - dmin m, one multiply or fused
multiply-add per 16 weights), then fused into the accumulators of every row of x, so the
weights are decoded once for all N rows of x; several weight rows share each x load; each row
prefetches the next group of rows. x stays float32 (no int8 quantization of activations, so
no error beyond float32 rounding: see matvec). The generic path (every type; the only one for
Q4_1, Q5_0, Q5_1, Q2_K, Q3_K) decodes each block exactly into a stack buffer and dots it.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

from stream_run.kernels.numba_kernels import HALF_SCALES, _f16, _stack_segment
from stream_run.kernels.quant import GGUF_BLOCK_TYPES, BlockWeight

QTYPES = tuple(GGUF_BLOCK_TYPES)  # a kernel's type id is its index here
MAX_X_ROWS = 8  # matvec's largest N
TILE = 16  # weight rows per parallel task

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


# --- fast matvec: explicit LLVM vector IR per type (Q4_0, Q8_0, Q4_K, Q5_K, Q6_K) ---

LANES = 16  # float32 lanes per vector: one AVX-512 register, two AVX2 ones
# (weight rows, rows of x) per inner call, by rows of x: 8 accumulator chains each, weights
# decoded once for all rows of x, each x load shared by the weight rows
GROUPS = ((8, 1), (4, 2), (2, 4), (1, 8))

_F32, _I8, _I16, _I32, _I64 = (ir.FloatType(), ir.IntType(8), ir.IntType(16), ir.IntType(32),
                               ir.IntType(64))
_VF, _VI8 = ir.VectorType(_F32, LANES), ir.VectorType(_I8, LANES)


def _fast_half() -> bool:
    """Whether numba's target widens f16 in hardware (x86 F16C, aarch64); numba compiles for
    the host unless NUMBA_CPU_NAME / NUMBA_CPU_FEATURES name another target."""
    if numba.config.CPU_NAME or numba.config.CPU_FEATURES:
        return "+f16c" in (numba.config.CPU_FEATURES or "")
    return HALF_SCALES


class _Emit:
    """IR helpers for one kernel body: vector constants, loads at byte offsets of a block."""

    def __init__(self, builder: ir.IRBuilder) -> None:
        self.b = builder
        self.fast_half = _fast_half()

    def i8s(self, v: int) -> ir.Constant:
        return ir.Constant(_VI8, [v] * LANES)

    def at(self, p, off, ty):
        return self.b.bitcast(self.b.gep(p, [ir.Constant(_I64, off)]), ty.as_pointer())

    def bytes16(self, p, off: int):
        return self.b.load(self.at(p, off, _VI8), align=1)

    def byte(self, p, off: int):
        """The byte at p + off as i32, zero-extended."""
        return self.b.zext(self.b.load(self.at(p, off, _I8), align=1), _I32)

    def half(self, p, off: int):
        """The f16 at p + off as float, exact, any alignment."""
        h = self.b.load(self.at(p, off, _I16), align=1)
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

    def splat(self, s):
        b = self.b
        v = b.insert_element(ir.Constant(_VF, ir.Undefined), s, ir.Constant(_I32, 0))
        return b.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES))

    def fma(self, a, x, c):
        fn = cgutils.get_or_insert_function(
            self.b.module, ir.FunctionType(_VF, [_VF, _VF, _VF]), f"llvm.fmuladd.v{LANES}f32")
        return self.b.call(fn, [a, x, c])

    def affine(self, q, d, m):
        """Unsigned codes q (<16 x i8>) -> d q - m as float32 lanes."""
        return self.fma(self.b.uitofp(q, _VF), self.splat(d), self.splat(self.b.fneg(m)))

    def scaled(self, q, d):
        """Signed codes q (<16 x i8>) -> d q as float32 lanes."""
        return self.b.fmul(self.b.sitofp(q, _VF), self.splat(d))

    def bit_to_4(self, h, bit: int):
        """Bit `bit` of each byte of h moved to bit 4 (the fifth bit of a 5-bit code)."""
        shifted = self.b.shl(h, self.i8s(4 - bit)) if bit <= 4 else self.b.lshr(
            h, self.i8s(bit - 4))
        return self.b.and_(shifted, self.i8s(16))


# Each decoder gives a block's unit u (one vector step of the inner loop) as (element offset in
# the block, 16 float32 weights) pairs; units = block elems / (16 * pairs per unit).


def _ir_q4_0(e: _Emit, p, u: int) -> list:
    d = e.half(p, 0)
    q = e.bytes16(p, 2)
    lo = e.b.sub(e.b.and_(q, e.i8s(15)), e.i8s(8))
    hi = e.b.sub(e.b.lshr(q, e.i8s(4)), e.i8s(8))
    return [(0, e.scaled(lo, d)), (16, e.scaled(hi, d))]


def _ir_q8_0(e: _Emit, p, u: int) -> list:
    d = e.half(p, 0)
    return [(0, e.scaled(e.bytes16(p, 2), d)), (16, e.scaled(e.bytes16(p, 18), d))]


def _k4_scale_min(e: _Emit, p, d, dmin, j: int):
    """Q4_K/Q5_K sub-block j's d * sc and dmin * m (kernels' _scale_min_k4 in IR)."""
    b, c = e.b, (lambda v: ir.Constant(_I32, v))
    if j < 4:
        sc = b.and_(e.byte(p, 4 + j), c(63))
        m = b.and_(e.byte(p, 8 + j), c(63))
    else:
        mixed = e.byte(p, 8 + j)
        sc = b.or_(b.and_(mixed, c(15)), b.shl(b.lshr(e.byte(p, j), c(6)), c(4)))
        m = b.or_(b.lshr(mixed, c(4)), b.shl(b.lshr(e.byte(p, 4 + j), c(6)), c(4)))
    return b.fmul(d, b.sitofp(sc, _F32)), b.fmul(dmin, b.sitofp(m, _F32))


def _ir_k4(e: _Emit, p, u: int, qh: bool) -> list:
    """Q4_K (qh False) or Q5_K chunk u: 32 bytes, sub-blocks 2u (low nibbles), 2u + 1 (high)."""
    d, dmin = e.half(p, 0), e.half(p, 2)
    q0 = (48 if qh else 16) + 32 * u
    out = []
    for s in range(2):
        dl, ml = _k4_scale_min(e, p, d, dmin, 2 * u + s)
        for g in range(2):
            q = e.bytes16(p, q0 + 16 * g)
            q = e.b.and_(q, e.i8s(15)) if s == 0 else e.b.lshr(q, e.i8s(4))
            if qh:
                q = e.b.or_(q, e.bit_to_4(e.bytes16(p, 16 + 16 * g), 2 * u + s))
            out.append((64 * u + 32 * s + 16 * g, e.affine(q, dl, ml)))
    return out


def _ir_q4_k(e: _Emit, p, u: int) -> list:
    return _ir_k4(e, p, u, False)


def _ir_q5_k(e: _Emit, p, u: int) -> list:
    return _ir_k4(e, p, u, True)


def _ir_q6_k(e: _Emit, p, u: int) -> list:
    """Q6_K unit u = 2 h + g: lanes l = 16 g .. 16 g + 15 of half h, elements 128 h + 32 k + l
    (k = 0..3) from ql[64 h + l] (k even: low nibble), ql[64 h + 32 + l], qh[32 h + l]."""
    b = e.b
    h, g = u >> 1, u & 1
    d = e.half(p, 208)
    a = e.bytes16(p, 64 * h + 16 * g)
    a2 = e.bytes16(p, 64 * h + 32 + 16 * g)
    c = e.bytes16(p, 128 + 32 * h + 16 * g)
    out = []
    for k, src in enumerate((a, a2, a, a2)):
        low = b.and_(src, e.i8s(15)) if k < 2 else b.lshr(src, e.i8s(4))
        top = b.shl(b.and_(b.lshr(c, e.i8s(2 * k)), e.i8s(3)), e.i8s(4))
        q = b.sub(b.or_(low, top), e.i8s(32))
        sb = 8 * h + 2 * k + g  # (128 h + 32 k + 16 g) // 16
        sc = b.sitofp(b.load(e.at(p, 192 + sb, _I8), align=1), _F32)
        out.append((32 * k + 128 * h + 16 * g, e.scaled(q, b.fmul(d, sc))))
    return out


# name -> (decoder, units per block)
_FAST = {"Q4_0": (_ir_q4_0, 1), "Q8_0": (_ir_q8_0, 1), "Q4_K": (_ir_q4_k, 4),
         "Q5_K": (_ir_q5_k, 4), "Q6_K": (_ir_q6_k, 4)}


def _prefetch(builder: ir.IRBuilder, ptr) -> None:
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [ir.PointerType(_I8), _I32, _I32, _I32]),
        "llvm.prefetch.p0i8")
    builder.call(fn, [ptr, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])


def _lane_sum(builder: ir.IRBuilder, v):
    n = LANES
    while n > 1:
        n //= 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(n))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n),
                                                      list(range(n, 2 * n))))
        v = builder.fadd(lo, hi)
    return builder.extract_element(v, ir.Constant(_I32, 0))


def _emit_rows(builder, qtype: str, n_rows: int, n_x: int, w_rows, x_rows, n_blocks, ahead):
    """IR: dot products of n_x rows of x with n_rows weight rows -> [[float] * n_x] per row."""
    decode, units = _FAST[qtype]
    elems, nbytes = GGUF_BLOCK_TYPES[qtype]
    e = _Emit(builder)
    zero = ir.Constant(_VF, None)
    accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(n_x)]
            for _ in range(n_rows)]
    with cgutils.for_range(builder, n_blocks) as loop:
        blk = loop.index
        k0 = builder.mul(blk, ir.Constant(_I64, elems))
        blocks = [builder.gep(w, [builder.mul(blk, ir.Constant(_I64, nbytes))]) for w in w_rows]
        for u in range(units):
            x_vecs = {}
            for i, p in enumerate(blocks):
                if u == 0:
                    for line in range(0, nbytes, 64):
                        _prefetch(builder, builder.gep(p, [builder.add(ahead, ir.Constant(
                            _I64, line))]))
                for off, w in decode(e, p, u):
                    if off not in x_vecs:  # loaded once per unit, shared by the weight rows
                        at = builder.add(k0, ir.Constant(_I64, off))
                        x_vecs[off] = [builder.load(builder.bitcast(
                            builder.gep(xr, [at]), _VF.as_pointer()), align=4) for xr in x_rows]
                    for j, acc in enumerate(accs[i]):
                        builder.store(e.fma(w, x_vecs[off][j], builder.load(acc)), acc)
    return [[_lane_sum(builder, builder.load(acc)) for acc in row] for row in accs]


def _literal(ty, name: str) -> int:
    if not isinstance(ty, types.IntegerLiteral):
        raise TypingError(f"_rows: {name} must be a compile-time integer, got {ty}")
    return int(ty.literal_value)


@intrinsic(prefer_literal=True)
def _rows(typingctx, kind, n_rows, n_x, data, o, x, r0, out):
    """out[r0 + j, o + i] = dot(x[r0 + j], dequantized row o + i of data) for i < n_rows,
    j < n_x; kind (an index of QTYPES), n_rows, n_x compile-time constants. No bounds checks:
    the caller keeps the rows in range and x, out, data C-contiguous."""
    qtype = QTYPES[_literal(kind, "kind")]
    rows, xs = _literal(n_rows, "n_rows"), _literal(n_x, "n_x")
    elems, nbytes = GGUF_BLOCK_TYPES[qtype]
    sig = types.void(kind, n_rows, n_x, data, o, x, r0, out)

    def codegen(context, builder, sig, args):
        data_a, x_a, out_a = (context.make_array(sig.args[i])(context, builder, args[i])
                              for i in (3, 5, 7))
        o, r0 = (context.cast(builder, args[i], sig.args[i], types.int64) for i in (4, 6))
        row_bytes = builder.extract_value(data_a.shape, 1)
        n_in = builder.extract_value(x_a.shape, 1)
        n_out = builder.extract_value(out_a.shape, 1)
        n_blocks = builder.udiv(n_in, ir.Constant(_I64, elems))
        w_rows = [builder.gep(data_a.data, [builder.mul(builder.add(o, ir.Constant(_I64, i)),
                                                        row_bytes)]) for i in range(rows)]
        x_rows = [builder.gep(x_a.data, [builder.mul(builder.add(r0, ir.Constant(_I64, j)),
                                                     n_in)]) for j in range(xs)]
        ahead = builder.mul(row_bytes, ir.Constant(_I64, rows))
        sums = _emit_rows(builder, qtype, rows, xs, w_rows, x_rows, n_blocks, ahead)
        for i, row in enumerate(sums):
            for j, s in enumerate(row):
                at = builder.add(builder.mul(builder.add(r0, ir.Constant(_I64, j)), n_out),
                                 builder.add(o, ir.Constant(_I64, i)))
                builder.store(s, builder.gep(out_a.data, [at]))

    return sig, codegen


@njit(**_INLINE)
def _group(kind, n_rows, n_x, x, r0, data, o0, o1, out):
    """Rows o0..o1 of the weight against rows r0..r0 + n_x of x: n_rows at a time, then one."""
    n_full = (o1 - o0) // n_rows
    for i in range(n_full):
        _rows(kind, n_rows, n_x, data, o0 + n_rows * i, x, r0, out)
    for i in range(o1 - o0 - n_rows * n_full):
        _rows(kind, 1, n_x, data, o0 + n_rows * n_full + i, x, r0, out)


@njit(**_INLINE)
def _tile(kind, x, data, o0, o1, out):
    """Rows o0..o1 of the weight against every row of x, in groups of 8, 4, 2, 1 rows of x."""
    r0 = 0
    while r0 < x.shape[0]:
        left = x.shape[0] - r0
        if left >= 8:
            _group(kind, 1, 8, x, r0, data, o0, o1, out)
            r0 += 8
        elif left >= 4:
            _group(kind, 2, 4, x, r0, data, o0, o1, out)
            r0 += 4
        elif left >= 2:
            _group(kind, 4, 2, x, r0, data, o0, o1, out)
            r0 += 2
        else:
            _group(kind, 8, 1, x, r0, data, o0, o1, out)
            r0 += 1


# One parallel driver per fast type: the type must be a compile-time constant down to _rows.


@njit(**_JIT)
def _matvec_q4_0(x, data, out):
    for t in prange((data.shape[0] + TILE - 1) // TILE):
        _tile(0, x, data, t * TILE, min(t * TILE + TILE, data.shape[0]), out)


@njit(**_JIT)
def _matvec_q8_0(x, data, out):
    for t in prange((data.shape[0] + TILE - 1) // TILE):
        _tile(4, x, data, t * TILE, min(t * TILE + TILE, data.shape[0]), out)


@njit(**_JIT)
def _matvec_q4_k(x, data, out):
    for t in prange((data.shape[0] + TILE - 1) // TILE):
        _tile(7, x, data, t * TILE, min(t * TILE + TILE, data.shape[0]), out)


@njit(**_JIT)
def _matvec_q5_k(x, data, out):
    for t in prange((data.shape[0] + TILE - 1) // TILE):
        _tile(8, x, data, t * TILE, min(t * TILE + TILE, data.shape[0]), out)


@njit(**_JIT)
def _matvec_q6_k(x, data, out):
    for t in prange((data.shape[0] + TILE - 1) // TILE):
        _tile(9, x, data, t * TILE, min(t * TILE + TILE, data.shape[0]), out)


FAST_KERNELS = {"Q4_0": _matvec_q4_0, "Q8_0": _matvec_q8_0, "Q4_K": _matvec_q4_k,
                "Q5_K": _matvec_q5_k, "Q6_K": _matvec_q6_k}


def matvec(x: np.ndarray, w: BlockWeight, *, generic: bool = False) -> np.ndarray:
    """x (N, in) float32, 1 <= N <= 8 -> x @ dequantize(w).T, (N, out) float32, computed on the
    blocks; parallel over output rows, each weight byte read from memory once for all N rows.

    Accuracy: every product and sum is float32 (x is not quantized). The fast kernels fold the
    block scale into the weights (d q, or d sc q - dmin m in one fused multiply-add: within an
    ulp of the dequantized weight) and sum each row in 16 lane-wise chains of in / 16 terms,
    added pairwise at the end; so |y - x @ w.T| <= ~(in / 16 + 6) * 2**-24 * (|x| @ |w|.T).

    Args:
        generic: use the exact-decode reference path even where a fast kernel exists.

    Raises:
        ValueError: x's shape does not fit w, N outside 1..8, or w's bytes do not match it.
    """
    data = check_blocks(w.data, w.qtype, w.shape)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or not 1 <= x.shape[0] <= MAX_X_ROWS or x.shape[1] != w.n_in:
        raise ValueError(f"matvec: x must be (N, {w.n_in}) with 1 <= N <= {MAX_X_ROWS}, got "
                         f"{x.shape} for a {w.qtype} {w.shape} weight")
    out = np.empty((x.shape[0], data.shape[0]), dtype=np.float32)
    kernel = None if generic else FAST_KERNELS.get(w.qtype)
    if kernel is not None:
        kernel(x, data, out)
    else:
        elems, nbytes = GGUF_BLOCK_TYPES[w.qtype]
        _matvec_generic(x, data, _type_id(w.qtype), elems, nbytes, out)
    return out
