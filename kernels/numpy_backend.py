"""The numpy backend (the CPU default): float32 numpy + BLAS, numba kernels on packed weights
(quantized, and 16-bit dense weights widened on the fly)."""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numba
import numpy as np

from stream_run.kernels import fused
from stream_run.kernels.formats import prepare_unit
from stream_run.kernels.numba_kernels import (
    HALF_SCALES,
    dequantize_rows,
    half_matvec,
    half_rows,
    kernel_weight,
    qmatvec,
)
from stream_run.kernels.quant import HalfWeight, QuantizedWeight

# Up to this many rows of x (decode, small batches) a quantized or 16-bit linear runs the fused
# numba matvec; above it, widening blocks of the weight to float32 and calling BLAS is faster.
MATVEC_MAX_ROWS = 8
DEQUANT_BLOCK_ELEMENTS = 1 << 22  # 16 MB of float32 weight rows per dequantize+BLAS block


def check_ids(ids: np.ndarray, n_rows: int) -> np.ndarray:
    """Token ids as int64, checked against the table size (the kernels do not bounds-check).

    Raises:
        ValueError: an id is negative or >= n_rows.
    """
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= n_rows):
        bad = ids[(ids < 0) | (ids >= n_rows)].ravel()[0]
        raise ValueError(f"token id {int(bad)} is out of range for a table of {n_rows} rows")
    return ids.astype(np.int64, copy=False)


def causal_mask(L: int, T: int, offset: int) -> np.ndarray:
    """(L, T) bool: query i (at position offset + i) may attend to key j iff j <= offset + i."""
    return np.arange(T)[None, :] <= offset + np.arange(L)[:, None]


def _float32_rows(w: QuantizedWeight | HalfWeight, rows: np.ndarray) -> np.ndarray:
    if isinstance(w, HalfWeight):
        return half_rows(w.data, w.dtype, rows)
    return dequantize_rows(w.packed, w.scales, w.biases, w.bits, w.group_size, rows)


_EMPTY = np.zeros(0, dtype=np.float32)


def _or_empty(a: np.ndarray | None) -> np.ndarray:
    return _EMPTY if a is None else a


# Each weight's kernel tuple, made once per prepared weight rather than per call: the three
# ascontiguousarray checks cost ~0.9 us per weight, 7 per decoder block per token.
_KERNEL_TUPLES: weakref.WeakKeyDictionary[QuantizedWeight, tuple] = weakref.WeakKeyDictionary()


def _kernel_tuple(w: QuantizedWeight) -> tuple:
    t = _KERNEL_TUPLES.get(w)
    if t is None:
        t = _KERNEL_TUPLES[w] = kernel_weight(w.packed, w.scales, w.biases, w.bits,
                                              w.group_size)
    return t


