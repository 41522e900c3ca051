"""gpt-oss (gpt_oss: gpt-oss-20b, gpt-oss-120b) on the Mixture-of-Experts pass of models/moe.py.

Beside qwen3_moe's pass: attention has q/k/v/o biases and a learned sink logit per head in its
softmax; layers alternate sliding-window and full attention (layer_types); RoPE is yarn. The
router has a bias and softmaxes its top-k logits only; each expert is gate_up (interleaved:
gate in the even rows, up in the odd ones) with a bias, the clamped SwiGLU
((up + 1) * gate * sigmoid(alpha * gate), gate clamped above, up both sides, at limit), and
down with a bias. Experts are stored fused ([n_experts, ...] per layer): unquantized as
transformers keeps them in memory, transposed (gate_up_proj (E, H, 2I)), or MXFP4 as OpenAI
ships them (gate_up_proj_blocks (E, 2I, H/32, 16) + _scales, computed as stored by
kernels/mxfp4_kernels.py). Either way each expert is a byte sub-range, its own unit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from stream_run.kernels.backend import KVCache
from stream_run.kernels.mxfp4 import BLOCK, MXFP4Weight
from stream_run.kernels.quant import HalfWeight, half_to_float32
from stream_run.loaders import (
    EMBED,
    HEAD,
    Architecture,
    FormatError,
    ModelSpec,
    TensorRef,
    layer_key,
)
from stream_run.models import llama, moe
from stream_run.models.moe_layout import MoEArgs, expert_key

LAYER_TYPES = ("sliding_attention", "full_attention")
EXPERT_TENSORS = ("gate_up_proj", "down_proj")


class Model(moe.Model):
    def __init__(self, spec: ModelSpec, ops: Any) -> None:
        llama.Model.__init__(self, spec, ops)  # moe.Model's config fields are qwen's
        self.moe = moe_args(spec.config)  # checked at load (hf_config)
        self.alpha = float(spec.config.get("swiglu_alpha", 1.702))
        self.limit = float(spec.config.get("swiglu_limit", 7.0))

    def layer_windows(self) -> list[int | None]:
        """HF's rule: the layers layer_types marks sliding_attention (by default the even
        ones) see sliding_window keys."""
        return [self.spec.sliding_window if t == "sliding_attention" else None
                for t in layer_types(self.spec.config)]

    def _attend(self, w: Mapping[str, Any], layer_idx: int, kv: KVCache, offset: int, q: Any,
                k: Any, v: Any) -> Any:
        """llama's attention with the layer's sinks in the softmax."""
        ops = self.ops
        L = q.shape[1]
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q = ops.transpose(ops.reshape(q, (1, L, H, D)), (0, 2, 1, 3))  # (1, H, L, D)
        k = ops.transpose(ops.reshape(k, (1, L, Hkv, D)), (0, 2, 1, 3))  # (1, Hkv, L, D)
        v = ops.transpose(ops.reshape(v, (1, L, Hkv, D)), (0, 2, 1, 3))
        q = ops.rope(q, offset, self.inv_freq)
        k = ops.rope(k, offset, self.inv_freq)
        keys, values = kv.update(layer_idx, k, v)
        o = ops.attention(q, keys, values, self.scale, keys.shape[2] - L,
                          self.windows[layer_idx], sinks=w["self_attn.sinks"])  # (1, H, L, D)
        return ops.reshape(ops.transpose(o, (0, 2, 1, 3)), (1, L, H * D))

    def _router(self, w: Mapping[str, Any], y: Any
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The top-k router logits (bias added), softmaxed among themselves."""
        ops = self.ops
        h = ops.rms_norm(y, w["post_attention_layernorm.weight"], self.spec.rms_norm_eps)
        logits = ops.to_numpy(ops.linear(h, w["mlp.router.weight"], w["mlp.router.bias"]))
        logits = logits[0].astype(np.float32)  # (n, n_experts)
        idx = np.argsort(-logits, axis=-1, kind="stable")[:, :self.moe.top_k]  # (n, k)
        top = np.take_along_axis(logits, idx, axis=-1)
        weight = np.exp(top - top.max(axis=-1, keepdims=True))
        weight /= weight.sum(axis=-1, keepdims=True)
        x = ops.to_numpy(h)[0].astype(np.float32)
        return x, np.zeros_like(x), idx, weight

    def _experts(self, layer_idx: int, tile_rows: int, r: moe.Routed,
                 units: Mapping[str, Any]) -> Any:
        """Each picked expert on the rows that picked it, weighted, summed into the residual."""
        out = r.out.copy()
        for e in r.picked:
            w = units[expert_key(layer_idx, e)]
            rows, slot = np.nonzero(r.idx == e)
            for a in range(0, len(rows), tile_rows):
                sel, s = rows[a:a + tile_rows], slot[a:a + tile_rows]
                gate_up = self._expert_linear(r.x[sel], w, "gate_up_proj")  # (n, 2I)
                y = self._expert_linear(self._swiglu(gate_up), w, "down_proj")
                out[sel] += y * r.weight[sel, s][:, None]
        return self.ops.add(r.h, self.ops.from_numpy(out[None]))

    def _swiglu(self, gate_up: np.ndarray) -> np.ndarray:
        gate = np.minimum(gate_up[:, 0::2], np.float32(self.limit))
        up = np.clip(gate_up[:, 1::2], np.float32(-self.limit), np.float32(self.limit))
        with np.errstate(over="ignore"):  # exp -> inf for gate << 0: sigmoid 0, correct
            glu = gate / (np.float32(1) + np.exp(-np.float32(self.alpha) * gate))
        return ((up + np.float32(1)) * glu).astype(np.float32)

    def _expert_linear(self, x: np.ndarray, w: Mapping[str, Any], name: str) -> np.ndarray:
        """x (n, in) -> (n, out) + bias: MXFP4 (out, in) as stored, or an unquantized weight
        stored (in, out) as transformers keeps it (its transpose is the linear's weight)."""
        ops, weight = self.ops, w[name]
        if isinstance(weight, HalfWeight):  # the numpy backend's 16-bit (in, out) weight
            weight = half_to_float32(weight)
        if not isinstance(weight, MXFP4Weight):
            weight = ops.transpose(weight, (1, 0))  # (out, in): a view
        return ops.to_numpy(ops.linear(ops.from_numpy(x), weight, w[f"{name}_bias"]))


