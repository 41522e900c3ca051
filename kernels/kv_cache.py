"""KV caches made of one part per layer, behind the one KVCache protocol (kernels/backend.py).

Two kinds of part: a full layer, preallocated to max_len positions, and a sliding-window layer
whose buffer holds `window` positions (a ring: position p at slot p % window), so its memory
is bounded by the window, not the context. The arrays are backend-native, so each backend owns
its kinds (numpy_backend.py, mlx_backend.py); what does not depend on the array type is here:
the per-sequence container with the one shared offset, the ring's bookkeeping, the bounds
checks and the attention mask.

Attention of a sliding layer with window W: the query at position p sees the keys at positions
max(0, p - W + 1) .. p (HF's convention: key j is visible iff 0 <= p - j < W).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


class KVLayer(Protocol):
    """One layer's part of a sequence's KV cache. The container passes the sequence offset."""

    window: int | None  # None: a full layer

    @property
    def nbytes(self) -> int: ...

    def update(self, offset: int, k: Any, v: Any) -> tuple[Any, Any]:
        """Store k, v (B, Hkv, L, D) at positions [offset, offset + L) and return the keys and
        values the pass attends over (KVCache.update says which)."""
        ...

    def attend(self, offset: int, q: Any, k: Any, v: Any, scale: float) -> Any:
        """KVCache.attend for this layer: batch row 0, q (L, H, D), k, v (L, Hkv, D)."""
        ...

    def check_rollback(self, offset: int) -> None:
        """Raise ValueError when a pass at `offset` could no longer be served (sliding layers
        hold only the last `window` positions written)."""
        ...

    def state(self, end: int) -> dict[str, np.ndarray]:
        """Batch row 0's positions [0, end) as numpy copies (a sliding layer: its ring and
        books), named as load_state and a prompt-cache file take them."""
        ...

    def load_state(self, state: dict[str, np.ndarray], n: int) -> None:
        """Into batch row 0: positions [0, n) from a state of this layer's kind and shape
        holding at least n. Raises ValueError when it cannot serve a pass at n (a sliding
        ring that has wrapped past them) or does not fit."""
        ...


class LayeredKVCache:
    """A sequence's KV cache: one KVLayer per layer, one shared offset (positions stored).

    It satisfies kernels.backend.KVCache by layer index; the backends subclass it only to build
    their layers (NumpyKVCache, MLXKVCache).
    """

    def __init__(self, layers: Sequence[KVLayer], max_len: int) -> None:
        self.layers = list(layers)
        self.max_len = max_len
        self.offset = 0

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    @property
    def windows(self) -> list[int | None]:
        """Each layer's window (None: full)."""
        return [layer.window for layer in self.layers]

    def _check_room(self, n: int) -> int:
        return check_room(self.offset, n, self.max_len)

    def update(self, layer_idx: int, k: Any, v: Any) -> tuple[Any, Any]:
        check_room(self.offset, k.shape[2], self.max_len)
        return self.layers[layer_idx].update(self.offset, k, v)

    def attend(self, layer_idx: int, q: Any, k: Any, v: Any, scale: float) -> Any:
        check_room(self.offset, q.shape[0], self.max_len)
        return self.layers[layer_idx].attend(self.offset, q, k, v, scale)

    def advance(self, n: int) -> None:
        self.offset = check_room(self.offset, n, self.max_len)

    def at(self, offset: int) -> LayeredKVCache:
        """This cache as a row tile of a pass sees it: the same layers, at offset (the rows of
        the tiles before it are written; the shared offset advances after the whole pass)."""
        view = copy.copy(self)
        view.offset = offset
        return view

    def state(self) -> list[dict[str, np.ndarray]]:
        """Every layer's state of the positions stored (KVLayer.state): what a prefix cache
        keeps and a prompt-cache file holds."""
        return [layer.state(self.offset) for layer in self.layers]

    def load_state(self, states: Sequence[dict[str, np.ndarray]], n: int) -> None:
        """Positions [0, n) from states (state() of a cache of the same model and KV setting,
        holding at least n); the offset becomes n.

        Raises:
            ValueError: a layer cannot take them (wrong kind or shape, a sliding ring that
                no longer holds what a pass at n needs, n beyond max_len).
        """
        check_room(0, n, self.max_len)
        if len(states) != len(self.layers):
            raise ValueError(f"KV state has {len(states)} layers, the cache {len(self.layers)}")
        for layer_idx, (layer, st) in enumerate(zip(self.layers, states, strict=True)):
            try:
                layer.load_state(st, n)
            except (ValueError, KeyError) as exc:
                raise ValueError(f"layer {layer_idx}: {exc}") from None
        self.offset = n

    def rollback_room(self, n: int) -> bool:
        """Whether a pass may write n positions at the offset and then trim any number of
        them (speculative decoding): always for full layers; for a sliding layer only while
        its ring has not wrapped and those n positions do not wrap it (a wrapped ring has
        overwritten positions that a shorter redo needs)."""
        return all(w is None or self.offset + n <= w for w in self.windows)

    def trim(self, n: int) -> None:
        """Drop the last n tokens. A full layer can always roll back (later writes overwrite);
        a sliding layer only while its ring still holds the window the next pass needs: one
        token once it has wrapped, any number before.

        Raises:
            ValueError: n is out of range, or a sliding layer cannot roll back that far.
        """
        check_trim(self.offset, n)
        for layer_idx, layer in enumerate(self.layers):
            try:
                layer.check_rollback(self.offset - n)
            except ValueError as exc:
                raise ValueError(f"cannot trim {n} tokens: layer {layer_idx}: {exc}") from None
        self.offset -= n


