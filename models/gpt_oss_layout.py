"""gpt-oss's files as the loaders see them (models/gpt_oss.py runs them): its config fields, the
expert units and their byte ranges in HF safetensors (fused tensors, unquantized or MXFP4) and
in GGUF (llama.cpp's gpt-oss: ffn_{gate,up,down}_exps, gate and up apart), every tensor's shape.

An expert unit holds what its file stores, under the file's names:
- HF unquantized: gate_up_proj (H, 2I), stored (in, out) as transformers keeps it, gate in the
  even columns, up in the odd ones; down_proj (I, H); their _bias.
- HF MXFP4: gate_up_proj_blocks (2I, H/32, 16) + _scales (2I, H/32) (out, in), down likewise.
- GGUF: gate_proj, up_proj (I, H), down_proj (H, I), each (out, in) in the file's type; _bias.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from stream_run.kernels.mxfp4 import BLOCK
from stream_run.loaders import (
    EMBED,
    HEAD,
    FormatError,
    ModelSpec,
    TensorRef,
    layer_key,
)
from stream_run.models import llama
from stream_run.models.moe_layout import MoEArgs, expert_key

LAYER_TYPES = ("sliding_attention", "full_attention")
_ONE_EXPERT = re.compile(r"^(\d+)\.(\w+)$")
EXPERT_TENSORS = ("gate_up_proj", "down_proj")
GGUF_LAYOUT = "stream_run_gguf_experts"  # config key gguf_config sets: GGUF's expert tensors
_DENSE_GGUF = ("ffn_norm", "ffn_gate.", "ffn_up.", "ffn_down.")
GGUF_NAMES = {**{k: v for k, v in llama.GGUF_NAMES.items()
                 if not any(d in k for d in _DENSE_GGUF)},
              "blk.{bid}.post_attention_norm.weight": (llama.BLOCK,
                                                       "post_attention_layernorm.weight"),
              "blk.{bid}.attn_sinks.weight": (llama.BLOCK, "self_attn.sinks"),
              "blk.{bid}.ffn_gate_inp.weight": (llama.BLOCK, "mlp.router.weight"),
              "blk.{bid}.ffn_gate_inp.bias": (llama.BLOCK, "mlp.router.bias"),
              **{f"blk.{{bid}}.ffn_{p}_exps.{what}": (llama.BLOCK, f"mlp.experts.{p}_proj{sfx}")
                 for p in ("gate", "up", "down") for what, sfx in (("weight", ""),
                                                                    ("bias", "_bias"))}}
# GGUF metadata key of each config field gguf_config checks
_GGUF_KEYS = {"num_local_experts": "expert_count", "num_experts_per_tok": "expert_used_count",
              "intermediate_size": "expert_feed_forward_length",
              "sliding_window": "attention.sliding_window"}


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
    hidden = cfg.get("hidden_size")
    hidden = hidden if isinstance(hidden, int) else 0  # ModelSpec reports a bad one
    if mxfp4_experts(cfg) and (args.expert_size % BLOCK or hidden % BLOCK):
        raise ValueError(f"fields 'hidden_size' and 'intermediate_size' must be multiples of "
                         f"{BLOCK} for mxfp4 experts")
    return {**cfg, "attention_bias": bool(cfg.get("attention_bias", True)),
            "layer_types": types}


def gguf_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The HF fields from llama.cpp's gpt-oss metadata: its experts are expert_count, each
    expert_feed_forward_length wide; even layers slide (llama.cpp's fixed pattern, HF's
    default); yarn untruncated as OpenAI's config.json has it.

    Raises:
        ValueError: naming the GGUF metadata key that is missing or wrong.
    """
    cfg = dict(cfg)
    cfg["num_local_experts"] = cfg.pop("num_experts", None)
    cfg["intermediate_size"] = cfg.pop("moe_intermediate_size", None)
    if isinstance(cfg.get("rope_scaling"), dict) and cfg["rope_scaling"].get("rope_type") == "yarn":
        cfg["rope_scaling"] = {"truncate": False, **cfg["rope_scaling"]}
    cfg[GGUF_LAYOUT] = True
    try:
        return hf_config(cfg)
    except ValueError as exc:
        field = str(exc).split("'")[1] if "'" in str(exc) else ""
        key = _GGUF_KEYS.get(field)
        raise ValueError(f"GGUF metadata key gpt-oss.{key}: {exc}" if key else str(exc)) from None


def expert_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """One expert's tensors, as stored."""
    E, I = spec.hidden_size, moe_args(spec.config).expert_size
    if spec.config.get(GGUF_LAYOUT):
        return {"gate_proj": (I, E), "gate_proj_bias": (I,), "up_proj": (I, E),
                "up_proj_bias": (I,), "down_proj": (E, I), "down_proj_bias": (E,)}
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
    """A fused expert tensor (n_experts, ...) -> each expert's byte sub-range, in its unit; one
    expert's own tensor (mlp.experts.{e}.name, as stream-convert writes them) -> its unit."""
    name = ref.name.removeprefix("mlp.experts.")
    shapes = expert_shapes(spec)
    if name == ref.name or not key.startswith("layers."):
        return [(key, ref)]
    m = _ONE_EXPERT.match(name)
    if m:
        e, n = int(m.group(1)), moe_args(spec.config).n_experts
        if e >= n:
            raise FormatError(f"tensor 'model.{key}.{ref.name}' is for expert {e}, but "
                              f"config.json has num_local_experts={n}")
        return [(expert_key(int(key.split(".")[1]), e), replace(ref, name=m.group(2)))]
    if name not in shapes:
        if name.endswith(("_blocks", "_scales")) or name in EXPERT_TENSORS:
            stored = "MXFP4" if name.endswith(("_blocks", "_scales")) else "unquantized"
            raise FormatError(f"tensor 'model.{key}.{ref.name}' holds {stored} experts, but "
                              "config.json's quantization_config says otherwise; hint: "
                              "quant_method mxfp4 goes with *_blocks + *_scales experts")
        return [(key, ref)]  # anything else unexpected is named by the index check
    n = moe_args(spec.config).n_experts
    want = (n, *shapes[name])
    if tuple(ref.shape) != want and spec.config.get(GGUF_LAYOUT):  # the loader names it
        raise FormatError(f"has shape {list(ref.shape)}, expected {list(want)} from the "
                          "metadata (gpt-oss.expert_count, embedding_length, "
                          "expert_feed_forward_length)")
    if tuple(ref.shape) != want:
        raise FormatError(f"tensor 'model.{key}.{ref.name}' has shape {list(ref.shape)} "
                          f"({ref.dtype}), expected {list(want)} from the config "
                          "(num_local_experts, hidden_size, intermediate_size, "
                          "quantization_config)")
    layer_idx, per = int(key.split(".")[1]), ref.nbytes // n
    return [(expert_key(layer_idx, e),
             replace(ref, name=name, offset=ref.offset + e * per, nbytes=per, shape=want[1:]))
            for e in range(n)]
