"""An independent float64 numpy forward pass of the HF Llama-family decoder.

Written from the HF modeling code's math (LlamaModel / Qwen2 / Qwen3), without KV cache or any
streaming, and without importing engine/, kernels/, loaders/, cache/ or scheduler/: it is the
reference the engine is compared against.
"""

from __future__ import annotations

import math

import numpy as np


def _inv_freq(cfg: dict) -> np.ndarray:
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    base = cfg.get("rope_theta", 10000.0)
    inv = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    scaling = cfg.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":  # transformers' _compute_llama3_parameters, element by element
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        out = []
        for f in inv:
            wavelen = 2 * math.pi / f
            if wavelen < old / high:
                out.append(f)
            elif wavelen > old / low:
                out.append(f / factor)
            else:
                smooth = (old / wavelen - low) / (high - low)
                out.append((1 - smooth) * f / factor + smooth * f)
        inv = np.array(out)
    return inv


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def reference_logits(config: dict, weights: dict[str, np.ndarray], token_ids: list[int]
                     ) -> np.ndarray:
    """Logits (L, vocab) for every position of token_ids."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    cfg = config
    n_heads = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_heads
    d = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
    eps = cfg.get("rms_norm_eps", 1e-6)
    qk_norm = cfg["model_type"] == "qwen3"
    L = len(token_ids)

    inv = _inv_freq(cfg)
    angles = np.outer(np.arange(L), inv)  # (L, d/2)
    emb = np.concatenate([angles, angles], axis=-1)
    cos, sin = np.cos(emb), np.sin(emb)
    mask = np.triu(np.full((L, L), -np.inf), k=1)

    x = w["model.embed_tokens.weight"][np.asarray(token_ids)]  # (L, E)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."

        def lin(h, name, p=p):
            y = h @ w[p + name + ".weight"].T
            bias = w.get(p + name + ".bias")
            return y if bias is None else y + bias

        h = _rms(x, w[p + "input_layernorm.weight"], eps)
        q = lin(h, "self_attn.q_proj").reshape(L, n_heads, d).transpose(1, 0, 2)
        k = lin(h, "self_attn.k_proj").reshape(L, n_kv, d).transpose(1, 0, 2)
        v = lin(h, "self_attn.v_proj").reshape(L, n_kv, d).transpose(1, 0, 2)
        if qk_norm:
            q = _rms(q, w[p + "self_attn.q_norm.weight"], eps)
            k = _rms(k, w[p + "self_attn.k_norm.weight"], eps)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        rep = n_heads // n_kv
        k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)  # HF repeat_kv
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(d) + mask
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        attn = (probs @ v).transpose(1, 0, 2).reshape(L, n_heads * d)
        x = x + lin(attn, "self_attn.o_proj")
        h = _rms(x, w[p + "post_attention_layernorm.weight"], eps)
        gate = lin(h, "mlp.gate_proj")
        x = x + lin(gate / (1 + np.exp(-gate)) * lin(h, "mlp.up_proj"), "mlp.down_proj")
    x = _rms(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else w["lm_head.weight"]
    return x @ head.T


def reference_greedy(config: dict, weights: dict[str, np.ndarray], prompt_ids: list[int],
                     n: int) -> list[int]:
    """n greedy tokens, recomputing the whole sequence each step."""
    ids = list(prompt_ids)
    for _ in range(n):
        ids.append(int(np.argmax(reference_logits(config, weights, ids)[-1])))
    return ids[len(prompt_ids):]
