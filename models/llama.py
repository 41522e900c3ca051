"""Llama-family decoder (llama, mistral, qwen2 with qkv bias, qwen3 with q/k norm), written
once against the kernels ops and split into scheduler steps: embed, one per block, head.

Two forms of a pass: `steps` runs ids (B, L) against one KV cache; `batch_steps` runs several
sequences, each with its own KV cache and length, as one pass: the linear layers see the rows of
all of them stacked (one matmul per weight), attention runs per sequence.

Blocks take their weights as an argument for one call and keep no reference to them, so
evicting a unit from the cache frees its memory. Embed and block steps return the hidden state
they produced: the scheduler hands the last one of each compute call to the backend's `start`
(MLX: evaluate it now, so a lazy graph does not keep a streamed unit's arrays alive).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from stream_run.kernels.backend import Backend, KVCache
from stream_run.loaders import EMBED, HEAD, ModelSpec, layer_key
from stream_run.models.rope import inv_freq
from stream_run.scheduler import Step


@dataclass
class ForwardState:
    """What flows through one forward pass: token ids in, hidden state, logits out."""

    ids: np.ndarray  # (B, L) int
    kv: KVCache
    all_logits: bool = False  # False: logits of the last position only
    h: Any = None  # (B, L, E)
    logits: np.ndarray | None = None  # (B, L or 1, V) float32
    rope: tuple[np.ndarray, np.ndarray] | None = None  # fused path: cos, sin per row


@dataclass
class SeqInput:
    """One sequence of a batched pass: its new ids (prompt chunk or last token) and its cache."""

    ids: np.ndarray  # (L,) int
    kv: KVCache


@dataclass
class BatchState:
    """A batched pass: sequences in, their rows stacked as h (1, T, E), T = sum of lengths."""

    seqs: list[SeqInput]
    h: Any = None
    logits: np.ndarray | None = None  # (N, V) float32, the last position of each sequence
    rope: tuple[np.ndarray, np.ndarray] | None = None  # fused path: cos, sin per row


LINEARS = tuple(f"self_attn.{p}_proj" for p in "qkvo") + tuple(
    f"mlp.{p}_proj" for p in ("gate", "up", "down"))


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
        return self._plan(partial(self._embed, st), partial(self._block, st),
                          partial(self._head, st))

    def batch_steps(self, st: BatchState) -> list[Step]:
        """The units of `steps`, running every sequence of st in one pass."""
        return self._plan(partial(self._embed_batch, st), partial(self._block_batch, st),
                          partial(self._head_batch, st))

    def _plan(self, embed: Callable[..., Any], block: Callable[..., Any],
              head: Callable[..., None]) -> list[Step]:
        """embed, each block (block(i, units)), final norm + head: one unit set per step."""
        head_units = (HEAD,) if not self.spec.tie_word_embeddings else (HEAD, EMBED)
        return [
            Step((EMBED,), embed, "embed"),
            *(Step((layer_key(i),), partial(block, i), layer_key(i))
              for i in range(self.spec.num_hidden_layers)),
            Step(head_units, head, "head"),
        ]

    def _embed(self, st: ForwardState, w: Mapping[str, Any]) -> Any:
        st.h = self.ops.embed(w[EMBED]["embed_tokens.weight"], st.ids)
        return st.h

    def _block(self, st: ForwardState, layer_idx: int, units: Mapping[str, Any]) -> Any:
        ops, w = self.ops, units[layer_key(layer_idx)]
        x = st.h
        B, L = st.ids.shape
        if B == 1 and self._fuses(w, L):
            if st.rope is None:
                st.rope = self._rope_tables([(st.kv.offset, L)])
            st.h = self._fused_block(w, layer_idx, x[0], [(st.kv, L)], st.rope)[None]
            return st.h
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
        return st.h

    def _head(self, st: ForwardState, units: Mapping[str, Any]) -> None:
        ops, w = self.ops, units[HEAD]
        h = st.h if st.all_logits else st.h[:, -1:, :]
        h = ops.rms_norm(h, w["norm.weight"], self.spec.rms_norm_eps)
        table = units[EMBED]["embed_tokens.weight"] if self.spec.tie_word_embeddings \
            else w["lm_head.weight"]
        st.logits = ops.to_numpy(ops.linear(h, table))
        st.kv.advance(st.ids.shape[1])
        st.h = None

    def _embed_batch(self, st: BatchState, w: Mapping[str, Any]) -> Any:
        ids = np.concatenate([s.ids for s in st.seqs])[None, :]  # (1, T)
        st.h = self.ops.embed(w[EMBED]["embed_tokens.weight"], ids)
        return st.h

    def _block_batch(self, st: BatchState, layer_idx: int, units: Mapping[str, Any]) -> Any:
        ops, w, eps = self.ops, units[layer_key(layer_idx)], self.spec.rms_norm_eps
        x = st.h
        if self._fuses(w, x.shape[1]):
            seqs = [(s.kv, len(s.ids)) for s in st.seqs]
            if st.rope is None:
                st.rope = self._rope_tables([(kv.offset, n) for kv, n in seqs])
            st.h = self._fused_block(w, layer_idx, x[0], seqs, st.rope)[None]
            return st.h
        h = ops.rms_norm(x, w["input_layernorm.weight"], eps)
        q = ops.linear(h, w["self_attn.q_proj.weight"], w.get("self_attn.q_proj.bias"))
        k = ops.linear(h, w["self_attn.k_proj.weight"], w.get("self_attn.k_proj.bias"))
        v = ops.linear(h, w["self_attn.v_proj.weight"], w.get("self_attn.v_proj.bias"))
        outs, start = [], 0
        for seq in st.seqs:  # attention per sequence, against its own cache and positions
            end = start + len(seq.ids)
            outs.append(self._attend(w, layer_idx, seq.kv, q[:, start:end], k[:, start:end],
                                     v[:, start:end]))
            start = end
        o = outs[0] if len(outs) == 1 else ops.concatenate(outs, axis=1)  # (1, T, H*D)
        x = ops.add(x, ops.linear(o, w["self_attn.o_proj.weight"], w.get("self_attn.o_proj.bias")))
        h = ops.rms_norm(x, w["post_attention_layernorm.weight"], eps)
        gate = ops.linear(h, w["mlp.gate_proj.weight"])
        up = ops.linear(h, w["mlp.up_proj.weight"])
        st.h = ops.add(x, ops.linear(ops.silu_mul(gate, up), w["mlp.down_proj.weight"]))
        return st.h

    def _attend(self, w: Mapping[str, Any], layer_idx: int, kv: KVCache, q: Any, k: Any,
                v: Any) -> Any:
        """One sequence's attention: q (1, L, H*D), k, v (1, L, Hkv*D) -> (1, L, H*D)."""
        ops, eps = self.ops, self.spec.rms_norm_eps
        L = q.shape[1]
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q = ops.transpose(ops.reshape(q, (1, L, H, D)), (0, 2, 1, 3))  # (1, H, L, D)
        k = ops.transpose(ops.reshape(k, (1, L, Hkv, D)), (0, 2, 1, 3))  # (1, Hkv, L, D)
        v = ops.transpose(ops.reshape(v, (1, L, Hkv, D)), (0, 2, 1, 3))
        if self.spec.qk_norm:
            q = ops.rms_norm(q, w["self_attn.q_norm.weight"], eps)
            k = ops.rms_norm(k, w["self_attn.k_norm.weight"], eps)
        q = ops.rope(q, kv.offset, self.inv_freq)
        k = ops.rope(k, kv.offset, self.inv_freq)
        keys, values = kv.update(layer_idx, k, v)
        o = ops.attention(q, keys, values, self.scale, kv.offset)  # (1, H, L, D)
        return ops.reshape(ops.transpose(o, (0, 2, 1, 3)), (1, L, H * D))

    def _fuses(self, w: Mapping[str, Any], n_rows: int) -> bool:
        """The backend's fused block applies (numpy: numba kernels for quantized linears on few
        rows; MLX: compiled halves on few rows)."""
        fuses = getattr(self.ops, "fuses", None)
        return fuses is not None and fuses([w[f"{n}.weight"] for n in LINEARS], n_rows)

    def _rope_tables(self, spans: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin (N, D/2) for the rows of (offset, length) spans, as ops.rope computes them."""
        pos = np.concatenate([np.arange(o, o + n, dtype=np.float32) for o, n in spans])
        freqs = pos[:, None] * np.asarray(self.inv_freq, dtype=np.float32)[None, :]
        return np.cos(freqs), np.sin(freqs)

    def _fused_block(self, w: Mapping[str, Any], layer_idx: int, x: Any,
                     seqs: list[tuple[KVCache, int]], rope: tuple[np.ndarray, np.ndarray]) -> Any:
        """The block on x (N, E) in two fused calls plus one attention call per sequence, or
        in one call where the backend has it (block_decode: one sequence)."""
        ops, eps = self.ops, self.spec.rms_norm_eps
        attn_in = (x, w["input_layernorm.weight"], eps,
                   [w[f"self_attn.{p}_proj.weight"] for p in "qkv"],
                   [w.get(f"self_attn.{p}_proj.bias") for p in "qkv"],
                   [w.get("self_attn.q_norm.weight"), w.get("self_attn.k_norm.weight")],
                   *rope, self.n_heads, self.n_kv_heads)
        out_args = (w["self_attn.o_proj.weight"], w.get("self_attn.o_proj.bias"),
                    w["post_attention_layernorm.weight"])
        mlp = [w[f"mlp.{p}_proj.weight"] for p in ("gate", "up", "down")]
        if len(seqs) == 1 and hasattr(ops, "block_decode"):
            return ops.block_decode(*attn_in, seqs[0][0], layer_idx, self.scale, *out_args, mlp)
        q, k, v = ops.block_attention_input(*attn_in)  # (N, H, D), (N, Hkv, D) x2
        outs, start = [], 0
        for kv, n in seqs:
            end = start + n
            outs.append(kv.attend(layer_idx, q[start:end], k[start:end], v[start:end],
                                  self.scale))
            start = end
        attn = outs[0] if len(outs) == 1 else ops.concatenate(outs, axis=0)  # (N, H * D)
        wo, bo, post_norm = out_args
        return ops.block_output(x, attn, wo, bo, post_norm, eps, mlp)

    def _head_batch(self, st: BatchState, units: Mapping[str, Any]) -> None:
        ops, w = self.ops, units[HEAD]
        ends = np.cumsum([len(s.ids) for s in st.seqs])
        h = st.h
        if ends[-1] != len(st.seqs):  # some sequence fed a prompt chunk: keep its last row
            h = ops.concatenate([h[:, e - 1:e] for e in ends], axis=1)  # (1, N, E)
        h = ops.rms_norm(h, w["norm.weight"], self.spec.rms_norm_eps)
        table = units[EMBED]["embed_tokens.weight"] if self.spec.tie_word_embeddings \
            else w["lm_head.weight"]
        st.logits = ops.to_numpy(ops.linear(h, table))[0]
        for seq in st.seqs:
            seq.kv.advance(len(seq.ids))
        st.h = None