# -- what the loaders need: config fields, tensor names and shapes, the expert units ----------
def moe_args(cfg: dict[str, Any]) -> MoEArgs:
    """The expert fields of a gpt_oss config.

    Raises:
        ValueError: naming the field that is missing or wrong.
    """
    n = _positive(cfg, "num_local_experts")
    top_k = _positive(cfg, "num_experts_per_tok")
    if top_k > n:
        raise ValueError(f"field 'num_experts_per_tok' is {top_k}, more than the {n} experts "
                         "(num_local_experts)")
    layers = cfg.get("num_hidden_layers")
    layers = layers if isinstance(layers, int) else 0  # ModelSpec reports a bad one
    return MoEArgs(n, top_k, _positive(cfg, "intermediate_size"), False, 0, (True,) * layers)


def _positive(cfg: dict[str, Any], name: str) -> int:
    val = cfg.get(name)
    if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
        raise ValueError(f"field {name!r} must be a positive int, got {val!r}")
    return val


def layer_types(cfg: dict[str, Any]) -> list[str]:
    """config.json's layer_types, or HF's default (sliding on even layers)."""
    n = cfg.get("num_hidden_layers")
    n = n if isinstance(n, int) else 0
    types = cfg.get("layer_types")
    if types is None:
        return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    if not isinstance(types, list) or len(types) != n or any(t not in LAYER_TYPES for t in types):
        raise ValueError(f"field 'layer_types' must list one of {list(LAYER_TYPES)} for each of "
                         f"the {n} layers, got {types!r}")
    return types


def mxfp4_experts(cfg: dict[str, Any]) -> bool:
    """Whether the experts are stored MXFP4 (quantization_config quant_method mxfp4)."""
    quant = cfg.get("quantization_config")
    if quant is None:
        return False
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method != "mxfp4":
        raise ValueError(f"field 'quantization_config.quant_method' is {method!r}; gpt_oss "
                         "runs unquantized or mxfp4 experts")
    return True


