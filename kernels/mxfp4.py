"""MXFP4 (OCP microscaling FP4) weights as stored, with no numba import (kernels/formats.py
makes them at read); kernels/mxfp4_kernels.py computes on them (dequantize rows, the matvec).

A weight is (out, in) with each row in blocks of 32 elements: 16 bytes of e2m1 codes (two a
byte) and one e8m0 exponent byte. Two layouts hold the same numbers:
- HF (gpt-oss checkpoints, `*_blocks` (out, in / 32, 16) and `*_scales` (out, in / 32)): byte j
  of a block holds element 2j in its low nibble, 2j + 1 in its high one.
- ggml (GGUF type MXFP4, 17-byte blocks: the exponent, then the codes): byte j holds element
  j low, j + 16 high.
Element value: e2m1(code) * 2**(e - 127), computed as gguf-py does (the doubled integer code
times 2**(e - 128), exact in float32), so dequantize equals gguf.quants.dequantize bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 32  # elements per block
BLOCK_BYTES = 16  # code bytes per block (the exponent is apart in HF, first in ggml)
GGML_BLOCK_BYTES = 17
# e2m1 codes, doubled to integers (0, 0.5, 1, 1.5, 2, 3, 4, 6; bit 3 the sign): gguf-py's kvalues
KVALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.float32)
# 2**(e - 128) for every exponent byte (gguf-py's e8m0_to_fp32_half; 2**-128 and 2**-127 are
# float32 subnormals, every one exact)
HALF_SCALES = np.ldexp(1.0, np.arange(256) - 128).astype(np.float32)


@dataclass(frozen=True, eq=False)
class MXFP4Weight:
    """An (out, in) MXFP4 weight as read: codes (out, in / 32, 16) uint8 and exponents
    (out, in / 32) uint8, usually views of the read buffer; ggml: the codes' nibble order is
    ggml's (see the module docstring), else HF's."""

    codes: np.ndarray
    exponents: np.ndarray
    ggml: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.codes.shape[0]), int(self.codes.shape[1]) * BLOCK

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes + self.exponents.nbytes)


def from_hf(blocks: np.ndarray, scales: np.ndarray, name: str = "weight") -> MXFP4Weight:
    """HF's `*_blocks` (out, in / 32, 16) and `*_scales` (out, in / 32) uint8 -> MXFP4Weight.

    Raises:
        ValueError: naming `name`, where the shapes do not pair.
    """
    blocks, scales = np.asarray(blocks), np.asarray(scales)
    if blocks.ndim != 3 or blocks.shape[2] != BLOCK_BYTES or scales.shape != blocks.shape[:2] \
            or blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise ValueError(f"{name}: MXFP4 blocks {list(blocks.shape)} ({blocks.dtype}) and scales "
                         f"{list(scales.shape)} ({scales.dtype}) do not pair; expected uint8 "
                         "(out, in/32, 16) and (out, in/32)")
    return MXFP4Weight(blocks, scales)


def from_ggml(data: np.ndarray, shape: tuple[int, int]) -> MXFP4Weight:
    """GGUF MXFP4 bytes of an (out, in) tensor -> MXFP4Weight (views of data).

    Raises:
        ValueError: in not a multiple of 32, or the byte count is not the shape's.
    """
    out, n_in = shape
    nbytes = out * n_in // BLOCK * GGML_BLOCK_BYTES
    data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    if n_in % BLOCK or data.size != nbytes:
        raise ValueError(f"MXFP4 tensor of shape {list(shape)}: got {data.size} bytes, expected "
                         f"{nbytes} (in a multiple of {BLOCK}); hint: the file is truncated or "
                         "its header is wrong")
    blocks = data.reshape(out, n_in // BLOCK, GGML_BLOCK_BYTES)
    return MXFP4Weight(blocks[:, :, 1:], blocks[:, :, 0], ggml=True)


def to_hf(w: MXFP4Weight) -> tuple[np.ndarray, np.ndarray]:
    """(codes in HF's nibble order (out, in / 32, 16), exponents (out, in / 32)): what MLX's
    mxfp4 mode packs (element 2j low, 2j + 1 high), from either layout."""
    if not w.ggml:
        return np.ascontiguousarray(w.codes), np.ascontiguousarray(w.exponents)
    nib = np.concatenate([w.codes & np.uint8(15), w.codes >> np.uint8(4)], axis=2)  # element order
    return np.ascontiguousarray(nib[..., 0::2] | (nib[..., 1::2] << np.uint8(4))), \
        np.ascontiguousarray(w.exponents)
