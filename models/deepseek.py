"""DeepSeek-V3 (deepseek_v3: DeepSeek-V3/R1, Kimi K2), as transformers' DeepseekV3 computes it.

Multi-head latent attention (MLA). Each position's keys and values come from one compressed
latent: kv_a_proj_with_mqa gives kv_lora_rank latent dims (normed by kv_a_layernorm) and
qk_rope_head_dim dims of a key part shared by every head (roped). The KV cache holds exactly
that, kv_lora_rank + qk_rope_head_dim floats per position and layer (LatentKVCache), never the
per-head keys and values kv_b_proj expands it to. Attention absorbs kv_b_proj instead: each
head's no-rope query goes through its key rows of kv_b_proj into the latent space, the scores
are taken against the latent and the roped key part (one "head" of keys shared by all query
heads), and the weighted latent goes through the head's value rows of kv_b_proj.

RoPE: on qk_rope_head_dim dims; DeepSeek's weights lay them out in interleaved pairs
(rope_interleave, the default), which are de-interleaved before the rotate-half rotation (the
scores do not depend on the order, as long as queries and keys share it). yarn scales cos/sin
by its attention factor and the softmax scale by mscale(factor, mscale_all_dim)^2.

Mixture of experts (models/moe.py's machinery: the layer's dense unit and a late-bound call
for the experts the router picks): sigmoid scores, e_score_correction_bias added for the
choice only, group-limited top-k (the n_group groups ranked by the sum of their two best
scores, the topk_group best kept), the chosen scores renormalized (norm_topk_prob) and scaled
by routed_scaling_factor; n_shared_experts shared experts as one MLP in the dense unit; the
first first_k_dense_replace layers have a dense MLP. Multi-token-prediction layers
(num_nextn_predict_layers, stored as layers num_hidden_layers.. ) are not read.

Config fields missing from config.json take transformers' DeepseekV3Config defaults. From GGUF
(llama.cpp's deepseek2), kv_b_proj may come split as the current converter writes it: attn_k_b
(each head's key rows, transposed) and attn_v_b; gguf_config reads llama.cpp's metadata keys.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import numpy as np

from stream_run.kernels.kv_cache import LayeredKVCache, check_rows, rows_state
from stream_run.loaders import (
    EMBED,
    HEAD,
    Architecture,
    FormatError,
    ModelSpec,
    TensorRef,
    layer_key,
)
from stream_run.models import moe
from stream_run.models.base import Batch, DecoderModel, attend_rows
from stream_run.models.moe_layout import EXPERT_LINEARS, MoEArgs, expert_key
from stream_run.models.rope import rope_parameters, scaling_type

# transformers' DeepseekV3Config defaults, for fields a config.json leaves out
DEFAULTS: dict[str, Any] = {
    "n_routed_experts": 256, "num_experts_per_tok": 8, "moe_intermediate_size": 2048,
    "n_shared_experts": 1, "n_group": 8, "topk_group": 4, "first_k_dense_replace": 3,
    "norm_topk_prob": True, "routed_scaling_factor": 2.5, "kv_lora_rank": 512,
    "q_lora_rank": 1536, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
    "rope_interleave": True,
}
NORM_EPS = 1e-6  # q_a_layernorm and kv_a_layernorm: transformers' RMSNorm default, not the config's
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(\w+)$")
STACKED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
GGUF_STACKED = tuple(f"mlp.experts.{p}.weight" for p in EXPERT_LINEARS)
KV_B_SPLIT = "gguf_kv_b_split"  # config: kv_b_proj as llama.cpp's attn_k_b and attn_v_b
BLOCK = "layers.{bid}"
# a pass of at most this many rows (decode) computes kv_b_proj's absorbed products on the
# stored weights, per head (backend head_linear / head_linear_t); more rows dequantize it once
HEAD_ROWS = 8
# GGUF tensor name -> (unit, HF name inside the unit): llama.cpp's deepseek2
GGUF_NAMES: dict[str, tuple[str, str]] = {
    "token_embd.weight": (EMBED, "embed_tokens.weight"),
    "output_norm.weight": (HEAD, "norm.weight"),
    "output.weight": (HEAD, "lm_head.weight"),
    **{f"blk.{{bid}}.{g}": (BLOCK, h) for g, h in {
        "attn_norm.weight": "input_layernorm.weight",
        "attn_q.weight": "self_attn.q_proj.weight",
        "attn_q_a.weight": "self_attn.q_a_proj.weight",
        "attn_q_a_norm.weight": "self_attn.q_a_layernorm.weight",
        "attn_q_b.weight": "self_attn.q_b_proj.weight",
        "attn_kv_a_mqa.weight": "self_attn.kv_a_proj_with_mqa.weight",
        "attn_kv_a_norm.weight": "self_attn.kv_a_layernorm.weight",
        "attn_kv_b.weight": "self_attn.kv_b_proj.weight",
        "attn_k_b.weight": "self_attn.k_b_proj.weight",
        "attn_v_b.weight": "self_attn.v_b_proj.weight",
        "attn_output.weight": "self_attn.o_proj.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
        "ffn_gate_inp.weight": "mlp.gate.weight",
        "exp_probs_b.bias": "mlp.gate.e_score_correction_bias",
        **{f"ffn_{g}.weight": f"mlp.{p}.weight"
           for g, p in zip(("gate", "up", "down"), EXPERT_LINEARS, strict=True)},
        **{f"ffn_{g}_exps.weight": f"mlp.experts.{p}.weight"
           for g, p in zip(("gate", "up", "down"), EXPERT_LINEARS, strict=True)},
        **{f"ffn_{g}_shexp.weight": f"mlp.shared_experts.{p}.weight"
           for g, p in zip(("gate", "up", "down"), EXPERT_LINEARS, strict=True)},
    }.items()},
}


@dataclass(frozen=True)
class DeepseekArgs:
    """The DeepSeek fields of config.json."""

    moe: MoEArgs
    n_group: int
    topk_group: int
    routed_scale: float
    q_lora_rank: int | None  # None: one q_proj
    kv_lora_rank: int
    nope: int  # qk_nope_head_dim
    rope: int  # qk_rope_head_dim
    v_dim: int  # v_head_dim
    interleave: bool

    @property
    def latent(self) -> int:
        """Floats per position and layer in the KV cache."""
        return self.kv_lora_rank + self.rope


def deepseek_args(cfg: dict[str, Any]) -> DeepseekArgs:
    """The DeepSeek fields of a config (transformers' defaults where absent).

    Raises:
        ValueError: naming the field that is wrong.
    """
    def get(name: str) -> Any:
        return cfg.get(name, DEFAULTS[name]) if name in DEFAULTS else cfg.get(name)

    def positive(name: str, zero: bool = False) -> int:
        val = get(name)
        if not isinstance(val, int) or isinstance(val, bool) or val < (0 if zero else 1):
            what = "a non-negative int" if zero else "a positive int"
            raise ValueError(f"field {name!r} must be {what}, got {val!r}")
        return val

    n_experts = positive("n_routed_experts")
    top_k = positive("num_experts_per_tok")
    size = positive("moe_intermediate_size")
    shared = positive("n_shared_experts", zero=True)
    n_group = positive("n_group")
    topk_group = positive("topk_group")
    if n_experts % n_group:
        raise ValueError(f"field 'n_group' is {n_group}, which does not divide the "
                         f"{n_experts} routed experts (n_routed_experts)")
    if topk_group > n_group:
        raise ValueError(f"field 'topk_group' is {topk_group}, more than the {n_group} groups "
                         "(n_group)")
    if top_k > topk_group * (n_experts // n_group):
        raise ValueError(f"field 'num_experts_per_tok' is {top_k}, more than the "
                         f"{topk_group * (n_experts // n_group)} experts of the topk_group "
                         "groups a token may pick from")
    first_dense = positive("first_k_dense_replace", zero=True)
    if cfg.get("moe_layer_freq", 1) != 1:
        raise ValueError(f"field 'moe_layer_freq' is {cfg.get('moe_layer_freq')!r}; only 1 "
                         "(every layer from first_k_dense_replace on is sparse) is supported")
    scoring = cfg.get("scoring_func", "sigmoid")
    if scoring != "sigmoid":
        raise ValueError(f"field 'scoring_func' is {scoring!r}; deepseek_v3 scores experts "
                         "with 'sigmoid' (a softmax-scored config is DeepSeek-V2's)")
    scale = get("routed_scaling_factor")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0:
        raise ValueError(f"field 'routed_scaling_factor' must be a positive number, got "
                         f"{scale!r}")
    q_lora = get("q_lora_rank")
    q_lora = None if q_lora is None else positive("q_lora_rank")
    rope = positive("qk_rope_head_dim")
    if rope % 2:
        raise ValueError(f"field 'qk_rope_head_dim' must be even (RoPE rotates pairs), "
                         f"got {rope}")
    interleave = get("rope_interleave")
    if not isinstance(interleave, bool):
        raise ValueError(f"field 'rope_interleave' must be true or false, got {interleave!r}")
    norm = get("norm_topk_prob")
    if not isinstance(norm, bool):
        raise ValueError(f"field 'norm_topk_prob' must be true or false, got {norm!r}")
    n = cfg.get("num_hidden_layers")
    n = n if isinstance(n, int) else 0  # ModelSpec reports a bad one
    args = MoEArgs(n_experts, top_k, size, norm, size * shared,
                   tuple(i >= first_dense for i in range(n)))
    return DeepseekArgs(args, n_group, topk_group, float(scale), q_lora,
                        positive("kv_lora_rank"), positive("qk_nope_head_dim", zero=True), rope,
                        positive("v_head_dim"), interleave)


class LatentLayer:
    """One layer's latent cache: (1, 1, max_len, kv_lora_rank + qk_rope_head_dim) float32 in
    the backend's arrays, written in place; the keys and the values of MLA's attention are
    both read from it (kernels/kv_cache.KVLayer)."""

    window = None

    def __init__(self, ops: Any, dim: int, max_len: int) -> None:
        self.ops = ops
        self.a = ops.from_numpy(np.zeros((1, 1, max_len, dim), dtype=np.float32))

    @property
    def nbytes(self) -> int:
        return int(self.a.nbytes)

    def update(self, offset: int, k: Any, v: Any = None) -> tuple[Any, Any]:
        """Store the latent k (1, 1, L, dim) at [offset, offset + L); return [0, offset + L)
        (as keys and as values)."""
        end = offset + k.shape[2]
        self.a[:, :, offset:end, :] = k
        out = self.a[:, :, :end, :]
        return out, out

    def attend(self, offset: int, q: Any, k: Any, v: Any, scale: float) -> Any:
        raise NotImplementedError("MLA has no fused attention path")

    def check_rollback(self, offset: int) -> None:
        return None

    def state(self, end: int) -> dict[str, np.ndarray]:
        return rows_state(("latent",), (self.a,), end)

    def load_state(self, state: dict[str, np.ndarray], n: int) -> None:
        (latent,) = check_rows(("latent",), (self.a,), state, n)
        self.a[0, :, :n, :] = self.ops.from_numpy(np.ascontiguousarray(latent))


class LatentKVCache(LayeredKVCache):
    """A sequence's MLA cache: a LatentLayer per layer, nothing expanded per head."""

    def __init__(self, ops: Any, n_layers: int, dim: int, max_len: int) -> None:
        super().__init__([LatentLayer(ops, dim, max_len) for _ in range(n_layers)], max_len)


class Model(moe.Model):
    def __init__(self, spec: ModelSpec, ops: Any) -> None:
        DecoderModel.__init__(self, spec, ops)  # not llama's: MLA has its own heads and RoPE
        try:
            self.ds = deepseek_args(spec.config)
            self.inv_freq, self.rope_factor = rope_parameters(
                self.ds.rope, spec.rope_theta, spec.rope_scaling, spec.max_position_embeddings,
                original_max_position_embeddings=(spec.rope_scaling or {}).get(
                    "original_max_position_embeddings"))
        except (ValueError, KeyError, TypeError) as exc:
            raise FormatError(f"model_type {spec.model_type!r}: {exc}") from None
        self.moe = self.ds.moe
        self.n_heads = spec.num_attention_heads
        self.scale = softmax_scale(self.ds.nope + self.ds.rope, spec.rope_scaling)

    def layer_windows(self) -> list[int | None]:
        return [None] * self.spec.num_hidden_layers

    def make_kv_cache(self, max_len: int, kv_bits: int | None = None) -> LatentKVCache:
        self.check_kv_bits(kv_bits)
        return LatentKVCache(self.ops, self.spec.num_hidden_layers, self.ds.latent, max_len)

    def check_kv_bits(self, kv_bits: int | None) -> None:
        if kv_bits is not None:
            raise ValueError(f"--kv-bits {kv_bits}: not supported for deepseek_v3, whose KV "
                             "cache holds the compressed latent (float32)")

    def kv_bytes(self, n_tokens: int, kv_bits: int | None = None) -> int:
        """The latent's float32 bytes: (kv_lora_rank + qk_rope_head_dim) per position and
        layer."""
        return 4 * self.ds.latent * n_tokens * self.spec.num_hidden_layers

    def pass_context(self, batch: Batch) -> None:
        return None

    def block(self, layer_idx: int, batch: Batch, ctx: Any, x: Any,
              units: Mapping[str, Any]) -> Any:
        """A dense layer (the first first_k_dense_replace): attention, then the MLP."""
        ops, w = self.ops, units[layer_key(layer_idx)]
        y = self._attention(layer_idx, batch, x, w)
        h = ops.rms_norm(y, w["post_attention_layernorm.weight"], self.spec.rms_norm_eps)
        return ops.add(y, moe._mlp(ops, h, w, "mlp."))

    def _attention(self, layer_idx: int, batch: Batch, x: Any, w: Mapping[str, Any]) -> Any:
        """MLA and its residual: x (1, T, E) -> x + o_proj(attention)."""
        ops, ds = self.ops, self.ds
        h = ops.rms_norm(x, w["input_layernorm.weight"], self.spec.rms_norm_eps)
        if ds.q_lora_rank is None:
            q = ops.linear(h, w["self_attn.q_proj.weight"])
        else:
            qa = ops.linear(h, w["self_attn.q_a_proj.weight"], w.get("self_attn.q_a_proj.bias"))
            q = ops.linear(ops.rms_norm(qa, w["self_attn.q_a_layernorm.weight"], NORM_EPS),
                           w["self_attn.q_b_proj.weight"])  # (1, T, H * (nope + rope))
        kva = ops.linear(h, w["self_attn.kv_a_proj_with_mqa.weight"],
                         w.get("self_attn.kv_a_proj_with_mqa.bias"))  # (1, T, rank + rope)
        r = ds.kv_lora_rank
        c = ops.rms_norm(kva[..., :r], w["self_attn.kv_a_layernorm.weight"], NORM_EPS)
        # decode reads kv_b_proj's rows per head as stored; a prompt dequantizes it once
        kv_b = w if q.shape[1] <= HEAD_ROWS and hasattr(ops, "head_linear") else self._kv_b(w)
        o = attend_rows(ops, batch, partial(self._attend, layer_idx, kv_b), q, c,
                        kva[..., r:], axis=1)  # (1, T, H * v_dim)
        return ops.add(x, ops.linear(o, w["self_attn.o_proj.weight"],
                                     w.get("self_attn.o_proj.bias")))

    def _kv_b(self, w: Mapping[str, Any]) -> tuple[Any, Any]:
        """kv_b_proj's key rows (H, nope, rank) and value rows (H, v_dim, rank), float32: from
        kv_b_proj, or from llama.cpp's split of it (attn_k_b transposed, attn_v_b)."""
        ds, H, r = self.ds, self.n_heads, self.ds.kv_lora_rank
        if "self_attn.kv_b_proj.weight" in w:
            kv_b = absorbable(self.ops, w["self_attn.kv_b_proj.weight"], H, r)
            return kv_b[:, :ds.nope, :], kv_b[:, ds.nope:, :]
        k_b = absorbable(self.ops, w["self_attn.k_b_proj.weight"], H, ds.nope)  # (H, r, nope)
        return (self.ops.transpose(k_b, (0, 2, 1)),
                absorbable(self.ops, w["self_attn.v_b_proj.weight"], H, r))

    def _attend(self, layer_idx: int, kv_b: Any, kv: LatentKVCache, offset: int,
                q: Any, c: Any, k_pe: Any) -> Any:
        """One sequence: q (1, L, H * (nope + rope)), c (1, L, rank), k_pe (1, L, rope)
        -> (1, L, H * v_dim), with kv_b's key rows (H, nope, rank) and value rows (H, v_dim,
        rank) absorbed: kv_b is _kv_b's float32 pair, or the layer's weights (decode), whose
        kv_b_proj (or attn_k_b / attn_v_b) the products read per head as stored."""
        ops, ds, H = self.ops, self.ds, self.n_heads
        L = q.shape[1]
        q = ops.transpose(ops.reshape(q, (1, L, H, ds.nope + ds.rope)), (0, 2, 1, 3))
        q_pe = self._rope(q[..., ds.nope:], offset)  # (1, H, L, rope)
        k_pe = self._rope(ops.reshape(k_pe, (1, 1, L, ds.rope)), offset)
        latent = ops.concatenate([ops.reshape(c, (1, 1, L, ds.kv_lora_rank)), k_pe], axis=-1)
        keys, _ = kv.update(layer_idx, latent, None)  # (1, 1, T, rank + rope)
        if isinstance(kv_b, tuple):
            q_lat = q[0, :, :, :ds.nope] @ kv_b[0]  # (H, L, rank)
        else:
            q_lat = self._absorb_k(kv_b, q[0, :, :, :ds.nope])
        q_all = ops.concatenate([ops.reshape(q_lat, (1, H, L, ds.kv_lora_rank)), q_pe],
                                axis=-1)
        # the values are the latent too: its roped tail is dropped after the weighting
        o = ops.attention(q_all, keys, keys, self.scale, keys.shape[2] - L)  # (1, H, L, r + rope)
        if isinstance(kv_b, tuple):
            o = o[0, :, :, :ds.kv_lora_rank] @ ops.transpose(kv_b[1], (0, 2, 1))
        else:
            o = self._absorb_v(kv_b, o[0, :, :, :ds.kv_lora_rank])  # (H, L, v_dim)
        return ops.reshape(ops.transpose(o, (1, 0, 2)), (1, L, H * ds.v_dim))

    def _absorb_k(self, w: Mapping[str, Any], q_nope: Any) -> Any:
        """q_nope (H, L, nope) -> (H, L, rank) through kv_b's key rows, on the stored weights:
        kv_b_proj's rows transposed (the backend's head_linear_t), or llama.cpp's attn_k_b
        (H * rank, nope) as per-head linears. Dequantizes the key rows where head_linear_t
        has no kernel for the weight's form."""
        ops, ds, H = self.ops, self.ds, self.n_heads
        if "self_attn.kv_b_proj.weight" in w:
            kv_b = w["self_attn.kv_b_proj.weight"]
            out = ops.head_linear_t(q_nope, kv_b, 0)
            if out is None:
                out = q_nope @ absorbable(ops, kv_b, H, ds.kv_lora_rank)[:, :ds.nope, :]
            return out
        out = ops.head_linear(q_nope, w["self_attn.k_b_proj.weight"], 0, ds.kv_lora_rank)
        return q_nope @ self._kv_b(w)[0] if out is None else out

    def _absorb_v(self, w: Mapping[str, Any], o_lat: Any) -> Any:
        """o_lat (H, L, rank) -> (H, L, v_dim): per-head linears on kv_b_proj's value rows or
        llama.cpp's attn_v_b, as stored (dequantized where head_linear has no path for the
        weight's form)."""
        ops, ds = self.ops, self.ds
        if "self_attn.kv_b_proj.weight" in w:
            out = ops.head_linear(o_lat, w["self_attn.kv_b_proj.weight"], ds.nope, ds.v_dim)
        else:
            out = ops.head_linear(o_lat, w["self_attn.v_b_proj.weight"], 0, ds.v_dim)
        return o_lat @ ops.transpose(self._kv_b(w)[1], (0, 2, 1)) if out is None else out

    def _rope(self, x: Any, offset: int) -> Any:
        """RoPE on x (1, h, L, rope) at positions offset.., in the rotate-half layout (pairs
        de-interleaved first where the weights interleave them); yarn's attention factor."""
        ops = self.ops
        if self.ds.interleave:
            x = ops.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)
        out = ops.rope(x, offset, self.inv_freq)
        return out if self.rope_factor == 1.0 else out * self.rope_factor

    def _top_experts(self, w: Mapping[str, Any], logits: np.ndarray) -> np.ndarray:
        """--expert-lookahead's guess: the grouped, bias-corrected choice (route)."""
        bias = np.asarray(self.ops.to_numpy(w["mlp.gate.e_score_correction_bias"]), np.float32)
        return route(logits, bias, self.ds)[0]

    def _router(self, w: Mapping[str, Any], y: Any
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(experts' input, shared experts' output or zeros, top-k experts, their weights) of
        the rows of y (1, n, E): DeepseekV3TopkRouter."""
        ops, ds = self.ops, self.ds
        h = ops.rms_norm(y, w["post_attention_layernorm.weight"], self.spec.rms_norm_eps)
        logits = ops.to_numpy(ops.linear(h, w["mlp.gate.weight"]))[0].astype(np.float32)
        bias = np.asarray(ops.to_numpy(w["mlp.gate.e_score_correction_bias"]), np.float32)
        idx, weight = route(logits, bias, ds)
        x = ops.to_numpy(h)[0].astype(np.float32)
        out = np.zeros_like(x)
        if self.moe.shared_size:
            out = ops.to_numpy(moe._mlp(ops, h, w, "mlp.shared_experts."))[0]
        return x, out.astype(np.float32), idx, weight


def route(logits: np.ndarray, bias: np.ndarray, ds: DeepseekArgs
          ) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid scores; the choice on scores + bias within the topk_group best groups (a group
    ranked by its two best); weights: the chosen scores (renormalized), times the routed
    scaling factor. logits (n, n_experts) -> idx (n, k), weight (n, k) float32."""
    n, n_experts = logits.shape
    scores = 1.0 / (1.0 + np.exp(-logits))
    choice = scores + bias[None, :]
    groups = choice.reshape(n, ds.n_group, n_experts // ds.n_group)
    best = np.sort(groups, axis=-1)[..., -2:].sum(axis=-1)  # (n, n_group)
    keep = np.argsort(-best, axis=-1, kind="stable")[:, :ds.topk_group]
    mask = np.zeros((n, ds.n_group), dtype=bool)
    np.put_along_axis(mask, keep, True, axis=-1)
    choice = np.where(np.repeat(mask, n_experts // ds.n_group, axis=-1), choice, -np.inf)
    idx = np.argsort(-choice, axis=-1, kind="stable")[:, :ds.moe.top_k]
    weight = np.take_along_axis(scores, idx, axis=-1)
    if ds.moe.norm_topk:
        weight = weight / (weight.sum(axis=-1, keepdims=True) + np.float32(1e-20))
    return idx, (weight * np.float32(ds.routed_scale)).astype(np.float32)


def absorbable(ops: Any, w: Any, heads: int, cols: int) -> Any:
    """A per-head weight (H * rows, cols) as (H, rows, cols) float32 in the backend's arrays:
    a float32 weight as it is; a packed or 16-bit one dequantized for this call (its rows as
    the backend's embed reads them), as a matmul would read it whole."""
    if str(getattr(w, "dtype", "")).removeprefix("mlx.core.") != "float32":
        w = ops.embed(w, np.arange(w.shape[0])[None])[0]  # (out, rank)
    return ops.reshape(w, (heads, w.shape[0] // heads, cols))


def softmax_scale(qk_dim: int, scaling: dict[str, Any] | None) -> float:
    """transformers' yarn_apply_mscale: qk_dim^-0.5, times mscale(factor, mscale_all_dim)^2
    for a non-default rope type with mscale_all_dim."""
    scale = qk_dim**-0.5
    if scaling_type(scaling) != "default" and scaling and scaling.get("mscale_all_dim"):
        factor = float(scaling["factor"])
        m = 1.0 if factor <= 1 else 0.1 * float(scaling["mscale_all_dim"]) * math.log(factor) + 1
        scale *= m * m
    return scale


# -- what the loaders need: config, tensor names and shapes, expert units ----------------------
def hf_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Checks the DeepSeek fields (ValueError names the field). MLA has no KV heads: the
    engine's num_key_value_heads is num_attention_heads (transformers writes its default, 128,
    whatever the heads), its head_dim the widest per-head row attention computes on (a q/k
    head, or the absorbed query over the latent), for the engine's activation estimates."""
    ds = deepseek_args(cfg)
    quant = cfg.get("quantization_config")
    if isinstance(quant, dict) and quant.get("quant_method") == "fp8":
        raise ValueError("field 'quantization_config' says quant_method 'fp8' (DeepSeek's "
                         "released FP8 weights, with weight_scale_inv blocks), which the engine "
                         "does not read; hint: cast them to bf16 first (DeepSeek-V3's "
                         "inference/fp8_cast_bf16.py), then stream-convert")
    heads = cfg.get("num_attention_heads")
    return {**cfg, "num_key_value_heads": heads, "head_dim": max(ds.nope + ds.rope, ds.latent)}


def hf_units(spec: ModelSpec, key: str, ref: TensorRef) -> list[tuple[str, TensorRef]]:
    """A routed expert's tensors into its own unit (stacked ones split into each expert's
    byte ranges); the multi-token-prediction layers (past num_hidden_layers) and empty
    shared-expert tensors dropped."""
    layer_idx = int(key.split(".")[1]) if key.startswith("layers.") else -1
    if layer_idx >= spec.num_hidden_layers:
        return []  # MTP: layers num_hidden_layers .. + num_nextn_predict_layers - 1
    if ref.name.startswith("mlp.shared_experts.") and 0 in tuple(ref.shape):
        return []  # transformers writes n_shared_experts=0 as empty shared-expert tensors
    if ref.name in ("self_attn.k_b_proj.weight", "self_attn.v_b_proj.weight") \
            and len(ref.shape) == 3:  # GGUF: (H, rows, cols), each head's rows contiguous
        return [(key, replace(ref, shape=(ref.shape[0] * ref.shape[1], ref.shape[2])))]
    m = _EXPERT.match(ref.name)
    if not m and ref.name not in STACKED + GGUF_STACKED:
        return [(key, ref)]
    ds = deepseek_args(spec.config)
    if not ds.moe.sparse[layer_idx]:
        raise FormatError(f"tensor 'model.{key}.{ref.name}' is a routed expert's, but the "
                          f"config makes layer {layer_idx} dense (first_k_dense_replace="
                          f"{spec.config.get('first_k_dense_replace')}); hint: the config must "
                          "match the checkpoint")
    if m:
        e, linear, what = int(m.group(1)), m.group(2), m.group(3)
        if e >= ds.moe.n_experts:
            raise FormatError(f"tensor 'model.{key}.{ref.name}' is for expert {e}, but "
                              f"config.json has n_routed_experts={ds.moe.n_experts}; hint: the "
                              "expert count must match the checkpoint's experts")
        return [(expert_key(layer_idx, e), replace(ref, name=f"{linear}.{what}"))]
    E, inner, n = spec.hidden_size, ds.moe.expert_size, ds.moe.n_experts
    if ref.name in GGUF_STACKED:  # ffn_{gate,up}_exps (n, I, E), ffn_down_exps (n, E, I)
        linear = ref.name.split(".")[2]
        shape = (E, inner) if linear == "down_proj" else (inner, E)
        if tuple(ref.shape) != (n, *shape):
            raise FormatError(f"has shape {list(ref.shape)}, expected {[n, *shape]} from the "
                              "metadata (expert_count, embedding_length, "
                              "expert_feed_forward_length); hint: the expert count and sizes "
                              "must match the stacked expert tensors")
        per = ref.nbytes // n
        return [(expert_key(layer_idx, e), replace(ref, name=f"{linear}.weight",
                                                   offset=ref.offset + e * per, nbytes=per,
                                                   shape=shape))
                for e in range(n)]
    up = ref.name.endswith("gate_up_proj")
    want = (n, 2 * inner, E) if up else (n, E, inner)
    if tuple(ref.shape) != want or ref.dtype == "U32":
        raise FormatError(f"tensor 'model.{key}.{ref.name}' has shape {list(ref.shape)} "
                          f"({ref.dtype}), expected {list(want)} from the config "
                          "(n_routed_experts, hidden_size, moe_intermediate_size; unquantized)")
    per = ref.nbytes // n
    halves = (("gate_proj.weight", 0), ("up_proj.weight", per // 2)) if up \
        else (("down_proj.weight", 0),)
    shape = (inner, E) if up else (E, inner)
    return [(expert_key(layer_idx, e),
             replace(ref, name=name, offset=ref.offset + e * per + at,
                     nbytes=per // len(halves), shape=shape))
            for e in range(n) for name, at in halves]


def expected_shapes(spec: ModelSpec) -> dict[str, dict[str, tuple[int, ...]]]:
    ds = deepseek_args(spec.config)
    E, I, V, H = spec.hidden_size, spec.intermediate_size, spec.vocab_size, \
        spec.num_attention_heads
    qk = H * (ds.nope + ds.rope)
    attn: dict[str, tuple[int, ...]] = {
        "input_layernorm.weight": (E,), "post_attention_layernorm.weight": (E,),
        "self_attn.kv_a_proj_with_mqa.weight": (ds.latent, E),
        "self_attn.kv_a_layernorm.weight": (ds.kv_lora_rank,),
        "self_attn.o_proj.weight": (E, H * ds.v_dim),
    }
    if spec.config.get(KV_B_SPLIT):  # llama.cpp's attn_k_b (H, rank, nope), attn_v_b, as 2-D
        attn.update({"self_attn.k_b_proj.weight": (H * ds.kv_lora_rank, ds.nope),
                     "self_attn.v_b_proj.weight": (H * ds.v_dim, ds.kv_lora_rank)})
    else:
        attn["self_attn.kv_b_proj.weight"] = (H * (ds.nope + ds.v_dim), ds.kv_lora_rank)
    if ds.q_lora_rank is None:
        attn["self_attn.q_proj.weight"] = (qk, E)
    else:
        attn.update({"self_attn.q_a_proj.weight": (ds.q_lora_rank, E),
                     "self_attn.q_a_layernorm.weight": (ds.q_lora_rank,),
                     "self_attn.q_b_proj.weight": (qk, ds.q_lora_rank)})
    if spec.attention_bias:
        attn.update({"self_attn.kv_a_proj_with_mqa.bias": (ds.latent,),
                     "self_attn.o_proj.bias": (E,)})
        if ds.q_lora_rank is not None:
            attn["self_attn.q_a_proj.bias"] = (ds.q_lora_rank,)
    units: dict[str, dict[str, tuple[int, ...]]] = {EMBED: {"embed_tokens.weight": (V, E)}}
    for i in range(spec.num_hidden_layers):
        block = dict(attn)
        if not ds.moe.sparse[i]:
            block.update(_mlp_shapes("mlp.", I, E))
            units[layer_key(i)] = block
            continue
        block.update({"mlp.gate.weight": (ds.moe.n_experts, E),
                      "mlp.gate.e_score_correction_bias": (ds.moe.n_experts,)})
        if ds.moe.shared_size:
            block.update(_mlp_shapes("mlp.shared_experts.", ds.moe.shared_size, E))
        units[layer_key(i)] = block
        for e in range(ds.moe.n_experts):
            units[expert_key(i, e)] = _mlp_shapes("", ds.moe.expert_size, E)
    units[HEAD] = {"norm.weight": (E,)}
    if not spec.tie_word_embeddings:
        units[HEAD]["lm_head.weight"] = (V, E)
    return units


def _mlp_shapes(prefix: str, inner: int, E: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}{p}.weight": (E, inner) if p == "down_proj" else (inner, E)
            for p in EXPERT_LINEARS}


def gguf_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The HF fields from llama.cpp's deepseek2 metadata (cfg["gguf_metadata"]): its MLA
    widths (key_length_mla and value_length_mla where the converter split kv_b_proj into
    attn_k_b and attn_v_b, else key_length and value_length), and its expert keys with
    llama.cpp's defaults where absent (no groups, no renormalization, a scale of 1).

    Raises:
        ValueError: naming the GGUF metadata key that is missing or wrong.
    """
    meta = cfg.get("gguf_metadata") or {}
    arch = "deepseek2"

    def need(key: str) -> Any:
        val = meta.get(key)
        if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
            raise ValueError(f"GGUF metadata key {arch}.{key} must be a positive int, got "
                             f"{val!r}")
        return val

    rope = need("rope.dimension_count")
    split = "attention.key_length_mla" in meta
    k_len, v_len = ("attention.key_length_mla", "attention.value_length_mla") if split \
        else ("attention.key_length", "attention.value_length")
    if need(k_len) <= rope:
        raise ValueError(f"GGUF metadata key {arch}.{k_len}={meta[k_len]} must exceed "
                         f"rope.dimension_count={rope} (it is qk_nope_head_dim + "
                         "qk_rope_head_dim)")
    gating = meta.get("expert_gating_func", 1)  # llama.cpp: absent means softmax (V2)
    if gating != 2:
        raise ValueError(f"GGUF metadata key {arch}.expert_gating_func is {gating!r}; "
                         "deepseek_v3 needs 2 (sigmoid); a softmax-gated file is DeepSeek-V2")
    out = {k: v for k, v in cfg.items() if k not in (
        "gguf_metadata", "num_experts", "moe_intermediate_size",
        "shared_expert_intermediate_size", "partial_rotary_factor")}
    scale = meta.get("expert_weights_scale")
    out.update({
        "n_routed_experts": meta.get("expert_count"),
        "num_experts_per_tok": meta.get("expert_used_count"),
        "moe_intermediate_size": meta.get("expert_feed_forward_length"),
        "n_shared_experts": meta.get("expert_shared_count", 0),
        "first_k_dense_replace": meta.get("leading_dense_block_count", 0),
        "n_group": meta.get("expert_group_count") or 1,
        "topk_group": meta.get("expert_group_used_count") or 1,
        "norm_topk_prob": bool(meta.get("expert_weights_norm", False)),
        "routed_scaling_factor": float(str(np.float32(scale))) if scale else 1.0,
        "q_lora_rank": meta.get("attention.q_lora_rank") or None,
        "kv_lora_rank": need("attention.kv_lora_rank"),
        "qk_rope_head_dim": rope, "qk_nope_head_dim": meta[k_len] - rope,
        "v_head_dim": need(v_len), "rope_interleave": True, KV_B_SPLIT: split,
    })
    keys = {"n_routed_experts": "expert_count", "num_experts_per_tok": "expert_used_count",
            "moe_intermediate_size": "expert_feed_forward_length",
            "n_shared_experts": "expert_shared_count",
            "first_k_dense_replace": "leading_dense_block_count",
            "n_group": "expert_group_count", "topk_group": "expert_group_used_count",
            "routed_scaling_factor": "expert_weights_scale",
            "q_lora_rank": "attention.q_lora_rank"}
    try:
        return hf_config(out)
    except ValueError as exc:
        field = str(exc).split("'")[1] if "'" in str(exc) else ""
        key = keys.get(field)
        raise ValueError(f"GGUF metadata key {arch}.{key}: {exc}" if key else str(exc)) \
            from None


def architecture(model_type: str) -> Architecture:
    return Architecture(model_type, expected_shapes, GGUF_NAMES, hf_config=hf_config,
                        gguf_config=gguf_config, hf_units=hf_units)

