"""Fused numba kernels for a decoder block at decode time (a few rows, quantized weights).

A block through the fine ops (kernels/numpy_backend.py) is some 60 numpy calls and 7 parallel
kernel launches per layer: at SmolLM2's size the Python and thread wake-ups between them cost
as much as the matvecs. Here a block is three calls:

- `attention_input`: RMSNorm, q|k|v in one parallel region (+ bias), q/k norm, RoPE;
- `cached_attention` (per sequence): writes k, v into the KV cache in place, causal attention;
- `attention_output_mlp`: o-proj + residual, RMSNorm, gate|up with SiLU in one region, down
  + residual.

For a pass of one sequence, `decoder_block` runs all three in one call: the returns to Python
between them were long enough for the TBB worker to fall asleep and need waking.

A weight is the tuple (packed, scales, biases, bits, group_size) of a QuantizedWeight; the math
per row is kernels.numba_kernels.qdot_tile's, the same as qmatvec's. The reference is the fine-op
path, which the tests compare these against (float32, summation order differs).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from stream_run.kernels.numba_kernels import JIT_DOT, TILE, deinterleave, group_sums, qdot_tile

_SERIAL = {**JIT_DOT, "parallel": False}
# Attention work (n_rows * n_heads * n_keys * head_dim) above which heads run in parallel:
# under it a thread wake-up costs more than the work.
PARALLEL_ATTENTION_WORK = 1 << 18


@njit(**_SERIAL)
def _rms_norm(x, weight, eps):
    out = np.empty_like(x)
    for r in range(x.shape[0]):
        ss = np.float32(0)
        for k in range(x.shape[1]):
            ss += x[r, k] * x[r, k]
        inv = np.float32(1) / np.sqrt(ss / np.float32(x.shape[1]) + np.float32(eps))
        for k in range(x.shape[1]):
            out[r, k] = x[r, k] * inv * weight[k]
    return out


@njit(**_SERIAL)
def _head_norm_rope(t, weight, eps, cos, sin):
    """In place on t (n, heads, D): per-head RMSNorm (when weight is non-empty), then RoPE
    (rotate-half) with cos, sin (n, D/2)."""
    n, heads, D = t.shape
    half = D // 2
    for r in range(n):
        for h in range(heads):
            if weight.shape[0]:
                ss = np.float32(0)
                for d in range(D):
                    ss += t[r, h, d] * t[r, h, d]
                inv = np.float32(1) / np.sqrt(ss / np.float32(D) + np.float32(eps))
                for d in range(D):
                    t[r, h, d] = t[r, h, d] * inv * weight[d]
            for d in range(half):
                a, b = t[r, h, d], t[r, h, d + half]
                t[r, h, d] = a * cos[r, d] - b * sin[r, d]
                t[r, h, d + half] = b * cos[r, d] + a * sin[r, d]


@njit(inline="always")
def _tiles(n_rows):
    return (n_rows + TILE - 1) // TILE


@njit(**JIT_DOT)
def _qkv(h, wq, wk, wv, out):
    """out[:, :nq | nq:nq+nk | nq+nk:] = h @ (wq | wk | wv).T, one parallel region."""
    xq, xk, xv = group_sums(h, wq[4]), group_sums(h, wk[4]), group_sums(h, wv[4])
    hd = deinterleave(h)
    nq, nk = wq[0].shape[0], wk[0].shape[0]
    tq, tk = _tiles(nq), _tiles(nk)
    for t in prange(tq + 2 * tk):
        if t < tq:
            o0 = t * TILE
            qdot_tile(h, hd, xq, wq, o0, min(o0 + TILE, nq), out, o0)
        elif t < tq + tk:
            o0 = (t - tq) * TILE
            qdot_tile(h, hd, xk, wk, o0, min(o0 + TILE, nk), out, nq + o0)
        else:
            o0 = (t - tq - tk) * TILE
            qdot_tile(h, hd, xv, wv, o0, min(o0 + TILE, nk), out, nq + nk + o0)


@njit(**_SERIAL)
def attention_input(x, ln, eps, wq, wk, wv, bq, bk, bv, qn, kn, cos, sin, n_heads, n_kv_heads):
    """x (n, E) -> q (n, H, D), k, v (n, Hkv, D): norm, projections (+ bias), q/k norm, RoPE.

    bq/bk/bv and qn/kn are empty when the model has no qkv bias or no q/k norm.
    """
    n = x.shape[0]
    nq, nk = wq[0].shape[0], wk[0].shape[0]
    h = _rms_norm(x, ln, eps)
    qkv = np.empty((n, nq + 2 * nk), dtype=np.float32)
    _qkv(h, wq, wk, wv, qkv)
    if bq.shape[0]:
        for r in range(n):
            qkv[r, :nq] += bq
            qkv[r, nq:nq + nk] += bk
            qkv[r, nq + nk:] += bv
    D = nq // n_heads
    q = np.ascontiguousarray(qkv[:, :nq]).reshape(n, n_heads, D)
    k = np.ascontiguousarray(qkv[:, nq:nq + nk]).reshape(n, n_kv_heads, D)
    v = np.ascontiguousarray(qkv[:, nq + nk:]).reshape(n, n_kv_heads, D)
    _head_norm_rope(q, qn, eps, cos, sin)
    _head_norm_rope(k, kn, eps, cos, sin)
    return q, k, v


@njit(inline="always")
def _attend_head(q, kc, vc, out, h, kvh, offset, scale):
    """out[:, h] = causal softmax(q[:, h] . kc[kvh, :T]) @ vc[kvh, :T] for rows at offset+r."""
    n, _, D = q.shape
    scores = np.empty(offset + n, dtype=np.float32)
    for r in range(n):
        T = offset + r + 1
        m = -np.inf
        for t in range(T):
            s = np.float32(0)
            for d in range(D):
                s += q[r, h, d] * kc[kvh, t, d]
            s *= scale
            scores[t] = s
            m = max(m, s)
        total = np.float32(0)
        for t in range(T):
            e = np.exp(scores[t] - m)
            scores[t] = e
            total += e
        for d in range(D):
            out[r, h, d] = np.float32(0)
        for t in range(T):
            p = scores[t] / total
            for d in range(D):
                out[r, h, d] += p * vc[kvh, t, d]


@njit(**_SERIAL)
def _attend_serial(q, kc, vc, out, offset, scale):
    group = q.shape[1] // kc.shape[0]
    for h in range(q.shape[1]):
        _attend_head(q, kc, vc, out, h, h // group, offset, scale)


@njit(**JIT_DOT)
def _attend_parallel(q, kc, vc, out, offset, scale):
    group = q.shape[1] // kc.shape[0]
    for h in prange(q.shape[1]):
        _attend_head(q, kc, vc, out, h, h // group, offset, scale)


def cached_attention(q, k, v, k_cache, v_cache, offset, scale):
    """One sequence: store k, v (n, Hkv, D) at rows offset.. of k_cache, v_cache (Hkv, max, D)
    in place, then causal attention of q (n, H, D) over keys 0..offset+r -> (n, H * D)."""
    n = q.shape[0]
    k_cache[:, offset:offset + n] = k.transpose(1, 0, 2)
    v_cache[:, offset:offset + n] = v.transpose(1, 0, 2)
    return attend_cached(q, k_cache, v_cache, offset, scale)


def attend_cached(q, k_cache, v_cache, offset, scale):
    """Causal attention of q (n, H, D) over keys 0..offset+r of k_cache, v_cache (Hkv, max, D)
    -> (n, H * D)."""
    n, n_heads, D = q.shape
    out = np.empty_like(q)
    kernel = _attend_parallel if n * n_heads * (offset + n) * D > PARALLEL_ATTENTION_WORK \
        else _attend_serial
    kernel(q, k_cache, v_cache, out, offset, np.float32(scale))
    return out.reshape(n, n_heads * D)


@njit(**JIT_DOT)
def _matvec(x, w, out):
    xs, xd = group_sums(x, w[4]), deinterleave(x)
    n_out = out.shape[1]
    for t in prange(_tiles(n_out)):
        o0 = t * TILE
        qdot_tile(x, xd, xs, w, o0, min(o0 + TILE, n_out), out, o0)


@njit(**JIT_DOT)
def _gate_up(h, wg, wu, out):
    """out[:, :I | I:] = h @ (wg | wu).T, one parallel region."""
    xg, xu = group_sums(h, wg[4]), group_sums(h, wu[4])
    hd = deinterleave(h)
    n_inter = wg[0].shape[0]
    ti = _tiles(n_inter)
    for t in prange(2 * ti):
        if t < ti:
            o0 = t * TILE
            qdot_tile(h, hd, xg, wg, o0, min(o0 + TILE, n_inter), out, o0)
        else:
            o0 = (t - ti) * TILE
            qdot_tile(h, hd, xu, wu, o0, min(o0 + TILE, n_inter), out, n_inter + o0)


@njit(**_SERIAL)
def attention_output_mlp(x, attn, wo, bo, ln, eps, wg, wu, wd):
    """h = x + o-proj(attn) (+ bo, empty when absent); returns h + down(silu(gate) * up) of
    norm(h)."""
    n, E = x.shape
    h = np.empty((n, wo[0].shape[0]), dtype=np.float32)
    _matvec(attn, wo, h)
    for r in range(n):
        for e in range(E):
            h[r, e] = x[r, e] + (h[r, e] + (bo[e] if bo.shape[0] else np.float32(0)))
    n_inter = wg[0].shape[0]
    gu = np.empty((n, 2 * n_inter), dtype=np.float32)
    _gate_up(_rms_norm(h, ln, eps), wg, wu, gu)
    act = np.empty((n, n_inter), dtype=np.float32)
    for r in range(n):
        for i in range(n_inter):
            g = gu[r, i]
            act[r, i] = g / (np.float32(1) + np.exp(-g)) * gu[r, n_inter + i]
    out = np.empty((n, E), dtype=np.float32)
    _matvec(act, wd, out)
    for r in range(n):
        for e in range(E):
            out[r, e] += h[r, e]
    return out


# The small steps of a block whose linears run elsewhere (GGUF blocks: kernels/gguf_blocks.py's
# matvecs, one parallel region per weight type): serial, no temporaries, each row on its own.


@njit(**_SERIAL)
def rms_norm(x, weight, eps):
    """RMSNorm of each row of x (n, E): _rms_norm, callable from Python."""
    return _rms_norm(x, weight, eps)


@njit(**_SERIAL)
def head_norm_rope(q, k, qn, kn, eps, cos, sin):
    """_head_norm_rope on q (n, H, D) and k (n, Hkv, D), in place."""
    _head_norm_rope(q, qn, eps, cos, sin)
    _head_norm_rope(k, kn, eps, cos, sin)


@njit(**_SERIAL)
def residual_norm(x, y, bias, ln, eps):
    """h = x + (y + bias) (bias empty when absent), and RMSNorm(h): (h, norm(h))."""
    n, E = x.shape
    h = np.empty((n, E), dtype=np.float32)
    for r in range(n):
        for e in range(E):
            h[r, e] = x[r, e] + (y[r, e] + (bias[e] if bias.shape[0] else np.float32(0)))
    return h, _rms_norm(h, ln, eps)


@njit(**_SERIAL)
def _store_kv(k, v, k_cache, v_cache, offset):
    """k, v (n, Hkv, D) -> rows offset.. of k_cache, v_cache (Hkv, max, D), in place."""
    for r in range(k.shape[0]):
        for h in range(k.shape[1]):
            for d in range(k.shape[2]):
                k_cache[h, offset + r, d] = k[r, h, d]
                v_cache[h, offset + r, d] = v[r, h, d]


@njit(**_SERIAL)
def decoder_block(x, ln, eps, wq, wk, wv, bq, bk, bv, qn, kn, cos, sin, n_heads, n_kv_heads,
                  k_cache, v_cache, slot, offset, scale, wo, bo, ln_post, wg, wu, wd):
    """A whole block for one sequence in one call: attention_input, the KV write and causal
    attention (cached_attention's), attention_output_mlp. Saves the two returns to Python
    between them, during which the parallel workers fell asleep.

    The rows' k, v go to slots slot.. of the caches and row r attends over slots
    0..offset+r: a full layer passes slot = offset; a sliding layer's ring, one row, its slot
    and the last slot it holds."""
    q, k, v = attention_input(x, ln, eps, wq, wk, wv, bq, bk, bv, qn, kn, cos, sin, n_heads,
                              n_kv_heads)
    _store_kv(k, v, k_cache, v_cache, slot)
    n, H, D = q.shape
    attn = np.empty_like(q)
    if n * H * (offset + n) * D > PARALLEL_ATTENTION_WORK:
        _attend_parallel(q, k_cache, v_cache, attn, offset, scale)
    else:
        _attend_serial(q, k_cache, v_cache, attn, offset, scale)
    return attention_output_mlp(x, attn.reshape(n, H * D), wo, bo, ln_post, eps, wg, wu, wd)
