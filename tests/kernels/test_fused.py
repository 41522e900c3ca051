"""The fused decode-block kernels (kernels/fused.py) against the fine ops of the numpy backend,
which the reference-model tests already check: same math, float32, summation order differs."""

import numpy as np
import pytest

from stream_run.kernels import fused
from stream_run.kernels.numpy_backend import MATVEC_MAX_ROWS, NumpyBackend, NumpyKVCache
from stream_run.kernels.quant import HalfWeight, QuantizedWeight, quantize

E, H, HKV, D, INTER = 64, 4, 2, 16, 128
EPS = 1e-5
TOL = {"rtol": 2e-5, "atol": 2e-5}


def weights(rng, bits, group_size):
    def q(out, inn):
        return quantize((rng.standard_normal((out, inn)) / np.sqrt(inn)).astype(np.float32),
                        bits, group_size)

    return {"q": q(H * D, E), "k": q(HKV * D, E), "v": q(HKV * D, E), "o": q(E, H * D),
            "gate": q(INTER, E), "up": q(INTER, E), "down": q(E, INTER)}


def norm_weight(rng, n):
    return (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)


def rope_tables(ops_inv_freq, positions):
    freqs = np.asarray(positions, np.float32)[:, None] * ops_inv_freq[None, :]
    return np.cos(freqs), np.sin(freqs)


INV_FREQ = (1.0 / 10000 ** (np.arange(0, D, 2) / D)).astype(np.float32)


@pytest.mark.parametrize("bits, group_size", [(4, 32), (8, 64), (3, 32), (6, 64), (2, 32),
                                              (5, 64)])
@pytest.mark.parametrize("n, offset", [(1, 0), (1, 7), (3, 5)])
@pytest.mark.parametrize("extras", [False, True])  # qkv bias + q/k norm (qwen2, qwen3)
def test_attention_input_matches_fine_ops(bits, group_size, n, offset, extras):
    rng = np.random.default_rng(bits * 100 + n)
    ops, w = NumpyBackend(), weights(rng, bits, group_size)
    x = rng.standard_normal((n, E)).astype(np.float32)
    ln = norm_weight(rng, E)
    bias = [rng.standard_normal(m).astype(np.float32) if extras else None
            for m in (H * D, HKV * D, HKV * D)]
    qk_norm = [norm_weight(rng, D) if extras else None for _ in range(2)]
    cos, sin = rope_tables(INV_FREQ, range(offset, offset + n))

    q, k, v = ops.block_attention_input(x, ln, EPS, [w["q"], w["k"], w["v"]], bias, qk_norm,
                                        cos, sin, H, HKV)

    h = ops.rms_norm(x, ln, EPS)
    want = []
    for name, heads, b, nw in (("q", H, bias[0], qk_norm[0]), ("k", HKV, bias[1], qk_norm[1]),
                               ("v", HKV, bias[2], None)):
        t = ops.linear(h, w[name], b).reshape(1, n, heads, D).transpose(0, 2, 1, 3)
        if nw is not None:
            t = ops.rms_norm(t, nw, EPS)
        if name != "v":
            t = ops.rope(t, offset, INV_FREQ)
        want.append(t[0].transpose(1, 0, 2))  # (n, heads, D)
    for got, exp in zip((q, k, v), want, strict=True):
        np.testing.assert_allclose(got, exp, **TOL)


@pytest.mark.parametrize("n, offset", [(1, 0), (1, 9), (4, 6), (2, 700)])
def test_cached_attention_writes_in_place_and_matches_fine_ops(n, offset):
    rng = np.random.default_rng(n + offset)
    ops = NumpyBackend()
    fused_kv = NumpyKVCache(2, 1, HKV, D, offset + n + 3)
    plain_kv = NumpyKVCache(2, 1, HKV, D, offset + n + 3)
    history = rng.standard_normal((1, HKV, offset, D)).astype(np.float32)
    for kv in (fused_kv, plain_kv):
        kv.update(1, history, history[..., ::-1].copy())
        kv.advance(offset)
    q = rng.standard_normal((n, H, D)).astype(np.float32)
    k = rng.standard_normal((n, HKV, D)).astype(np.float32)
    v = rng.standard_normal((n, HKV, D)).astype(np.float32)

    got = fused_kv.attend(1, q, k, v, D**-0.5)

    keys, values = plain_kv.update(1, k.transpose(1, 0, 2)[None], v.transpose(1, 0, 2)[None])
    want = ops.attention(q.transpose(1, 0, 2)[None], keys, values, D**-0.5, offset)
    np.testing.assert_allclose(got, want[0].transpose(1, 0, 2).reshape(n, H * D), **TOL)
    for got_layer, want_layer in zip(fused_kv.layers, plain_kv.layers, strict=True):
        np.testing.assert_array_equal(got_layer.k, want_layer.k)  # written in place, same slots
        np.testing.assert_array_equal(got_layer.v, want_layer.v)
    assert fused_kv.offset == offset  # advancing stays the head's job


@pytest.mark.parametrize("n, offset, extras", [(1, 0, False), (1, 9, True), (3, 5, False),
                                             (1, 700, False)])  # 700: heads in parallel
