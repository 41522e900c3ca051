"""An independent float64 numpy forward pass of the HF Llama-family decoder.

Written from the HF modeling code's math (modeling_llama / mistral / qwen2 / qwen3 and
modeling_rope_utils), without KV cache or any streaming, and without importing engine/,
kernels/, loaders/, cache/ or scheduler/: it is the reference the engine is compared against.
Anything it does not implement (another RoPE type, say) raises instead of silently computing
something else.
"""

from __future__ import annotations

import math

import numpy as np

ROPE_TYPES = ("default", "linear", "llama3")


def _head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def _rope_params(cfg: dict) -> dict:
    """rope_theta + rope_scaling (transformers 4 configs) or rope_parameters (transformers 5)."""
    params = {"rope_theta": cfg.get("rope_theta", 10000.0), **(cfg.get("rope_scaling") or {}),
              **(cfg.get("rope_parameters") or {})}
    params.setdefault("rope_type", params.get("type", "default"))
    if params["rope_type"] not in ROPE_TYPES or params.get("partial_rotary_factor", 1.0) != 1.0:
        raise NotImplementedError(f"reference: RoPE {params} (supported: {ROPE_TYPES}, full "
                                  "rotary)")
    return params


def _inv_freq(cfg: dict) -> np.ndarray:
    dim = _head_dim(cfg)
    p = _rope_params(cfg)
    inv = 1.0 / p["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if p["rope_type"] == "linear":
        return inv / p["factor"]
    if p["rope_type"] == "llama3":  # _compute_llama3_parameters
        factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old = p["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - low) / (high - low)
        medium = (1 - smooth) * inv / factor + smooth * inv
        return np.where(wavelen < old / high, inv, np.where(wavelen > old / low, inv / factor,
                                                           medium))
    return inv


def _sliding_window(cfg: dict, layer_idx: int) -> int | None:
    """The window of layer_idx's attention, or None for full causal attention."""
    if cfg["model_type"] == "mistral":
        return cfg.get("sliding_window")
    if cfg["model_type"] not in ("qwen2", "qwen3") or not cfg.get("use_sliding_window"):
        return None
    # Qwen2Config: layers from max_window_layers on slide, unless layer_types says otherwise
    types = cfg.get("layer_types") or [
        "sliding_attention" if i >= cfg.get("max_window_layers", 28) else "full_attention"
        for i in range(cfg["num_hidden_layers"])]
    return cfg.get("sliding_window", 4096) if types[layer_idx] == "sliding_attention" else None


def _mask(L: int, window: int | None) -> np.ndarray:
    i, j = np.arange(L)[:, None], np.arange(L)[None, :]
    visible = (j <= i) if window is None else (j <= i) & (i - j < window)
    return np.where(visible, 0.0, -np.inf)  # (L, L)


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def reference_logits(config: dict, weights: dict[str, np.ndarray], token_ids: list[int]
                     ) -> np.ndarray:
    """Logits (L, vocab) in float64 for every position of token_ids.

    Args:
        config: the HF config.json as a dict (llama, mistral, qwen2 or qwen3).
        weights: full HF tensor names to arrays (any float dtype; computed in float64).
        token_ids: the whole sequence; attention is causal over all of it, no KV cache.
    """
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    cfg = config
    if cfg["model_type"] not in ("llama", "mistral", "qwen2", "qwen3"):
        raise NotImplementedError(f"reference: model_type {cfg['model_type']!r}")
    n_heads = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_heads
    D = _head_dim(cfg)
    eps = cfg.get("rms_norm_eps", 1e-6)
    L = len(token_ids)

    angles = np.outer(np.arange(L), _inv_freq(cfg))  # (L, D/2)
    emb = np.concatenate([angles, angles], axis=-1)  # (L, D): HF's non-interleaved layout
    cos, sin = np.cos(emb), np.sin(emb)

    x = w["model.embed_tokens.weight"][np.asarray(token_ids)]  # (L, E)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."

        def lin(h, name, p=p):
            y = h @ w[p + name + ".weight"].T
            bias = w.get(p + name + ".bias")
            return y if bias is None else y + bias

        h = _rms(x, w[p + "input_layernorm.weight"], eps)
        q = lin(h, "self_attn.q_proj").reshape(L, n_heads, D).transpose(1, 0, 2)  # (H, L, D)
        k = lin(h, "self_attn.k_proj").reshape(L, n_kv, D).transpose(1, 0, 2)
        v = lin(h, "self_attn.v_proj").reshape(L, n_kv, D).transpose(1, 0, 2)
        if cfg["model_type"] == "qwen3":  # per-head RMSNorm over D, before RoPE
            q = _rms(q, w[p + "self_attn.q_norm.weight"], eps)
            k = _rms(k, w[p + "self_attn.k_norm.weight"], eps)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        rep = n_heads // n_kv
        k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)  # HF repeat_kv
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(D) + _mask(L, _sliding_window(cfg, i))
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        attn = (probs @ v).transpose(1, 0, 2).reshape(L, n_heads * D)  # (L, H*D)
        x = x + lin(attn, "self_attn.o_proj")
        h = _rms(x, w[p + "post_attention_layernorm.weight"], eps)
        gate = lin(h, "mlp.gate_proj")
        x = x + lin(gate / (1 + np.exp(-gate)) * lin(h, "mlp.up_proj"), "mlp.down_proj")
    x = _rms(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else w["lm_head.weight"]
    return x @ head.T


def reference_greedy(config: dict, weights: dict[str, np.ndarray], prompt_ids: list[int],
                     n: int) -> list[int]:
    """n greedy tokens after prompt_ids (no EOS stop), recomputing the whole sequence each step."""
    ids = list(prompt_ids)
    for _ in range(n):
        ids.append(int(np.argmax(reference_logits(config, weights, ids)[-1])))
    return ids[len(prompt_ids):]
