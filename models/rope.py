"""RoPE inverse frequencies, including HF's rope_scaling variants (default, linear, llama3)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_type(scaling: dict[str, Any] | None) -> str:
    if not scaling:
        return "default"
    return str(scaling.get("rope_type", scaling.get("type", "default")))


def inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> np.ndarray:
    """(head_dim/2,) float32 inverse frequencies with scaling applied.

    Raises:
        ValueError: an unsupported rope_scaling type (names it and lists supported ones).
    """
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    kind = rope_type(scaling)
    if kind == "default":
        pass
    elif kind == "linear":
        freqs = freqs / float(scaling["factor"])  # type: ignore[index]
    elif kind == "llama3":
        freqs = _llama3(freqs, scaling)  # type: ignore[arg-type]
    else:
        raise ValueError(
            f"unsupported rope_scaling type {kind!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return freqs.astype(np.float32)


def _llama3(freqs: np.ndarray, s: dict[str, Any]) -> np.ndarray:
    factor = float(s["factor"])
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_ctx = float(s.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / freqs
    scaled = np.where(wavelen > low_wavelen, freqs / factor, freqs)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)
