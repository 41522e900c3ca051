"""Gemma 2 (gemma2) and Gemma 3 text (gemma3_text; gemma3: the text model of the multimodal
checkpoints). One file: the two differ only in Gemma 3's q/k norms, its RoPE base per layer
kind, Gemma 2's attention soft-capping (HF's Gemma 3 reads attn_logit_softcapping but never
applies it) and their defaults.

Both: sliding (local) layers interleaved with global ones, attention scaled by
query_pre_attn_scalar**-0.5, four norms per block (input, post-attention, pre- and post-feed-
forward), (1 + w) RMSNorm weights, a GELU-tanh gated MLP, embeddings times sqrt(hidden_size),
a tied head, and soft-capping of the attention and final logits where the config sets them.

Norm weights: an HF checkpoint stores w and the norm multiplies by 1 + w; llama.cpp's
converter stores w + 1. The GGUF hook (gguf_config) records that as norm_weight_offset = 0.0
in the config (1.0 otherwise), so the weights are used as stored and the key survives
stream-convert. The blocks run on the plain ops, not the backend's fused (SwiGLU) kernels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from stream_run.kernels.backend import Backend, KVCache
from stream_run.loaders import EMBED, HEAD, Architecture, FormatError, ModelSpec, layer_key
from stream_run.models.base import Batch, DecoderModel, attend_rows
from stream_run.models.rope import rope_parameters

SLIDING, FULL = "sliding_attention", "full_attention"
_COMMON = {"vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216,
           "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
           "head_dim": 256, "rms_norm_eps": 1e-6, "bos_token_id": 2, "eos_token_id": 1,
           "tie_word_embeddings": True, "query_pre_attn_scalar": 256, "sliding_window": 4096,
           "hidden_activation": "gelu_pytorch_tanh"}
# HF's config class defaults (Gemma2Config, Gemma3TextConfig): a sparse config.json (Gemma 3's
# multimodal text_config) relies on them
DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma2": {**_COMMON, "max_position_embeddings": 8192, "rope_theta": 10000.0,
               "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    "gemma3_text": {**_COMMON, "vocab_size": 262208, "max_position_embeddings": 131072,
                    "rope_theta": 1_000_000.0, "rope_local_base_freq": 10000.0,
                    "sliding_window_pattern": 6, "attn_logit_softcapping": None,
                    "final_logit_softcapping": None},
}
DEFAULTS["gemma3"] = DEFAULTS["gemma3_text"]
# llama.cpp's LLM_TYPE_27B (by block count) scales attention by (hidden / heads)**-0.5
_GGUF_27B_LAYERS = {"gemma2": 46, "gemma3_text": 62}


def config(spec: ModelSpec) -> dict[str, Any]:
    return {**DEFAULTS[spec.model_type], **spec.config}


class Model(DecoderModel):
    def __init__(self, spec: ModelSpec, ops: Backend) -> None:
        super().__init__(spec, ops)
        cfg = config(spec)
        if cfg.get("use_bidirectional_attention"):
            raise FormatError(f"model_type {spec.model_type!r}: use_bidirectional_attention "
                              "(an embedding model) is not supported; hint: a causal LM only")
        if cfg.get("hidden_activation") != "gelu_pytorch_tanh":
            raise FormatError(f"model_type {spec.model_type!r}: hidden_activation "
                              f"{cfg.get('hidden_activation')!r} is not supported; expected "
                              "'gelu_pytorch_tanh'")
        assert spec.head_dim is not None and spec.num_key_value_heads is not None
        self.n_heads, self.n_kv_heads = spec.num_attention_heads, spec.num_key_value_heads
        self.head_dim = spec.head_dim
        self.norm_offset = float(cfg.get("norm_weight_offset", 1.0))
        self.embed_scale = embed_scale(spec.hidden_size, cfg.get("dtype")
                                       or cfg.get("torch_dtype"))
        # as HF: Gemma 3's attention ignores attn_logit_softcapping, and its multimodal class
        # (gemma3) does not soft-cap the final logits either
        gemma2 = spec.model_type == "gemma2"
        self.attn_cap = cfg.get("attn_logit_softcapping") if gemma2 else None
        self.final_cap = cfg.get("final_logit_softcapping") if spec.model_type != "gemma3" \
            else None
        self.kinds = layer_kinds(cfg, spec.num_hidden_layers, spec.model_type)
        window = cfg.get("sliding_window")
        self.windows = [window if kind == SLIDING else None for kind in self.kinds]
        base = float(cfg["query_pre_attn_scalar"]) ** -0.5
        rope = {}
        for kind, params in rope_by_kind(spec, cfg).items():
            try:
                inv_freq, factor = rope_parameters(self.head_dim, params["rope_theta"], params,
                                                   spec.max_position_embeddings)
            except (ValueError, KeyError) as exc:
                raise FormatError(f"model_type {spec.model_type!r}: {kind} RoPE: {exc}") from None
            # an attention factor (yarn) scales cos and sin, so q.k by its square
            rope[kind] = (inv_freq, base * factor**2)
        self.rope = [rope[kind] for kind in self.kinds]

    def layer_windows(self) -> list[int | None]:
        return self.windows

    def embed(self, batch: Batch, w: Mapping[str, Any]) -> Any:
        return self.ops.embed(w["embed_tokens.weight"], batch.ids[None, :]) * self.embed_scale

    def block(self, layer_idx: int, batch: Batch, ctx: Any, x: Any,
              units: Mapping[str, Any]) -> Any:
        ops, w = self.ops, units[layer_key(layer_idx)]
        h = self._norm(x, w["input_layernorm.weight"])
        q, k, v = (ops.linear(h, w[f"self_attn.{p}_proj.weight"], w.get(f"self_attn.{p}_proj.bias"))
                   for p in "qkv")

        def attend(kv: KVCache, offset: int, q: Any, k: Any, v: Any) -> Any:
            return self._attend(w, layer_idx, kv, offset, q, k, v)

        o = attend_rows(ops, batch, attend, q, k, v, axis=1)  # (1, T, H*D)
        o = ops.linear(o, w["self_attn.o_proj.weight"], w.get("self_attn.o_proj.bias"))
        x = ops.add(x, self._norm(o, w["post_attention_layernorm.weight"]))
        h = self._norm(x, w["pre_feedforward_layernorm.weight"])
        h = ops.gelu_tanh_mul(ops.linear(h, w["mlp.gate_proj.weight"]),
                              ops.linear(h, w["mlp.up_proj.weight"]))
        h = ops.linear(h, w["mlp.down_proj.weight"])
        return ops.add(x, self._norm(h, w["post_feedforward_layernorm.weight"]))

    def _attend(self, w: Mapping[str, Any], layer_idx: int, kv: KVCache, offset: int, q: Any,
                k: Any, v: Any) -> Any:
        """One sequence's attention: q (1, L, H*D), k, v (1, L, Hkv*D) -> (1, L, H*D)."""
        ops, L = self.ops, q.shape[1]
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q = ops.transpose(ops.reshape(q, (1, L, H, D)), (0, 2, 1, 3))  # (1, H, L, D)
        k = ops.transpose(ops.reshape(k, (1, L, Hkv, D)), (0, 2, 1, 3))  # (1, Hkv, L, D)
        v = ops.transpose(ops.reshape(v, (1, L, Hkv, D)), (0, 2, 1, 3))
        if "self_attn.q_norm.weight" in w:  # gemma3
            q = self._norm(q, w["self_attn.q_norm.weight"])
            k = self._norm(k, w["self_attn.k_norm.weight"])
        inv_freq, scale = self.rope[layer_idx]
        q, k = ops.rope(q, offset, inv_freq), ops.rope(k, offset, inv_freq)
        keys, values = kv.update(layer_idx, k, v)  # a sliding layer: the window's keys only
        o = ops.attention(q, keys, values, scale, keys.shape[2] - L, self.windows[layer_idx],
                          self.attn_cap)  # (1, H, L, D)
        return ops.reshape(ops.transpose(o, (0, 2, 1, 3)), (1, L, H * D))

    def _norm(self, x: Any, weight: Any) -> Any:
        """Gemma's RMSNorm: x / rms(x) * (offset + w), in float32 as HF computes it."""
        w = weight + self.norm_offset if self.norm_offset else weight
        return self.ops.rms_norm(x, w, self.spec.rms_norm_eps)

    def final_norm(self, h: Any, w: Mapping[str, Any]) -> Any:
        return self._norm(h, w["norm.weight"])

    def head(self, h: Any, units: Mapping[str, Any]) -> Any:
        logits = super().head(h, units)
        return logits if self.final_cap is None else self.ops.softcap(logits, self.final_cap)


