"""Random GGUF quant blocks made directly as bytes, and llama.cpp's per-tensor type mixes.

A synthetic quantized tensor never exists as floats: its blocks are random bytes (the quant
codes) with the scale fields overwritten by sane values, and the block scale `d` (f16) is set
so that the dequantized values have the std asked for. Scales of the K types are drawn from
the upper half of their code range, as llama.cpp's quantizers produce (the largest sub-block
maps to the top code), and the mins of the affine types centre each sub-block on zero.

Block layouts (ggml, little-endian), bytes per block:
    Q4_0 {f16 d; u8 qs[16]} 18/32          Q4_1 {f16 d, m; u8 qs[16]} 20/32
    Q5_0 {f16 d; u8 qh[4]; qs[16]} 22/32   Q5_1 {f16 d, m; qh[4]; qs[16]} 24/32
    Q8_0 {f16 d; i8 qs[32]} 34/32
    Q2_K {u8 scales[16]; qs[64]; f16 d, dmin} 84/256
    Q3_K {u8 hmask[32]; qs[64]; scales[12]; f16 d} 110/256
    Q4_K {f16 d, dmin; u8 scales[12]; qs[128]} 144/256
    Q5_K {f16 d, dmin; u8 scales[12]; qh[32]; qs[128]} 176/256
    Q6_K {u8 ql[128]; qh[64]; i8 scales[16]; f16 d} 210/256
    MXFP4 {u8 e (e8m0); u8 qs[16] (e2m1 codes)} 17/32: its scale is a power of two, so the std
    asked for is met to within a factor sqrt(2)
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType
from gguf.quants import dequantize

Q = GGMLQuantizationType
POOL_BYTES = 1 << 24  # 16 MiB of random bytes per pool slice; chunks are slices of it
FLOATS = (Q.F32, Q.F16, Q.BF16)
K_TYPES = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)

# --quant -> (main tensor type, general.file_type). The pure K types take the file_type of
# llama.cpp's nearest mix (its "_S" ones); file_type is informational in llama.cpp.
QUANTS: dict[str, tuple[Q, LlamaFileType]] = {
    "f32": (Q.F32, LlamaFileType.ALL_F32), "f16": (Q.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, LlamaFileType.MOSTLY_BF16), "q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, LlamaFileType.MOSTLY_Q4_0), "q4_1": (Q.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "q5_0": (Q.Q5_0, LlamaFileType.MOSTLY_Q5_0), "q5_1": (Q.Q5_1, LlamaFileType.MOSTLY_Q5_1),
    "q2_k": (Q.Q2_K, LlamaFileType.MOSTLY_Q2_K), "q3_k": (Q.Q3_K, LlamaFileType.MOSTLY_Q3_K_S),
    "q4_k": (Q.Q4_K, LlamaFileType.MOSTLY_Q4_K_S), "q5_k": (Q.Q5_K, LlamaFileType.MOSTLY_Q5_K_S),
    "q6_k": (Q.Q6_K, LlamaFileType.MOSTLY_Q6_K),
    "q4_k_m": (Q.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),
    "q5_k_m": (Q.Q5_K, LlamaFileType.MOSTLY_Q5_K_M),
}
# llama.cpp's tensor_type_fallback: a row length the block size does not divide
K_FALLBACK = {Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}


def use_more_bits(layer_idx: int, n_layers: int) -> bool:
    """llama.cpp's rule for the layers a _M mix gives more bits (first and last eighth, and
    every third in between)."""
    return (layer_idx < n_layers // 8 or layer_idx >= 7 * n_layers // 8
            or (layer_idx - n_layers // 8) % 3 == 2)


def tensor_type(quant: str, name: str, shape: tuple[int, ...], layer_idx: int | None,
                n_layers: int, gqa: bool) -> Q:
    """The type of one tensor (GGUF name, numpy-order shape) in the --quant mix.

    1-D tensors are F32. Pure types use their type everywhere but output.weight, which is Q6_K
    for K types (as llama.cpp) and the same type otherwise (llama.cpp would use Q6_K there
    too; keeping it lets the engine's Q4_0/Q8_0 kernels run the whole file). The _M mixes
    follow llama_tensor_get_type: output Q6_K, attn_v (attn_qkv) and ffn_down Q6_K where
    use_more_bits, attn_v Q5_K in a 70B (80 layers, GQA). Row lengths the block does not
    divide fall back as llama.cpp does (K -> Q4_0/Q5_0/Q5_1/Q8_0, else F16).
    """
    base = QUANTS[quant][0]
    if len(shape) == 1 or "ffn_gate_inp" in name:  # llama-quantize keeps MoE routers F32
        return Q.F32
    if base in FLOATS:
        return base
    cols, t = shape[-1], base
    if name == "output.weight" and base in K_TYPES:
        t = Q.Q8_0 if cols % block_elems(base) else Q.Q6_K
    elif quant.endswith("_m") and layer_idx is not None:
        more = use_more_bits(layer_idx, n_layers)
        if name.endswith(("attn_v.weight", "attn_qkv.weight")):
            t = Q.Q6_K if more else (Q.Q5_K if n_layers == 80 and gqa and t == Q.Q4_K else t)
        elif name.endswith(("ffn_down.weight", "ffn_down_exps.weight")) and more:
            t = Q.Q6_K
    if cols % block_elems(t):
        t = K_FALLBACK.get(t, Q.F16)
    return Q.F16 if cols % block_elems(t) else t


def block_elems(qtype: Q) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def nbytes(qtype: Q, n_values: int) -> int:
    elems, size = GGML_QUANT_SIZES[qtype]
    return n_values // elems * size


# --- random blocks ---------------------------------------------------------------------------

def _put_f16(blocks: np.ndarray, col: int, value: float) -> None:
    blocks[:, col:col + 2] = np.frombuffer(np.float16(value).tobytes(), np.uint8)


def _pack_k4(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins per block -> Q4_K/Q5_K's 12 bytes (get_scale_min_k4)."""
    out = np.empty((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return out


def _pack_q3k(s: np.ndarray) -> np.ndarray:
    """Sixteen 6-bit scales per block -> Q3_K's 12 bytes: low nibbles of s[j] and s[j+8] in
    byte j, the top 2 bits of s[k + 4i] at bits 2i of byte 8 + k."""
    out = np.empty((s.shape[0], 12), np.uint8)
    out[:, 0:8] = (s[:, :8] & 15) | ((s[:, 8:] & 15) << 4)
    hi = (s >> 4).reshape(-1, 4, 4)  # (n, i, k)
    out[:, 8:12] = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    return out


def _affine_k(blocks: np.ndarray, d: float, col_d: int, col_sc: int, center: float,
              dmin_ratio: int) -> None:
    """Q4_K/Q5_K: scales 32..63; mins so dmin * m ~ d * sc * center (each sub-block ~0 mean)."""
    sc = 32 + (blocks[:, col_sc:col_sc + 8] & 31)
    mn = np.rint(sc * (center / dmin_ratio)).astype(np.uint8)
    blocks[:, col_sc:col_sc + 12] = _pack_k4(sc, mn)
    _put_f16(blocks, col_d, d)
    _put_f16(blocks, col_d + 2, d * dmin_ratio)


def _q2_k(b: np.ndarray, d: float) -> None:
    sc = 8 + (b[:, 0:16] & 7)  # codes 0..3 centred on 1.5 by m ~ 0.75 sc with dmin = 2 d
    b[:, 0:16] = sc | (np.rint(sc * 0.75).astype(np.uint8) << 4)
    _put_f16(b, 80, d)
    _put_f16(b, 82, 2 * d)


def _q3_k(b: np.ndarray, d: float) -> None:
    r = b[:, 96:108]  # the random scale bytes -> 16 magnitudes 16..31 and 16 signs
    mag = 16 + np.concatenate([r[:, :8] & 15, r[:, :8] >> 4], axis=1)
    sign = np.unpackbits(r[:, 8:10], axis=1).astype(bool)
    b[:, 96:108] = _pack_q3k(np.where(sign, 32 + mag, 32 - mag).astype(np.uint8))
    _put_f16(b, 108, d)


def _q6_k(b: np.ndarray, d: float) -> None:
    r = b[:, 192:208].astype(np.int16)
    mag = 64 + (r & 63)
    b[:, 192:208] = np.where(r & 64, mag, -mag).astype(np.int8).view(np.uint8)
    _put_f16(b, 208, d)


# The symmetric types' lowest code has no positive twin (Q4_0: -8..7): it becomes 0, so the
# weights have zero mean, as a quantizer of symmetric weights leaves them.
def _q4_0(b: np.ndarray, d: float) -> None:
    qs = b[:, 2:18]
    lo, hi = qs & 15, qs >> 4
    b[:, 2:18] = np.where(lo == 0, 8, lo) | (np.where(hi == 0, 8, hi) << 4)
    _put_f16(b, 0, d)


def _q5_0(b: np.ndarray, d: float) -> None:
    qs = b[:, 6:22]
    low = np.concatenate([qs & 15, qs >> 4], axis=1)  # (n, 32): element j's low 4 bits
    high = np.unpackbits(b[:, 2:6], axis=1, bitorder="little")  # (n, 32): its 5th bit
    high |= ((low == 0) & (high == 0)).astype(np.uint8)  # code 0 (-16) -> 16 (0)
    b[:, 2:6] = np.packbits(high, axis=1, bitorder="little")
    _put_f16(b, 0, d)


def _q8_0(b: np.ndarray, d: float) -> None:
    qs = b[:, 2:34].view(np.int8)
    qs[qs == -128] = 0
    _put_f16(b, 0, d)


def _mxfp4(b: np.ndarray, d: float) -> None:
    # the nearest power of two to d (e 127 is the unit scale); all 16 codes are values (+-0)
    b[:, 0] = np.uint8(min(254, max(1, 127 + round(float(np.log2(d))))))


FILLERS: dict[Q, Callable[[np.ndarray, float], None]] = {
    Q.Q4_0: _q4_0,
    Q.Q4_1: lambda b, d: (_put_f16(b, 0, d), _put_f16(b, 2, -7.5 * d)),
    Q.Q5_0: _q5_0,
    Q.Q5_1: lambda b, d: (_put_f16(b, 0, d), _put_f16(b, 2, -15.5 * d)),
    Q.Q8_0: _q8_0,
    Q.Q2_K: _q2_k,
    Q.Q3_K: _q3_k,
    Q.Q4_K: lambda b, d: _affine_k(b, d, 0, 4, 7.5, 8),
    Q.Q5_K: lambda b, d: _affine_k(b, d, 0, 4, 15.5, 16),
    Q.Q6_K: _q6_k,
    Q.MXFP4: _mxfp4,
}


@cache
def unit_std(qtype: Q) -> float:
    """Std of the dequantized values at d = 1 (measured once on 4096 blocks)."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (4096, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
    FILLERS[qtype](blocks, 1.0)
    return float(dequantize(blocks, qtype).std())


class BlockPool:
    """Random bytes, generated once; a tensor's blocks are random slices with the scale
    fields set, so writing is bounded by the disk and memory by a few slices."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.bytes = self.rng.integers(0, 256, 2 * POOL_BYTES, dtype=np.uint8)

    def chunks(self, qtype: Q, n_values: int, std: float):
        """Yield the tensor's bytes as uint8 (blocks, block bytes) arrays of <= POOL_BYTES."""
        size = GGML_QUANT_SIZES[qtype][1]
        left = n_values // block_elems(qtype)
        d = std / unit_std(qtype)
        while left:
            n = min(left, POOL_BYTES // size)
            start = int(self.rng.integers(0, POOL_BYTES))
            blocks = self.bytes[start:start + n * size].reshape(n, size).copy()
            FILLERS[qtype](blocks, d)
            yield blocks
            left -= n
