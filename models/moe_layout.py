"""The Mixture-of-Experts families' files, as the loaders see them (models/moe.py runs them):
the expert fields of their configs, each routed expert's unit and byte ranges in HF safetensors
(one tensor per expert, or stacked: transformers v5) and in GGUF (llama.cpp's stacked
ffn_{gate,up,down}_exps, each expert a byte sub-range in the file's own blocks), and every
tensor's shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from stream_run.loaders import EMBED, HEAD, FormatError, ModelSpec, TensorRef, layer_key
from stream_run.models import llama

EXPERT_LINEARS = ("gate_proj", "up_proj", "down_proj")
MIXTRAL_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}  # -> canonical
_EXPERT = re.compile(r"^(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(w[123]|\w+_proj)\.(\w+)$")
STACKED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
# GGUF: llama.cpp stacks each linear of every expert in one tensor (ffn_gate_exps, (n, I, E))
GGUF_STACKED = tuple(f"mlp.experts.{p}.weight" for p in EXPERT_LINEARS)
GGUF_NAMES = {**llama.GGUF_NAMES,
              "blk.{bid}.ffn_gate_inp.weight": (llama.BLOCK, "mlp.gate.weight"),
              **{f"blk.{{bid}}.ffn_{g}_exps.weight": (llama.BLOCK, f"mlp.experts.{p}.weight")
                 for g, p in zip(("gate", "up", "down"), EXPERT_LINEARS, strict=True)},
              **{f"blk.{{bid}}.ffn_{g}_shexp.weight": (llama.BLOCK, f"mlp.shared_expert.{p}.weight")
                 for g, p in zip(("gate", "up", "down"), EXPERT_LINEARS, strict=True)},
              "blk.{bid}.ffn_gate_inp_shexp.weight": (llama.BLOCK, "mlp.shared_expert_gate.weight")}
GGUF_ARCH = {"qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "mixtral": "llama"}


def expert_key(layer_idx: int, expert: int) -> str:
    return f"{layer_key(layer_idx)}.mlp.experts.{expert}"


@dataclass(frozen=True)
class MoEArgs:
    """The expert fields of config.json (names differ per family: see moe_args)."""

    n_experts: int
    top_k: int
    expert_size: int  # each routed expert's intermediate size
    norm_topk: bool  # renormalize the top-k probabilities to sum to 1
    shared_size: int  # the shared expert's intermediate size (0: none)
    sparse: tuple[bool, ...]  # per layer: routed experts (else a dense MLP)


def moe_args(model_type: str, cfg: dict[str, Any]) -> MoEArgs:
    """The expert fields of a config (as config.json names them, per family).

    Raises:
        ValueError: naming the field that is missing or wrong.
    """
    mixtral = model_type == "mixtral"
    n_experts = _positive(cfg, experts_field(model_type, cfg))
    top_k = _positive(cfg, "num_experts_per_tok")
    if top_k > n_experts:
        raise ValueError(f"field 'num_experts_per_tok' is {top_k}, more than the {n_experts} "
                         "experts")
    size = _positive(cfg, "intermediate_size" if mixtral else "moe_intermediate_size")
    shared = _positive(cfg, "shared_expert_intermediate_size") \
        if model_type == "qwen2_moe" else 0
    step = 1 if mixtral else _positive(cfg, "decoder_sparse_step", 1)
    dense = cfg.get("mlp_only_layers") or []
    if not isinstance(dense, list):
        raise ValueError(f"field 'mlp_only_layers' must be a list of layer indices, got {dense!r}")
    n = cfg.get("num_hidden_layers")
    n = n if isinstance(n, int) else 0  # ModelSpec reports a bad one
    return MoEArgs(n_experts, top_k, size, mixtral or bool(cfg.get("norm_topk_prob", False)),
                   shared, tuple(i not in dense and (i + 1) % step == 0 for i in range(n)))


def experts_field(model_type: str, cfg: dict[str, Any]) -> str:
    """The config field counting the routed experts (transformers 5 writes qwen3_moe's as
    num_local_experts, the Hub's Qwen3 configs num_experts)."""
    return "num_local_experts" if model_type == "mixtral" or "num_experts" not in cfg \
        else "num_experts"


def _positive(cfg: dict[str, Any], name: str, default: int | None = None) -> int:
    val = cfg.get(name, default)
    if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
        raise ValueError(f"field {name!r} must be a positive int, got {val!r}")
    return val


# -- what the loaders need: tensor names, shapes and the expert units -------------------------
def hf_config(model_type: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Checks the expert fields (ValueError names the field); qwen2_moe's q/k/v biases are
    qkv_bias in transformers 5 (always on before)."""
    moe_args(model_type, cfg)
    if model_type == "qwen2_moe":
        cfg = {**cfg, "attention_bias": bool(cfg.get("qkv_bias", True))}
    return cfg


def hf_units(spec: ModelSpec, key: str, ref: TensorRef) -> list[tuple[str, TensorRef]]:
    """A routed expert's tensors into its own unit; a tensor stacking every expert into each
    expert's byte sub-ranges; mixtral's names (w1, w3, w2; block_sparse_moe) to qwen's."""
    if ref.name == "block_sparse_moe.gate.weight":
        return [(key, replace(ref, name="mlp.gate.weight"))]
    if ref.name == "mlp.shared_expert_gate.weight" and tuple(ref.shape) == (spec.hidden_size,):
        return [(key, replace(ref, shape=(1, spec.hidden_size)))]  # a GGUF converter's (E,)
    m = _EXPERT.match(ref.name)
    if not m and ref.name not in STACKED + GGUF_STACKED:
        return [(key, ref)]
    layer_idx = int(key.split(".")[1]) if key.startswith("layers.") else -1
    sparse = moe_args(spec.model_type, spec.config).sparse
    if 0 <= layer_idx < len(sparse) and not sparse[layer_idx]:
        raise FormatError(f"tensor 'model.{key}.{ref.name}' is a routed expert's, but the "
                          f"config makes layer {layer_idx} dense (mlp_only_layers, "
                          "decoder_sparse_step); hint: the config must match the checkpoint")
    if m:
        e, linear, what = int(m.group(1)), m.group(2), m.group(3)
        n = moe_args(spec.model_type, spec.config).n_experts
        if e >= n:
            field = experts_field(spec.model_type, spec.config)
            raise FormatError(f"tensor 'model.{key}.{ref.name}' is for expert {e}, but "
                              f"config.json has {field}={n}; hint: the expert count must "
                              "match the checkpoint's experts")
        name = f"{MIXTRAL_NAMES.get(linear, linear)}.{what}"
        return [(expert_key(layer_idx, e), replace(ref, name=name))]
    if ref.name in GGUF_STACKED:
        return _split_gguf(spec, layer_idx, ref)
    return _split_stacked(spec, key, layer_idx, ref)


def _split_gguf(spec: ModelSpec, layer_idx: int, ref: TensorRef) -> list[tuple[str, TensorRef]]:
    """ffn_{gate,up}_exps (n_experts, I, E), ffn_down_exps (n_experts, E, I) in HF order: the
    expert is the outermost dim, so expert e is the e-th 1/n of the bytes, in the file's own
    (quantized) blocks: each row's blocks run along E (I for down)."""
    moe, E = moe_args(spec.model_type, spec.config), spec.hidden_size
    linear = ref.name.split(".")[2]
    shape = (E, moe.expert_size) if linear == "down_proj" else (moe.expert_size, E)
    want = (moe.n_experts, *shape)
    if tuple(ref.shape) != want:
        what = "expert_count, embedding_length, expert_feed_forward_length" \
            if linear == "down_proj" else \
            "expert_count, expert_feed_forward_length, embedding_length"
        raise FormatError(f"has shape {list(ref.shape)}, expected {list(want)} from the "
                          f"metadata ({what}); hint: the expert count and sizes must match "
                          "the stacked expert tensors")
    per = ref.nbytes // moe.n_experts
    return [(expert_key(layer_idx, e),
             replace(ref, name=f"{linear}.weight", offset=ref.offset + e * per, nbytes=per,
                     shape=shape))
            for e in range(moe.n_experts)]


def gguf_config(model_type: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The HF fields from llama.cpp's: its qwen3moe always renormalizes the top-k weights, its
    qwen2moe never; Mixtral's experts are num_local_experts, each intermediate_size wide.

    Raises:
        ValueError: naming the GGUF metadata key that is missing or wrong.
    """
    arch, cfg = GGUF_ARCH[model_type], dict(cfg)
    keys = {"num_experts": "expert_count", "num_experts_per_tok": "expert_used_count",
            "moe_intermediate_size": "expert_feed_forward_length",
            "shared_expert_intermediate_size": "expert_shared_feed_forward_length"}
    if model_type == "mixtral":
        cfg["num_local_experts"] = cfg.pop("num_experts", None)
        keys = {**keys, "num_local_experts": "expert_count",
                "intermediate_size": "feed_forward_length"}
    cfg["norm_topk_prob"] = model_type == "qwen3_moe"
    try:
        moe_args(model_type, cfg)
    except ValueError as exc:
        field = str(exc).split("'")[1] if "'" in str(exc) else ""
        key = keys.get(field)
        raise ValueError(f"GGUF metadata key {arch}.{key}: {exc}" if key else str(exc)) from None
    return cfg


def _split_stacked(spec: ModelSpec, key: str, layer_idx: int, ref: TensorRef
                   ) -> list[tuple[str, TensorRef]]:
    """gate_up_proj (n_experts, 2I, E): expert e's gate rows then its up rows;
    down_proj (n_experts, E, I). Each is a contiguous byte range of the stacked tensor."""
    moe, E = moe_args(spec.model_type, spec.config), spec.hidden_size
    up = ref.name.endswith("gate_up_proj")
    want = (moe.n_experts, 2 * moe.expert_size, E) if up else (moe.n_experts, E, moe.expert_size)
    if tuple(ref.shape) != want or ref.dtype == "U32":
        raise FormatError(f"tensor 'model.{key}.{ref.name}' has shape {list(ref.shape)} "
                          f"({ref.dtype}), expected {list(want)} from the config (num_experts, "
                          "hidden and expert intermediate sizes; unquantized)")
    per = ref.nbytes // moe.n_experts
    halves = (("gate_proj.weight", 0), ("up_proj.weight", per // 2)) if up \
        else (("down_proj.weight", 0),)
    shape = want[1:] if not up else (moe.expert_size, E)
    return [(expert_key(layer_idx, e),
             replace(ref, name=name, offset=ref.offset + e * per + at,
                     nbytes=per // len(halves), shape=shape))
            for e in range(moe.n_experts) for name, at in halves]


def expected_shapes(spec: ModelSpec) -> dict[str, dict[str, tuple[int, ...]]]:
    """llama's shapes; a sparse layer's dense MLP replaced by its router (and shared expert),
    its experts in units of their own after it."""
    moe, E = moe_args(spec.model_type, spec.config), spec.hidden_size
    dense = llama.expected_shapes(spec)
    units = {EMBED: dense[EMBED]}
    for i in range(spec.num_hidden_layers):
        block = dict(dense[layer_key(i)])
        if spec.model_type == "qwen3_moe":
            block.update({"self_attn.q_norm.weight": (spec.head_dim,),
                          "self_attn.k_norm.weight": (spec.head_dim,)})
            if spec.attention_bias:
                block["self_attn.o_proj.bias"] = (E,)
        units[layer_key(i)] = block
        if not moe.sparse[i]:
            continue
        for p in EXPERT_LINEARS:
            del block[f"mlp.{p}.weight"]
        block["mlp.gate.weight"] = (moe.n_experts, E)
        if moe.shared_size:
            block.update(_mlp_shapes("mlp.shared_expert.", moe.shared_size, E))
            block["mlp.shared_expert_gate.weight"] = (1, E)
        for e in range(moe.n_experts):
            units[expert_key(i, e)] = _mlp_shapes("", moe.expert_size, E)
    units[HEAD] = dense[HEAD]
    return units


def _mlp_shapes(prefix: str, inner: int, E: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}gate_proj.weight": (inner, E), f"{prefix}up_proj.weight": (inner, E),
            f"{prefix}down_proj.weight": (E, inner)}