def embed_scale(hidden_size: int, dtype: Any) -> float:
    """sqrt(hidden_size) as HF applies it: a float32 tensor cast to the model's dtype (a
    bfloat16 checkpoint scales by the bfloat16 value, e.g. sqrt(2560) -> 50.5)."""
    scale = np.float32(math.sqrt(hidden_size))
    if dtype == "float16":
        return float(np.float16(scale))
    if dtype == "bfloat16":  # round to nearest even on the top 16 bits, as torch does
        bits = int(scale.view(np.uint32))
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return float(np.uint32(bits).view(np.float32))
    return float(scale)


def layer_kinds(cfg: dict[str, Any], n: int, model_type: str) -> list[str]:
    """Each layer's kind: layer_types, else HF's pattern (gemma2: every 2nd layer global;
    gemma3: every sliding_window_pattern-th)."""
    kinds = cfg.get("layer_types")
    if kinds is None:
        every = 2 if model_type == "gemma2" else int(cfg["sliding_window_pattern"])
        kinds = [SLIDING if (i + 1) % every else FULL for i in range(n)]
    if len(kinds) != n or set(kinds) - {SLIDING, FULL}:
        raise FormatError(f"model_type {model_type!r}: layer_types {kinds!r} is not one of "
                          f"{SLIDING!r} / {FULL!r} for each of the {n} layers")
    return list(kinds)


