"""MLX's affine group-wise quantization, defined once: constants, packed layout, reference code.

Layout (as mx.quantize writes it): the packed weight is uint32 of shape (out, in * bits // 32).
Each row is a little-endian bitstream: element j occupies bits [j * bits, (j + 1) * bits) of the
row's bytes read as uint8 little-endian (for 2/4/8 bits that is "the k-th element sits at bits
k * bits of each word"; 3/5/6-bit elements straddle bytes and words). scales and biases have
shape (out, in // group_size), and w = scales * q + biases per group.

quantize is mx.quantize (min/max round-to-nearest), bit for bit. quantize_search writes the same
layout but searches each group's clip range and refits scale and bias by least squares, for a
smaller squared error at the same size (stream-convert's default).

HalfWeight is the other packed form: a dense F16/BF16 matrix kept at 2 bytes per element.

Everything here is plain numpy and is the reference the numba and MLX kernels are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
CHUNK = 8  # 8 elements of any bit width fill exactly `bits` whole bytes


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A (out, in) weight in MLX affine form. Arrays are numpy (numpy backend) or mx (MLX).

    packed (out, in * bits // 32) uint32; scales, biases (out, in // group_size) float32, or
    float16 where the numpy backend keeps them so (kernels/formats.py, half_scales): readers
    widen them, np.asarray(scales, np.float32) does it exactly.
    """

    packed: Any
    scales: Any
    biases: Any
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.packed.shape[0]), int(self.packed.shape[1]) * 32 // self.bits

    @property
    def nbytes(self) -> int:
        return int(self.packed.nbytes + self.scales.nbytes + self.biases.nbytes)


HALF_DTYPES = {"F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}  # storage dtype -> numpy view


@dataclass(frozen=True, eq=False)
class HalfWeight:
    """A (out, in) weight kept in its stored 16-bit form: float16 (F16) or the raw bf16 bit
    patterns as uint16 (BF16; numpy has no bfloat16). Widened to float32 only inside the ops.

    data is numpy (numpy backend); the MLX backend uses mx.float16 / mx.bfloat16 arrays instead.
    """

    data: np.ndarray
    dtype: str  # "F16" | "BF16"

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.data.shape[0]), int(self.data.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


# GGUF block types: name -> (elements per block, bytes per block), as ggml lays them out.
GGUF_BLOCK_TYPES = {
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}


@dataclass(frozen=True, eq=False)
class BlockWeight:
    """A (out, in) weight kept as the GGUF file stores it: each row is in // block elements'
    worth of ggml blocks, data is their bytes as read, uint8 (out, in // block * block bytes),
    usually a view of the read buffer. Kernels compute on the blocks (kernels/gguf_blocks.py);
    nothing is converted or widened outside the ops."""

    data: np.ndarray
    qtype: str  # a GGUF_BLOCK_TYPES key
    n_in: int

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.data.shape[0]), self.n_in

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


def row_block(w: Any, lo: int, hi: int) -> Any:
    """Rows lo..hi of a (out, in) weight in its stored form (QuantizedWeight, HalfWeight,
    BlockWeight or a plain array; numpy or mx arrays): views of the same bytes, no copy."""
    if isinstance(w, QuantizedWeight):
        return QuantizedWeight(w.packed[lo:hi], w.scales[lo:hi], w.biases[lo:hi], w.bits,
                               w.group_size)
    if isinstance(w, HalfWeight):
        return HalfWeight(w.data[lo:hi], w.dtype)
    if isinstance(w, BlockWeight):
        return BlockWeight(w.data[lo:hi], w.qtype, w.n_in)
    return w[lo:hi]


def half_to_float32(hw: HalfWeight) -> np.ndarray:
    """Reference widening of a HalfWeight -> float32 (out, in); exact (every half is a float32)."""
    if hw.dtype == "BF16":
        return (hw.data.astype(np.uint32) << 16).view(np.float32)
    return hw.data.astype(np.float32)


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; expected one of {SUPPORTED_BITS}")


