"""Raw stored bytes (uint8 arrays) to compute arrays, decided tensor by tensor by one table
(FORMATS: storage dtype -> compute form on each backend).

- Dense F32 stays float32; 2-D F16/BF16 matrices stay 16-bit (HalfWeight), 1-D ones widen.
- MLX affine triples (U32 words + scales + biases) stay packed (QuantizedWeight).
- GGUF block types, on the numpy backend, stay the bytes as read (BlockWeight): the kernels
  of kernels/gguf_blocks.py compute on the blocks; nothing is converted or widened at read.
- MXFP4 pairs (HF gpt-oss: uint8 "x_blocks" + "x_scales") become one MXFP4Weight under "x",
  views of the bytes as read (kernels/mxfp4.py computes on them; MLX: its mxfp4 mode).
- GGUF blocks on MLX: the types whose blocks are affine over 32 elements (Q4_0, Q4_1, Q5_0,
  Q5_1, Q8_0, Q4_K, Q5_K) map onto MLX's packed form losslessly at read (gguf_to_affine:
  dequantize(gguf_to_affine(raw)) equals gguf-py's dequantization bit for bit: d * q and the
  K-quants' d * sc are exact in float32, so scales * q + biases rounds the same way). Q2_K,
  Q3_K and Q6_K scale 16-element sub-blocks, a group size MLX has not: they are dequantized at
  read to float16 (2 bytes a weight against their 2.6-6.6 bits, and the rounding of float16).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from stream_run.kernels import mxfp4
from stream_run.kernels.quant import (
    GGUF_BLOCK_TYPES,
    HALF_DTYPES,
    BlockWeight,
    HalfWeight,
    QuantizedWeight,
    check_quantized,
    pack,
)

DENSE_DTYPES = ("F32", "F16", "BF16")
GGUF_BLOCK = 32
# GGUF types that are affine over 32-element groups: dtype -> (bits, bytes per 32 elements as
# stored, the K-quants' super-block header shared out). The MLX backend maps these losslessly.
GGUF_TYPES = {"Q4_0": (4, 18), "Q4_1": (4, 20), "Q8_0": (8, 34), "Q5_0": (5, 22),
              "Q5_1": (5, 24), "Q4_K": (4, 18), "Q5_K": (5, 22)}
# GGUF types with 16-element sub-block scales (no MLX group size): float16 at read on MLX.
GGUF_HALF_ON_MLX = ("Q2_K", "Q3_K", "Q6_K")


@dataclass(frozen=True)
class Format:
    """How one storage dtype is computed, on each backend."""

    storage: str  # "dense" | "half" | "mlx-affine" | "gguf-blocks"
    numpy: str
    mlx: str
    mlx_exact: bool  # the MLX compute form holds the stored values exactly


def _gguf_format(dtype: str) -> Format:
    if dtype in GGUF_TYPES:
        bits = GGUF_TYPES[dtype][0]
        return Format("gguf-blocks", "BlockWeight: the blocks as read",
                      f"QuantizedWeight, {bits}-bit affine, group 32, float32 scales", True)
    return Format("gguf-blocks", "BlockWeight: the blocks as read",
                  "float16 (dequantized at read)", False)


FORMATS: dict[str, Format] = {
    "F32": Format("dense", "float32, a view of the read buffer", "mx.float32", True),
    "F16": Format("half", "2-D: HalfWeight (float16, widened inside the ops); 1-D: float32",
                  "2-D: mx.float16; 1-D: float32", True),
    "BF16": Format("half", "2-D: HalfWeight (bf16 bits, widened inside the ops); 1-D: float32",
                   "2-D: mx.bfloat16; 1-D: float32", True),
    "U8": Format("mxfp4", "MXFP4Weight: x_blocks + x_scales as read (kernels/mxfp4.py)",
                 "uint32 codes + uint8 exponents (mx.quantized_matmul, mode mxfp4)", True),
    "MXFP4": Format("mxfp4", "MXFP4Weight: GGUF's 17-byte blocks as read (kernels/mxfp4.py)",
                    "uint32 codes + uint8 exponents (mx.quantized_matmul, mode mxfp4)", True),
    "U32": Format("mlx-affine", "QuantizedWeight: packed words as read, float16/32 scales",
                  "QuantizedWeight (mx.quantized_matmul)", True),
    **{dtype: _gguf_format(dtype) for dtype in GGUF_BLOCK_TYPES},
}


def _check_size(data: np.ndarray, nbytes: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    if data.size < nbytes:
        raise ValueError(
            f"{dtype} tensor of shape {tuple(shape)} is truncated: got {data.size} of its "
            f"{nbytes} bytes; hint: the file is truncated or its header is wrong"
        )
    if data.size != nbytes:
        raise ValueError(
            f"{dtype} tensor of shape {tuple(shape)}: got {data.size} bytes, expected {nbytes}; "
            "hint: the file is truncated or its header is wrong"
        )
    return data


def to_float32(data: np.ndarray, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """F32/F16/BF16 little-endian bytes -> a new float32 array of `shape` (never a view of data).

    Raises:
        ValueError: unknown dtype, or the byte count does not match the shape.
    """
    n = math.prod(shape)
    if dtype == "F32":
        raw = _check_size(data, 4 * n, dtype, shape)
        return raw.view("<f4").astype(np.float32).reshape(shape)  # astype copies
    if dtype == "F16":
        raw = _check_size(data, 2 * n, dtype, shape)
        return raw.view("<f2").astype(np.float32).reshape(shape)
    if dtype == "BF16":
        raw = _check_size(data, 2 * n, dtype, shape)
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    raise ValueError(f"dtype {dtype!r} is not a dense float type; expected one of {DENSE_DTYPES}")


def _blocks(data: np.ndarray, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Raw bytes -> (n_blocks, block bytes) uint8, after checking shape and size."""
    if dtype not in GGUF_BLOCK_TYPES:
        raise ValueError(
            f"dtype {dtype!r} is not a GGUF block type; expected one of {tuple(GGUF_BLOCK_TYPES)}"
        )
    block, block_bytes = GGUF_BLOCK_TYPES[dtype]
    if len(shape) != 2 or shape[1] % block:
        raise ValueError(
            f"{dtype} tensor of shape {tuple(shape)}: expected 2-D (out, in) with in a multiple "
            f"of {block}"
        )
    n_blocks = shape[0] * shape[1] // block
    raw = _check_size(data, n_blocks * block_bytes, dtype, shape)
    return raw.reshape(n_blocks, block_bytes)


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The little-endian f16 at byte `at` of every block -> (n_blocks,) float32."""
    return np.ascontiguousarray(blocks[:, at : at + 2]).view("<f2")[:, 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """ggml's 4-bit order: (nb, 16k) bytes -> (nb, 32k) codes, per 16 bytes the 16 low
    nibbles, then the 16 high ones (a 32-element run)."""
    runs = qs.reshape(qs.shape[0], -1, 16)
    codes = np.concatenate([runs & np.uint8(15), runs >> np.uint8(4)], axis=2)
    return codes.reshape(qs.shape[0], -1)


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 scale bytes -> the 8 sub-blocks' 6-bit scales and mins (nb, 8) each."""
    sc = np.empty((scales.shape[0], 8), np.uint8)
    mn = np.empty_like(sc)
    sc[:, :4] = scales[:, 0:4] & np.uint8(63)
    mn[:, :4] = scales[:, 4:8] & np.uint8(63)
    sc[:, 4:] = (scales[:, 8:12] & np.uint8(15)) | ((scales[:, 0:4] >> np.uint8(6)) << np.uint8(4))
    mn[:, 4:] = (scales[:, 8:12] >> np.uint8(4)) | ((scales[:, 4:8] >> np.uint8(6)) << np.uint8(4))
    return sc, mn


