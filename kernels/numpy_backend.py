"""The numpy backend (the CPU default): float32 numpy + BLAS, numba kernels on packed weights
(MLX affine, GGUF blocks as read, and 16-bit dense weights widened on the fly)."""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numba
import numpy as np

from stream_run.kernels import fused, gguf_blocks, gguf_gemm, mxfp4, mxfp4_kernels
from stream_run.kernels.formats import prepare_unit
from stream_run.kernels.kv_cache import (
    ATTN_SCORE_BYTES,
    LayeredKVCache,
    Ring,
    check_rows,
    layer_windows,
    load_ring,
    query_blocks,
    ring_state,
    rows_state,
    window_mask,
)
from stream_run.kernels.kv_quant import NumpyQuantizedKV
from stream_run.kernels.numba_kernels import (
    HALF_SCALES,
    dequantize_rows,
    half_head_t,
    half_matvec,
    half_rows,
    kernel_weight,
    qhead,
    qhead_t,
    qmatvec,
)
from stream_run.kernels.quant import BlockWeight, HalfWeight, QuantizedWeight, row_block

# Up to this many rows of x (decode, small batches) a quantized or 16-bit linear runs the fused
# numba matvec; above it, GGUF blocks run the int8 GEMM (kernels/gguf_gemm.py, x rounded to
# int8 per 32 elements as decode rounds it), other weights are widened to float32 in blocks
# for BLAS.
MATVEC_MAX_ROWS = 8
PROMPT_ROWS = 128  # attention's query rows per block (kernels/kv_cache.py query_blocks)
DEQUANT_BLOCK_ELEMENTS = 1 << 22  # 16 MB of float32 weight rows per dequantize+BLAS block
GELU_C = math.sqrt(2 / math.pi)  # the tanh approximation's constant


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


Packed = QuantizedWeight | HalfWeight | BlockWeight


def _float32_rows(w: Packed, rows: np.ndarray) -> np.ndarray:
    if isinstance(w, HalfWeight):
        return half_rows(w.data, w.dtype, rows)
    if isinstance(w, BlockWeight):
        return gguf_blocks.dequantize_rows(w, rows)
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


