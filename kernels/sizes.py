"""Bytes a tensor takes in compute form, known from its storage dtype and shape alone.

Both backends compute in float32: dense weights are widened to float32, quantized weights stay
packed (uint32 words) with float32 scales and biases per group. The cache reserves this many
bytes before a read starts, so the figure must equal what prepare() produces.
"""

from __future__ import annotations

import math

GGUF_AFFINE = {"Q4_0": (4, 32), "Q4_1": (4, 32), "Q8_0": (8, 32)}  # -> (bits, group_size)
DENSE_DTYPES = ("F32", "F16", "BF16")


def prepared_nbytes(dtype: str, shape: tuple[int, ...], quant_bits: int | None = None) -> int:
    """Compute-form bytes of one stored tensor.

    For an MLX-packed weight (dtype "U32") the packed words are kept as they are; its scales
    and biases (stored F16/BF16/F32) are dense tensors in their own right and widen to float32.
    """
    n = math.prod(shape)
    if dtype in DENSE_DTYPES:
        return 4 * n
    if dtype == "U32":
        return 4 * n
    if dtype in GGUF_AFFINE:
        bits, group = GGUF_AFFINE[dtype]
        return n * bits // 8 + 2 * 4 * (n // group)
    raise ValueError(f"no compute form for dtype {dtype!r}")
