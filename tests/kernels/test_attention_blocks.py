"""Attention in query blocks (kernels.kv_cache.query_blocks): each block of rows attends over
only the keys it can see, and the result equals one call on the whole score matrix, against a
plain float64 numpy reference, for full and sliding layers, with soft-capping, GQA and an
offset (a later chunk of a prompt)."""

from __future__ import annotations

import numpy as np
import pytest

from stream_run.kernels import available_backends, get_backend
from stream_run.kernels import kv_cache as kv_module
from stream_run.kernels.kv_cache import query_blocks
from stream_run.kernels.numpy_backend import _attention

BACKENDS = ["numpy"] + (["mlx"] if "mlx" in available_backends() else [])


def reference(q, k, v, scale, offset, window, softcap):
    """float64, one (L, T) score matrix per head, the mask written out."""
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    B, Hq, L, D = q.shape
    G = Hq // k.shape[1]
    k, v = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)
    s = q @ k.swapaxes(-1, -2) * scale
    if softcap is not None:
        s = np.tanh(s / softcap) * softcap
    i, j = np.arange(L)[:, None] + offset, np.arange(k.shape[2])[None, :]
    visible = (j <= i) & ((i - j < window) if window else True)
    s = np.where(visible, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def test_blocks_cover_the_rows_and_only_the_keys_they_see():
    blocks = query_blocks(L=50, T=70, heads=4, offset=20, window=None, nbytes=4 * 4 * 70 * 8)
    assert [b[:2] for b in blocks] == [(q0, min(50, q0 + 8)) for q0 in range(0, 50, 8)]
    assert all(lo == 0 and hi == 20 + q1 for q0, q1, lo, hi in blocks)
    windowed = query_blocks(L=50, T=70, heads=4, offset=20, window=6, nbytes=4 * 4 * 70 * 8)
    assert all(lo == max(0, 20 + q0 - 5) for q0, _, lo, _ in windowed)
    assert query_blocks(L=50, T=70, heads=4, offset=20, window=None) == [(0, 50, 0, 70)]
    assert len(query_blocks(L=3, T=10**6, heads=64, offset=10**6 - 3, window=None,
                            nbytes=1)) == 3  # at least one row per block


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("window", "softcap"), [(None, None), (9, None), (None, 2.5), (9, 2.5)])
def test_blocked_attention_equals_the_whole_matrix(backend, window, softcap, monkeypatch):
    rng = np.random.default_rng(3)
    B, Hq, Hkv, L, offset, D = 1, 4, 2, 37, 11, 8
    q = rng.standard_normal((B, Hq, L, D)).astype(np.float32)
    k = rng.standard_normal((B, Hkv, offset + L, D)).astype(np.float32)
    v = rng.standard_normal((B, Hkv, offset + L, D)).astype(np.float32)
    want = reference(q, k, v, 0.3, offset, window, softcap)
    ops = get_backend(backend, 1)
    args = [ops.from_numpy(a) for a in (q, k, v)]
    whole = ops.to_numpy(ops.attention(*args, 0.3, offset, window, softcap))
    monkeypatch.setattr(kv_module, "ATTN_SCORE_BYTES", 4 * Hq * (offset + L) * 5)  # 5 rows
    assert len(query_blocks(L, offset + L, Hq, offset, window)) == 8
    blocked = ops.to_numpy(ops.attention(*args, 0.3, offset, window, softcap))
    np.testing.assert_allclose(whole, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(blocked, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("window", [None, 64])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_a_few_rows_have_the_bits_of_one_row_passes(window, softcap, sinks):
    """A pass of 2..8 query rows (a speculative pass's draft rows, a short chunk) gives each row
    the bits the one-row pass at its position gives: the numpy backend runs them one by one
    over their own keys. One masked score matrix sums each row in another order (its masked
    keys add zeros), which moved SmolLM2's logits by ~0.3 through the int8-x kernels and made
    greedy speculative decoding differ from plain decoding (issue 19)."""
    ops = get_backend("numpy")
    rng = np.random.default_rng(7)
    offset, Hq, Hkv, D = 29, 6, 2, 16
    for L in range(2, 9):
        q = rng.standard_normal((1, Hq, L, D)).astype(np.float32)
        k = rng.standard_normal((1, Hkv, offset + L, D)).astype(np.float32)
        v = rng.standard_normal((1, Hkv, offset + L, D)).astype(np.float32)
        sink = rng.standard_normal(Hq).astype(np.float32) if sinks else None
        kw = {"sinks": sink} if sinks else {}
        got = ops.attention(q, k, v, 0.25, offset, window, softcap, **kw)
        for i in range(L):
            t = offset + i + 1
            one = ops.attention(q[:, :, i:i + 1], k[:, :, :t], v[:, :, :t], 0.25, t - 1, window,
                                softcap, **kw)
            np.testing.assert_array_equal(got[:, :, i:i + 1], one, err_msg=f"L={L} row {i}")
        if sinks:  # one masked score matrix is the reference with sinks
            whole = _attention(q, k, v, 0.25, offset, window, softcap, sink)
            np.testing.assert_allclose(got, whole, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_allclose(got, reference(q, k, v, 0.25, offset, window, softcap),
                                       rtol=1e-5, atol=1e-5)
