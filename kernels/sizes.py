"""Bytes a tensor takes in compute form, known from its storage dtype and shape alone.

Both backends compute in float32, but weights stay in their stored width where the ops can read
it: 2-D F16/BF16 matrices stay 16-bit (HalfWeight; mx.float16/bfloat16 on MLX), quantized
weights stay packed (uint32 words) with float32 scales and biases per group, or float16 ones
where the backend keeps them so (half_scales: numpy on a CPU that widens float16 in hardware,
for GGUF blocks and F16-stored MLX scales). 1-D F16/BF16 tensors (norms, biases) and F32 are
float32. The cache reserves this many bytes before a read starts, so the figure must equal what
prepare() produces. GGUF block tensors: a backend whose compute forms view the read buffer
(numpy) keeps their bytes as read (blocks=True); the others (MLX) hold them as
formats.prepare_unit converts them: lossless affine (float32 scales and biases), or float16.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from stream_run.kernels.formats import GGUF_TYPES, no_compute_form
from stream_run.kernels.quant import GGUF_BLOCK_TYPES

DENSE_DTYPES = ("F32", "F16", "BF16")
HALF_DTYPES = ("F16", "BF16")


def prepared_nbytes(
    dtype: str, shape: tuple[int, ...], quant_bits: int | None = None, *, widened: bool = False,
    half_scales: bool = False, blocks: bool = False,
) -> int:
    """Compute-form bytes of one stored tensor.

    widened=True: a dense tensor that prepare() widens to float32 whatever its shape, which is
    what happens to the scales and biases of an MLX-packed weight (dtype "U32"; its packed
    words are kept as they are). unit_nbytes() applies that rule by name.
    blocks=True: a 2-D GGUF block tensor stays its stored bytes. Otherwise the GGUF_TYPES
    become affine (half_scales=True: float16 scales and biases where exact, which the size
    counts them as), the rest float16; a 1-D block tensor becomes float32.
    """
    n = math.prod(shape)
    if dtype in HALF_DTYPES and len(shape) == 2 and not widened:
        return 2 * n
    if dtype in DENSE_DTYPES:
        return 4 * n
    if dtype == "U32":
        return 4 * n
    if dtype == "U8":  # MXFP4 codes or exponents: kept as stored (MLX: the same bytes)
        return n
    if dtype == "MXFP4" and len(shape) == 2:  # GGUF's 17-byte blocks (MLX: the same bytes)
        return n // 32 * 17
    if dtype in GGUF_BLOCK_TYPES:
        block, block_bytes = GGUF_BLOCK_TYPES[dtype]
        if len(shape) != 2:
            return 4 * n
        if blocks:
            return n // block * block_bytes
        if dtype in GGUF_TYPES:
            return n * GGUF_TYPES[dtype][0] // 8 + 2 * (2 if half_scales else 4) * (n // 32)
        return 2 * n
    raise ValueError(no_compute_form(dtype))


def _companions(tensors: Mapping[str, Any]) -> set[str]:
    """The "x.scales" / "x.biases" names next to a U32 "x.weight"."""
    return {
        f"{name.removesuffix('.weight')}.{part}"
        for name, t in tensors.items()
        if t.dtype == "U32"
        for part in ("scales", "biases")
    }


def _viewed(tensors: Mapping[str, Any], half_scales: bool) -> bool:
    """Whether prepare() on a view-making backend keeps views of the read buffer: packed U32
    words, F32 tensors and 2-D F16/BF16 matrices stay in the buffer (when aligned, as the
    reader's buffers and safetensors offsets make them), as do F16 scales and biases with
    half_scales, and 2-D GGUF block tensors (computed on as read); everything else is
    converted."""
    companions = _companions(tensors)
    return any(_is_view(name, t, companions, half_scales) for name, t in tensors.items())


def _is_view(name: str, t: Any, companions: set[str], half_scales: bool) -> bool:
    if name in companions:
        return t.dtype == "F32" or (half_scales and t.dtype == "F16")
    two_d = len(tuple(t.shape)) == 2
    return t.dtype in ("U32", "U8", "F32") \
        or (two_d and t.dtype in (*HALF_DTYPES, *GGUF_BLOCK_TYPES, "MXFP4"))


def _tensor_nbytes(name: str, t: Any, companions: set[str], half_scales: bool,
                   blocks: bool = False) -> int:
    shape = tuple(t.shape)
    if t.dtype == "U8" and not name.endswith(("_blocks", "_scales")):
        raise ValueError(f"{no_compute_form(t.dtype)} (uint8 runs only as MXFP4 x_blocks + "
                         "x_scales)")
    if name in companions and half_scales and t.dtype == "F16":
        return 2 * math.prod(shape)  # kept as float16
    return prepared_nbytes(t.dtype, shape, widened=name in companions, half_scales=half_scales,
                           blocks=blocks)


def held_nbytes(tensors: Mapping[str, Any], views_raw: bool, half_scales: bool = False) -> int:
    """Bytes a prepared unit keeps allocated: what the cache budget counts for it.

    tensors is {name: object with .dtype, .shape and .nbytes (stored bytes)}. On a backend
    whose compute form views the read buffer (numpy), one view keeps the whole buffer alive, so
    the unit holds every raw byte plus the arrays converted out of it (float32 scales and
    biases, widened norms): without half_scales a 4-bit group-64 unit holds its float16 scales
    and biases twice. Otherwise (MLX copies into its own arrays) it holds its compute form only.
    """
    if views_raw and _viewed(tensors, half_scales):
        companions = _companions(tensors)
        converted = sum(
            _tensor_nbytes(name, t, companions, half_scales)
            for name, t in tensors.items()
            if not _is_view(name, t, companions, half_scales))
        return sum(int(t.nbytes) for t in tensors.values()) + converted
    return unit_nbytes(tensors, half_scales)


def transient_nbytes(
    tensors: Mapping[str, Any], views_raw: bool, half_scales: bool = False
) -> int:
    """Raw bytes allocated beside the held bytes only while a unit is prepared: the read
    buffer, unless the prepared unit keeps views of it (then held_nbytes counts it). The
    scheduler reserves these bytes for each read in flight."""
    if views_raw and _viewed(tensors, half_scales):
        return 0
    return sum(int(t.nbytes) for t in tensors.values())


def unit_nbytes(tensors: Mapping[str, Any], half_scales: bool = False,
                blocks: bool = False) -> int:
    """Compute-form bytes of one unit: {name: object with .dtype and .shape}, as prepare() takes.

    "x.scales" / "x.biases" next to a U32 "x.weight" are widened to float32 (2-D or not), or
    with half_scales kept as they are when F16. blocks: GGUF block tensors stay as stored.
    """
    companions = _companions(tensors)
    total = 0
    for name, t in tensors.items():
        try:
            total += _tensor_nbytes(name, t, companions, half_scales, blocks)
        except ValueError as exc:
            raise ValueError(f"tensor {name!r}: {exc}") from None
    return total
