"""Llama-family decoder: llama, mistral, qwen2 (q/k/v biases), qwen3 (q/k norms).

The block is written once, in batched form (models/base.py): the rows of every sequence of a
pass are stacked, the linear layers see them all, attention runs per sequence against its own
cache. Where the backend offers a fused block (kernels.backend.FusedBlock: numba kernels on
quantized weights, compiled MLX halves) and the weights suit it, the block goes through it.

Blocks take their weights as an argument for one call and keep no reference to them, so
evicting a unit from the cache frees its memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from stream_run.kernels.backend import Backend, DecodeBlock, FusedBlock, KVCache
from stream_run.loaders import EMBED, HEAD, Architecture, FormatError, ModelSpec, layer_key
from stream_run.models.base import Batch, DecoderModel, attend_rows, rope_rows
from stream_run.models.rope import (
    partial_rotary_factor,
    reject_per_layer_type,
    rope_parameters,
    scaling_type,
)

LINEARS = tuple(f"self_attn.{p}_proj" for p in "qkvo") + tuple(
    f"mlp.{p}_proj" for p in ("gate", "up", "down"))


class Model(DecoderModel):
    def __init__(self, spec: ModelSpec, ops: Backend) -> None:
        super().__init__(spec, ops)
        try:
            reject_per_layer_type(spec.config)
            prf = partial_rotary_factor(spec.config)
        except ValueError as exc:
            raise FormatError(f"model_type {spec.model_type!r}: {exc}") from None
        if prf != 1.0:  # the fused kernels and the yarn scale fold assume full rotary
            raise FormatError(f"model_type {spec.model_type!r}: partial rotary embeddings "
                              f"(partial_rotary_factor={prf}) are not supported for this "
                              "architecture")
        assert spec.head_dim is not None and spec.num_key_value_heads is not None
        self.n_heads = spec.num_attention_heads
        self.n_kv_heads = spec.num_key_value_heads
        self.head_dim = spec.head_dim
        kind = scaling_type(spec.rope_scaling)
        if kind in ("longrope", "su"):  # switches factor sets by length: see models/phi3.py
            raise FormatError(f"model_type {spec.model_type!r}: rope_scaling type {kind!r} is "
                              "not supported for this architecture")
        try:
            self.inv_freq, factor = rope_parameters(
                spec.head_dim, spec.rope_theta, spec.rope_scaling, spec.max_position_embeddings,
                original_max_position_embeddings=spec.config.get(
                    "original_max_position_embeddings"))
        except ValueError as exc:
            raise FormatError(f"model_type {spec.model_type!r}: {exc}") from None
        # yarn's attention factor scales cos and sin, so q.k by its square (full rotary here)
        self.scale = spec.head_dim**-0.5 * factor**2
        self.windows = self.layer_windows()
        # checked once: isinstance on a runtime Protocol costs ~3 us, ~6 % of a SmolLM2 token
        # if it ran per block
        self.fused = isinstance(ops, FusedBlock)
        self.decode_block = isinstance(ops, DecodeBlock)

    def layer_windows(self) -> list[int | None]:
        """HF's rules. mistral: sliding_window on every layer (None: full). qwen2/qwen3 with
        use_sliding_window: the layers layer_types marks "sliding_attention", by default those
        from max_window_layers (HF default 28) on. llama: full."""
        spec, n = self.spec, self.spec.num_hidden_layers
        if spec.model_type == "mistral":
            return [spec.sliding_window] * n
        if spec.model_type not in ("qwen2", "qwen3") or not spec.use_sliding_window \
                or spec.sliding_window is None:
            return [None] * n
        first = 28 if spec.max_window_layers is None else spec.max_window_layers
        types = spec.layer_types or ["sliding_attention" if i >= first else "full_attention"
                                     for i in range(n)]
        if len(types) != n:
            raise ValueError(f"config layer_types has {len(types)} entries for {n} layers; "
                             "hint: one per layer (sliding_attention | full_attention)")
        return [spec.sliding_window if t == "sliding_attention" else None for t in types]

    def pass_context(self, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        return rope_rows(self.inv_freq, batch.spans)  # the fused path's cos, sin per row

    def block(self, layer_idx: int, batch: Batch, ctx: Any, x: Any,
              units: Mapping[str, Any]) -> Any:
        ops, w, eps = self.ops, units[layer_key(layer_idx)], self.spec.rms_norm_eps
        if self._fuses(w, x.shape[1]):
            return self._fused_block(w, layer_idx, batch, ctx, x[0])[None]
        h = ops.rms_norm(x, w["input_layernorm.weight"], eps)
        q = ops.linear(h, w["self_attn.q_proj.weight"], w.get("self_attn.q_proj.bias"))
        k = ops.linear(h, w["self_attn.k_proj.weight"], w.get("self_attn.k_proj.bias"))
        v = ops.linear(h, w["self_attn.v_proj.weight"], w.get("self_attn.v_proj.bias"))

        def attend(kv: KVCache, offset: int, q: Any, k: Any, v: Any) -> Any:
            return self._attend(w, layer_idx, kv, offset, q, k, v)

        o = attend_rows(ops, batch, attend, q, k, v, axis=1)  # (1, T, H*D)
        x = ops.add(x, ops.linear(o, w["self_attn.o_proj.weight"], w.get("self_attn.o_proj.bias")))
        h = ops.rms_norm(x, w["post_attention_layernorm.weight"], eps)
        gate = ops.linear(h, w["mlp.gate_proj.weight"])
        up = ops.linear(h, w["mlp.up_proj.weight"])
        return ops.add(x, ops.linear(ops.silu_mul(gate, up), w["mlp.down_proj.weight"]))

    def _attend(self, w: Mapping[str, Any], layer_idx: int, kv: KVCache, offset: int, q: Any,
                k: Any, v: Any) -> Any:
        """One sequence's attention: q (1, L, H*D), k, v (1, L, Hkv*D) -> (1, L, H*D)."""
        ops, eps = self.ops, self.spec.rms_norm_eps
        L = q.shape[1]
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q = ops.transpose(ops.reshape(q, (1, L, H, D)), (0, 2, 1, 3))  # (1, H, L, D)
        k = ops.transpose(ops.reshape(k, (1, L, Hkv, D)), (0, 2, 1, 3))  # (1, Hkv, L, D)
        v = ops.transpose(ops.reshape(v, (1, L, Hkv, D)), (0, 2, 1, 3))
        if "self_attn.q_norm.weight" in w:  # qwen3
            q = ops.rms_norm(q, w["self_attn.q_norm.weight"], eps)
            k = ops.rms_norm(k, w["self_attn.k_norm.weight"], eps)
        q = ops.rope(q, offset, self.inv_freq)
        k = ops.rope(k, offset, self.inv_freq)
        keys, values = kv.update(layer_idx, k, v)  # a sliding layer: the window's keys only
        o = ops.attention(q, keys, values, self.scale, keys.shape[2] - L,
                          self.windows[layer_idx])  # (1, H, L, D)
        return ops.reshape(ops.transpose(o, (0, 2, 1, 3)), (1, L, H * D))

    def _fuses(self, w: Mapping[str, Any], n_rows: int) -> bool:
        """The backend's fused block applies (numpy: numba kernels for quantized linears on few
        rows; MLX: compiled halves on few rows)."""
        return self.fused and self.ops.fuses(  # type: ignore[attr-defined]
            [w[f"{n}.weight"] for n in LINEARS], n_rows)

    def _fused_block(self, w: Mapping[str, Any], layer_idx: int, batch: Batch,
                     rope: tuple[np.ndarray, np.ndarray], x: Any) -> Any:
        """The block on x (T, E) in two fused calls plus one attention call per sequence, or
        in one call where the backend has it (DecodeBlock: one sequence)."""
        ops, eps = self.ops, self.spec.rms_norm_eps
        attn_in = (x, w["input_layernorm.weight"], eps,
                   [w[f"self_attn.{p}_proj.weight"] for p in "qkv"],
                   [w.get(f"self_attn.{p}_proj.bias") for p in "qkv"],
                   [w.get("self_attn.q_norm.weight"), w.get("self_attn.k_norm.weight")],
                   *rope, self.n_heads, self.n_kv_heads)
        out_args = (w["self_attn.o_proj.weight"], w.get("self_attn.o_proj.bias"),
                    w["post_attention_layernorm.weight"])
        mlp = [w[f"mlp.{p}_proj.weight"] for p in ("gate", "up", "down")]
        if len(batch.seqs) == 1 and self.decode_block:
            return ops.block_decode(*attn_in, batch.seqs[0].kv, layer_idx, self.scale,
                                    *out_args, mlp)
        q, k, v = ops.block_attention_input(*attn_in)  # (T, H, D), (T, Hkv, D) x2

        def attend(kv: KVCache, _offset: int, q: Any, k: Any, v: Any) -> Any:
            return kv.attend(layer_idx, q, k, v, self.scale)  # (n, H * D)

        attn = attend_rows(ops, batch, attend, q, k, v, axis=0)
        wo, bo, post_norm = out_args
        return ops.block_output(x, attn, wo, bo, post_norm, eps, mlp)


