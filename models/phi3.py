"""Phi-3 (phi3): one fused q|k|v projection, one fused gate|up projection, partial rotary
embeddings, and longrope scaling (Phi-3 128k and later).

The fused weights stay fused: one matmul each, split after (a quantized fused weight splits
only by whole rows, so keeping it whole also keeps GGUF and packed files as they are). The
backend's fused-block kernels expect separate q/k/v and gate/up weights, so Phi-3 blocks run
on the plain ops.

longrope: HF picks the long factors for a forward call whose last position is past
original_max_position_embeddings, the short ones otherwise; keys already cached keep the
rotation they were stored with. The engine chooses per sequence per pass, the same rule, and
matches a loop of HF forward calls. HF's generate() differs once: when a sequence crosses the
original length it drops its cache and recomputes every key with the long factors; the engine
does not re-read the prompt for that.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from stream_run.kernels.backend import Backend, KVCache
from stream_run.loaders import EMBED, HEAD, Architecture, FormatError, ModelSpec, layer_key
from stream_run.models.base import Batch, DecoderModel, attend_rows
from stream_run.models.rope import (
    partial_rotary_factor,
    reject_per_layer_type,
    rope_parameters,
    scaling_type,
)


class Model(DecoderModel):
    def __init__(self, spec: ModelSpec, ops: Backend) -> None:
        super().__init__(spec, ops)
        assert spec.head_dim is not None and spec.num_key_value_heads is not None
        self.n_heads, self.n_kv_heads = spec.num_attention_heads, spec.num_key_value_heads
        self.head_dim = D = spec.head_dim
        self.scale = D**-0.5
        scaling = dict(spec.rope_scaling or {})
        longrope = scaling_type(scaling) in ("longrope", "su", "yarn")
        if longrope:  # HF's Phi3Config reads "su" and "yarn" as longrope too
            scaling["rope_type"] = "longrope"
        # one original length for the factors and for the switch between them: top level
        # (Phi-3's config.json), else inside rope_scaling, else max_position_embeddings
        orig = spec.config.get("original_max_position_embeddings") or scaling.get(
            "original_max_position_embeddings") or spec.max_position_embeddings
        try:
            reject_per_layer_type(spec.config)
            prf = partial_rotary_factor(spec.config)
            args = (D, spec.rope_theta, scaling or None, spec.max_position_embeddings, prf)
            self.inv_freq, self.rope_factor = rope_parameters(
                *args, original_max_position_embeddings=orig)
            long, _ = rope_parameters(*args, seq_len=orig + 1,
                                      original_max_position_embeddings=orig)
        except ValueError as exc:
            raise FormatError(f"phi3: {exc}") from None
        self.rotary_dim = int(D * prf)
        self.long_after = orig if longrope else None
        self.inv_freq_long = long
        self.windows = self.layer_windows()

    def layer_windows(self) -> list[int | None]:
        """sliding_window on every layer when set (Phi-3 mini 4k: 2047), as HF applies it."""
        return [self.spec.sliding_window] * self.spec.num_hidden_layers

    def reuses_prefix(self, cached: int, prompt: int) -> bool:
        """longrope: a fresh prompt past the original length rotates every key with the long
        factors, while keys cached from shorter passes kept the short ones (and the other way
        round): reuse only when the cached passes and the prompt all stay short."""
        return not self.long_after or max(cached, prompt) <= self.long_after

    def verify_rows(self, offset: int, n: int) -> int:
        """A verification pass may not cross long_after: its rows would all take the long
        factors, where decoding them one by one takes the short ones below it."""
        if self.long_after and offset < self.long_after < offset + n:
            return self.long_after - offset
        return n

    def pass_context(self, batch: Batch) -> dict[int, np.ndarray]:
        """Each sequence's inverse frequencies for this pass (short or long factors), by the
        end of the span its rows stand for: a prompt chunk as the whole prompt (one HF call)."""
        batch.spans  # noqa: B018  (offsets as the pass starts)
        return {id(s.kv): self.inv_freq_long if self.long_after and s.end > self.long_after
                else self.inv_freq for s in batch.seqs}

    def block(self, layer_idx: int, batch: Batch, ctx: dict[int, np.ndarray], x: Any,
              units: Mapping[str, Any]) -> Any:
        ops, w, eps = self.ops, units[layer_key(layer_idx)], self.spec.rms_norm_eps
        qd, kd = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        h = ops.rms_norm(x, w["input_layernorm.weight"], eps)
        qkv = ops.linear(h, w["self_attn.qkv_proj.weight"])  # (1, T, qd + 2 kd)

        def attend(kv: KVCache, offset: int, q: Any, k: Any, v: Any) -> Any:
            return self._attend(layer_idx, kv, offset, ctx[id(kv)], q, k, v)

        o = attend_rows(ops, batch, attend, qkv[..., :qd], qkv[..., qd:qd + kd],
                        qkv[..., qd + kd:], axis=1)
        x = ops.add(x, ops.linear(o, w["self_attn.o_proj.weight"]))
        h = ops.rms_norm(x, w["post_attention_layernorm.weight"], eps)
        gate_up = ops.linear(h, w["mlp.gate_up_proj.weight"])  # (1, T, 2 I)
        n = gate_up.shape[-1] // 2
        return ops.add(x, ops.linear(ops.silu_mul(gate_up[..., :n], gate_up[..., n:]),
                                     w["mlp.down_proj.weight"]))

    def _attend(self, layer_idx: int, kv: KVCache, offset: int, inv_freq: np.ndarray, q: Any,
                k: Any, v: Any) -> Any:
        """One sequence's attention: q (1, L, H*D), k, v (1, L, Hkv*D) -> (1, L, H*D)."""
        ops, L = self.ops, q.shape[1]
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q = ops.transpose(ops.reshape(q, (1, L, H, D)), (0, 2, 1, 3))  # (1, H, L, D)
        k = ops.transpose(ops.reshape(k, (1, L, Hkv, D)), (0, 2, 1, 3))  # (1, Hkv, L, D)
        v = ops.transpose(ops.reshape(v, (1, L, Hkv, D)), (0, 2, 1, 3))
        q, k = self._rope(q, offset, inv_freq), self._rope(k, offset, inv_freq)
        keys, values = kv.update(layer_idx, k, v)  # a sliding layer: the window's keys only
        o = ops.attention(q, keys, values, self.scale, keys.shape[2] - L,
                          self.windows[layer_idx])  # (1, H, L, D)
        return ops.reshape(ops.transpose(o, (0, 2, 1, 3)), (1, L, H * D))

    def _rope(self, x: Any, offset: int, inv_freq: np.ndarray) -> Any:
        """RoPE on the first rotary_dim dims of each head; longrope's attention factor scales
        the rotated part only (HF scales cos and sin)."""
        ops, rd = self.ops, self.rotary_dim
        if rd == self.head_dim:
            out = ops.rope(x, offset, inv_freq)
            return out if self.rope_factor == 1.0 else out * self.rope_factor
        rot = ops.rope(x[..., :rd], offset, inv_freq)
        if self.rope_factor != 1.0:
            rot = rot * self.rope_factor
        return ops.concatenate([rot, x[..., rd:]], axis=-1)


