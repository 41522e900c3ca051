"""What a model file provides, and the pass of a decoder-only transformer written once.

A pass runs a Batch: the new rows of one or more sequences, each with its own KV cache and
position, stacked into one hidden state (1, T, E) with T the sum of their lengths. Linear
layers see all rows at once (one matmul per weight); attention runs per sequence. One sequence
is a batch of one.

A model turns a Batch into Calls, one per group of units (embed, each block, the head). Each
call takes the previous call's output and returns its own; the head returns the logits. The KV
caches are the only state a pass writes (the runner advances them after the pass).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Any

import numpy as np

from stream_run.kernels.backend import Backend, KVCache
from stream_run.kernels.kv_cache import group_size, position_bytes
from stream_run.loaders import EMBED, HEAD, ModelSpec, layer_key

Units = tuple[str, ...]


@dataclass
class SeqRows:
    """One sequence of a pass: its new ids (a prompt chunk or the last token) and its cache.

    span_end: where the span these rows belong to ends (a prompt chunk: the prompt's length),
    when it is past the rows' own end. A model whose computation depends on the length a
    forward call sees (Phi-3 longrope) uses it, so a chunked prefill computes as one call.
    n_logits: how many of the last rows return logits (a speculative verification: the last
    token and each draft token).
    """

    ids: np.ndarray  # (L,) int
    kv: KVCache
    span_end: int | None = None
    n_logits: int = 1

    @property
    def end(self) -> int:
        """The last position + 1 that these rows stand for (kv.offset before the pass)."""
        return max(self.kv.offset + len(self.ids), self.span_end or 0)


@dataclass
class Batch:
    """The rows of one pass. all_logits: logits for every row (perplexity, calibration), not
    only the last row of each sequence."""

    seqs: list[SeqRows]
    all_logits: bool = False

    @cached_property
    def ids(self) -> np.ndarray:
        return np.concatenate([s.ids for s in self.seqs])  # (T,)

    @cached_property
    def spans(self) -> list[tuple[KVCache, int, int]]:
        """(kv, offset, n_rows) per sequence, as the pass starts."""
        return [(s.kv, s.kv.offset, len(s.ids)) for s in self.seqs]

    @cached_property
    def last_rows(self) -> np.ndarray:
        """Index of each sequence's last row in the stacked (T, E) hidden state."""
        return np.cumsum([len(s.ids) for s in self.seqs]) - 1

    @cached_property
    def logit_rows(self) -> np.ndarray:
        """Rows whose logits the pass returns (without all_logits): each sequence's last
        n_logits rows, in order."""
        ends = self.last_rows + 1
        return np.concatenate([np.arange(e - s.n_logits, e) for s, e in zip(self.seqs, ends,
                                                                           strict=True)])


@dataclass(frozen=True)
class Call:
    """One step of a pass: run(x, weights) -> y, where weights maps each unit to its value.

    units may be a function of x (late-bound): the units are then known only once the call
    before has run, e.g. the experts a router picked.
    """

    units: Units | Callable[[Any], Units]
    run: Callable[[Any, Mapping[str, Any]], Any]
    name: str = ""
    candidates: Units = ()  # late-bound: the units it picks from, and how many
    picks: int = 1


@dataclass(frozen=True)
class LateUnits:
    """A late-bound call in `DecoderModel.units()`: its candidates and how many it picks, so
    the residency plan and the minimum budget keep room for them."""

    candidates: Units
    picks: int = 1


class DecoderModel:
    """embed -> blocks -> norm + head. A model file subclasses it and writes `block` once, in
    batched form; a Mixture-of-Experts model also overrides `calls` to split its blocks."""

    def __init__(self, spec: ModelSpec, ops: Backend) -> None:
        self.spec = spec
        self.ops = ops
        self._layout: list[Units] | None = None

    # -- the protocol the engine relies on ---------------------------------------------------
    def units(self) -> list[Units | LateUnits]:
        """Each call's units in pass order, a late-bound call as LateUnits (what the residency
        plan and the minimum budget are made from)."""
        return self.layout()

    def layout(self) -> list[Units]:
        """The units of embed, each block and the head (made once: every pass asks)."""
        if self._layout is None:
            head = (HEAD,) if not self.spec.tie_word_embeddings else (HEAD, EMBED)
            n = self.spec.num_hidden_layers
            self._layout = [(EMBED,), *((layer_key(i),) for i in range(n)), head]
        return self._layout

    def calls(self, batch: Batch, tile_rows: int | None = None) -> list[Call]:
        """The pass over batch as calls; the last returns logits (N or T, V) float32.

        tile_rows: each block runs the pass's rows in tiles of at most this many rows, in
        order (row_tiles), so a long prompt goes through every unit in one pass while the
        activations of one tile bound the memory a block's computation takes. None: one tile.
        """
        units = self.layout()
        batch.spans  # noqa: B018  (fixes each sequence's offset before the pass: see spans)
        tiles = [(t, self.pass_context(t))
                 for t in (row_tiles(batch, tile_rows) if tile_rows else [batch])]
        return [
            Call(units[0], partial(self._embed_call, batch), "embed"),
            *(Call(units[1 + i], partial(self.block, i, *tiles[0]) if len(tiles) == 1
                   else partial(self._tiled_block, i, tiles), layer_key(i))
              for i in range(self.spec.num_hidden_layers)),
            Call(units[-1], partial(self._head_call, batch), "head"),
        ]

    def make_kv_cache(self, max_len: int, kv_bits: int | None = None) -> KVCache:
        """A sequence's KV cache: per layer a full part (quantized with kv_bits), or a
        sliding-window part where layer_windows gives a window."""
        spec = self.spec
        assert spec.head_dim is not None and spec.num_key_value_heads is not None
        return self.ops.make_kv_cache(spec.num_hidden_layers, 1, spec.num_key_value_heads,
                                      spec.head_dim, max_len, self.layer_windows(), kv_bits)

    def check_kv_bits(self, kv_bits: int | None) -> None:
        """Raise ValueError when the KV cache cannot be stored in kv_bits (a head_dim it
        cannot group: not a multiple of 32)."""
        if kv_bits is not None:
            assert self.spec.head_dim is not None
            group_size(self.spec.head_dim, kv_bits)

    def kv_bytes(self, n_tokens: int, kv_bits: int | None = None) -> int:
        """Bytes of one sequence's KV cache for n_tokens positions (float32 keys and values,
        or kv_bits codes with their scales in full layers; a sliding-window layer holds its
        window at most, in float32)."""
        spec = self.spec
        assert spec.head_dim is not None and spec.num_key_value_heads is not None
        f32 = 2 * spec.num_key_value_heads * spec.head_dim * 4
        full = f32 if kv_bits is None else \
            2 * spec.num_key_value_heads * position_bytes(spec.head_dim, kv_bits)
        return sum(full * n_tokens if w is None else f32 * min(n_tokens, w)
                   for w in self.layer_windows())

    def reuses_prefix(self, cached: int, prompt: int) -> bool:
        """Whether keys a request computed over `cached` positions serve a prompt of `prompt`
        tokens as the prompt's own pass would compute them (the prefix cache asks; a model
        whose rotation depends on the sequence's length says when they differ)."""
        return True

    def verify_rows(self, offset: int, n: int) -> int:
        """How many of n rows at offset one pass may carry (speculative verification) and
        still compute each row as a pass of its own would: all, unless the model's
        computation depends on the length a pass sees (Phi-3 longrope)."""
        return n

    def layer_windows(self) -> list[int | None]:
        """Each layer's sliding window, None for full attention (the default: all full)."""
        return [None] * self.spec.num_hidden_layers

    # -- what a model file writes ------------------------------------------------------------
    def pass_context(self, batch: Batch) -> Any:
        """Values every block of one pass shares (RoPE tables for the rows), computed once on
        the event loop before the pass; None when the model needs none."""
        return None

    def embed(self, batch: Batch, w: Mapping[str, Any]) -> Any:
        return self.ops.embed(w["embed_tokens.weight"], batch.ids[None, :])  # (1, T, E)

    def block(self, layer_idx: int, batch: Batch, ctx: Any, h: Any,
              units: Mapping[str, Any]) -> Any:
        raise NotImplementedError

    def final_norm(self, h: Any, w: Mapping[str, Any]) -> Any:
        return self.ops.rms_norm(h, w["norm.weight"], self.spec.rms_norm_eps)

    def head(self, h: Any, units: Mapping[str, Any]) -> Any:
        """Logits of the rows of h (1, N, E) -> (1, N, V)."""
        w = units[HEAD]
        table = units[EMBED]["embed_tokens.weight"] if self.spec.tie_word_embeddings \
            else w["lm_head.weight"]
        return self.ops.linear(self.final_norm(h, w), table)

    # -- glue ----------------------------------------------------------------------------------
    def _tiled_block(self, layer_idx: int, tiles: Sequence[tuple[Batch, Any]], h: Any,
                     units: Mapping[str, Any]) -> Any:
        """The block on each row tile in order, its output written over the tile's rows of h
        (a tile needs only its own rows of h and the keys the tiles before it stored)."""
        start = 0
        for tile, ctx in tiles:
            n = len(tile.ids)
            y = self.block(layer_idx, tile, ctx, h[:, start:start + n], units)
            h = self.ops.write_rows(h, start, y)
            start += n
        return h

    def _embed_call(self, batch: Batch, _x: Any, units: Mapping[str, Any]) -> Any:
        return self.embed(batch, units[EMBED])

    def _head_call(self, batch: Batch, h: Any, units: Mapping[str, Any]) -> np.ndarray:
        rows = batch.logit_rows
        if not batch.all_logits and h.shape[1] != len(rows):
            h = self.ops.concatenate([h[:, r:r + 1] for r in rows], axis=1)
        return self.ops.to_numpy(self.head(h, units))[0]


def row_tiles(batch: Batch, rows: int) -> list[Batch]:
    """The pass's rows cut, in order, into tiles of at most `rows` rows (a sequence's span may
    be cut across tiles). A tile's sequences see their caches at the tile's first position
    (KVCache.at) and keep the whole span's end (SeqRows.span_end), so running the tiles one
    after another computes what one call on all rows would."""
    if len(batch.ids) <= rows:
        return [batch]
    tiles: list[Batch] = []
    seqs: list[SeqRows] = []
    free = rows
    for s, (kv, offset, n) in zip(batch.seqs, batch.spans, strict=True):
        a = 0
        while a < n:
            b = min(n, a + free)
            seqs.append(SeqRows(s.ids[a:b], kv.at(offset + a), s.end))
            free -= b - a
            a = b
            if free == 0:
                tiles.append(Batch(seqs, batch.all_logits))
                seqs, free = [], rows
    if seqs:
        tiles.append(Batch(seqs, batch.all_logits))
    return tiles


def attend_rows(ops: Backend, batch: Batch, fn: Callable[[KVCache, int, Any, Any, Any], Any],
                q: Any, k: Any, v: Any, axis: int) -> Any:
    """Run fn(kv, offset, q, k, v) per sequence on its slice of the stacked rows along axis
    and join the results (attention runs per sequence, against its own cache)."""
    outs, start = [], 0
    for kv, offset, n in batch.spans:
        sl = (slice(None),) * axis + (slice(start, start + n),)
        outs.append(fn(kv, offset, q[sl], k[sl], v[sl]))
        start += n
    return outs[0] if len(outs) == 1 else ops.concatenate(outs, axis=axis)


def rope_rows(inv_freq: np.ndarray, spans: Sequence[tuple[Any, int, int]]
              ) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (T, D/2) for the rows of (kv, offset, n) spans, as ops.rope computes them."""
    pos = np.concatenate([np.arange(o, o + n, dtype=np.float32) for _, o, n in spans])
    freqs = pos[:, None] * np.asarray(inv_freq, dtype=np.float32)[None, :]
    return np.cos(freqs), np.sin(freqs)