def hf_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Checks the fields the family adds (ValueError names the field); attention biases are on
    unless the config says otherwise (HF's default)."""
    args = moe_args(cfg)
    types = layer_types(cfg)
    window = cfg.get("sliding_window")
    if "sliding_attention" in types and (not isinstance(window, int) or window <= 0):
        raise ValueError(f"field 'sliding_window' must be a positive int with sliding layers, "
                         f"got {window!r}")
    for name in ("swiglu_alpha", "swiglu_limit"):
        val = cfg.get(name, 1.0)
        if isinstance(val, bool) or not isinstance(val, (int, float)) or val <= 0:
            raise ValueError(f"field {name!r} must be a positive number, got {val!r}")
    size = args.expert_size
    if mxfp4_experts(cfg) and (size % BLOCK or cfg.get("hidden_size", 0) % BLOCK):
        raise ValueError(f"fields 'hidden_size' and 'intermediate_size' must be multiples of "
                         f"{BLOCK} for mxfp4 experts")
    return {**cfg, "attention_bias": bool(cfg.get("attention_bias", True)),
            "layer_types": types}


def expert_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """One expert's tensors, as stored."""
    E, I = spec.hidden_size, moe_args(spec.config).expert_size
    if not mxfp4_experts(spec.config):
        return {"gate_up_proj": (E, 2 * I), "gate_up_proj_bias": (2 * I,),
                "down_proj": (I, E), "down_proj_bias": (E,)}
    return {"gate_up_proj_blocks": (2 * I, E // BLOCK, 16),
            "gate_up_proj_scales": (2 * I, E // BLOCK), "gate_up_proj_bias": (2 * I,),
            "down_proj_blocks": (E, I // BLOCK, 16),
            "down_proj_scales": (E, I // BLOCK), "down_proj_bias": (E,)}


def expected_shapes(spec: ModelSpec) -> dict[str, dict[str, tuple[int, ...]]]:
    """llama's attention with o_proj's bias and the sinks, the router, then the experts."""
    args, E = moe_args(spec.config), spec.hidden_size
    dense = llama.expected_shapes(spec)
    units = {EMBED: dense[EMBED]}
    for i in range(spec.num_hidden_layers):
        block = {k: s for k, s in dense[layer_key(i)].items() if not k.startswith("mlp.")}
        if spec.attention_bias:
            block["self_attn.o_proj.bias"] = (E,)
        block.update({"self_attn.sinks": (spec.num_attention_heads,),
                      "mlp.router.weight": (args.n_experts, E),
                      "mlp.router.bias": (args.n_experts,)})
        units[layer_key(i)] = block
        for e in range(args.n_experts):
            units[expert_key(i, e)] = expert_shapes(spec)
    units[HEAD] = dense[HEAD]
    return units


def hf_units(spec: ModelSpec, key: str, ref: TensorRef) -> list[tuple[str, TensorRef]]:
    """A fused expert tensor (n_experts, ...) -> each expert's byte sub-range, in its unit."""
    name = ref.name.removeprefix("mlp.experts.")
    shapes = expert_shapes(spec)
    if name == ref.name or not key.startswith("layers."):
        return [(key, ref)]
    if name not in shapes:
        if name.endswith(("_blocks", "_scales")) or name in EXPERT_TENSORS:
            stored = "MXFP4" if name.endswith(("_blocks", "_scales")) else "unquantized"
            raise FormatError(f"tensor 'model.{key}.{ref.name}' holds {stored} experts, but "
                              "config.json's quantization_config says otherwise; hint: "
                              "quant_method mxfp4 goes with *_blocks + *_scales experts")
        return [(key, ref)]  # anything else unexpected is named by the index check
    n = moe_args(spec.config).n_experts
    want = (n, *shapes[name])
    if tuple(ref.shape) != want:
        raise FormatError(f"tensor 'model.{key}.{ref.name}' has shape {list(ref.shape)} "
                          f"({ref.dtype}), expected {list(want)} from the config "
                          "(num_local_experts, hidden_size, intermediate_size, "
                          "quantization_config)")
    layer_idx, per = int(key.split(".")[1]), ref.nbytes // n
    return [(expert_key(layer_idx, e),
             replace(ref, name=name, offset=ref.offset + e * per, nbytes=per, shape=want[1:]))
            for e in range(n)]


def architecture(model_type: str) -> Architecture:
    return Architecture(model_type, expected_shapes, hf_config=hf_config, hf_units=hf_units)
