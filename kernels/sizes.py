"""Bytes a tensor takes in compute form, known from its storage dtype and shape alone.

Both backends compute in float32, but weights stay in their stored width where the ops can read
it: 2-D F16/BF16 matrices stay 16-bit (HalfWeight; mx.float16/bfloat16 on MLX), quantized
weights stay packed (uint32 words) with float32 scales and biases per group. 1-D F16/BF16
tensors (norms, biases) and F32 are float32. The cache reserves this many bytes before a read
starts, so the figure must equal what prepare() produces.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from kernels.formats import no_compute_form

GGUF_AFFINE = {"Q4_0": (4, 32), "Q4_1": (4, 32), "Q8_0": (8, 32)}  # -> (bits, group_size)
DENSE_DTYPES = ("F32", "F16", "BF16")
HALF_DTYPES = ("F16", "BF16")


def prepared_nbytes(
    dtype: str, shape: tuple[int, ...], quant_bits: int | None = None, *, widened: bool = False
) -> int:
    """Compute-form bytes of one stored tensor.

    widened=True: a dense tensor that prepare() widens to float32 whatever its shape, which is
    what happens to the scales and biases of an MLX-packed weight (dtype "U32"; its packed
    words are kept as they are). unit_nbytes() applies that rule by name.
    """
    n = math.prod(shape)
    if dtype in HALF_DTYPES and len(shape) == 2 and not widened:
        return 2 * n
    if dtype in DENSE_DTYPES:
        return 4 * n
    if dtype == "U32":
        return 4 * n
    if dtype in GGUF_AFFINE:
        bits, group = GGUF_AFFINE[dtype]
        return n * bits // 8 + 2 * 4 * (n // group)
    raise ValueError(no_compute_form(dtype))


def _companions(tensors: Mapping[str, Any]) -> set[str]:
    """The "x.scales" / "x.biases" names next to a U32 "x.weight" (widened to float32)."""
    return {
        f"{name.removesuffix('.weight')}.{part}"
        for name, t in tensors.items()
        if t.dtype == "U32"
        for part in ("scales", "biases")
    }


def _viewed(tensors: Mapping[str, Any]) -> bool:
    """Whether prepare() on a view-making backend keeps views of the read buffer: packed U32
    words, F32 tensors and 2-D F16/BF16 matrices stay in the buffer (when aligned, as the
    reader's buffers and safetensors offsets make them); everything else is converted. A unit
    with GGUF blocks keeps no views (prepare_unit copies its dense tensors)."""
    if any(t.dtype in GGUF_AFFINE for t in tensors.values()):
        return False
    companions = _companions(tensors)
    return any(_is_view(name, t, companions) for name, t in tensors.items())


def _is_view(name: str, t: Any, companions: set[str]) -> bool:
    if name in companions:
        return t.dtype == "F32"
    return t.dtype in ("U32", "F32") or (t.dtype in HALF_DTYPES and len(tuple(t.shape)) == 2)


def held_nbytes(tensors: Mapping[str, Any], views_raw: bool) -> int:
    """Bytes a prepared unit keeps allocated: what the cache budget counts for it.

    tensors is {name: object with .dtype, .shape and .nbytes (stored bytes)}. On a backend
    whose compute form views the read buffer (numpy), one view keeps the whole buffer alive, so
    the unit holds every raw byte plus the arrays converted out of it (float32 scales and
    biases, widened norms): a 4-bit group-64 unit holds its float16 scales and biases twice.
    Otherwise (MLX copies into its own arrays) it holds its compute form only.
    """
    if views_raw and _viewed(tensors):
        companions = _companions(tensors)
        converted = sum(
            prepared_nbytes(t.dtype, tuple(t.shape), widened=name in companions)
            for name, t in tensors.items()
            if not _is_view(name, t, companions))
        return sum(int(t.nbytes) for t in tensors.values()) + converted
    return unit_nbytes(tensors)


def transient_nbytes(tensors: Mapping[str, Any], views_raw: bool) -> int:
    """Raw bytes allocated beside the held bytes only while a unit is prepared: the read
    buffer, unless the prepared unit keeps views of it (then held_nbytes counts it). The
    scheduler reserves these bytes for each read in flight."""
    if views_raw and _viewed(tensors):
        return 0
    return sum(int(t.nbytes) for t in tensors.values())


def unit_nbytes(tensors: Mapping[str, Any]) -> int:
    """Compute-form bytes of one unit: {name: object with .dtype and .shape}, as prepare() takes.

    "x.scales" / "x.biases" next to a U32 "x.weight" are widened to float32 (2-D or not).
    """
    companions = _companions(tensors)
    total = 0
    for name, t in tensors.items():
        try:
            total += prepared_nbytes(t.dtype, tuple(t.shape), widened=name in companions)
        except ValueError as exc:
            raise ValueError(f"tensor {name!r}: {exc}") from None
    return total
