"""Raw stored bytes (uint8 arrays) to compute arrays: dense floats (2-D F16/BF16 kept at 16 bits),
and GGUF blocks to affine form.

GGUF Q4_0, Q4_1 and Q8_0 are affine with 32-element groups, so they map onto MLX's packed form
losslessly: dequantize(gguf_to_affine(raw)) equals GGUF's own dequantization bit for bit (the
products d * q are exact in float32, so scales * q + biases rounds the same way).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from stream_run.kernels.quant import HALF_DTYPES, HalfWeight, QuantizedWeight, check_quantized

DENSE_DTYPES = ("F32", "F16", "BF16")
GGUF_BLOCK = 32
# dtype -> (bits, bytes per 32-element block)
GGUF_TYPES = {"Q4_0": (4, 18), "Q4_1": (4, 20), "Q8_0": (8, 34)}


def _check_size(data: np.ndarray, nbytes: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
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
    """Raw bytes -> (out * in / 32, block bytes) uint8, after checking shape and size."""
    if dtype not in GGUF_TYPES:
        raise ValueError(
            f"dtype {dtype!r} is not a GGUF block type; expected one of {tuple(GGUF_TYPES)}"
        )
    if len(shape) != 2 or shape[1] % GGUF_BLOCK:
        raise ValueError(
            f"{dtype} tensor of shape {tuple(shape)}: expected 2-D (out, in) with in a multiple "
            f"of {GGUF_BLOCK}"
        )
    block_bytes = GGUF_TYPES[dtype][1]
    n_blocks = shape[0] * shape[1] // GGUF_BLOCK
    raw = _check_size(data, n_blocks * block_bytes, dtype, shape)
    return raw.reshape(n_blocks, block_bytes)


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The little-endian f16 at byte `at` of every block -> (n_blocks,) float32."""
    return np.ascontiguousarray(blocks[:, at : at + 2]).view("<f2")[:, 0].astype(np.float32)


def gguf_to_affine(
    data: np.ndarray, dtype: str, shape: tuple[int, ...], half_scales: bool = False
) -> QuantizedWeight:
    """GGUF Q4_0/Q4_1/Q8_0 bytes of an (out, in) tensor -> QuantizedWeight (group size 32).

    Scales and biases are float32, or with half_scales float16, which holds every GGUF scale
    (stored as f16) and bias exactly; a bias that is not exact in float16 (-128 d overflows
    for d > 511.98) keeps that tensor's biases float32.

    Raises:
        ValueError: unsupported dtype, shape not (out, in) with in % 32 == 0, or wrong size.
    """
    blocks = _blocks(data, dtype, shape)
    out, n_in = shape
    d = _f16(blocks, 0)
    if dtype == "Q8_0":
        q_bytes = blocks[:, 2:] ^ np.uint8(0x80)  # int8 q -> q + 128 as uint8: 8-bit stream
        scales, biases = d, np.float32(-128) * d
    else:
        qs = blocks[:, -16:]
        # GGUF: low nibbles are elements 0..15, high nibbles 16..31; affine packs element j at
        # bits 4j, i.e. byte t holds elements 2t (low) and 2t+1 (high).
        vals = np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1)  # (nb, 32)
        q_bytes = vals[:, 0::2] | (vals[:, 1::2] << np.uint8(4))  # (nb, 16)
        if dtype == "Q4_0":
            scales, biases = d, np.float32(-8) * d
        else:
            scales, biases = d, _f16(blocks, 2)
    packed = np.ascontiguousarray(q_bytes).reshape(out, -1).view("<u4")
    groups = n_in // GGUF_BLOCK
    scales, biases = (a.reshape(out, groups).astype(np.float32) for a in (scales, biases))
    if half_scales:
        scales, biases = scales.astype(np.float16), _half_if_exact(biases)
    return QuantizedWeight(packed.astype(np.uint32, copy=False), scales, biases,
                           bits=GGUF_TYPES[dtype][0], group_size=GGUF_BLOCK)


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
    tensors: Mapping[str, Any], quantization: Mapping[str, Any] | None, half_scales: bool = False
) -> dict[str, np.ndarray | QuantizedWeight | HalfWeight]:
    """One unit's raw tensors -> host compute form (float32 arrays, numpy Quantized/HalfWeights).

    MLX triples "x.weight" (U32) + "x.scales" + "x.biases" become one QuantizedWeight under
    "x.weight" (scales and biases widened to float32; with half_scales, F16 ones stay float16
    views of the raw bytes); GGUF Q4_0/Q4_1/Q8_0 become QuantizedWeights (float16 scales and
    biases with half_scales, see gguf_to_affine); 2-D F16/BF16 matrices become HalfWeights,
    which may be views of the raw buffers (keeping them alive), as may F32 tensors, except in a
    unit with GGUF blocks (there they are copied so the buffer can go); 1-D F16/BF16 tensors
    become new float32 arrays.

    Raises:
        ValueError: names the tensor: unknown dtype, missing scales/biases, bad shapes or sizes.
    """
    out: dict[str, np.ndarray | QuantizedWeight | HalfWeight] = {}
    consumed: set[str] = set()
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
        if t.dtype in GGUF_TYPES:
            try:
                out[name] = gguf_to_affine(t.data, t.dtype, t.shape, half_scales)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        elif t.dtype in HALF_DTYPES and len(t.shape) == 2:
            out[name] = _half(name, t)
        elif t.dtype in DENSE_DTYPES:
            out[name] = _dense(name, t)
        else:
            raise ValueError(f"{name}: {no_compute_form(t.dtype)}")
    if any(t.dtype in GGUF_TYPES for t in tensors.values()):
        # GGUF blocks are converted, so nothing else should pin the raw buffer: one small norm
        # kept as a view would hold every block byte beside its converted form.
        out = {k: _owned(v) for k, v in out.items()}
    return out


Prepared = np.ndarray | QuantizedWeight | HalfWeight


def _owned(v: Prepared) -> Prepared:
    if isinstance(v, HalfWeight):
        return v if v.data.base is None else HalfWeight(v.data.copy(), v.dtype)
    if isinstance(v, np.ndarray) and v.base is not None:
        return v.copy()
    return v


def no_compute_form(dtype: str) -> str:
    """Why a storage dtype cannot be prepared, with a hint for the GGUF types that
    stream-convert can repack (K-quants and friends are dequantized there, not per token)."""
    runnable = (*DENSE_DTYPES, "U32", *GGUF_TYPES)
    if dtype.startswith(("Q", "IQ", "TQ")):
        return (f"GGUF type {dtype} has no compute form in this engine (GGUF types that run "
                f"directly: {', '.join(GGUF_TYPES)}); hint: convert the model first: "
                "stream-convert MODEL OUT")
    return f"dtype {dtype!r} has no compute form; expected one of {runnable}"