class Ring:
    """The bookkeeping of a sliding layer's buffer of `window` slots: position p sits at slot
    p % window, and the positions [start, end) are held (end: one past the last written).

    Writes happen during a pass, before the offset advances: a pass that is dropped after
    writing several positions has overwritten history that a redo at the same offset needs,
    which `first_needed` then reports rather than attending over the wrong keys.
    """

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"sliding window must be >= 1, got {window}")
        self.window = window
        self.start = 0
        self.end = 0

    def first_needed(self, offset: int) -> int:
        """The first position a pass at offset attends to, max(0, offset - window + 1), after
        checking that the ring still holds it.

        Raises:
            ValueError: the ring no longer holds it.
        """
        first = max(0, offset - self.window + 1)
        if self.start > first:
            raise ValueError(
                f"the sliding-window layer (window {self.window}) no longer holds position "
                f"{first}, which a pass at offset {offset} needs (it holds {self.start}.."
                f"{self.end - 1}); hint: a sliding layer rolls back at most one token once its "
                f"ring has wrapped")
        return first

    def store_one(self, offset: int) -> int:
        """Record the write of position offset; returns its slot."""
        self.start = max(self.start, offset + 1 - self.window)
        self.end = offset + 1
        return offset % self.window

    def store(self, offset: int, n: int) -> list[tuple[int, int, int]]:
        """Record the write of positions [offset, offset + n); returns the copies to make as
        (slot, slot end, first source row): the last min(n, window) rows, split where the ring
        wraps."""
        lo = max(offset, offset + n - self.window)
        self.start = max(self.start, offset + n - self.window)  # their slots held these
        self.end = offset + n
        out, row = [], lo - offset
        for a, b in self.slots(lo, offset + n):
            out.append((a, b, row))
            row += b - a
        return out

    def slots(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """Slot ranges holding positions [lo, hi) (at most window of them), in position order."""
        a, n = lo % self.window, hi - lo
        if a + n <= self.window:
            return [(a, a + n)]
        return [(a, self.window), (0, a + n - self.window)]


def rows_state(names: Sequence[str], arrays: Sequence[Any], end: int) -> dict[str, np.ndarray]:
    """A full layer's state: batch row 0 of each array, positions [0, end), as numpy copies."""
    return {name: np.array(a[0, :, :end]) for name, a in zip(names, arrays, strict=True)}


def check_rows(names: Sequence[str], arrays: Sequence[Any], state: dict[str, np.ndarray],
               n: int) -> list[np.ndarray]:
    """A full layer's state checked against its arrays: the state's [0, n) rows by name.

    Raises:
        ValueError: a name is missing, or its shape or dtype is not the layer's.
    """
    out = []
    for name, a in zip(names, arrays, strict=True):
        s = state.get(name)
        want = (a.shape[1], a.shape[3])
        if s is None or s.ndim != 3 or (s.shape[0], s.shape[2]) != want or s.shape[1] < n \
                or np.dtype(s.dtype) != np.dtype(str(a.dtype).removeprefix("mlx.core.")):
            got = "missing" if s is None else f"{s.dtype} {tuple(s.shape)}"
            raise ValueError(f"KV state {name!r}: {got}, the cache needs {n} positions of "
                             f"{want} ({str(a.dtype).removeprefix('mlx.core.')})")
        out.append(s[:, :n])
    return out


def ring_state(ring: Ring, names: Sequence[str], arrays: Sequence[Any]) -> dict[str, np.ndarray]:
    """A sliding layer's state: its ring buffers (batch row 0) and books."""
    st = {name: np.array(a[0]) for name, a in zip(names, arrays, strict=True)}
    st["ring"] = np.array([ring.window, ring.start, ring.end], dtype=np.int64)
    return st


def load_ring(ring: Ring, names: Sequence[str], arrays: Sequence[Any],
              state: dict[str, np.ndarray], n: int) -> list[np.ndarray]:
    """A sliding layer's state checked and its books restored to serve a pass at n; returns
    the ring buffers to copy in.

    Raises:
        ValueError: another window, shape or kind, or the ring no longer holds what a pass at
            n needs (it wrapped past it).
    """
    books = state.get("ring")
    if books is None or books.shape != (3,) or int(books[0]) != ring.window:
        raise ValueError(f"KV state is not a sliding-window layer of window {ring.window}")
    bufs = []
    for name, a in zip(names, arrays, strict=True):
        s = state.get(name)
        if s is None or tuple(s.shape) != tuple(a.shape[1:]):
            raise ValueError(f"KV state {name!r} does not fit the ring {tuple(a.shape[1:])}")
        bufs.append(s)
    start, end = int(books[1]), int(books[2])
    if n > end:
        raise ValueError(f"KV state holds {end} positions, {n} asked")
    probe = Ring(ring.window)
    probe.start, probe.end = start, end
    probe.first_needed(n)  # raises when the ring wrapped past what a pass at n needs
    ring.start, ring.end = start, n
    return bufs


def check_room(offset: int, n: int, max_len: int) -> int:
    """offset + n, after checking it fits.

    Raises:
        ValueError: names max_len and the length requested.
    """
    if n < 0 or offset + n > max_len:
        raise ValueError(
            f"KV cache overflow: {offset} tokens stored + {n} new = {offset + n} exceeds "
            f"max_len={max_len}; hint: create the cache with a larger max_len"
        )
    return offset + n


def check_trim(offset: int, n: int) -> int:
    if not 0 <= n <= offset:
        raise ValueError(f"cannot trim {n} tokens from a KV cache holding {offset}")
    return n


def layer_windows(n_layers: int, max_len: int, windows: Sequence[int | None] | None
                  ) -> list[int | None]:
    """Each layer's window for a cache of max_len positions: None (full) where none is given,
    and where the window is >= max_len (it never excludes a key there, and a full layer of
    max_len positions is no larger than the ring).

    Raises:
        ValueError: windows has the wrong length or a window < 1.
    """
    if windows is None:
        return [None] * n_layers
    if len(windows) != n_layers:
        raise ValueError(f"windows has {len(windows)} entries for {n_layers} layers")
    for w in windows:
        if w is not None and w < 1:
            raise ValueError(f"sliding window must be >= 1, got {w}")
    return [None if w is None or w >= max_len else int(w) for w in windows]


def window_mask(L: int, T: int, offset: int, window: int | None) -> np.ndarray:
    """(L, T) bool: query i (at key index offset + i) may attend to key j iff j <= offset + i
    and, with a window, offset + i - j < window."""
    d = offset + np.arange(L)[:, None] - np.arange(T)[None, :]
    return d >= 0 if window is None else (d >= 0) & (d < window)


# Float32 attention scores one query block may hold: a long prompt's rows attend in blocks of
# rows (query_blocks), so no pass holds a rows x keys score matrix per head.
ATTN_SCORE_BYTES = 16 * 2**20


def query_blocks(L: int, T: int, heads: int, offset: int, window: int | None,
                 nbytes: int | None = None) -> list[tuple[int, int, int, int]]:
    """Blocks (q0, q1, lo, hi) of L query rows over T keys (heads query heads; query i at key
    index offset + i, see window_mask): rows q0..q1-1 see only keys lo..hi-1, so each block
    runs as its own attention call on those keys, at offset offset + q0 - lo, with the same
    result per row. One block when the whole (heads, L, T) score matrix fits in nbytes; else
    as many rows per block as fit (at least one). nbytes: ATTN_SCORE_BYTES by default."""
    nbytes = ATTN_SCORE_BYTES if nbytes is None else nbytes
    if 4 * heads * L * T <= nbytes:
        return [(0, L, 0, T)]
    rows = max(1, nbytes // (4 * heads * max(1, T)))
    out = []
    for q0 in range(0, L, rows):
        q1 = min(L, q0 + rows)
        lo = 0 if window is None else max(0, offset + q0 - window + 1)
        out.append((q0, q1, lo, min(T, offset + q1)))
    return out


# -- quantized KV (--kv-bits): what does not depend on the backend (kv_quant.py: numpy) ------
KV_BITS = (4, 8)


def group_size(head_dim: int, bits: int) -> int:
    """The quantization group along head_dim: 64 at 8 bits (32 where 64 does not divide it),
    32 at 4 bits. SmolLM2 on the GPL-3 text (1023 tokens, ctx 512; float32 KV: perplexity
    19.64): 8 bits 19.68 with groups of 64, 19.67 with 32; 4 bits 23.36 with 64, 21.05 with 32.
    mlx-lm uses 64 for both.

    Raises:
        ValueError: head_dim is not a multiple of 32.
    """
    for g in ((64, 32) if bits == 8 else (32,)):
        if head_dim % g == 0:
            return g
    raise ValueError(f"--kv-bits needs a head_dim that is a multiple of 32, got {head_dim}; "
                     "hint: run this model without --kv-bits")


def check_bits(bits: int) -> int:
    if bits not in KV_BITS:
        raise ValueError(f"kv_bits must be one of {', '.join(map(str, KV_BITS))}, got {bits}")
    return bits


def position_bytes(head_dim: int, bits: int) -> int:
    """Bytes one position of one KV head takes in K or V: codes plus float16 scale and bias."""
    return head_dim * bits // 8 + 4 * (head_dim // group_size(head_dim, bits))