def _high_bits(qh: np.ndarray, n: int) -> np.ndarray:
    """Q5_0/Q5_1: the little-endian 32-bit qh -> (nb, 32) fifth bits of elements 0..31."""
    word = np.ascontiguousarray(qh).view("<u4")[:, :1]
    return ((word >> np.arange(n, dtype=np.uint32)) & np.uint32(1)).astype(np.uint8)


def _affine_codes(blocks: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GGUF blocks -> (codes (nb, block) uint8, scales, biases (nb, block // 32) float32), with
    w = scales * code + biases per 32 elements exactly as ggml dequantizes them."""
    d = _f16(blocks, 0)[:, None]
    if dtype == "Q8_0":  # int8 q -> q + 128 as uint8
        return blocks[:, 2:] ^ np.uint8(0x80), d, np.float32(-128) * d
    if dtype in ("Q4_0", "Q4_1"):
        q = _nibbles(blocks[:, -16:])
        return q, d, (np.float32(-8) * d if dtype == "Q4_0" else _f16(blocks, 2)[:, None])
    if dtype in ("Q5_0", "Q5_1"):
        at = 2 if dtype == "Q5_0" else 4
        q = _nibbles(blocks[:, at + 4:]) | (_high_bits(blocks[:, at:at + 4], 32) << np.uint8(4))
        return q, d, (np.float32(-16) * d if dtype == "Q5_0" else _f16(blocks, 2)[:, None])
    # Q4_K / Q5_K: 8 sub-blocks of 32, w = d * sc * q - dmin * m
    dmin = _f16(blocks, 2)[:, None]
    sc, mn = _k_scales(blocks[:, 4:16])
    scales = d * sc.astype(np.float32)
    biases = -(dmin * mn.astype(np.float32))
    qs = blocks[:, -128:].reshape(-1, 4, 32)  # chunk i: sub-block 2i low, 2i + 1 high nibbles
    q = np.stack([qs & np.uint8(15), qs >> np.uint8(4)], axis=2)  # (nb, 4, 2, 32)
    if dtype == "Q5_K":
        qh = blocks[:, 16:48]  # bit 2i (low) and 2i + 1 (high) of byte l: element l's fifth bit
        shifts = np.arange(8, dtype=np.uint8).reshape(4, 2, 1)
        q = q | (((qh[:, None, None, :] >> shifts) & np.uint8(1)) << np.uint8(4))
    return q.reshape(-1, 256), scales, biases


def _pack_rows(q: np.ndarray, bits: int) -> np.ndarray:
    """quant.pack's layout, without its 8-byte-per-element temporaries for 4 and 8 bits (and in
    row chunks of 1M elements for 5)."""
    if bits == 8:
        return np.ascontiguousarray(q).view("<u4")
    if bits == 4:
        return np.ascontiguousarray(q[:, 0::2] | (q[:, 1::2] << np.uint8(4))).view("<u4")
    step = max(1, (1 << 20) // q.shape[1])
    return np.concatenate([pack(q[r:r + step], bits) for r in range(0, q.shape[0], step)])


def gguf_to_affine(
    data: np.ndarray, dtype: str, shape: tuple[int, ...], half_scales: bool = False
) -> QuantizedWeight:
    """GGUF Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K bytes of an (out, in) tensor -> QuantizedWeight
    (group size 32; 4, 5 or 8 bits), lossless.

    Scales and biases are float32, or with half_scales float16 where every one is exact in
    float16 (a Q4_0/Q8_0 bias -8 d / -128 d overflows it for large d; K-quant products d * sc
    need up to 17 bits): then that tensor keeps float32.

    Raises:
        ValueError: unsupported dtype, shape not (out, in) with in % 32 == 0, or wrong size.
    """
    if dtype not in GGUF_TYPES:
        raise ValueError(
            f"dtype {dtype!r} has no lossless affine form; expected one of {tuple(GGUF_TYPES)}")
    blocks = _blocks(data, dtype, shape)
    out, n_in = shape
    q, scales, biases = _affine_codes(blocks, dtype)
    bits = GGUF_TYPES[dtype][0]
    packed = _pack_rows(q.reshape(out, n_in), bits)
    groups = n_in // GGUF_BLOCK
    scales, biases = (a.reshape(out, groups).astype(np.float32) for a in (scales, biases))
    if half_scales:
        half_s = _half_if_exact(scales)
        if half_s.dtype == np.float16:
            scales, biases = half_s, _half_if_exact(biases)
    return QuantizedWeight(packed.astype(np.uint32, copy=False), scales, biases,
                           bits=bits, group_size=GGUF_BLOCK)


def _half_if_exact(a: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # an overflow is the inexact case, not a warning
        half = a.astype(np.float16)
    return half if np.array_equal(half.astype(np.float32), a, equal_nan=True) else a


_REFERENCE_BLOCKS = {
    "Q4_0": np.dtype([("d", "<f2"), ("qs", "u1", 16)]),
    "Q4_1": np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)]),
    "Q8_0": np.dtype([("d", "<f2"), ("qs", "i1", 32)]),
}


def dequantize_gguf_reference(data: np.ndarray, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """GGUF blocks -> float32 (out, in), straight from the ggml block structs (test reference).

    Independent of the affine path: Q4_0 w = d * (q - 8); Q4_1 w = d * q + m; Q8_0 w = d * q.
    """
    blocks = _blocks(data, dtype, shape)
    b = np.ascontiguousarray(blocks).view(_REFERENCE_BLOCKS[dtype])[:, 0]
    d = b["d"].astype(np.float32)[:, None]
    if dtype == "Q8_0":
        w = d * b["qs"].astype(np.float32)
    else:
        qs = b["qs"]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)  # (nb, 32)
        w = d * (q - 8) if dtype == "Q4_0" else d * q + b["m"].astype(np.float32)[:, None]
    return w.astype(np.float32).reshape(shape)


def _quant_params(
    quantization: Mapping[str, Any] | None, prefix: str, name: str
) -> tuple[int, int]:
    """bits, group_size for the MLX-quantized weight `prefix`.weight (per-tensor override first)."""
    if not quantization:
        raise ValueError(
            f"{name}: MLX-quantized (U32) weight but the model has no quantization config; "
            "hint: config.json needs a 'quantization' section with bits and group_size"
        )
    override = quantization.get(prefix)
    source = override if isinstance(override, Mapping) else quantization
    try:
        return int(source["bits"]), int(source["group_size"])
    except KeyError as exc:
        raise ValueError(f"{name}: quantization config lacks {exc.args[0]!r}") from None


def _dense(name: str, t: Any) -> np.ndarray:
    """A dense tensor -> float32: F32 stays a view of the raw bytes when 4-byte aligned (no
    copy of an f32 model per streamed unit); F16/BF16 are widened into a new array."""
    try:
        if t.dtype == "F32":
            raw = _check_size(t.data, 4 * math.prod(t.shape), "F32", t.shape)
            if raw.ctypes.data % 4 == 0:
                return raw.view("<f4").reshape(t.shape)
        return to_float32(t.data, t.dtype, t.shape)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def _group_params(name: str, t: Any, half_scales: bool) -> np.ndarray:
    """MLX scales or biases: F16 stays a float16 view when half_scales, else float32."""
    return _half(name, t).data if half_scales and t.dtype == "F16" else _dense(name, t)


def _half(name: str, t: Any) -> HalfWeight:
    """A 2-D F16/BF16 tensor -> HalfWeight: a zero-copy view of the raw bytes when they are
    2-byte aligned, else a copy."""
    n = math.prod(t.shape)
    raw = _check_size(t.data, 2 * n, f"{name}: {t.dtype}", t.shape)
    if raw.ctypes.data % 2:
        raw = raw.copy()  # a fresh allocation is aligned
    return HalfWeight(raw.view(HALF_DTYPES[t.dtype]).reshape(t.shape), t.dtype)


def _packed_u32(name: str, t: Any) -> np.ndarray:
    """Packed words: a zero-copy view of the raw bytes when 4-byte aligned, else a copy."""
    n = math.prod(t.shape)
    raw = _check_size(t.data, 4 * n, f"{name}: U32", t.shape)
    if raw.ctypes.data % 4:
        raw = raw.copy()  # a fresh allocation is aligned
    return raw.view("<u4").reshape(t.shape)


def prepare_unit(
    tensors: Mapping[str, Any], quantization: Mapping[str, Any] | None, half_scales: bool = False,
    blocks: bool = False,
) -> dict[str, Prepared]:
    """One unit's raw tensors -> host compute form, by FORMATS.

    MLX triples "x.weight" (U32) + "x.scales" + "x.biases" become one QuantizedWeight under
    "x.weight" (scales and biases widened to float32; with half_scales, F16 ones stay float16
    views of the raw bytes). GGUF block tensors: with blocks (the numpy backend) a BlockWeight,
    a view of the raw bytes; without, a lossless QuantizedWeight (gguf_to_affine) or, for
    Q2_K/Q3_K/Q6_K, a float16 HalfWeight (the MLX backend). 2-D F16/BF16 matrices become
    HalfWeights, which may be views of the raw buffers (keeping them alive), as may F32
    tensors, except in a unit with converted GGUF blocks (there they are copied so the buffer
    can go); 1-D F16/BF16 tensors become new float32 arrays.

    Raises:
        ValueError: names the tensor: unknown dtype, missing scales/biases, bad shapes or sizes.
    """
    out: dict[str, Prepared] = {}
    consumed: set[str] = set()
    for name, t in tensors.items():
        if t.dtype == "U8" and name.endswith("_blocks"):
            out[name.removesuffix("_blocks")] = _mxfp4(name, t, tensors)
            consumed |= {name, name.removesuffix("_blocks") + "_scales"}
    for name, t in tensors.items():
        if t.dtype != "U32":
            continue
        prefix = name.removesuffix(".weight")
        parts = {p: tensors.get(f"{prefix}.{p}") for p in ("scales", "biases")}
        missing = [f"{prefix}.{p}" for p, v in parts.items() if v is None]
        if not name.endswith(".weight") or missing:
            raise ValueError(
                f"{name}: U32 tensor without its MLX quantization companions (missing "
                f"{missing or ['a .weight name']}); hint: the checkpoint is incomplete"
            )
        bits, group_size = _quant_params(quantization, prefix, name)
        scales, biases = (_group_params(f"{prefix}.{p}", parts[p], half_scales)
                          for p in ("scales", "biases"))
        qw = QuantizedWeight(_packed_u32(name, t), scales, biases, bits, group_size)
        check_quantized(qw, name)
        out[name] = qw
        consumed |= {f"{prefix}.scales", f"{prefix}.biases"}
    for name, t in tensors.items():
        if name in consumed or name in out:
            continue
        if t.dtype in GGUF_BLOCK_TYPES:
            try:
                out[name] = _gguf(t, blocks, half_scales)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        elif t.dtype == "MXFP4" and len(t.shape) == 2:  # GGUF's: computed as read
            try:
                out[name] = mxfp4.from_ggml(t.data, tuple(int(d) for d in t.shape))
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        elif t.dtype in HALF_DTYPES and len(t.shape) == 2:
            out[name] = _half(name, t)
        elif t.dtype in DENSE_DTYPES:
            out[name] = _dense(name, t)
        else:
            raise ValueError(f"{name}: {no_compute_form(t.dtype)}")
    if not blocks and any(t.dtype in GGUF_BLOCK_TYPES for t in tensors.values()):
        # GGUF blocks are converted, so nothing else should pin the raw buffer: one small norm
        # kept as a view would hold every block byte beside its converted form.
        out = {k: _owned(v) for k, v in out.items()}
    return out


def _mxfp4(name: str, t: Any, tensors: Mapping[str, Any]) -> mxfp4.MXFP4Weight:
    """HF's MXFP4 pair x_blocks (out, in/32, 16) + x_scales (out, in/32), both uint8."""
    scales_name = name.removesuffix("_blocks") + "_scales"
    s = tensors.get(scales_name)
    if s is None or s.dtype != "U8":
        raise ValueError(f"{name}: MXFP4 blocks without their uint8 {scales_name!r}; hint: the "
                         "checkpoint is incomplete")
    blocks = _check_size(t.data, math.prod(t.shape), f"{name}: U8", t.shape).reshape(t.shape)
    scales = _check_size(s.data, math.prod(s.shape), f"{scales_name}: U8", s.shape)
    return mxfp4.from_hf(blocks, scales.reshape(s.shape), name)


def _gguf(t: Any, blocks: bool, half_scales: bool) -> Prepared:
    shape = tuple(int(d) for d in t.shape)
    if len(shape) == 2 and blocks:
        return BlockWeight(block_rows(t.data, t.dtype, shape), t.dtype, shape[1])
    if len(shape) == 2 and t.dtype in GGUF_TYPES:
        return gguf_to_affine(t.data, t.dtype, shape, half_scales)
    # 16-element sub-blocks on MLX, or a 1-D block tensor: dequantized at read
    flat = shape if len(shape) == 2 else (1, math.prod(shape))
    from stream_run.kernels.gguf_blocks import dequantize_rows  # numba: compiled on first use

    w = dequantize_rows(BlockWeight(block_rows(t.data, t.dtype, flat), t.dtype, flat[1]))
    if len(shape) != 2:
        return w.reshape(shape)
    return HalfWeight(w.astype(np.float16), "F16")


def block_rows(data: np.ndarray, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """GGUF block bytes of a (out, in) tensor -> a uint8 (out, row bytes) view, size-checked.

    Raises:
        ValueError: unknown type, in not a multiple of the block, or the wrong byte count
            (a truncated tensor says so).
    """
    return _blocks(data, dtype, shape).reshape(shape[0], -1)


Prepared = np.ndarray | QuantizedWeight | HalfWeight | BlockWeight | mxfp4.MXFP4Weight


def _owned(v: Prepared) -> Prepared:
    if isinstance(v, HalfWeight):
        return v if v.data.base is None else HalfWeight(v.data.copy(), v.dtype)
    if isinstance(v, np.ndarray) and v.base is not None:
        return v.copy()
    return v


def no_compute_form(dtype: str) -> str:
    """Why a storage dtype cannot be prepared, with a hint for the GGUF types that
    stream-convert can repack (K-quants and friends are dequantized there, not per token)."""
    runnable = (*DENSE_DTYPES, "U32", *GGUF_BLOCK_TYPES)
    if dtype.startswith(("Q", "IQ", "TQ", "MXFP", "NVFP")):
        return (f"GGUF type {dtype} has no compute form in this engine (GGUF types it runs: "
                f"{', '.join(GGUF_BLOCK_TYPES)}); hint: use a GGUF quantized to one of those")
    return f"dtype {dtype!r} has no compute form; expected one of {runnable}"