def check_group_size(group_size: int) -> None:
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(
            f"group_size={group_size!r} is not supported; expected one of {SUPPORTED_GROUP_SIZES}"
        )


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ints q (..., n) < 2**bits into uint32 words (..., n * bits // 32).

    Raises:
        ValueError: unsupported bits, or n not a multiple of 32.
    """
    check_bits(bits)
    q = np.asarray(q)
    n = q.shape[-1]
    if n % 32:
        raise ValueError(f"q: last dimension {n} must be a multiple of 32 to pack whole words")
    lead = q.shape[:-1]
    chunks = q.reshape(-1, n // CHUNK, CHUNK).astype(np.uint64)  # (R, n/8, 8)
    shifts = np.arange(CHUNK, dtype=np.uint64) * np.uint64(bits)
    words = np.bitwise_or.reduce(chunks << shifts, axis=-1)  # (R, n/8) uint64, `bits` bytes used
    as_bytes = words[..., None].astype("<u8").view(np.uint8)[..., :bits]  # (R, n/8, bits)
    flat = np.ascontiguousarray(as_bytes).reshape(-1, n * bits // 8)  # (R, row bytes)
    return flat.view("<u4").reshape(*lead, n * bits // 32)


def unpack(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of pack: uint32 words (..., n * bits // 32) -> uint8 values (..., n).

    Raises:
        ValueError: unsupported bits, or packed's last dimension does not hold n elements.
    """
    check_bits(bits)
    packed = np.ascontiguousarray(packed, dtype="<u4")
    if n % 32 or packed.shape[-1] * 32 != n * bits:
        raise ValueError(
            f"packed: last dimension {packed.shape[-1]} does not hold n={n} {bits}-bit elements "
            f"(expected {n * bits // 32} words, n a multiple of 32)"
        )
    lead = packed.shape[:-1]
    as_bytes = packed.view(np.uint8).reshape(-1, n // CHUNK, bits)  # (R, n/8, bits)
    padded = np.zeros(as_bytes.shape[:-1] + (8,), dtype=np.uint8)
    padded[..., :bits] = as_bytes
    words = padded.view("<u8")  # (R, n/8, 1)
    shifts = np.arange(CHUNK, dtype=np.uint64) * np.uint64(bits)
    q = (words >> shifts) & np.uint64((1 << bits) - 1)  # (R, n/8, 8)
    return q.astype(np.uint8).reshape(*lead, n)


def _check_matrix(w: np.ndarray, group_size: int, name: str = "w") -> None:
    if w.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (out, in) array, got shape {w.shape}")
    if w.shape[1] % group_size:
        raise ValueError(
            f"{name}: in={w.shape[1]} is not divisible by group_size={group_size}; "
            "hint: choose a group size that divides the input dimension"
        )


def quantize(w: np.ndarray, bits: int = 4, group_size: int = 64) -> QuantizedWeight:
    """Affine-quantize w (out, in) exactly as mx.quantize does on float32 input.

    Per group: the edge is the endpoint with the larger magnitude (min or max); the scale is
    (max - min) / (2**bits - 1), at least 1e-7, signed so that the edge maps to q=0, then
    refined to edge / round(edge / scale) so the edge is exactly representable. q is
    round-half-even((w - bias) / scale) clipped to [0, 2**bits - 1].

    Non-finite input is refused (MLX would write NaN scales silently): a NaN or inf weight, or
    a group whose range overflows float32, raises.

    Raises:
        ValueError: unsupported bits or group_size, w not 2-D, in not divisible by group_size,
            a NaN or inf in w, or a group range beyond float32.
    """
    groups = _groups(w, bits, group_size)  # (out, n_groups, group_size)
    q, scales, biases = _rtn(groups, bits)
    return QuantizedWeight(pack(q.reshape(groups.shape[0], -1), bits), scales, biases, bits,
                           group_size)


def _groups(w: np.ndarray, bits: int, group_size: int) -> np.ndarray:
    """Checked float32 w (out, in) as (out, in // group_size, group_size)."""
    check_bits(bits)
    check_group_size(group_size)
    w = np.asarray(w, dtype=np.float32)
    _check_matrix(w, group_size)
    if not np.isfinite(w).all():
        r, c = np.argwhere(~np.isfinite(w))[0]
        raise ValueError(f"w: non-finite value {w[r, c]} at [{r}, {c}]; NaN and inf cannot be "
                         "quantized; hint: the source weights are corrupt")
    out, n_in = w.shape
    return w.reshape(out, n_in // group_size, group_size)


def _rtn(groups: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MLX's round-to-nearest of groups (..., group_size): uint8 codes, float32 scales, biases."""
    n_bins = np.float32((1 << bits) - 1)
    w_max = groups.max(axis=-1)
    w_min = groups.min(axis=-1)
    mask = np.abs(w_min) > np.abs(w_max)
    with np.errstate(over="ignore"):
        scales = np.maximum((w_max - w_min) / n_bins, np.float32(1e-7))
    if not np.isfinite(scales).all():
        r, g = np.argwhere(~np.isfinite(scales))[0]
        raise ValueError(f"w: group {g} of row {r} spans [{w_min[r, g]}, {w_max[r, g]}], whose "
                         "range overflows float32; it cannot be quantized")
    scales = np.where(mask, scales, -scales)
    edge = np.where(mask, w_min, w_max)
    # a constant group near float32's max overflows edge / scale; its scale becomes 0, w - bias
    # is 0 and q 0/0: q = 0, as MLX gives (w = bias exactly)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        q0 = np.rint(edge / scales)
        scales = np.where(q0 != 0, edge / q0, scales).astype(np.float32)
        biases = np.where(q0 != 0, edge, np.float32(0)).astype(np.float32)
        q = np.rint((groups - biases[..., None]) / scales[..., None])
    q = np.clip(np.nan_to_num(q, nan=0.0), 0, n_bins).astype(np.uint8)
    return q, scales, biases


# quantize_search's defaults: 20 clip ranges from the whole [min, max] down to its middle half
# (an even grid, as AWQ's and llama.cpp's clip searches use), then 4 refits of each group's best
SEARCH_SHRINKS = tuple(float(a) for a in np.linspace(1.0, 0.5, 20))
SEARCH_POLISH = 4
SEARCH_CHUNK_ELEMS = 1 << 18  # weights searched at once: bounds the temporaries (1 MB each)


def quantize_search(w: np.ndarray, bits: int = 4, group_size: int = 64, *,
                    shrinks: tuple[float, ...] = SEARCH_SHRINKS, n_polish: int = SEARCH_POLISH,
                    param_dtype: type = np.float16) -> QuantizedWeight:
    """Affine-quantize w (out, in), choosing each group's codes, scale and bias to reduce the
    squared error of the weights as stored. Same layout as quantize; only the choice differs.

    Candidates per group: quantize's own (MLX's round-to-nearest), so no group ends worse
    than quantize's result with its scale and bias rounded to param_dtype; and for each
    shrink factor a, the range [min, max] narrowed by a about its midpoint (clipping the
    outermost weights), its codes, then the least-squares scale and bias for those codes. The
    best is refitted n_polish more times (codes -> least squares -> codes). Each candidate's
    scale and bias are rounded to param_dtype first (as the writer stores them; values it
    cannot hold stay float32) and its codes recomputed with them before its error is measured
    (float32 s * q + b as dequantize computes it, squared and summed in float64): what is
    stored is what was optimised.

    Lower weight error is not lower model loss: on SmolLM2 (requantizing its Q4_1 weights)
    this search cut the squared weight error by 25-50 % (2-8 bits), yet perplexity came out
    worse than quantize's at 3-5 bits (better at 6, equal at 8).

    Args:
        shrinks: the clip grid, fractions of the group's range (1.0: no clipping).
        n_polish: refits of each group's best after the grid.
        param_dtype: the dtype the scales and biases will be stored in (np.float16 or
            np.float32); the returned float32 arrays hold values exactly representable in it.

    Raises:
        ValueError: as quantize.
    """
    groups = _groups(w, bits, group_size)
    q, scales, biases = _rtn(groups, bits)  # also refuses a group whose range overflows
    out, n_groups, _ = groups.shape
    x = groups.reshape(-1, group_size)
    q, scales, biases = q.reshape(x.shape), scales.reshape(-1), biases.reshape(-1)
    step = max(1, SEARCH_CHUNK_ELEMS // group_size)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for g in range(0, len(x), step):
            sl = slice(g, g + step)
            best = _GroupSearch(x[sl], (1 << bits) - 1, param_dtype, q[sl], scales[sl],
                                biases[sl])
            q[sl], scales[sl], biases[sl] = best.search(shrinks, n_polish)
    return QuantizedWeight(pack(q.reshape(out, -1), bits), scales.reshape(out, n_groups),
                           biases.reshape(out, n_groups), bits, group_size)


def round_params(p: np.ndarray, dtype: type) -> np.ndarray:
    """float32 p rounded to dtype, as the writer stores it; where dtype overflows, p as is
    (the writer then keeps the whole tensor float32)."""
    with np.errstate(over="ignore"):
        h = p.astype(dtype).astype(np.float32)
    return np.where(np.isfinite(h), h, p)


class _GroupSearch:
    """The best (codes, scale, bias) found so far for each group of x (G, group_size)."""

    def __init__(self, x: np.ndarray, n_bins: int, dtype: type, q: np.ndarray,
                 s: np.ndarray, b: np.ndarray) -> None:
        self.x, self.n_bins, self.dtype = x, n_bins, dtype
        self.mean = x.mean(axis=-1, dtype=np.float64).astype(np.float32)
        self.xc = x - self.mean[:, None]  # centred: the refit's sums do not cancel
        self.sum_xc = self.xc.sum(axis=-1, dtype=np.float64)
        self.tmp = np.empty_like(x)
        self.q, self.s, self.b = q.astype(np.float32), round_params(s, dtype), \
            round_params(b, dtype)
        self.err = self.error(self.q, self.s, self.b)  # MLX's codes with its s, b as stored

    def search(self, shrinks: tuple[float, ...], n_polish: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Try the clip grid, refit the best n_polish times; returns uint8 codes, s, b."""
        lo, hi = self.x.min(axis=-1), self.x.max(axis=-1)
        half = (hi - lo) / 2  # finite: _rtn refused a range that overflows
        mid = lo + half
        for a in shrinks:
            s, b = half * np.float32(2 * a / self.n_bins), mid - np.float32(a) * half
            self.offer(*self.refit(self.codes(s, b), s, b))
        for _ in range(n_polish):
            self.offer(*self.refit(self.q, self.s, self.b))
        return self.q.astype(np.uint8), self.s, self.b

    def codes(self, s: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Round-to-nearest codes for scale s and bias b (float32 (G, group_size))."""
        inv = np.float32(1) / s
        inv[~np.isfinite(inv)] = 0  # s == 0 or tiny: every code 0, w = b
        q = np.subtract(self.x, b[:, None])
        q *= inv[:, None]
        np.rint(q, out=q)  # NaN only where w - b overflows and inv is 0: that error is NaN too
        return np.clip(q, 0, self.n_bins, out=q)

    def refit(self, q: np.ndarray, s: np.ndarray, b: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
        """Least-squares scale and bias for codes q; s, b kept where all codes are equal."""
        n = q.shape[1]
        # exact: integer codes, sum of squares below 2**24 (128 * 255**2)
        sum_q = q.sum(axis=-1, dtype=np.float64)
        sum_qq = np.einsum("ij,ij->i", q, q).astype(np.float64)
        sum_qx = np.einsum("ij,ij->i", q, self.xc).astype(np.float64)
        den = n * sum_qq - sum_q * sum_q
        ok = den > 0
        s_fit = np.where(ok, (n * sum_qx - sum_q * self.sum_xc) / np.where(ok, den, 1), s)
        b_fit = np.where(ok, self.mean + (self.sum_xc - s_fit * sum_q) / n, b)
        return s_fit.astype(np.float32), b_fit.astype(np.float32)

    def offer(self, s: np.ndarray, b: np.ndarray) -> None:
        """Keep (s, b) as stored, with their codes, for each group where it beats the best."""
        s, b = round_params(s, self.dtype), round_params(b, self.dtype)
        q = self.codes(s, b)
        err = self.error(q, s, b)
        better = err < self.err  # NaN (an overflowing candidate) never wins
        self.q[better] = q[better]
        self.s, self.b = np.where(better, s, self.s), np.where(better, b, self.b)
        self.err = np.where(better, err, self.err)

    def error(self, q: np.ndarray, s: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Sum of squared errors per group of s * q + b as dequantize computes it (float32),
        summed in float64."""
        d = np.multiply(q, s[:, None], out=self.tmp)
        d += b[:, None]
        d -= self.x
        return np.einsum("ij,ij->i", d, d, dtype=np.float64)


def dequantize(qw: QuantizedWeight) -> np.ndarray:
    """w = scales * q + biases per group, in float32 (two roundings, no fused multiply-add)."""
    out, n_in = qw.shape
    q = unpack(np.asarray(qw.packed), qw.bits, n_in).astype(np.float32)
    q = q.reshape(out, n_in // qw.group_size, qw.group_size)
    scales = np.asarray(qw.scales, dtype=np.float32)[..., None]
    biases = np.asarray(qw.biases, dtype=np.float32)[..., None]
    return (scales * q + biases).reshape(out, n_in)


def check_quantized(qw: QuantizedWeight, name: str = "weight") -> None:
    """Check a triple's shapes agree with bits and group_size.

    Raises:
        ValueError: names the tensor, the expected and the actual shapes.
    """
    check_bits(qw.bits)
    check_group_size(qw.group_size)
    if len(qw.packed.shape) != 2 or (qw.packed.shape[1] * 32) % qw.bits:
        raise ValueError(
            f"{name}: packed shape {tuple(qw.packed.shape)} is not (out, in * {qw.bits} // 32)"
        )
    out, n_in = qw.shape
    want = (out, n_in // qw.group_size)
    for part in ("scales", "biases"):
        got = tuple(getattr(qw, part).shape)
        if n_in % qw.group_size or got != want:
            raise ValueError(
                f"{name}: {part} shape {got} does not match packed {tuple(qw.packed.shape)} at "
                f"{qw.bits} bits, group_size {qw.group_size} (expected {want}); hint: check the "
                "model's quantization bits/group_size"
            )