# -- what the loaders need: tensor names and shapes -------------------------------------------
BLOCK = "layers.{bid}"

# GGUF tensor name -> (unit, HF name inside the unit), gguf-py style with {bid}.
GGUF_NAMES: dict[str, tuple[str, str]] = {
    "token_embd.weight": (EMBED, "embed_tokens.weight"),
    "blk.{bid}.attn_norm.weight": (BLOCK, "input_layernorm.weight"),
    "blk.{bid}.attn_q.weight": (BLOCK, "self_attn.q_proj.weight"),
    "blk.{bid}.attn_k.weight": (BLOCK, "self_attn.k_proj.weight"),
    "blk.{bid}.attn_v.weight": (BLOCK, "self_attn.v_proj.weight"),
    "blk.{bid}.attn_output.weight": (BLOCK, "self_attn.o_proj.weight"),
    "blk.{bid}.attn_q.bias": (BLOCK, "self_attn.q_proj.bias"),
    "blk.{bid}.attn_k.bias": (BLOCK, "self_attn.k_proj.bias"),
    "blk.{bid}.attn_v.bias": (BLOCK, "self_attn.v_proj.bias"),
    "blk.{bid}.attn_output.bias": (BLOCK, "self_attn.o_proj.bias"),
    "blk.{bid}.attn_q_norm.weight": (BLOCK, "self_attn.q_norm.weight"),
    "blk.{bid}.attn_k_norm.weight": (BLOCK, "self_attn.k_norm.weight"),
    "blk.{bid}.ffn_norm.weight": (BLOCK, "post_attention_layernorm.weight"),
    "blk.{bid}.ffn_gate.weight": (BLOCK, "mlp.gate_proj.weight"),
    "blk.{bid}.ffn_up.weight": (BLOCK, "mlp.up_proj.weight"),
    "blk.{bid}.ffn_down.weight": (BLOCK, "mlp.down_proj.weight"),
    "output_norm.weight": (HEAD, "norm.weight"),
    "output.weight": (HEAD, "lm_head.weight"),
}

