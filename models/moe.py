"""Mixture-of-Experts decoders: qwen3_moe, qwen2_moe (a gated shared expert beside the routed
ones) and mixtral, with llama's attention (qwen3's q/k norms, qwen2's q/k/v biases).

A sparse layer is two calls. The first runs the layer's dense unit (attention, norms, router,
shared expert) and picks each row's top-k experts; the second is late-bound: its units are
the experts those rows picked (their union over every sequence of the pass, each read once),
known only once the router has run. Each routed expert is its own unit
("layers.{i}.mlp.experts.{e}": gate, up and down), so the cache holds and streams experts one
by one. The routing glue (softmax, top-k, gathering and weighting an expert's rows) runs in
numpy on the host: the router's choice must reach the event loop as plain indices anyway.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import numpy as np

from stream_run.loaders import (
    EMBED,
    HEAD,
    Architecture,
    FormatError,
    ModelSpec,
    TensorRef,
    layer_key,
)
from stream_run.models import llama
from stream_run.models.base import Batch, Call, LateUnits, Units, attend_rows, row_tiles

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


@dataclass
class Routed:
    """What a sparse layer's dense call hands its experts call."""

    h: Any  # (1, T, E) the residual stream after attention
    x: np.ndarray  # (T, E) float32: the experts' input (post-attention norm)
    out: np.ndarray  # (T, E) float32: the shared expert's output, or zeros
    idx: np.ndarray  # (T, k) each row's experts
    weight: np.ndarray  # (T, k) float32 their weights

    @property
    def picked(self) -> list[int]:
        return sorted(set(self.idx.reshape(-1).tolist()))


