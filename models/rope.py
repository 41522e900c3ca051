"""RoPE inverse frequencies and attention factors for HF's rope types.

`rope_parameters` mirrors transformers' `ROPE_INIT_FUNCTIONS` (modeling_rope_utils.py) for the
types "default", "linear", "llama3", "dynamic", "yarn" and "longrope" (legacy name "su").
`inv_freq` is the older entry point for the types whose attention factor is always 1.0.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# What inv_freq handles: the types that need no attention factor and no sequence length.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# What rope_parameters handles.
ROPE_PARAMETER_TYPES = ("default", "linear", "llama3", "dynamic", "yarn", "longrope")
# Old Phi-3 configs call longrope "su".
_ALIASES = {"su": "longrope"}
# inv_freq has no max_position_embeddings; llama3 fell back to Llama 3's 8192 before.
_LLAMA3_DEFAULT_CONTEXT = 8192


def rope_type(scaling: dict[str, Any] | None) -> str:
    """The rope type named by a config's rope dict (`rope_type`, or the legacy `type`)."""
    if not scaling:
        return "default"
    return str(scaling.get("rope_type", scaling.get("type", "default")))


def inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> np.ndarray:
    """(head_dim/2,) float32 inverse frequencies with scaling applied.

    Only for the types whose attention factor is 1.0 (`SUPPORTED_ROPE_TYPES`); the others need
    `rope_parameters`, which also returns the factor cos/sin must be multiplied by.

    Raises:
        ValueError: an unsupported rope_scaling type (names it and lists supported ones).
    """
    kind = rope_type(scaling)
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope_scaling type {kind!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    freqs, _ = rope_parameters(head_dim, theta, scaling, _LLAMA3_DEFAULT_CONTEXT)
    return freqs


def rope_parameters(
    head_dim: int,
    theta: float,
    scaling: dict[str, Any] | None,
    max_position_embeddings: int,
    partial_rotary_factor: float = 1.0,
    *,
    seq_len: int | None = None,
    original_max_position_embeddings: int | None = None,
) -> tuple[np.ndarray, float]:
    """Inverse frequencies and attention factor, as transformers' `ROPE_INIT_FUNCTIONS` give them.

    `scaling` is the rope dict as found in config.json: transformers 4's `rope_scaling` or
    transformers 5's `rope_parameters`, with `rope_type` or the legacy `type`. As in
    transformers, `rope_theta` and `partial_rotary_factor` inside the dict take priority over
    the `theta` and `partial_rotary_factor` arguments.

    Two types depend on the sequence length, which transformers re-evaluates on every forward
    call from the largest position id in it (`seq_len = max(position_ids) + 1`):

    * "longrope": `short_factor` while `seq_len <= original_max_position_embeddings` (including
      `seq_len=None`, which is what transformers builds at init), `long_factor` beyond it. The
      attention factor does not depend on the choice. transformers does not re-rotate cached
      keys when it switches, so an engine serving contexts longer than the original one should
      pass such a `seq_len` up front to use the long factors throughout.
    * "dynamic": `seq_len=None` or `seq_len <= max_position_embeddings` gives the default
      frequencies; longer sequences raise the base (NTK-aware), again for the whole call.

    Args:
        head_dim: the attention head size.
        theta: the RoPE base (`rope_theta`) when the dict has none.
        scaling: the config's rope dict, or None for plain RoPE.
        max_position_embeddings: the config's `max_position_embeddings`; the fallback for
            `original_max_position_embeddings` and for yarn/longrope's missing `factor`.
        partial_rotary_factor: the fraction of head_dim that is rotated, when the dict has none.
        seq_len: the sequence length for "longrope" and "dynamic"; ignored by other types.
        original_max_position_embeddings: a top-level config.json value of that name (Phi-3
            keeps it there); like transformers, it overrides the dict's for llama3/yarn/longrope.

    Returns:
        (inv_freq, attention_factor): float32 of shape (rotary_dim/2,), where rotary_dim =
        int(head_dim * partial_rotary_factor), and the factor cos and sin are multiplied by
        (1.0 except for yarn and longrope).

    Raises:
        ValueError: an unsupported rope type (names it and lists supported ones), an odd
            rotary dimension, or longrope factor lists of the wrong length.
    """
    p = dict(scaling or {})
    kind = rope_type(p)
    kind = _ALIASES.get(kind, kind)
    if kind not in ROPE_PARAMETER_TYPES:
        raise ValueError(
            f"unsupported rope_scaling type {kind!r}; supported: {', '.join(ROPE_PARAMETER_TYPES)}"
        )
    base = float(p["rope_theta"] if p.get("rope_theta") is not None else theta)
    prf = p.get("partial_rotary_factor")
    dim = int(head_dim * (partial_rotary_factor if prf is None else prf))
    if dim <= 0 or dim % 2:
        # transformers would build ceil(dim/2) frequencies over an odd dim: no rotation matches
        raise ValueError(f"rotary dimension {dim} (head_dim {head_dim} x partial_rotary_factor "
                         f"{prf if prf is not None else partial_rotary_factor}) must be even")
    if kind in ("llama3", "yarn", "longrope"):
        # standardize_rope_params: a top-level value wins, then the dict's, then max_position
        if original_max_position_embeddings is not None:
            p["original_max_position_embeddings"] = original_max_position_embeddings
        elif p.get("original_max_position_embeddings") is None:
            p["original_max_position_embeddings"] = max_position_embeddings
    exponents = np.arange(0, dim, 2, dtype=np.float64) / dim
    if kind == "yarn":
        return _yarn(base, dim, exponents, p, max_position_embeddings)
    if kind == "longrope":
        return _longrope(base, dim, exponents, p, max_position_embeddings, seq_len)
    if kind == "dynamic":
        factor = float(p["factor"])
        seq = max(seq_len or max_position_embeddings, max_position_embeddings)
        base = base * ((factor * seq / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    freqs = 1.0 / (base**exponents)
    if kind == "linear":
        freqs = freqs / float(p["factor"])
    elif kind == "llama3":
        freqs = _llama3(freqs, p)
    return freqs.astype(np.float32), 1.0


def _llama3(freqs: np.ndarray, s: dict[str, Any]) -> np.ndarray:
    factor = float(s["factor"])
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_ctx = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / freqs
    scaled = np.where(wavelen > low_wavelen, freqs / factor, freqs)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN paper eq. 21, as transformers' yarn_get_mscale."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn(base: float, dim: int, exponents: np.ndarray, p: dict[str, Any], max_pos: int
          ) -> tuple[np.ndarray, float]:
    """transformers' _compute_yarn_parameters."""
    orig = p["original_max_position_embeddings"]
    factor = p.get("factor")
    if factor is None:  # DeepSeek-V3 style: the ratio of the two context lengths
        factor = max_pos / orig
    factor = float(factor)
    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    # `or`, not a .get default: transformers also replaces 0 and None by the defaults
    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    # float32 like transformers: with factor 32 a float64 ramp moves inv_freq by ~2e-6 relative
    ramp = (np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    ramp = np.clip(ramp, 0, 1).astype(np.float64)
    pos_freqs = base**exponents
    extrapolation = 1.0 - ramp  # weight of the unscaled frequencies
    freqs = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return freqs.astype(np.float32), float(attention_factor)


def _longrope(base: float, dim: int, exponents: np.ndarray, p: dict[str, Any], max_pos: int,
              seq_len: int | None) -> tuple[np.ndarray, float]:
    """transformers' _compute_longrope_parameters."""
    orig = p["original_max_position_embeddings"]
    factor = p.get("factor")
    if factor is None:  # Phi-3 style: the ratio of the two context lengths
        factor = max_pos / orig
    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        attention_factor = (1.0 if factor <= 1.0
                            else math.sqrt(1 + math.log(factor) / math.log(orig)))
    name = "long_factor" if seq_len and seq_len > orig else "short_factor"
    ext = np.asarray(p[name], dtype=np.float64)
    if ext.shape != exponents.shape:
        raise ValueError(f"longrope {name} has {ext.size} entries; the rotary dimension {dim} "
                         f"needs {dim // 2}")
    freqs = 1.0 / (ext * base**exponents)
    return freqs.astype(np.float32), float(attention_factor)


def partial_rotary_factor(config: dict[str, Any]) -> float:
    """The rotated fraction of head_dim from a config.json as read: inside transformers 5's
    rope_parameters, else top level (Phi-3, GGUF rope.dimension_count), else 1."""
    params = config.get("rope_parameters")
    params = params if isinstance(params, dict) else {}
    value = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"partial_rotary_factor must be a number in (0, 1], got {value!r}")
    return float(value)


def scaling_type(scaling: dict[str, Any] | None) -> str:
    """The rope_scaling dict's type, "default" when there is none."""
    if not scaling:
        return "default"
    return str(scaling.get("rope_type", scaling.get("type", "default")))


def reject_per_layer_type(config: dict[str, Any]) -> None:
    """Raise ValueError for transformers 5's per-layer-type rope_parameters ({"full_attention":
    {...}, "sliding_attention": {...}}) in a model that has one kind of layer: read as flat,
    it would silently give the default theta."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"rope_parameters per layer type ({', '.join(params)}) are not "
                         "supported for this architecture")