class NumpyKVCache:
    """k, v float32 (n_layers, B, Hkv, max_len, D), preallocated and written in place."""

    def __init__(
        self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int
    ) -> None:
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = np.zeros(shape, dtype=np.float32)  # zeros: pages are only touched when written
        self.v = np.zeros(shape, dtype=np.float32)
        self.max_len = max_len
        self.offset = 0

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def _check_room(self, n: int) -> int:
        end = self.offset + n
        if n < 0 or end > self.max_len:
            raise ValueError(
                f"KV cache overflow: {self.offset} tokens stored + {n} new = {end} exceeds "
                f"max_len={self.max_len}; hint: create the cache with a larger max_len"
            )
        return end

    def update(self, layer_idx: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Store k, v (B, Hkv, L, D) at [offset, offset + L); return views of [0, offset + L)."""
        end = self._check_room(k.shape[2])
        self.k[layer_idx, :, :, self.offset : end] = k
        self.v[layer_idx, :, :, self.offset : end] = v
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]

    def advance(self, n: int) -> None:
        self.offset = self._check_room(n)

    def attend(self, layer_idx: int, q: np.ndarray, k: np.ndarray, v: np.ndarray,
               scale: float) -> np.ndarray:
        """The fused form of update + attention for batch 1: q (L, H, D), k, v (L, Hkv, D) are
        written in place at offset; returns causal attention (L, H * D)."""
        self._check_room(q.shape[0])
        return fused.cached_attention(q, k, v, self.k[layer_idx, 0], self.v[layer_idx, 0],
                                      self.offset, scale)

    def trim(self, n: int) -> None:
        """Drop the last n tokens (a cancelled step's writes are simply overwritten later)."""
        if not 0 <= n <= self.offset:
            raise ValueError(f"cannot trim {n} tokens from a KV cache holding {self.offset}")
        self.offset -= n


class NumpyBackend:
    name = "numpy"
    prepare_off_compute_thread = True
    prepare_views_raw = True
    half_scales = HALF_SCALES

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads

    def init_compute_thread(self) -> None:
        """numba's thread count is per calling thread: set it on the compute thread."""
        if self.threads is not None:
            numba.set_num_threads(self.threads)

    def prepare(
        self, tensors: Mapping[str, Any], quantization: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        return prepare_unit(tensors, quantization, self.half_scales)

    def nbytes(self, prepared: Mapping[str, Any]) -> int:
        return sum(int(v.nbytes) for v in prepared.values())

    def from_numpy(self, a: np.ndarray) -> np.ndarray:
        return np.asarray(a)

    def to_numpy(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x)

    def embed(self, table: Any, ids: np.ndarray) -> np.ndarray:
        ids = check_ids(ids, table.shape[0])
        if isinstance(table, QuantizedWeight):
            rows = dequantize_rows(
                table.packed, table.scales, table.biases, table.bits, table.group_size, ids
            )
            return rows.reshape(*ids.shape, table.shape[1])
        if isinstance(table, HalfWeight):
            return half_rows(table.data, table.dtype, ids).reshape(*ids.shape, table.shape[1])
        return table[ids]

    def linear(self, x: np.ndarray, w: Any, bias: np.ndarray | None = None) -> np.ndarray:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        if isinstance(w, (QuantizedWeight, HalfWeight)):
            y = self._packed_linear(x2, w)
        else:
            y = x2 @ w.T  # BLAS sgemm with a transposed operand: no copy of w
        if bias is not None:
            y += bias
        return y.reshape(*lead, y.shape[-1])

    def _packed_linear(self, x: np.ndarray, w: QuantizedWeight | HalfWeight) -> np.ndarray:
        n_out, n_in = w.shape
        if x.shape[1] != n_in:
            raise ValueError(f"linear: x has {x.shape[1]} features, weight {w.shape} wants {n_in}")
        if x.shape[0] <= MATVEC_MAX_ROWS:
            if isinstance(w, HalfWeight):
                return half_matvec(x, w.data, w.dtype)
            return qmatvec(x, w.packed, w.scales, w.biases, w.bits, w.group_size)
        x = np.ascontiguousarray(x, dtype=np.float32)
        y = np.empty((x.shape[0], n_out), dtype=np.float32)
        step = max(1, DEQUANT_BLOCK_ELEMENTS // n_in)
        for lo in range(0, n_out, step):  # blocks bound the float32 temporary
            rows = np.arange(lo, min(lo + step, n_out), dtype=np.int64)
            np.matmul(x, _float32_rows(w, rows).T, out=y[:, lo : lo + rows.size])
        return y

    def fuses(self, weights: Sequence[Any], n_rows: int) -> bool:
        """True when the fused block kernels (kernels/fused.py) can run these linears on n_rows
        rows: all quantized, and few enough rows for matvec."""
        return n_rows <= MATVEC_MAX_ROWS and all(isinstance(w, QuantizedWeight) for w in weights)

    def block_attention_input(
        self, x: np.ndarray, norm: np.ndarray, eps: float, qkv: Sequence[QuantizedWeight],
        qkv_bias: Sequence[np.ndarray | None], qk_norm: Sequence[np.ndarray | None],
        cos: np.ndarray, sin: np.ndarray, n_heads: int, n_kv_heads: int,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x (N, E) -> q (N, H, D), k, v (N, Hkv, D): norm, q/k/v (+ bias), q/k norm, RoPE with
        per-row cos, sin (N, D/2). Only where fuses() said True."""
        wq, wk, wv = (_kernel_tuple(w) for w in qkv)
        bq, bk, bv = (_or_empty(b) for b in qkv_bias)
        qn, kn = (_or_empty(n) for n in qk_norm)
        return fused.attention_input(np.ascontiguousarray(x, dtype=np.float32), norm, eps,
                                     wq, wk, wv, bq, bk, bv, qn, kn, cos, sin, n_heads,
                                     n_kv_heads)

    def block_output(
        self, x: np.ndarray, attn: np.ndarray, wo: QuantizedWeight, bo: np.ndarray | None,
        norm: np.ndarray, eps: float, mlp: Sequence[QuantizedWeight],
    ) -> np.ndarray:
        """x (N, E) + o-proj(attn (N, H*D)) -> h; returns h + the SiLU MLP of norm(h)."""
        wg, wu, wd = (_kernel_tuple(w) for w in mlp)
        return fused.attention_output_mlp(np.ascontiguousarray(x, dtype=np.float32),
                                          np.ascontiguousarray(attn, dtype=np.float32),
                                          _kernel_tuple(wo), _or_empty(bo), norm, eps,
                                          wg, wu, wd)

    def block_decode(
        self, x: np.ndarray, norm: np.ndarray, eps: float, qkv: Sequence[QuantizedWeight],
        qkv_bias: Sequence[np.ndarray | None], qk_norm: Sequence[np.ndarray | None],
        cos: np.ndarray, sin: np.ndarray, n_heads: int, n_kv_heads: int, kv: NumpyKVCache,
        layer_idx: int, scale: float, wo: QuantizedWeight, bo: np.ndarray | None,
        post_norm: np.ndarray, mlp: Sequence[QuantizedWeight],
    ) -> np.ndarray:
        """block_attention_input, kv.attend and block_output for one sequence, in one call."""
        kv._check_room(x.shape[0])
        wq, wk, wv = (_kernel_tuple(w) for w in qkv)
        bq, bk, bv = (_or_empty(b) for b in qkv_bias)
        qn, kn = (_or_empty(n) for n in qk_norm)
        wg, wu, wd = (_kernel_tuple(w) for w in mlp)
        return fused.decoder_block(np.ascontiguousarray(x, dtype=np.float32), norm, eps, wq, wk,
                                   wv, bq, bk, bv, qn, kn, cos, sin, n_heads, n_kv_heads,
                                   kv.k[layer_idx, 0], kv.v[layer_idx, 0], kv.offset,
                                   np.float32(scale), _kernel_tuple(wo), _or_empty(bo),
                                   post_norm, wg, wu, wd)

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        ms = np.mean(np.square(x), axis=-1, keepdims=True)
        return x * (np.float32(1) / np.sqrt(ms + np.float32(eps))) * weight

    def rope(self, x: np.ndarray, offset: int, inv_freq: np.ndarray) -> np.ndarray:
        L, half = x.shape[2], x.shape[3] // 2
        pos = np.arange(offset, offset + L, dtype=np.float32)
        freqs = pos[:, None] * np.asarray(inv_freq, dtype=np.float32)[None, :]  # (L, D/2)
        cos, sin = np.cos(freqs), np.sin(freqs)
        x1, x2 = x[..., :half], x[..., half:]
        # HF rotate-half: x * cat(cos, cos) + cat(-x2, x1) * cat(sin, sin)
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    def attention(
        self, q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, offset: int
    ) -> np.ndarray:
        B, Hq, L, D = q.shape
        Hkv, T = k.shape[1], k.shape[2]
        G = Hq // Hkv
        # Query heads h = kv * G + g share kv head h // G: group them instead of repeating K/V.
        qg = np.ascontiguousarray(q).reshape(B, Hkv, G * L, D)
        scores = qg @ k.swapaxes(-1, -2)  # (B, Hkv, G*L, T)
        scores *= np.float32(scale)
        if not (L == 1 and T == offset + 1):
            s5 = scores.reshape(B, Hkv, G, L, T)
            s5[..., ~causal_mask(L, T, offset)] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        return (scores @ v).reshape(B, Hq, L, D)

    def silu_mul(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):  # exp(-g) -> inf for g << 0 gives silu = -0, correct
            return gate / (np.float32(1) + np.exp(-gate)) * up

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a + b

    def concatenate(self, xs: list[np.ndarray], axis: int) -> np.ndarray:
        return np.concatenate(xs, axis=axis)

    def reshape(self, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return np.reshape(x, shape)

    def transpose(self, x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
        return np.transpose(x, axes)

    def make_kv_cache(
        self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int
    ) -> NumpyKVCache:
        return NumpyKVCache(n_layers, batch, n_kv_heads, head_dim, max_len)

    def synchronize(self, x: Any) -> None:
        return None

    def start(self, x: Any) -> None:
        return None