def test_block_decode_is_the_three_calls_in_one(n, offset, extras):
    """block_decode (one numba call per block) = block_attention_input + kv.attend +
    block_output, KV cache writes included; only the summation order may differ."""
    rng = np.random.default_rng(50 + n + offset)
    ops, w = NumpyBackend(), weights(rng, 4, 32)
    x = rng.standard_normal((n, E)).astype(np.float32)
    ln, ln_post = norm_weight(rng, E), norm_weight(rng, E)
    biases = [rng.standard_normal(m).astype(np.float32) if extras else None
              for m in (H * D, HKV * D, HKV * D)]
    qk_norm = [norm_weight(rng, D) if extras else None for _ in range(2)]
    bo = rng.standard_normal(E).astype(np.float32) if extras else None
    cos, sin = rope_tables(INV_FREQ, np.arange(offset, offset + n))
    history = rng.standard_normal((1, HKV, offset, D)).astype(np.float32)
    kvs = [NumpyKVCache(2, 1, HKV, D, offset + n + 2) for _ in range(2)]
    for kv in kvs:
        kv.update(1, history, history + 1)
        kv.advance(offset)
    attn_in = (x, ln, EPS, [w["q"], w["k"], w["v"]], biases, qk_norm, cos, sin, H, HKV)
    mlp = [w["gate"], w["up"], w["down"]]

    got = ops.block_decode(*attn_in, kvs[0], 1, D**-0.5, w["o"], bo, ln_post, mlp)

    q, k, v = ops.block_attention_input(*attn_in)
    attn = kvs[1].attend(1, q, k, v, D**-0.5)
    want = ops.block_output(x, attn, w["o"], bo, ln_post, EPS, mlp)
    np.testing.assert_allclose(got, want, **TOL)
    for got_layer, want_layer in zip(kvs[0].layers, kvs[1].layers, strict=True):
        np.testing.assert_allclose(got_layer.k, want_layer.k, **TOL)
        np.testing.assert_allclose(got_layer.v, want_layer.v, **TOL)
    assert kvs[0].offset == offset


def test_parallel_and_serial_attention_agree(monkeypatch):
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, H, D)).astype(np.float32)
    k = rng.standard_normal((2, HKV, D)).astype(np.float32)
    kc = rng.standard_normal((HKV, 40, D)).astype(np.float32)
    vc = rng.standard_normal((HKV, 40, D)).astype(np.float32)
    outs = []
    for threshold in (1 << 40, 0):  # serial, then parallel over heads
        monkeypatch.setattr(fused, "PARALLEL_ATTENTION_WORK", threshold)
        outs.append(fused.cached_attention(q, k, k, kc.copy(), vc.copy(), 30, 0.25))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits, group_size", [(4, 32), (8, 64), (3, 64)])
@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("o_bias", [False, True])
def test_attention_output_mlp_matches_fine_ops(bits, group_size, n, o_bias):
    rng = np.random.default_rng(bits + n)
    ops, w = NumpyBackend(), weights(rng, bits, group_size)
    x = rng.standard_normal((n, E)).astype(np.float32)
    attn = rng.standard_normal((n, H * D)).astype(np.float32)
    ln = norm_weight(rng, E)
    bo = rng.standard_normal(E).astype(np.float32) if o_bias else None

    got = ops.block_output(x, attn, w["o"], bo, ln, EPS, [w["gate"], w["up"], w["down"]])

    h = ops.add(x, ops.linear(attn, w["o"], bo))
    normed = ops.rms_norm(h, ln, EPS)
    mlp = ops.silu_mul(ops.linear(normed, w["gate"]), ops.linear(normed, w["up"]))
    np.testing.assert_allclose(got, ops.add(h, ops.linear(mlp, w["down"])), **TOL)


@pytest.mark.parametrize("bits", [4, 8, 3])
def test_block_output_with_float16_scales_is_exact(bits):
    """half_scales weights (float16 scales and biases) run the same math as float32 ones."""
    rng = np.random.default_rng(40 + bits)
    ops, w = NumpyBackend(), weights(rng, bits, 32)
    half = {k: QuantizedWeight(v.packed, v.scales.astype(np.float16),
                               v.biases.astype(np.float16), bits, 32) for k, v in w.items()}
    wide = {k: QuantizedWeight(v.packed, v.scales.astype(np.float32),
                               v.biases.astype(np.float32), bits, 32) for k, v in half.items()}
    x = rng.standard_normal((2, E)).astype(np.float32)
    attn = rng.standard_normal((2, H * D)).astype(np.float32)
    ln = norm_weight(rng, E)
    got, want = (ops.block_output(x, attn, ws["o"], None, ln, EPS,
                                  [ws["gate"], ws["up"], ws["down"]]) for ws in (half, wide))
    np.testing.assert_array_equal(got, want)
    # attn as a strided float64 view (the backend makes it what the vector code reads)
    strided = np.repeat(attn.astype(np.float64), 2, axis=1)[:, ::2]
    np.testing.assert_array_equal(ops.block_output(x, strided, half["o"], None, ln, EPS,
                                                   [half["gate"], half["up"], half["down"]]),
                                  got)


def test_fuses_only_quantized_weights_and_few_rows():
    rng = np.random.default_rng(0)
    ops, w = NumpyBackend(), list(weights(rng, 4, 32).values())
    assert ops.fuses(w, 1) and ops.fuses(w, MATVEC_MAX_ROWS)
    assert not ops.fuses(w, MATVEC_MAX_ROWS + 1)  # prefill: dequantize + BLAS
    half = HalfWeight(np.zeros((E, E), np.uint16), "BF16")
    assert not ops.fuses(w[:-1] + [half], 1)
    assert not ops.fuses(w[:-1] + [np.zeros((E, INTER), np.float32)], 1)
