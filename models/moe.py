"""Mixture-of-Experts decoders: qwen3_moe, qwen2_moe (a gated shared expert beside the routed
ones) and mixtral, with llama's attention (qwen3's q/k norms, qwen2's q/k/v biases).

A sparse layer is two calls. The first runs the layer's dense unit (attention, norms, router,
shared expert) and picks each row's top-k experts; the second is late-bound: its units are
the experts those rows picked (their union over every sequence of the pass, each read once),
known only once the router has run. Each routed expert is its own unit
("layers.{i}.mlp.experts.{e}": gate, up and down), so the cache holds and streams experts one
by one. The routing glue (softmax, top-k, gathering and weighting an expert's rows) runs in
numpy on the host: the router's choice must reach the event loop as plain indices anyway.
The families' files (config fields, expert units and byte ranges, shapes) are moe_layout.py's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from stream_run.loaders import EMBED, Architecture, ModelSpec, layer_key
from stream_run.models import llama
from stream_run.models.base import Batch, Call, LateUnits, Units, attend_rows, row_tiles
from stream_run.models.moe_layout import (  # noqa: F401  (re-exported: tests, bench)
    EXPERT_LINEARS,
    GGUF_NAMES,
    STACKED,
    MoEArgs,
    expected_shapes,
    expert_key,
    gguf_config,
    hf_config,
    hf_units,
    moe_args,
)


@dataclass
class Routed:
    """What a sparse layer's dense call hands its experts call."""

    h: Any  # (1, T, E) the residual stream after attention
    x: np.ndarray  # (T, E) float32: the experts' input (post-attention norm)
    out: np.ndarray  # (T, E) float32: the shared expert's output, or zeros
    idx: np.ndarray  # (T, k) each row's experts
    weight: np.ndarray  # (T, k) float32 their weights
    # expert lookahead: the next layer's experts its router picks from this layer's hidden
    # state (the scheduler reads them early, as guesses); () when off
    lookahead: tuple[str, ...] = ()

    @property
    def picked(self) -> list[int]:
        return sorted(set(self.idx.reshape(-1).tolist()))


class Model(llama.Model):
    # --expert-lookahead: a sparse layer's dense call also takes the next sparse layer's
    # dense unit and guesses its experts (the engine sets it before the first pass)
    lookahead = False

    def __init__(self, spec: ModelSpec, ops: Any) -> None:
        super().__init__(spec, ops)
        self.moe = moe_args(spec.model_type, spec.config)  # checked at load (hf_config)

    def _ahead(self, layer_idx: int) -> int | None:
        """The layer whose experts layer_idx's dense call guesses, or None."""
        nxt = layer_idx + 1
        sparse = self.moe.sparse
        ok = self.lookahead and sparse[layer_idx] and nxt < len(sparse) and sparse[nxt]
        return nxt if ok else None

    def _dense_units(self, layer_idx: int) -> Units:
        nxt = self._ahead(layer_idx)
        return (layer_key(layer_idx),) if nxt is None else (layer_key(layer_idx),
                                                             layer_key(nxt))

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
            out.append(self._dense_units(i))
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
            calls.append(Call(self._dense_units(i), partial(self._route, i, tiles), key))
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
        h, start, nxt, guess = x, 0, self._ahead(layer_idx), set()
        for tile, _ctx in tiles:
            n = len(tile.ids)
            y = self._attention(layer_idx, tile, x[:, start:start + n], w)
            h = y if len(tiles) == 1 else ops.write_rows(h, start, y)
            parts.append(self._router(w, y))
            if nxt is not None:
                guess.update(self._guess(units[layer_key(nxt)], y).reshape(-1).tolist())
            start += n
        xs, outs, idx, weight = (np.concatenate(p) for p in zip(*parts, strict=True))
        return Routed(h, xs, outs, idx, weight,
                      tuple(expert_key(nxt, e) for e in sorted(guess)) if guess else ())

    def _guess(self, w_next: Mapping[str, Any], y: Any) -> np.ndarray:
        """(n, k) the experts the next layer's router picks for rows y (1, n, E) of this
        layer's residual stream after attention (its post-attention norm, its router)."""
        ops = self.ops
        h = ops.rms_norm(y, w_next["post_attention_layernorm.weight"], self.spec.rms_norm_eps)
        logits = ops.to_numpy(ops.linear(h, w_next["mlp.gate.weight"]))[0].astype(np.float32)
        return self._top_experts(w_next, logits)

    def _top_experts(self, w: Mapping[str, Any], logits: np.ndarray) -> np.ndarray:
        """(n, k) the experts a router with these logits (n, n_experts) picks: the top k
        (softmax keeps the order); deepseek_v3 overrides it with its grouped choice."""
        return np.argsort(-logits, axis=-1, kind="stable")[:, :self.moe.top_k]

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


def architecture(model_type: str) -> Architecture:
    return Architecture(model_type, expected_shapes, GGUF_NAMES,
                        gguf_permuted=llama.GGUF_PERMUTED if model_type == "mixtral" else {},
                        hf_config=partial(hf_config, model_type),
                        gguf_config=partial(gguf_config, model_type), hf_units=hf_units)