# general.architecture -> HF model_type
ARCH_TO_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

# llama.cpp's llama converter permuted these rows for ggml's interleaved RoPE (Mistral too,
# which it writes as "llama"); its qwen2/qwen3 converters do not.
GGUF_PERMUTED = {"self_attn.q_proj.weight": "q", "self_attn.q_proj.bias": "q",
                 "self_attn.k_proj.weight": "k", "self_attn.k_proj.bias": "k"}


def expected_shapes(spec: ModelSpec) -> dict[str, dict[str, tuple[int, ...]]]:
    """Logical (unquantized) shape of every tensor, per unit key."""
    E, I, V = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    D = spec.head_dim
    assert D is not None and spec.num_key_value_heads is not None
    q_out, kv_out = spec.num_attention_heads * D, spec.num_key_value_heads * D
    block: dict[str, tuple[int, ...]] = {
        "input_layernorm.weight": (E,),
        "post_attention_layernorm.weight": (E,),
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
                      "self_attn.v_proj.bias": (kv_out,)})
        if spec.model_type == "llama":
            block["self_attn.o_proj.bias"] = (E,)
    if spec.model_type == "qwen3":
        block.update({"self_attn.q_norm.weight": (D,), "self_attn.k_norm.weight": (D,)})
    units = {EMBED: {"embed_tokens.weight": (V, E)}}
    for i in range(spec.num_hidden_layers):
        units[layer_key(i)] = dict(block)
    units[HEAD] = {"norm.weight": (E,)}
    if not spec.tie_word_embeddings:
        units[HEAD]["lm_head.weight"] = (V, E)
    return units


def architecture(model_type: str) -> Architecture:
    return Architecture(
        model_type, expected_shapes, GGUF_NAMES,
        gguf_permuted=GGUF_PERMUTED if model_type in ("llama", "mistral") else {},
        config_overrides={"attention_bias": True} if model_type == "qwen2" else {},
    )
