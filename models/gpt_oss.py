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
from typing import Any

import numpy as np

from stream_run.kernels.backend import KVCache
from stream_run.kernels.mxfp4 import MXFP4Weight
from stream_run.kernels.quant import HalfWeight, half_to_float32
from stream_run.loaders import Architecture, ModelSpec
from stream_run.models import llama, moe
from stream_run.models.gpt_oss_layout import (  # noqa: F401  (re-exported: tests, bench)
    GGUF_NAMES,
    expected_shapes,
    expert_key,
    gguf_config,
    hf_config,
    hf_units,
    layer_types,
    moe_args,
)


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
                out[sel] += self._expert(r.x[sel], w) * r.weight[sel, s][:, None]
        return self.ops.add(r.h, self.ops.from_numpy(out[None]))

    def _expert(self, x: np.ndarray, w: Mapping[str, Any]) -> np.ndarray:
        """One expert on its rows x (n, H) -> (n, H)."""
        if "gate_up_proj" in w:  # HF: interleaved, gate the even outputs, up the odd ones
            gate_up = self._expert_linear(x, w, "gate_up_proj")  # (n, 2I)
            gate, up = gate_up[:, 0::2], gate_up[:, 1::2]
        else:  # GGUF: apart
            gate, up = (self._expert_linear(x, w, n) for n in ("gate_proj", "up_proj"))
        return self._expert_linear(self._swiglu(gate, up), w, "down_proj")

    def _swiglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        gate = np.minimum(gate, np.float32(self.limit))
        up = np.clip(up, np.float32(-self.limit), np.float32(self.limit))
        with np.errstate(over="ignore"):  # exp -> inf for gate << 0: sigmoid 0, correct
            glu = gate / (np.float32(1) + np.exp(-np.float32(self.alpha) * gate))
        return ((up + np.float32(1)) * glu).astype(np.float32)

    def _expert_linear(self, x: np.ndarray, w: Mapping[str, Any], name: str) -> np.ndarray:
        """x (n, in) -> (n, out) + bias. Weights are (out, in) (MXFP4, GGUF), except HF's
        unquantized experts, stored (in, out) as transformers keeps them: their transpose is
        the linear's weight."""
        ops, weight = self.ops, w[name]
        if "gate_up_proj" in w and not isinstance(weight, MXFP4Weight):
            if isinstance(weight, HalfWeight):  # the numpy backend's 16-bit (in, out) weight
                weight = half_to_float32(weight)
            weight = ops.transpose(weight, (1, 0))  # (out, in): a view
        return ops.to_numpy(ops.linear(ops.from_numpy(x), weight, w[f"{name}_bias"]))


def architecture(model_type: str) -> Architecture:
    return Architecture(model_type, expected_shapes, GGUF_NAMES, hf_config=hf_config,
                        gguf_config=gguf_config, hf_units=hf_units)