# -- what the loaders need: tensor names and shapes -------------------------------------------
BLOCK = "layers.{bid}"

GGUF_NAMES: dict[str, tuple[str, str]] = {
    "token_embd.weight": (EMBED, "embed_tokens.weight"),
    "blk.{bid}.attn_norm.weight": (BLOCK, "input_layernorm.weight"),
    "blk.{bid}.attn_qkv.weight": (BLOCK, "self_attn.qkv_proj.weight"),
    "blk.{bid}.attn_output.weight": (BLOCK, "self_attn.o_proj.weight"),
    "blk.{bid}.ffn_norm.weight": (BLOCK, "post_attention_layernorm.weight"),
    "blk.{bid}.ffn_up.weight": (BLOCK, "mlp.gate_up_proj.weight"),  # llama.cpp: gate|up fused
    "blk.{bid}.ffn_down.weight": (BLOCK, "mlp.down_proj.weight"),
    "output_norm.weight": (HEAD, "norm.weight"),
    "output.weight": (HEAD, "lm_head.weight"),
}


def expected_shapes(spec: ModelSpec) -> dict[str, dict[str, tuple[int, ...]]]:
    E, I, V = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    D = spec.head_dim
    assert D is not None and spec.num_key_value_heads is not None
    q_out, kv_out = spec.num_attention_heads * D, spec.num_key_value_heads * D
    block = {
        "input_layernorm.weight": (E,),
        "post_attention_layernorm.weight": (E,),
        "self_attn.qkv_proj.weight": (q_out + 2 * kv_out, E),
        "self_attn.o_proj.weight": (E, q_out),
        "mlp.gate_up_proj.weight": (2 * I, E),
        "mlp.down_proj.weight": (E, I),
    }
    units: dict[str, dict[str, tuple[int, ...]]] = {EMBED: {"embed_tokens.weight": (V, E)}}
    for i in range(spec.num_hidden_layers):
        units[layer_key(i)] = dict(block)
    units[HEAD] = {"norm.weight": (E,)}
    if not spec.tie_word_embeddings:
        units[HEAD]["lm_head.weight"] = (V, E)
    return units


def architecture(model_type: str) -> Architecture:
    return Architecture(model_type, expected_shapes, GGUF_NAMES)