class NumpyFullKV:
    """One full layer: k, v float32 (B, Hkv, max_len, D), preallocated and written in place."""

    window = None

    def __init__(self, batch: int, n_kv_heads: int, head_dim: int, max_len: int) -> None:
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = np.zeros(shape, dtype=np.float32)  # zeros: pages are only touched when written
        self.v = np.zeros(shape, dtype=np.float32)
        self.kc, self.vc = self.k[0], self.v[0]  # batch row 0: the fused path's (Hkv, max, D)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def update(self, offset: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Store k, v (B, Hkv, L, D) at [offset, offset + L); return views of [0, offset + L)."""
        end = offset + k.shape[2]
        self.k[:, :, offset:end] = k
        self.v[:, :, offset:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def attend(self, offset: int, q: np.ndarray, k: np.ndarray, v: np.ndarray,
               scale: float) -> np.ndarray:
        return fused.cached_attention(q, k, v, self.kc, self.vc, offset, scale)

    def check_rollback(self, offset: int) -> None:
        return None

    def state(self, end: int) -> dict[str, np.ndarray]:
        return rows_state(("k", "v"), (self.k, self.v), end)

    def load_state(self, state: dict[str, np.ndarray], n: int) -> None:
        k, v = check_rows(("k", "v"), (self.k, self.v), state, n)
        self.k[0, :, :n] = k
        self.v[0, :, :n] = v


class NumpySlidingKV:
    """One sliding-window layer: k, v float32 (B, Hkv, window, D), a ring buffer (position p
    at slot p % window; kv_cache.Ring keeps the books)."""

    def __init__(self, batch: int, n_kv_heads: int, head_dim: int, window: int) -> None:
        self.ring = Ring(window)
        self.window = window
        shape = (batch, n_kv_heads, window, head_dim)
        self.k = np.zeros(shape, dtype=np.float32)
        self.v = np.zeros(shape, dtype=np.float32)
        self.kc, self.vc = self.k[0], self.v[0]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def update(self, offset: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Store k, v (B, Hkv, L, D) at [offset, offset + L). Returns, for one row, views of the
        ring's filled slots (the window, in slot order: one query needs no order); for L > 1, new
        arrays of positions max(0, offset - window + 1) .. offset + L - 1 in order."""
        ring, L = self.ring, k.shape[2]
        first = ring.first_needed(offset)
        if L == 1:
            s = ring.store_one(offset)
            self.k[:, :, s] = k[:, :, 0]
            self.v[:, :, s] = v[:, :, 0]
            T = min(offset + 1, self.window)
            return self.k[:, :, :T], self.v[:, :, :T]
        keys = np.concatenate([*self._held(self.k, first, offset), k], axis=2)
        values = np.concatenate([*self._held(self.v, first, offset), v], axis=2)
        for a, b, r in ring.store(offset, L):  # after the reads: these slots held older keys
            self.k[:, :, a:b] = k[:, :, r : r + b - a]
            self.v[:, :, a:b] = v[:, :, r : r + b - a]
        return keys, values

    def _held(self, buf: np.ndarray, lo: int, hi: int) -> list[np.ndarray]:
        return [buf[:, :, a:b] for a, b in self.ring.slots(lo, hi)]

    def decode_slot(self, offset: int) -> tuple[int, int]:
        """For one row at offset written into kc, vc by a fused kernel: its slot, and the
        kernel's offset (it attends over slots [0, offset + 1): every position the ring holds)."""
        self.ring.first_needed(offset)
        return self.ring.store_one(offset), min(offset + 1, self.window) - 1

    def attend(self, offset: int, q: np.ndarray, k: np.ndarray, v: np.ndarray,
               scale: float) -> np.ndarray:
        L, H, D = q.shape
        if L == 1:
            slot, kernel_offset = self.decode_slot(offset)
            self.kc[:, slot] = k[0]
            self.vc[:, slot] = v[0]
            return fused.attend_cached(q, self.kc, self.vc, kernel_offset, scale)
        keys, values = self.update(offset, k.transpose(1, 0, 2)[None], v.transpose(1, 0, 2)[None])
        o = attention(q.transpose(1, 0, 2)[None], keys, values, scale, keys.shape[2] - L,
                      self.window)  # (1, H, L, D)
        return o[0].transpose(1, 0, 2).reshape(L, H * D)

    def check_rollback(self, offset: int) -> None:
        self.ring.first_needed(offset)

    def state(self, end: int) -> dict[str, np.ndarray]:
        return ring_state(self.ring, ("k", "v"), (self.k, self.v))

    def load_state(self, state: dict[str, np.ndarray], n: int) -> None:
        k, v = load_ring(self.ring, ("k", "v"), (self.k, self.v), state, n)
        self.k[0], self.v[0] = k, v


class NumpyKVCache(LayeredKVCache):
    """A sequence's KV cache on numpy: per layer a NumpyFullKV (a NumpyQuantizedKV with
    kv_bits), or a NumpySlidingKV where windows gives a window (kv_cache.layer_windows)."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int,
                 windows: Sequence[int | None] | None = None, kv_bits: int | None = None
                 ) -> None:
        def full() -> NumpyFullKV | NumpyQuantizedKV:
            if kv_bits is None:
                return NumpyFullKV(batch, n_kv_heads, head_dim, max_len)
            return NumpyQuantizedKV(batch, n_kv_heads, head_dim, max_len, kv_bits)

        super().__init__([
            full() if w is None else NumpySlidingKV(batch, n_kv_heads, head_dim, w)
            for w in layer_windows(n_layers, max_len, windows)], max_len)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, offset: int,
              window: int | None = None, softcap: float | None = None,
              sinks: np.ndarray | None = None) -> np.ndarray:
    """NumpyBackend.attention (also a sliding layer's attention for several rows): in blocks
    of query rows over the keys each block sees (kv_cache.query_blocks) when the whole score
    matrix would exceed ATTN_SCORE_BYTES."""
    L, T = q.shape[2], k.shape[2]
    if 1 < L <= MATVEC_MAX_ROWS and T == offset + L and (window is None or T <= window):
        # A few rows (a speculative pass's draft rows, or a short chunk): each row as the
        # one-row pass at its position computes it (its keys, no mask), so a row's bits do not
        # depend on the rows beside it; one score matrix with masked keys sums in another order
        out = np.empty(q.shape, np.result_type(q, v))
        for i in range(L):
            t = offset + i + 1
            out[:, :, i:i + 1] = _attention(q[:, :, i:i + 1], k[:, :, :t], v[:, :, :t], scale,
                                            t - 1, window, softcap, sinks)
        return out
    heads = q.shape[0] * q.shape[1]
    # a prompt's rows in blocks of at most PROMPT_ROWS: each block skips the keys after its
    # last row (causal), ~45 % of a 512-row prompt's score work
    blocks = query_blocks(L, T, heads, offset, window,
                          min(ATTN_SCORE_BYTES, 4 * heads * max(1, T) * PROMPT_ROWS))
    if len(blocks) == 1:
        return _attention(q, k, v, scale, offset, window, softcap, sinks)
    out = np.empty(q.shape, np.result_type(q, v))
    for q0, q1, lo, hi in blocks:
        out[:, :, q0:q1] = _attention(q[:, :, q0:q1], k[:, :, lo:hi], v[:, :, lo:hi], scale,
                                      offset + q0 - lo, window, softcap, sinks)
    return out


def _attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, offset: int,
               window: int | None, softcap: float | None,
               sinks: np.ndarray | None = None) -> np.ndarray:
    B, Hq, L, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    G = Hq // Hkv
    # Query heads h = kv * G + g share kv head h // G: group them instead of repeating K/V.
    qg = np.ascontiguousarray(q).reshape(B, Hkv, G * L, D)
    per_head = L > MATVEC_MAX_ROWS  # a prompt's rows: one BLAS call per head
    if per_head:  # numpy's stacked matmul ran 1-3.4x slower than a loop of 2-d ones
        scores = np.empty((B, Hkv, G * L, T), np.result_type(q, k))
        for b in range(B):
            for h in range(Hkv):
                np.matmul(qg[b, h], k[b, h].T, out=scores[b, h])
    else:
        scores = qg @ k.swapaxes(-1, -2)  # (B, Hkv, G*L, T)
    scores *= np.float32(scale)
    if softcap is not None:
        scores /= np.float32(softcap)
        np.tanh(scores, out=scores)
        scores *= np.float32(softcap)
    if not (L == 1 and T == offset + 1 and (window is None or T <= window)):
        np.copyto(scores.reshape(B, Hkv, G, L, T), np.float32(-np.inf),
                  where=~window_mask(L, T, offset, window))
    if sinks is not None:  # a learned logit per query head in the softmax, with no value
        scores = _sink_softmax(scores, sinks, Hkv, G, L)
    else:
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
    if not per_head:
        return (scores @ v).reshape(B, Hq, L, D)
    out = np.empty((B, Hkv, G * L, D), np.result_type(scores, v))
    for b in range(B):
        for h in range(Hkv):
            np.matmul(scores[b, h], v[b, h], out=out[b, h])
    return out.reshape(B, Hq, L, D)


def _sink_softmax(scores: np.ndarray, sinks: np.ndarray, Hkv: int, G: int, L: int
                  ) -> np.ndarray:
    """softmax over each row's scores (B, Hkv, G*L, T) and its query head's sink, the sink's
    share dropped (gpt-oss)."""
    sink = np.repeat(np.asarray(sinks, np.float32).reshape(1, Hkv, G, 1), L, axis=2)
    m = np.maximum(scores.max(axis=-1, keepdims=True), sink)
    scores -= m
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True) + np.exp(sink - m)
    return scores


def _silu_mul_into(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """NumpyBackend.silu_mul's bits, with one temporary: numpy's vector exp (numba's scalar
    one ran 2x slower at 11008 wide)."""
    act = np.negative(gate)
    with np.errstate(over="ignore"):  # exp(-g) -> inf for g << 0 gives silu = -0, correct
        np.exp(act, out=act)
    act += np.float32(1)
    np.divide(gate, act, out=act)
    act *= up
    return act


def _block_attention_input(
    x: np.ndarray, norm: np.ndarray, eps: float, qkv: Sequence[BlockWeight],
    qkv_bias: Sequence[np.ndarray | None], qk_norm: Sequence[np.ndarray | None],
    cos: np.ndarray, sin: np.ndarray, n_heads: int, n_kv_heads: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NumpyBackend.block_attention_input on GGUF blocks: the norm, q|k|v as matvecs (x
    quantized once, one parallel region per weight type), q/k norm and RoPE in place."""
    n = x.shape[0]
    h = fused.rms_norm(np.ascontiguousarray(x, dtype=np.float32), norm, eps)
    q, k, v = gguf_blocks.matvecs(h, qkv)
    for t, b in zip((q, k, v), qkv_bias, strict=True):
        if b is not None:
            t += b
    q, k, v = (t.reshape(n, heads, -1) for t, heads in zip(
        (q, k, v), (n_heads, n_kv_heads, n_kv_heads), strict=True))
    qn, kn = (_or_empty(w) for w in qk_norm)
    fused.head_norm_rope(q, k, qn, kn, eps, cos, sin)
    return q, k, v


def _block_output(x: np.ndarray, attn: np.ndarray, wo: BlockWeight, bo: np.ndarray | None,
                  norm: np.ndarray, eps: float, mlp: Sequence[BlockWeight]) -> np.ndarray:
    """NumpyBackend.block_output on GGUF blocks: o, gate|up (one quantization of their x), down
    as matvecs; the residuals and norm in one serial kernel, SiLU in place."""
    (o,) = gguf_blocks.matvecs(attn, [wo])
    h, hn = fused.residual_norm(np.ascontiguousarray(x, dtype=np.float32), o, _or_empty(bo),
                                norm, eps)
    gate, up = gguf_blocks.matvecs(hn, mlp[:2])
    (out,) = gguf_blocks.matvecs(_silu_mul_into(gate, up), [mlp[2]])
    out += h
    return out


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
        return prepare_unit(tensors, quantization, self.half_scales, blocks=True)

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
        if isinstance(table, (HalfWeight, BlockWeight)):
            return _float32_rows(table, ids.reshape(-1)).reshape(*ids.shape, table.shape[1])
        return table[ids]

    def linear(self, x: np.ndarray, w: Any, bias: np.ndarray | None = None) -> np.ndarray:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        if isinstance(w, (QuantizedWeight, HalfWeight, BlockWeight)):
            y = self._packed_linear(x2, w)
        elif isinstance(w, mxfp4.MXFP4Weight):
            y = mxfp4_kernels.linear(x2, w)
        else:
            y = x2 @ w.T  # BLAS sgemm with a transposed operand: no copy of w
        if bias is not None:
            y += bias
        return y.reshape(*lead, y.shape[-1])

    def head_linear(self, x: np.ndarray, w: Any, start: int, n: int) -> np.ndarray | None:
        """Per-head linears on a weight (H * rho, in) whose row blocks are heads (MLA's kv_b_proj):
        x (H, L, in) -> (H, L, n), head h's x[h] through its rows h * rho + start .. + n, read
        in their stored form as linear reads them (decode's matvecs: no float32 weight); None
        for another form (the caller dequantizes)."""
        H = x.shape[0]
        rho = w.shape[0] // H
        if isinstance(w, np.ndarray):
            return x @ w.reshape(H, rho, -1)[:, start:start + n].transpose(0, 2, 1)
        if isinstance(w, QuantizedWeight) and x.shape[1] <= MATVEC_MAX_ROWS:
            return qhead(x, w.packed, w.scales, w.biases, w.bits, w.group_size, rho, start, n)
        if not isinstance(w, (QuantizedWeight, HalfWeight, BlockWeight)):
            return None
        out = np.empty((H, x.shape[1], n), dtype=np.float32)
        for h in range(H):
            lo = h * rho + start
            out[h] = self.linear(x[h], row_block(w, lo, lo + n))
        return out

    def head_linear_t(self, x: np.ndarray, w: Any, start: int) -> np.ndarray | None:
        """The transposed per-head product: x (H, L, n) -> (H, L, in), x[h] @ rows
        h * rho + start .. + n of w (H * rho, in). MLX-affine and 16-bit weights accumulate row
        by row on the stored form; GGUF blocks dequantize just those rows; None for a form
        with neither (the caller dequantizes)."""
        H, n = x.shape[0], x.shape[2]
        rho = w.shape[0] // H
        if isinstance(w, np.ndarray):
            return x @ w.reshape(H, rho, -1)[:, start:start + n]
        if isinstance(w, QuantizedWeight):
            return qhead_t(x, w.packed, w.scales, w.biases, w.bits, w.group_size, rho, start)
        if isinstance(w, HalfWeight):
            return half_head_t(x, w.data, w.dtype, rho, start)
        if isinstance(w, BlockWeight):
            rows = (np.arange(H)[:, None] * rho + start + np.arange(n)).reshape(-1)
            return np.ascontiguousarray(x, dtype=np.float32) @ _float32_rows(w, rows).reshape(
                H, n, -1)
        return None

    def _packed_linear(self, x: np.ndarray, w: Packed) -> np.ndarray:
        n_out, n_in = w.shape
        if x.shape[1] != n_in:
            raise ValueError(f"linear: x has {x.shape[1]} features, weight {w.shape} wants {n_in}")
        if x.shape[0] <= MATVEC_MAX_ROWS:
            if isinstance(w, HalfWeight):
                return half_matvec(x, w.data, w.dtype)
            if isinstance(w, BlockWeight):
                return gguf_blocks.matvec(np.ascontiguousarray(x, dtype=np.float32), w)
            return qmatvec(x, w.packed, w.scales, w.biases, w.bits, w.group_size)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if isinstance(w, BlockWeight) and w.qtype in gguf_blocks.QUANTIZED_X:
            # int8 on the blocks, for the types whose decode kernels round x to int8 (Q8_0's
            # keep x float32, and so does its prompt path, BLAS)
            return gguf_gemm.gemm(x, w)
        y = np.empty((x.shape[0], n_out), dtype=np.float32)
        step = max(1, DEQUANT_BLOCK_ELEMENTS // n_in)
        for lo in range(0, n_out, step):  # blocks bound the float32 temporary
            rows = np.arange(lo, min(lo + step, n_out), dtype=np.int64)
            np.matmul(x, _float32_rows(w, rows).T, out=y[:, lo : lo + rows.size])
        return y

    def fuses(self, weights: Sequence[Any], n_rows: int) -> bool:
        """True when the fused block kernels can run these linears on n_rows rows: few enough
        rows for matvec, and all quantized (kernels/fused.py) or all GGUF blocks
        (kernels/gguf_blocks.py's matvecs between fused.py's small serial steps)."""
        return n_rows <= MATVEC_MAX_ROWS and (
            all(isinstance(w, QuantizedWeight) for w in weights)
            or all(isinstance(w, BlockWeight) for w in weights))

    def block_attention_input(
        self, x: np.ndarray, norm: np.ndarray, eps: float, qkv: Sequence[QuantizedWeight],
        qkv_bias: Sequence[np.ndarray | None], qk_norm: Sequence[np.ndarray | None],
        cos: np.ndarray, sin: np.ndarray, n_heads: int, n_kv_heads: int,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x (N, E) -> q (N, H, D), k, v (N, Hkv, D): norm, q/k/v (+ bias), q/k norm, RoPE with
        per-row cos, sin (N, D/2). Only where fuses() said True."""
        if isinstance(qkv[0], BlockWeight):
            return _block_attention_input(x, norm, eps, qkv, qkv_bias, qk_norm, cos, sin,
                                          n_heads, n_kv_heads)
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
        if isinstance(wo, BlockWeight):
            return _block_output(x, attn, wo, bo, norm, eps, mlp)
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
        """block_attention_input, kv.attend and block_output for one sequence, in one call
        (a sliding layer's ring takes one row so; several go through the three calls)."""
        if isinstance(wo, BlockWeight):  # GGUF blocks: the three calls (matvecs between)
            q, k, v = _block_attention_input(x, norm, eps, qkv, qkv_bias, qk_norm, cos, sin,
                                             n_heads, n_kv_heads)
            attn = kv.attend(layer_idx, q, k, v, scale)
            return _block_output(x, attn, wo, bo, post_norm, eps, mlp)
        layer = kv.layers[layer_idx]
        slot = offset = kv.offset
        kv._check_room(x.shape[0])
        if isinstance(layer, NumpyQuantizedKV) or layer.window is not None:
            # a quantized layer attends from its codes (kv_quant); a sliding one writing row
            # r into the ring would drop keys rows < r need
            if isinstance(layer, NumpyQuantizedKV) or x.shape[0] > 1:
                q, k, v = self.block_attention_input(x, norm, eps, qkv, qkv_bias, qk_norm, cos,
                                                     sin, n_heads, n_kv_heads)
                attn = kv.attend(layer_idx, q, k, v, scale)
                return self.block_output(x, attn, wo, bo, post_norm, eps, mlp)
            slot, offset = layer.decode_slot(offset)
        wq, wk, wv = (_kernel_tuple(w) for w in qkv)
        bq, bk, bv = (_or_empty(b) for b in qkv_bias)
        qn, kn = (_or_empty(n) for n in qk_norm)
        wg, wu, wd = (_kernel_tuple(w) for w in mlp)
        return fused.decoder_block(np.ascontiguousarray(x, dtype=np.float32), norm, eps, wq, wk,
                                   wv, bq, bk, bv, qn, kn, cos, sin, n_heads, n_kv_heads,
                                   layer.kc, layer.vc, slot, offset, np.float32(scale),
                                   _kernel_tuple(wo), _or_empty(bo), post_norm, wg, wu, wd)

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
        self, q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, offset: int,
        window: int | None = None, softcap: float | None = None,
        sinks: np.ndarray | None = None,
    ) -> np.ndarray:
        return attention(q, k, v, scale, offset, window, softcap, sinks)

    def silu_mul(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        if gate.dtype == up.dtype == np.float32 and gate.shape == up.shape:
            return _silu_mul_into(gate, up)  # the same bits, one temporary instead of four
        with np.errstate(over="ignore"):  # exp(-g) -> inf for g << 0 gives silu = -0, correct
            return gate / (np.float32(1) + np.exp(-gate)) * up

    def gelu_tanh_mul(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        inner = np.float32(GELU_C) * (gate + np.float32(0.044715) * gate * gate * gate)
        return np.float32(0.5) * gate * (np.float32(1) + np.tanh(inner)) * up

    def softcap(self, x: np.ndarray, cap: float) -> np.ndarray:
        return np.tanh(x / np.float32(cap)) * np.float32(cap)

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a + b

    def concatenate(self, xs: list[np.ndarray], axis: int) -> np.ndarray:
        return np.concatenate(xs, axis=axis)

    def write_rows(self, x: np.ndarray, start: int, y: np.ndarray) -> np.ndarray:
        if not x.flags.writeable:
            x = x.copy()
        x[:, start:start + y.shape[1]] = y
        return x

    def reshape(self, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return np.reshape(x, shape)

    def transpose(self, x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
        return np.transpose(x, axes)

    def make_kv_cache(
        self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int,
        windows: Sequence[int | None] | None = None, kv_bits: int | None = None,
    ) -> NumpyKVCache:
        return NumpyKVCache(n_layers, batch, n_kv_heads, head_dim, max_len, windows, kv_bits)

    def synchronize(self, x: Any) -> None:
        return None

    def start(self, x: Any) -> None:
        return None
