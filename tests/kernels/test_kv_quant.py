"""The quantized KV layers (--kv-bits): the codes against an independent per-group rounding, and
attention from the codes against float64 softmax attention over the values they stand for,
numpy (numba kernels on the codes) and MLX (mx.quantize / mx.dequantize)."""

from __future__ import annotations

import numpy as np
import pytest

from stream_run.kernels import available_backends
from stream_run.kernels.kv_cache import group_size, position_bytes
from stream_run.kernels.kv_quant import NumpyQuantizedKV, dequantize, quantize

BITS = [8, 4]


def reference_codes(x: np.ndarray, bits: int, group: int):
    """Per-group affine rounding written out with Python scalars, float16 scale and bias."""
    levels = 2**bits - 1
    rows = x.reshape(-1, group)
    codes, scales, biases = [], [], []
    for g in rows:
        lo, hi = float(g.min()), float(g.max())
        s = float(np.float16((hi - lo) / levels)) or 1.0
        b = float(np.float16(lo))
        codes.append([min(levels, max(0, round((float(v) - b) / s))) for v in g])
        scales.append(s)
        biases.append(b)
    return np.array(codes), np.array(scales), np.array(biases)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("D", [64, 96])
def test_codes_match_per_group_rounding(bits, D):
    rng = np.random.default_rng(bits + D)
    x = (rng.standard_normal((2, 3, D)) * rng.uniform(0.01, 20, (2, 3, 1))).astype(np.float32)
    x[0, 0, :] = 1.5  # a constant group: scale 1, codes 0, exact
    group = group_size(D, bits)
    codes, scales, biases = quantize(x, bits, group)
    assert codes.shape == (2, 3, D * bits // 8) and codes.dtype == np.uint8
    assert scales.shape == biases.shape == (2, 3, D // group)
    if bits == 4:  # even element in the low nibble
        unpacked = np.stack([codes & 15, codes >> 4], axis=-1).reshape(2, 3, D)
    else:
        unpacked = codes
    want_c, want_s, want_b = reference_codes(x, bits, group)
    # rint (half to even) and round() agree except on exact halves; allow one code there
    assert np.abs(unpacked.reshape(-1, group).astype(int) - want_c).max() <= 1
    assert np.mean(unpacked.reshape(-1, group) == want_c) > 0.999
    np.testing.assert_array_equal(scales.view(np.float16).astype(np.float64).ravel(), want_s)
    np.testing.assert_array_equal(biases.view(np.float16).astype(np.float64).ravel(), want_b)
    back = dequantize(codes, scales, biases, bits, group)
    step = want_s.repeat(group).reshape(x.shape)
    # half a step, plus float16's rounding of the bias (it may sit above the group's min)
    bias_err = np.abs(want_b - x.reshape(-1, group).min(axis=1)).repeat(group).reshape(x.shape)
    assert np.all(np.abs(back - x) <= step / 2 + bias_err + 1e-6)
    np.testing.assert_array_equal(back[0, 0], np.float32(1.5))


def test_group_sizes_and_bytes():
    assert group_size(64, 8) == 64 and group_size(96, 8) == 32 and group_size(128, 4) == 32
    assert position_bytes(128, 8) == 128 + 4 * 2 and position_bytes(128, 4) == 64 + 4 * 4
    with pytest.raises(ValueError, match="--kv-bits needs a head_dim that is a multiple of 32"):
        group_size(16, 8)


def reference_attention(q, keys, values, scale, offset):
    """float64 causal softmax attention; q (L, H, D), keys/values (Hkv, T, D) -> (L, H*D)."""
    L, H, D = q.shape
    rep = H // keys.shape[0]
    out = np.zeros((L, H, D))
    for r in range(L):
        T = offset + r + 1
        for h in range(H):
            s = keys[h // rep, :T].astype(np.float64) @ q[r, h].astype(np.float64) * scale
            p = np.exp(s - s.max())
            out[r, h] = (p / p.sum()) @ values[h // rep, :T]
    return out.reshape(L, H * D)


def stored(layer: NumpyQuantizedKV, which: str, end: int) -> np.ndarray:
    buf = layer.k if which == "k" else layer.v
    return dequantize(*(a[0, :, :end] for a in buf), layer.bits, layer.group)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("D", [64, 96])
def test_numpy_attention_from_codes(bits, D):
    """Prompt rows (a serial kernel), then a long run of single rows (the parallel kernel once
    the work passes its threshold): each result equals attention over the stored values, and
    update() hands back the same values."""
    rng = np.random.default_rng(D * bits)
    H, Hkv, max_len = 4, 2, 300
    layer = NumpyQuantizedKV(1, Hkv, D, max_len, bits)
    scale = D**-0.5
    offset = 0
    for n in [5, 1, 1, 3] + [1] * 3 + [200] + [1, 1]:
        q = rng.standard_normal((n, H, D)).astype(np.float32) * 2
        k = rng.standard_normal((n, Hkv, D)).astype(np.float32) * 3
        v = rng.standard_normal((n, Hkv, D)).astype(np.float32)
        got = layer.attend(offset, q, k, v, scale)
        end = offset + n
        want = reference_attention(q, stored(layer, "k", end), stored(layer, "v", end), scale,
                                   offset)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
        # the values stored stand for k, v within the quantization step
        assert np.abs(stored(layer, "k", end)[:, offset:] - k.transpose(1, 0, 2)).max() \
            < 3 * 6 / (2**bits - 1)
        offset = end
    keys, values = layer.update(offset, k[None].transpose(0, 2, 1, 3)[:, :, :1] * 0 + 1,
                                v[None].transpose(0, 2, 1, 3)[:, :, :1])
    assert keys.shape == (1, Hkv, offset + 1, D)
    np.testing.assert_array_equal(keys[0, :, :offset], stored(layer, "k", offset))
    np.testing.assert_array_equal(keys[0, :, offset], np.float32(1))
    assert layer.nbytes == 2 * Hkv * max_len * position_bytes(D, bits)


@pytest.mark.skipif("mlx" not in available_backends(), reason="mlx not installed")
@pytest.mark.parametrize("bits", BITS)
def test_mlx_attention_from_codes(bits):
    import mlx.core as mx

    from stream_run.kernels.mlx_backend import MLXQuantizedKV

    rng = np.random.default_rng(bits)
    H, Hkv, D = 4, 2, 64
    layer = MLXQuantizedKV(1, Hkv, D, 40, bits)
    offset = 0
    for n in (6, 1, 1, 9):
        q, k, v = (rng.standard_normal((n, h, D)).astype(np.float32) for h in (H, Hkv, Hkv))
        got = np.array(layer.attend(offset, mx.array(q), mx.array(k), mx.array(v), D**-0.5))
        end = offset + n
        keys, values = (np.array(mx.dequantize(*(a[0, :, :end] for a in buf),
                                               group_size=layer.group, bits=layer.bits),
                                 dtype=np.float32) for buf in (layer.k, layer.v))
        np.testing.assert_allclose(got, reference_attention(q, keys, values, D**-0.5, offset),
                                   rtol=1e-3, atol=1e-3)
        assert np.abs(keys[:, offset:] - k.transpose(1, 0, 2)).max() < 10 / (2**bits - 1)
        offset = end
    assert layer.nbytes == 2 * Hkv * 40 * position_bytes(D, bits)
