"""The ops Gemma added, on both backends, against float64 formulas written here: the GELU-tanh
gated product, soft-capping, and attention with soft-capped scores (GQA, causal, windows)."""

import math

import numpy as np
import pytest

from stream_run import kernels
from stream_run.kernels.kv_cache import window_mask

BACKENDS = [
    "numpy",
    pytest.param("mlx", marks=pytest.mark.skipif(
        "mlx" not in kernels.available_backends(), reason="mlx is not installed")),
]


@pytest.fixture(params=BACKENDS)
def ops(request):
    return kernels.get_backend(request.param)


def to_np(ops, x):
    return np.asarray(ops.to_numpy(x))


def test_gelu_tanh_mul(ops):
    rng = np.random.default_rng(1)
    gate = (rng.standard_normal((2, 3, 40)) * 4).astype(np.float32)
    gate[0, 0, :4] = [-60.0, 60.0, 0.0, -1e-4]
    up = rng.standard_normal((2, 3, 40)).astype(np.float32)
    got = to_np(ops, ops.gelu_tanh_mul(ops.from_numpy(gate), ops.from_numpy(up)))
    g = gate.astype(np.float64)
    ref = 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3))) * up
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert got.dtype == np.float32


def test_softcap(ops):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((1, 5, 64)) * 40).astype(np.float32)
    got = to_np(ops, ops.softcap(ops.from_numpy(x), 30.0))
    np.testing.assert_allclose(got, np.tanh(x.astype(np.float64) / 30) * 30, rtol=1e-5,
                               atol=1e-5)
    assert np.abs(got).max() < 30


def reference(q, k, v, scale, offset, window, softcap):
    """float64, heads repeated, scores soft-capped before the mask, every row masked."""
    G = q.shape[1] // k.shape[1]
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    k, v = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)
    s = np.einsum("bhld,bhtd->bhlt", q, k) * scale
    if softcap is not None:
        s = np.tanh(s / softcap) * softcap
    s = np.where(window_mask(q.shape[2], k.shape[2], offset, window), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("offset,L,window", [(0, 6, None), (7, 1, None), (5, 4, None),
                                             (0, 9, 4), (6, 3, 4), (3, 1, 4)])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_attention_with_softcap(ops, offset, L, window, softcap):
    rng = np.random.default_rng(3)
    B, Hq, Hkv, D = 1, 6, 2, 16
    T = offset + L
    q = (rng.standard_normal((B, Hq, L, D)) * 2).astype(np.float32)
    k = (rng.standard_normal((B, Hkv, T, D)) * 2).astype(np.float32)
    v = rng.standard_normal((B, Hkv, T, D)).astype(np.float32)
    args = (*(ops.from_numpy(a) for a in (q, k, v)), 0.5, offset, window, softcap)
    got = to_np(ops, ops.attention(*args))
    assert got.shape == (B, Hq, L, D)
    want = reference(q, k, v, 0.5, offset, window, softcap)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if softcap is not None:  # the cap bites on these scores
        assert np.abs(want - reference(q, k, v, 0.5, offset, window, None)).max() > 1e-2