class Model(llama.Model):
    def __init__(self, spec: ModelSpec, ops: Any) -> None:
        super().__init__(spec, ops)
        self.moe = moe_args(spec.model_type, spec.config)  # checked at load (hf_config)

    def layer_windows(self) -> list[int | None]:
        """HF's rules: mixtral and qwen3_moe slide every layer when sliding_window is set;
        qwen2_moe the layers layer_types marks sliding_attention."""
        spec, n = self.spec, self.spec.num_hidden_layers
        if spec.model_type != "qwen2_moe":
            return [spec.sliding_window] * n
        types = spec.layer_types if spec.use_sliding_window and spec.layer_types else []
        return [spec.sliding_window if t == "sliding_attention" else None for t in types] \
            or [None] * n

    def experts_of(self, layer_idx: int) -> Units:
        return tuple(expert_key(layer_idx, e) for e in range(self.moe.n_experts))

    def units(self) -> list[Units | LateUnits]:
        out: list[Units | LateUnits] = [(EMBED,)]
        for i in range(self.spec.num_hidden_layers):
            out.append((layer_key(i),))
            if self.moe.sparse[i]:  # a prefill may pick every expert of the layer
                out.append(LateUnits(self.experts_of(i), self.moe.n_experts))
        return [*out, self.layout()[-1]]

    def calls(self, batch: Batch, tile_rows: int | None = None) -> list[Call]:
        """Dense calls run their rows in tiles of tile_rows (as DecoderModel.calls); an
        experts call runs each expert on its rows in tiles of as many."""
        batch.spans  # noqa: B018  (fixes each sequence's offset before the pass)
        tiles = [(t, self.pass_context(t))
                 for t in (row_tiles(batch, tile_rows) if tile_rows else [batch])]
        calls = [Call((EMBED,), partial(self._embed_call, batch), "embed")]
        # what this pass's rows can pick: room the scheduler keeps free for a layer's experts
        picks = min(self.moe.n_experts, len(batch.ids) * self.moe.top_k)
        for i in range(self.spec.num_hidden_layers):
            key = layer_key(i)
            if not self.moe.sparse[i]:
                run = partial(self.block, i, *tiles[0]) if len(tiles) == 1 \
                    else partial(self._tiled_block, i, tiles)
                calls.append(Call((key,), run, key))
                continue
            calls.append(Call((key,), partial(self._route, i, tiles), key))
            calls.append(Call(partial(self._picked_units, i),
                              partial(self._experts, i, tile_rows or len(batch.ids)),
                              f"{key}.experts", self.experts_of(i), picks))
        return [*calls, Call(self.layout()[-1], partial(self._head_call, batch), "head")]

    def _picked_units(self, layer_idx: int, routed: Routed) -> Units:
        return tuple(expert_key(layer_idx, e) for e in routed.picked)

    def _route(self, layer_idx: int, tiles: list[tuple[Batch, Any]], x: Any,
               units: Mapping[str, Any]) -> Routed:
        """Attention, the post-attention norm, the router and the shared expert, per tile."""
        ops, w = self.ops, units[layer_key(layer_idx)]
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        h, start = x, 0
        for tile, _ctx in tiles:
            n = len(tile.ids)
            y = self._attention(layer_idx, tile, x[:, start:start + n], w)
            h = y if len(tiles) == 1 else ops.write_rows(h, start, y)
            parts.append(self._router(w, y))
            start += n
        xs, outs, idx, weight = (np.concatenate(p) for p in zip(*parts, strict=True))
        return Routed(h, xs, outs, idx, weight)

    def _attention(self, layer_idx: int, batch: Batch, x: Any, w: Mapping[str, Any]) -> Any:
        """llama's attention and its residual (llama.Model.block's first half)."""
        ops = self.ops
        h = ops.rms_norm(x, w["input_layernorm.weight"], self.spec.rms_norm_eps)
        q, k, v = (ops.linear(h, w[f"self_attn.{p}_proj.weight"], w.get(f"self_attn.{p}_proj.bias"))
                   for p in "qkv")
        o = attend_rows(ops, batch, partial(self._attend, w, layer_idx), q, k, v, axis=1)
        o = ops.linear(o, w["self_attn.o_proj.weight"], w.get("self_attn.o_proj.bias"))
        return ops.add(x, o)

    def _router(self, w: Mapping[str, Any], y: Any
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(experts' input, shared expert's output or zeros, top-k experts, their weights) of
        the rows of y (1, n, E)."""
        ops, moe = self.ops, self.moe
        h = ops.rms_norm(y, w["post_attention_layernorm.weight"], self.spec.rms_norm_eps)
        logits = ops.to_numpy(ops.linear(h, w["mlp.gate.weight"]))[0].astype(np.float32)
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)  # (n, n_experts)
        idx = np.argsort(-probs, axis=-1, kind="stable")[:, :moe.top_k]  # (n, k)
        weight = np.take_along_axis(probs, idx, axis=-1)
        if moe.norm_topk:
            weight /= weight.sum(axis=-1, keepdims=True)
        x = ops.to_numpy(h)[0].astype(np.float32)
        out = np.zeros_like(x)
        if moe.shared_size:
            gate = ops.to_numpy(ops.linear(h, w["mlp.shared_expert_gate.weight"]))[0]
            out = ops.to_numpy(_mlp(ops, h, w, "mlp.shared_expert."))[0] / (1 + np.exp(-gate))
        return x, out.astype(np.float32), idx, weight

    def _experts(self, layer_idx: int, tile_rows: int, r: Routed,
                 units: Mapping[str, Any]) -> Any:
        """Each picked expert on the rows that picked it, weighted, summed into the residual."""
        ops, out = self.ops, r.out.copy()
        for e in r.picked:
            w = units[expert_key(layer_idx, e)]
            rows, slot = np.nonzero(r.idx == e)  # a row picks an expert at most once
            for a in range(0, len(rows), tile_rows):
                sel, s = rows[a:a + tile_rows], slot[a:a + tile_rows]
                y = ops.to_numpy(_mlp(ops, ops.from_numpy(r.x[sel][None]), w, ""))[0]
                out[sel] += y * r.weight[sel, s][:, None]
        return ops.add(r.h, ops.from_numpy(out[None]))


def _mlp(ops: Any, x: Any, w: Mapping[str, Any], prefix: str) -> Any:
    gate = ops.linear(x, w[f"{prefix}gate_proj.weight"])
    up = ops.linear(x, w[f"{prefix}up_proj.weight"])
    return ops.linear(ops.silu_mul(gate, up), w[f"{prefix}down_proj.weight"])


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


def architecture(model_type: str) -> Architecture:
    return Architecture(model_type, expected_shapes, GGUF_NAMES,
                        gguf_permuted=llama.GGUF_PERMUTED if model_type == "mixtral" else {},
                        hf_config=partial(hf_config, model_type),
                        gguf_config=partial(gguf_config, model_type), hf_units=hf_units)
