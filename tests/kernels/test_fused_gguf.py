"""The fused block path on GGUF blocks (numpy backend: gguf_blocks.matvecs between fused.py's
serial steps) against the fine ops, and its batch invariance: a row's bits do not depend on the
rows beside it (a speculative pass's rows equal one-row decode steps)."""

import numpy as np
import pytest

from stream_run.kernels.numpy_backend import MATVEC_MAX_ROWS, NumpyBackend, NumpyKVCache
from stream_run.kernels.quant import BlockWeight, quantize
from tests.kernels.test_fused import EPS, norm_weight, rope_tables

pytest.importorskip("gguf.quants")
from tests.test_gguf_blocks import quantized_blocks  # noqa: E402

E, H, HKV, D, INTER = 256, 4, 2, 64, 512
# Q4_K_M style: mostly Q4_K, v and down Q6_K; a Q4_0 file; one with Q8_0 (float path)
LAYOUTS = {"q4_k_m": dict.fromkeys("qkogu", "Q4_K") | {"v": "Q6_K", "d": "Q6_K"},
           "q4_0": dict.fromkeys("qkvogud", "Q4_0"),
           "mixed": dict.fromkeys("qkvogud", "Q5_0") | {"k": "Q8_0", "u": "Q4_1"}}
SHAPES = {"q": (H * D, E), "k": (HKV * D, E), "v": (HKV * D, E), "o": (E, H * D),
          "g": (INTER, E), "u": (INTER, E), "d": (E, INTER)}


def gguf_weights(rng, layout):
    return {n: BlockWeight(quantized_blocks(t, *SHAPES[n], rng), t, SHAPES[n][1])
            for n, t in LAYOUTS[layout].items()}


def close(got, want):
    """Within float32 noise, or one x code step where the two paths' norms differ by an ulp
    at a rounding boundary of x's int8 quantization."""
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-3 * np.abs(want).max())


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("n, offset", [(1, 0), (1, 7), (3, 5)])
@pytest.mark.parametrize("extras", [False, True])  # qkv bias + q/k norm (qwen2, qwen3)
def test_gguf_attention_input_matches_fine_ops(layout, n, offset, extras):
    rng = np.random.default_rng(n + offset)
    ops, w = NumpyBackend(), gguf_weights(rng, layout)
    x = rng.standard_normal((n, E)).astype(np.float32)
    ln = norm_weight(rng, E)
    bias = [rng.standard_normal(m).astype(np.float32) if extras else None
            for m in (H * D, HKV * D, HKV * D)]
    qk_norm = [norm_weight(rng, D) if extras else None for _ in range(2)]
    inv_freq = (1.0 / 10000 ** (np.arange(0, D, 2) / D)).astype(np.float32)
    cos, sin = rope_tables(inv_freq, range(offset, offset + n))

    q, k, v = ops.block_attention_input(x, ln, EPS, [w["q"], w["k"], w["v"]], bias, qk_norm,
                                        cos, sin, H, HKV)

    h = ops.rms_norm(x, ln, EPS)
    for got, name, heads, b, nw in ((q, "q", H, bias[0], qk_norm[0]),
                                    (k, "k", HKV, bias[1], qk_norm[1]),
                                    (v, "v", HKV, bias[2], None)):
        t = ops.linear(h, w[name], b).reshape(1, n, heads, D).transpose(0, 2, 1, 3)
        if nw is not None:
            t = ops.rms_norm(t, nw, EPS)
        if name != "v":
            t = ops.rope(t, offset, inv_freq)
        close(got, t[0].transpose(1, 0, 2))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("o_bias", [False, True])
def test_gguf_block_output_matches_fine_ops(layout, n, o_bias):
    rng = np.random.default_rng(10 + n)
    ops, w = NumpyBackend(), gguf_weights(rng, layout)
    x = rng.standard_normal((n, E)).astype(np.float32)
    attn = rng.standard_normal((n, H * D)).astype(np.float32)
    ln = norm_weight(rng, E)
    bo = rng.standard_normal(E).astype(np.float32) if o_bias else None

    got = ops.block_output(x, attn, w["o"], bo, ln, EPS, [w["g"], w["u"], w["d"]])

    h = ops.add(x, ops.linear(attn, w["o"], bo))
    normed = ops.rms_norm(h, ln, EPS)
    mlp = ops.silu_mul(ops.linear(normed, w["g"]), ops.linear(normed, w["u"]))
    close(got, ops.add(h, ops.linear(mlp, w["d"])))


def _block(ops, w, x, ln, ln_post, cos, sin, kv):
    return ops.block_decode(x, ln, EPS, [w["q"], w["k"], w["v"]], [None] * 3, [None] * 2, cos,
                            sin, H, HKV, kv, 1, D**-0.5, w["o"], None, ln_post,
                            [w["g"], w["u"], w["d"]])


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_gguf_block_decode_is_batch_invariant(layout):
    """block_decode on n rows (1..MATVEC_MAX_ROWS) = n one-row steps, bit for bit, KV cache
    writes included."""
    rng = np.random.default_rng(20)
    ops, w = NumpyBackend(), gguf_weights(rng, layout)
    ln, ln_post = norm_weight(rng, E), norm_weight(rng, E)
    offset = 6
    x = rng.standard_normal((MATVEC_MAX_ROWS, E)).astype(np.float32)
    inv_freq = (1.0 / 10000 ** (np.arange(0, D, 2) / D)).astype(np.float32)
    cos, sin = rope_tables(inv_freq, np.arange(offset, offset + MATVEC_MAX_ROWS))
    history = rng.standard_normal((1, HKV, offset, D)).astype(np.float32)

    def cache():
        kv = NumpyKVCache(2, 1, HKV, D, offset + MATVEC_MAX_ROWS)
        kv.update(1, history, history + 1)
        kv.advance(offset)
        return kv

    kv1 = cache()
    alone = []
    for r in range(MATVEC_MAX_ROWS):
        alone.append(_block(ops, w, x[r:r + 1], ln, ln_post, cos[r:r + 1], sin[r:r + 1], kv1))
        kv1.advance(1)
    alone = np.concatenate(alone)
    for n in range(2, MATVEC_MAX_ROWS + 1):
        kv = cache()
        got = _block(ops, w, x[:n], ln, ln_post, cos[:n], sin[:n], kv)
        np.testing.assert_array_equal(got, alone[:n], err_msg=f"n={n}")
        np.testing.assert_array_equal(kv.layers[1].k[:, :, :offset + n],
                                      kv1.layers[1].k[:, :, :offset + n])


def test_fuses_all_gguf_blocks_but_not_a_mix():
    rng = np.random.default_rng(0)
    ops, w = NumpyBackend(), list(gguf_weights(rng, "q4_k_m").values())
    assert ops.fuses(w, 1) and ops.fuses(w, MATVEC_MAX_ROWS)
    assert not ops.fuses(w, MATVEC_MAX_ROWS + 1)
    packed = quantize(rng.standard_normal((E, INTER)).astype(np.float32), 4, 32)
    assert not ops.fuses(w[:-1] + [packed], 1)
    assert not ops.fuses(w[:-1] + [np.zeros((E, INTER), np.float32)], 1)
