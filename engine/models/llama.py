"""Llama-family decoder (llama, mistral, qwen2 with qkv bias, qwen3 with q/k norm), written
once against the kernels ops and split into scheduler steps: embed, one per block, head.

Blocks take their weights as an argument for one call and keep no reference to them, so
evicting a unit from the cache frees its memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from engine.models.rope import inv_freq
from kernels.backend import Backend, KVCache
from loaders import EMBED, HEAD, ModelSpec, layer_key
from scheduler import Step


@dataclass
class ForwardState:
    """What flows through one forward pass: token ids in, hidden state, logits out."""

    ids: np.ndarray  # (B, L) int
    kv: KVCache
    all_logits: bool = False  # False: logits of the last position only
    h: Any = None  # (B, L, E)
    logits: np.ndarray | None = None  # (B, L or 1, V) float32


class Model:
    def __init__(self, spec: ModelSpec, ops: Backend) -> None:
        self.spec = spec
        self.ops = ops
        assert spec.head_dim is not None and spec.num_key_value_heads is not None
        self.n_heads = spec.num_attention_heads
        self.n_kv_heads = spec.num_key_value_heads
        self.head_dim = spec.head_dim
        self.scale = spec.head_dim**-0.5
        self.inv_freq = inv_freq(spec.head_dim, spec.rope_theta, spec.rope_scaling)

    def make_kv_cache(self, batch: int, max_len: int) -> KVCache:
        return self.ops.make_kv_cache(
            self.spec.num_hidden_layers, batch, self.n_kv_heads, self.head_dim, max_len
        )

    def steps(self, st: ForwardState) -> list[Step]:
        head_units = (HEAD,) if not self.spec.tie_word_embeddings else (HEAD, EMBED)
        return [
            Step((EMBED,), partial(self._embed, st), "embed"),
            *(Step((layer_key(i),), partial(self._block, st, i), layer_key(i))
              for i in range(self.spec.num_hidden_layers)),
            Step(head_units, partial(self._head, st), "head"),
        ]

    def _embed(self, st: ForwardState, w: Mapping[str, Any]) -> None:
        st.h = self.ops.embed(w[EMBED]["embed_tokens.weight"], st.ids)

    def _block(self, st: ForwardState, layer_idx: int, units: Mapping[str, Any]) -> None:
        ops, w = self.ops, units[layer_key(layer_idx)]
        x = st.h
        B, L = st.ids.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        offset = st.kv.offset
        h = ops.rms_norm(x, w["input_layernorm.weight"], self.spec.rms_norm_eps)
        q = ops.linear(h, w["self_attn.q_proj.weight"], w.get("self_attn.q_proj.bias"))
        k = ops.linear(h, w["self_attn.k_proj.weight"], w.get("self_attn.k_proj.bias"))
        v = ops.linear(h, w["self_attn.v_proj.weight"], w.get("self_attn.v_proj.bias"))
        q = ops.transpose(ops.reshape(q, (B, L, H, D)), (0, 2, 1, 3))  # (B, H, L, D)
        k = ops.transpose(ops.reshape(k, (B, L, Hkv, D)), (0, 2, 1, 3))  # (B, Hkv, L, D)
        v = ops.transpose(ops.reshape(v, (B, L, Hkv, D)), (0, 2, 1, 3))
        if self.spec.qk_norm:
            q = ops.rms_norm(q, w["self_attn.q_norm.weight"], self.spec.rms_norm_eps)
            k = ops.rms_norm(k, w["self_attn.k_norm.weight"], self.spec.rms_norm_eps)
        q = ops.rope(q, offset, self.inv_freq)
        k = ops.rope(k, offset, self.inv_freq)
        keys, values = st.kv.update(layer_idx, k, v)
        o = ops.attention(q, keys, values, self.scale, offset)  # (B, H, L, D)
        o = ops.reshape(ops.transpose(o, (0, 2, 1, 3)), (B, L, H * D))
        x = ops.add(x, ops.linear(o, w["self_attn.o_proj.weight"], w.get("self_attn.o_proj.bias")))
        h = ops.rms_norm(x, w["post_attention_layernorm.weight"], self.spec.rms_norm_eps)
        gate = ops.linear(h, w["mlp.gate_proj.weight"])
        up = ops.linear(h, w["mlp.up_proj.weight"])
        st.h = ops.add(x, ops.linear(ops.silu_mul(gate, up), w["mlp.down_proj.weight"]))

    def _head(self, st: ForwardState, units: Mapping[str, Any]) -> None:
        ops, w = self.ops, units[HEAD]
        h = st.h if st.all_logits else st.h[:, -1:, :]
        h = ops.rms_norm(h, w["norm.weight"], self.spec.rms_norm_eps)
        table = units[EMBED]["embed_tokens.weight"] if self.spec.tie_word_embeddings \
            else w["lm_head.weight"]
        st.logits = ops.to_numpy(ops.linear(h, table))
        st.kv.advance(st.ids.shape[1])
        st.h = None
