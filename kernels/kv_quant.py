"""A group-wise quantized KV cache (`--kv-bits 8 | 4`), as mlx-lm's QuantizedKVCache: each
position's key and value vectors are cut into groups along head_dim (kv_cache.group_size: 64
wide at 8 bits, 32 at 4 bits), and each group is stored as unsigned codes with an affine scale
and bias: x ~= scale * code + bias, scale = (max - min) / (2**bits - 1), bias = min.

Bytes per position and KV head, head_dim D (keys and values alike): float32 4 D; 8 bits
D + 4 D/64 (3.76x smaller); 4 bits D/2 + 4 D/32 (6.4x smaller). Scales and biases are stored as
float16 (their bit patterns as uint16: numba has no float16 type; kernels widen them with
numba_kernels._f16), which is what mlx-lm stores for a float16 model.

Every key and value a pass attends over comes from the cache, the pass's own rows included
(mlx-lm's semantics too): a prompt run in one pass, in chunks or one token at a time sees the
same keys, so those paths agree with one another as the float32 cache's do.

Only full layers are quantized. A sliding-window layer's ring holds `window` positions however
long the context is, so it stays float32 (the memory --kv-bits saves grows with the context;
the ring's does not).

This module is the numpy backend's part (numba kernels attend straight from the codes, one
scale and bias per group, never widening the cache); MLX's layer is mlx_backend.MLXQuantizedKV.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from stream_run.kernels.kv_cache import check_bits, check_rows, group_size, rows_state
from stream_run.kernels.numba_kernels import JIT_DOT, _f16

_SERIAL = {**JIT_DOT, "parallel": False}
STATE_NAMES = ("k", "k_scales", "k_biases", "v", "v_scales", "v_biases")
PARALLEL_WORK = 1 << 18  # as fused.PARALLEL_ATTENTION_WORK: below it, threads cost more
F16_MAX = 65504.0


def quantize(x: np.ndarray, bits: int, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (..., D) float -> codes uint8 (..., D * bits / 8), scales and biases as float16 bit
    patterns, uint16 (..., D / group). 4-bit codes pack two per byte, the even element in the
    low nibble."""
    *lead, D = x.shape
    levels = (1 << bits) - 1
    g = np.asarray(x, dtype=np.float32).reshape(*lead, D // group, group)
    lo = np.clip(g.min(axis=-1), -F16_MAX, F16_MAX)
    hi = np.clip(g.max(axis=-1), -F16_MAX, F16_MAX)
    bias = lo.astype(np.float16)
    scale = ((hi - lo) / np.float32(levels)).astype(np.float16)
    scale[scale == 0] = 1  # a constant group (or one narrower than float16 resolves): codes 0
    s, b = scale.astype(np.float32)[..., None], bias.astype(np.float32)[..., None]
    codes = np.clip(np.rint((g - b) / s), 0, levels).astype(np.uint8).reshape(*lead, D)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, scale.view(np.uint16), bias.view(np.uint16)


def dequantize(codes: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int,
               group: int) -> np.ndarray:
    """quantize's inverse: float32 (..., D)."""
    if bits == 4:
        codes = np.stack([codes & 15, codes >> 4], axis=-1).reshape(*codes.shape[:-1], -1)
    *lead, D = codes.shape
    g = codes.reshape(*lead, D // group, group).astype(np.float32)
    s = scales.view(np.float16).astype(np.float32)[..., None]
    b = biases.view(np.float16).astype(np.float32)[..., None]
    g *= s  # in place: a prompt's widened cache is held once, not three times (runner's
    g += b  # activation_bytes counts it once), the same bits as g * s + b
    return g.reshape(*lead, D)


@njit(inline="always")
def _code(c, t, d, bits):
    """Element d of position t's codes c (Hkv slice taken): 8 bits one byte, 4 bits a nibble."""
    if bits == 8:
        return np.float32(c[t, d])
    byte = c[t, d >> 1]
    return np.float32((byte >> 4) if d & 1 else (byte & 15))


@njit(inline="always")
def _attend_head(q, kc, ks, kb, vc, vs, vb, out, h, kvh, offset, scale, bits, group):
    """out[:, h] = causal softmax(q[:, h] . K) @ V for rows at offset + r, K and V read from
    codes: q . (s c + b) over a group is s (q . c) + b sum(q), and p (s c + b) summed over
    positions is sum(p s c) + sum(p b)."""
    n, _, D = q.shape
    ng = D // group
    k_codes, k_s, k_b = kc[kvh], ks[kvh], kb[kvh]
    v_codes, v_s, v_b = vc[kvh], vs[kvh], vb[kvh]
    scores = np.empty(offset + n, dtype=np.float32)
    qsum = np.empty(ng, dtype=np.float32)
    acc = np.empty(D, dtype=np.float32)
    vbias = np.empty(ng, dtype=np.float32)
    for r in range(n):
        T = offset + r + 1
        for g in range(ng):
            t_sum = np.float32(0)
            for d in range(g * group, (g + 1) * group):
                t_sum += q[r, h, d]
            qsum[g] = t_sum
        m = -np.inf
        for t in range(T):
            s = np.float32(0)
            for g in range(ng):
                dot = np.float32(0)
                for d in range(g * group, (g + 1) * group):
                    dot += q[r, h, d] * _code(k_codes, t, d, bits)
                s += _f16(k_s[t, g]) * dot + _f16(k_b[t, g]) * qsum[g]
            s *= scale
            scores[t] = s
            m = max(m, s)
        total = np.float32(0)
        for t in range(T):
            e = np.exp(scores[t] - m)
            scores[t] = e
            total += e
        acc[:] = 0
        vbias[:] = 0
        for t in range(T):
            p = scores[t] / total
            for g in range(ng):
                ps = p * _f16(v_s[t, g])
                vbias[g] += p * _f16(v_b[t, g])
                for d in range(g * group, (g + 1) * group):
                    acc[d] += ps * _code(v_codes, t, d, bits)
        for d in range(D):
            out[r, h, d] = acc[d] + vbias[d // group]


@njit(**_SERIAL)
def _attend_serial(q, kc, ks, kb, vc, vs, vb, out, offset, scale, bits, group):
    rep = q.shape[1] // kc.shape[0]
    for h in range(q.shape[1]):
        _attend_head(q, kc, ks, kb, vc, vs, vb, out, h, h // rep, offset, scale, bits, group)


@njit(**JIT_DOT)
def _attend_parallel(q, kc, ks, kb, vc, vs, vb, out, offset, scale, bits, group):
    rep = q.shape[1] // kc.shape[0]
    for h in prange(q.shape[1]):
        _attend_head(q, kc, ks, kb, vc, vs, vb, out, h, h // rep, offset, scale, bits, group)


class NumpyQuantizedKV:
    """One full layer of a quantized cache (numpy): codes, scales and biases for K and V,
    (B, Hkv, max_len, ...), preallocated and written in place."""

    window = None

    def __init__(self, batch: int, n_kv_heads: int, head_dim: int, max_len: int,
                 bits: int) -> None:
        self.bits = check_bits(bits)
        self.group = group_size(head_dim, bits)
        lead = (batch, n_kv_heads, max_len)
        # zeros: pages are only touched when written
        self.k = (np.zeros((*lead, head_dim * bits // 8), np.uint8),
                  np.zeros((*lead, head_dim // self.group), np.uint16),
                  np.zeros((*lead, head_dim // self.group), np.uint16))
        self.v = tuple(np.zeros_like(a) for a in self.k)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*self.k, *self.v))

    def _store(self, buf: tuple[np.ndarray, ...], rows: slice, x: np.ndarray) -> None:
        for dst, src in zip(buf, quantize(x, self.bits, self.group), strict=True):
            dst[rows] = src

    def update(self, offset: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Store k, v (B, Hkv, L, D) at [offset, offset + L); return positions [0, offset + L)
        widened to float32 (B, Hkv, offset + L, D), the new rows as stored."""
        end = offset + k.shape[2]
        rows = np.s_[:, :, offset:end]
        self._store(self.k, rows, k)
        self._store(self.v, rows, v)
        return tuple(dequantize(*(a[:, :, :end] for a in buf), self.bits, self.group)
                     for buf in (self.k, self.v))  # type: ignore[return-value]

    def attend(self, offset: int, q: np.ndarray, k: np.ndarray, v: np.ndarray,
               scale: float) -> np.ndarray:
        """Batch row 0: store k, v (L, Hkv, D) at offset.., then causal attention of q (L, H, D)
        over positions 0..offset + r from the codes -> (L, H * D)."""
        L, H, D = q.shape
        rows = np.s_[0, :, offset:offset + L]
        self._store(self.k, rows, k.transpose(1, 0, 2))
        self._store(self.v, rows, v.transpose(1, 0, 2))
        q = np.ascontiguousarray(q, dtype=np.float32)
        out = np.empty_like(q)
        kernel = _attend_parallel if L * H * (offset + L) * D > PARALLEL_WORK else _attend_serial
        kernel(q, *(a[0] for a in self.k), *(a[0] for a in self.v), out, offset,
               np.float32(scale), self.bits, self.group)
        return out.reshape(L, H * D)

    def check_rollback(self, offset: int) -> None:
        return None  # a full layer: later writes overwrite

    def state(self, end: int) -> dict[str, np.ndarray]:
        return rows_state(STATE_NAMES, (*self.k, *self.v), end)

    def load_state(self, state: dict[str, np.ndarray], n: int) -> None:
        for dst, src in zip((*self.k, *self.v), check_rows(STATE_NAMES, (*self.k, *self.v),
                                                           state, n), strict=True):
            dst[0, :, :n] = src