def rope_by_kind(spec: ModelSpec, cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each layer kind's rope dict, as transformers 5 builds rope_parameters: per kind when the
    config has them; else (gemma3) rope_theta and rope_scaling for global layers and
    rope_local_base_freq for local ones; gemma2 one set for both."""
    params = spec.config.get("rope_parameters")
    if isinstance(params, dict) and FULL in params:
        return {kind: dict(params.get(kind) or {"rope_type": "default"})
                for kind in (SLIDING, FULL)}
    # spec.rope_theta reads either spelling; without one, the family's default (gemma3: 1e6)
    theta = spec.rope_theta if "rope_theta" in spec.config or params else cfg["rope_theta"]
    full = {**(spec.rope_scaling or {"rope_type": "default"}), "rope_theta": theta}
    if spec.model_type == "gemma2":
        return {SLIDING: full, FULL: full}
    return {SLIDING: {"rope_type": "default", "rope_theta": cfg["rope_local_base_freq"]},
            FULL: full}


# -- what the loaders need: tensor names and shapes -------------------------------------------
BLOCK = "layers.{bid}"

GGUF_NAMES: dict[str, tuple[str, str]] = {
    "token_embd.weight": (EMBED, "embed_tokens.weight"),
    "blk.{bid}.attn_norm.weight": (BLOCK, "input_layernorm.weight"),
    **{f"blk.{{bid}}.attn_{g}.{kind}": (BLOCK, f"self_attn.{p}_proj.{kind}")
       for g, p in (("q", "q"), ("k", "k"), ("v", "v"), ("output", "o"))
       for kind in ("weight", "bias")},
    "blk.{bid}.attn_q_norm.weight": (BLOCK, "self_attn.q_norm.weight"),
    "blk.{bid}.attn_k_norm.weight": (BLOCK, "self_attn.k_norm.weight"),
    "blk.{bid}.post_attention_norm.weight": (BLOCK, "post_attention_layernorm.weight"),
    "blk.{bid}.ffn_norm.weight": (BLOCK, "pre_feedforward_layernorm.weight"),
    "blk.{bid}.ffn_gate.weight": (BLOCK, "mlp.gate_proj.weight"),
    "blk.{bid}.ffn_up.weight": (BLOCK, "mlp.up_proj.weight"),
    "blk.{bid}.ffn_down.weight": (BLOCK, "mlp.down_proj.weight"),
    "blk.{bid}.post_ffw_norm.weight": (BLOCK, "post_feedforward_layernorm.weight"),
    "output_norm.weight": (HEAD, "norm.weight"),
    "output.weight": (HEAD, "lm_head.weight"),
}


def expected_shapes(spec: ModelSpec) -> dict[str, dict[str, tuple[int, ...]]]:
    E, I, V = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    D = spec.head_dim
    assert D is not None and spec.num_key_value_heads is not None
    q_out, kv_out = spec.num_attention_heads * D, spec.num_key_value_heads * D
    block: dict[str, tuple[int, ...]] = {
        **{f"{n}.weight": (E,) for n in ("input_layernorm", "post_attention_layernorm",
                                         "pre_feedforward_layernorm",
                                         "post_feedforward_layernorm")},
        "self_attn.q_proj.weight": (q_out, E),
        "self_attn.k_proj.weight": (kv_out, E),
        "self_attn.v_proj.weight": (kv_out, E),
        "self_attn.o_proj.weight": (E, q_out),
        "mlp.gate_proj.weight": (I, E),
        "mlp.up_proj.weight": (I, E),
        "mlp.down_proj.weight": (E, I),
    }
    if spec.attention_bias:
        block.update({"self_attn.q_proj.bias": (q_out,), "self_attn.k_proj.bias": (kv_out,),
                      "self_attn.v_proj.bias": (kv_out,), "self_attn.o_proj.bias": (E,)})
    if spec.model_type != "gemma2":
        block.update({"self_attn.q_norm.weight": (D,), "self_attn.k_norm.weight": (D,)})
    units: dict[str, dict[str, tuple[int, ...]]] = {EMBED: {"embed_tokens.weight": (V, E)}}
    for i in range(spec.num_hidden_layers):
        units[layer_key(i)] = dict(block)
    units[HEAD] = {"norm.weight": (E,)}
    if not spec.tie_word_embeddings:
        units[HEAD]["lm_head.weight"] = (V, E)
    return units


def hf_config(model_type: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """config.json -> the text model's flat config: gemma3's text_config un-nested (the outer
    fields fill what it lacks), HF's class defaults under all."""
    if model_type == "gemma3":
        text = cfg.get("text_config")
        if not isinstance(text, dict):
            raise ValueError(f"field 'text_config' must be an object, got {text!r}; hint: a "
                             "Gemma 3 multimodal config nests the text model's config there")
        outer = {k: v for k, v in cfg.items() if k not in ("text_config", "vision_config")}
        cfg = {**outer, **text, "model_type": model_type}
    return {**DEFAULTS[model_type], **cfg}


def gguf_config(model_type: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """What llama.cpp implies for a Gemma GGUF: norm weights stored with the +1 added, the
    attention scale it picks by model size, embeddings scaled in float32, no sliding window
    on gemma3 without the key (gemma2: 4096), HF's defaults for the rest."""
    E, H = cfg["hidden_size"], cfg["num_attention_heads"]
    D = cfg.get("head_dim") or E // H
    big = cfg["num_hidden_layers"] == _GGUF_27B_LAYERS[model_type]
    no_window = {} if model_type == "gemma2" else {"sliding_window": None}
    return {**DEFAULTS[model_type], **no_window, **cfg, "norm_weight_offset": 0.0,
            "query_pre_attn_scalar": E // H if big else D, "dtype": "float32"}


def architecture(model_type: str) -> Architecture:
    def from_hf(cfg: dict[str, Any]) -> dict[str, Any]:
        return hf_config(model_type, cfg)

    def from_gguf(cfg: dict[str, Any]) -> dict[str, Any]:
        return gguf_config(model_type, cfg)

    return Architecture(
        model_type, expected_shapes, GGUF_NAMES, hf_config=from_hf, gguf_config=from_gguf,
        hf_prefixes=("language_model.", "") if model_type == "gemma3" else ("",))
