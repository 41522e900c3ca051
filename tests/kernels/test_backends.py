"""Both backends' ops vs plain numpy formulas written here, and prepare()'s byte count vs
kernels.sizes (the weight cache reserves that figure before a read)."""

from dataclasses import dataclass

import numpy as np
import pytest

from stream_run import kernels
from stream_run.kernels.formats import dequantize_gguf_reference
from stream_run.kernels.quant import (
    SUPPORTED_BITS,
    BlockWeight,
    QuantizedWeight,
    dequantize,
    quantize,
)
from stream_run.kernels.sizes import unit_nbytes

BACKENDS = [
    "numpy",
    pytest.param(
        "mlx",
        marks=pytest.mark.skipif(
            "mlx" not in kernels.available_backends(), reason="mlx is not installed"
        ),
    ),
]


@dataclass
class Raw:
    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray


def raw(a: np.ndarray, dtype: str) -> Raw:
    np_dtype = {"F32": "<f4", "F16": "<f2", "U32": "<u4"}[dtype]
    return Raw(dtype, a.shape, np.ascontiguousarray(a.astype(np_dtype)).reshape(-1).view(np.uint8))


def raw_bf16(a: np.ndarray) -> Raw:
    bits = (a.astype(np.float32).view(np.uint32) >> 16).astype("<u2")
    return Raw("BF16", a.shape, bits.reshape(-1).view(np.uint8))


def raw_quantized(prefix: str, qw: QuantizedWeight, scale_dtype: str = "F16") -> dict[str, Raw]:
    return {
        f"{prefix}.weight": raw(qw.packed, "U32"),
        f"{prefix}.scales": raw(qw.scales, scale_dtype),
        f"{prefix}.biases": raw(qw.biases, scale_dtype),
    }


def f16_exact(qw: QuantizedWeight) -> QuantizedWeight:
    """The same weight with f16-representable scales/biases, as checkpoints store them."""
    s, b = (a.astype(np.float16).astype(np.float32) for a in (qw.scales, qw.biases))
    return QuantizedWeight(qw.packed, s, b, qw.bits, qw.group_size)


def gguf_q8_0(rng, out, n_in):
    n_blocks = out * n_in // 32
    d = rng.uniform(0.001, 0.01, n_blocks).astype("<f2").view(np.uint8).reshape(n_blocks, 2)
    q = rng.integers(0, 256, (n_blocks, 32), dtype=np.uint8)
    return Raw("Q8_0", (out, n_in), np.concatenate([d, q], axis=1).reshape(-1))


@pytest.fixture(params=BACKENDS)
def ops(request):
    return kernels.get_backend(request.param)


def to_np(ops, x):
    return np.asarray(ops.to_numpy(x))


def test_prepare_matches_sizes_and_values(ops):
    rng = np.random.default_rng(0)
    w_q = f16_exact(quantize(rng.standard_normal((64, 128)).astype(np.float32), 4, 64))
    w_o = f16_exact(quantize(rng.standard_normal((32, 128)).astype(np.float32), 8, 32))
    norm = rng.standard_normal(128).astype(np.float32)
    dense = rng.standard_normal((16, 128)).astype(np.float32)
    q8 = gguf_q8_0(rng, 8, 64)
    tensors = {
        **raw_quantized("self_attn.q_proj", w_q),
        **raw_quantized("self_attn.o_proj", w_o, "F32"),
        "input_layernorm.weight": raw(norm, "F16"),
        "mlp.dense.weight": raw(dense, "F32"),
        "post_attention_layernorm.weight": raw_bf16(norm),
        "ffn.q8.weight": q8,
    }
    quantization = {"bits": 4, "group_size": 64, "self_attn.o_proj": {"bits": 8, "group_size": 32}}
    prepared = ops.prepare(tensors, quantization)
    assert sorted(prepared) == sorted(
        [
            "self_attn.q_proj.weight",
            "self_attn.o_proj.weight",
            "input_layernorm.weight",
            "mlp.dense.weight",
            "post_attention_layernorm.weight",
            "ffn.q8.weight",
        ]
    )
    expected = unit_nbytes(tensors, ops.half_scales, blocks=ops.prepare_views_raw)
    assert ops.nbytes(prepared) == expected
    q = prepared["self_attn.q_proj.weight"]
    o = prepared["self_attn.o_proj.weight"]
    assert (q.bits, q.group_size, o.bits, o.group_size) == (4, 64, 8, 32)
    # half_scales keeps F16-stored scales float16; F32-stored ones stay float32. numpy keeps
    # GGUF blocks as read; MLX maps Q8_0 onto its affine form.
    half = np.float16 if ops.half_scales else np.float32
    q8 = prepared["ffn.q8.weight"]
    if ops.name == "numpy":
        assert (q.scales.dtype, q.biases.dtype) == (half,) * 2
        assert o.scales.dtype == o.biases.dtype == np.float32
        assert isinstance(q8, BlockWeight) and q8.nbytes == tensors["ffn.q8.weight"].data.nbytes
    else:
        assert (q8.bits, q8.group_size) == (8, 32)
    np.testing.assert_array_equal(to_np(ops, q.packed), w_q.packed)
    np.testing.assert_array_equal(to_np(ops, q.scales), w_q.scales)
    np.testing.assert_array_equal(to_np(ops, o.biases), w_o.biases)
    np.testing.assert_array_equal(
        to_np(ops, prepared["input_layernorm.weight"]), norm.astype(np.float16).astype(np.float32)
    )
    np.testing.assert_array_equal(to_np(ops, prepared["mlp.dense.weight"]), dense)
    assert to_np(ops, prepared["post_attention_layernorm.weight"]).dtype == np.float32


def test_prepare_errors_name_the_tensor(ops):
    with pytest.raises(ValueError, match=r"mlp.w.weight: GGUF type IQ2_XXS has no compute form"
                                         r".*Q6_K.*hint: use a GGUF quantized to one of those"):
        ops.prepare({"mlp.w.weight": Raw("IQ2_XXS", (1, 256), np.zeros(66, np.uint8))}, None)
    with pytest.raises(ValueError, match="mlp.w.weight: dtype 'I64' has no compute form"):
        ops.prepare({"mlp.w.weight": Raw("I64", (1, 4), np.zeros(32, np.uint8))}, None)
    qw = quantize(np.ones((4, 64), np.float32), 4, 64)
    tensors = raw_quantized("mlp.w", qw)
    with pytest.raises(ValueError, match=r"mlp.w.weight: .*quantization"):
        ops.prepare(tensors, None)
    with pytest.raises(ValueError, match="mlp.w.weight: scales shape"):
        ops.prepare(tensors, {"bits": 4, "group_size": 32})
    del tensors["mlp.w.biases"]
    with pytest.raises(ValueError, match=r"mlp.w.weight: .*without.*mlp.w.biases"):
        ops.prepare(tensors, {"bits": 4, "group_size": 64})


def assert_close_matmul(got, x, w, rtol=1e-5):
    """|got - x @ w.T| within rtol of the sum of |terms| (a scale-free matmul tolerance)."""
    x2 = x.reshape(-1, x.shape[-1]).astype(np.float64)
    ref = x2 @ w.T.astype(np.float64)
    mag = np.abs(x2) @ np.abs(w.T.astype(np.float64))
    err = np.abs(got.reshape(ref.shape) - ref)
    assert np.all(err <= rtol * mag + 1e-30), float((err / mag).max())


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("n_rows", [1, 3, 20])
def test_linear_quantized(ops, bits, n_rows):
    rng = np.random.default_rng(bits * 100 + n_rows)
    qw = quantize(rng.standard_normal((48, 256)).astype(np.float32), bits, 64)
    w = ops.prepare(raw_quantized("p", qw, "F32"), {"bits": bits, "group_size": 64})["p.weight"]
    x = rng.standard_normal((1, n_rows, 256)).astype(np.float32)
    bias = rng.standard_normal(48).astype(np.float32)
    y = to_np(ops, ops.linear(ops.from_numpy(x), w, ops.from_numpy(bias)))
    assert y.shape == (1, n_rows, 48) and y.dtype == np.float32
    assert_close_matmul(y - bias, x, dequantize(qw))


def test_linear_dense_and_gguf(ops):
    rng = np.random.default_rng(1)
    dense = rng.standard_normal((40, 64)).astype(np.float32)
    q8 = gguf_q8_0(rng, 24, 64)
    prepared = ops.prepare({"a.weight": raw(dense, "F32"), "b.weight": q8}, None)
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    y = to_np(ops, ops.linear(ops.from_numpy(x), prepared["a.weight"]))
    assert_close_matmul(y, x, dense)
    w8 = dequantize_gguf_reference(q8.data, "Q8_0", q8.shape)
    for n in (1, 12):
        xn = x.reshape(-1, 64)[:1] if n == 1 else np.tile(x.reshape(-1, 64), (2, 1))
        y = to_np(ops, ops.linear(ops.from_numpy(xn), prepared["b.weight"]))
        assert_close_matmul(y, xn, w8)


def test_embed(ops):
    rng = np.random.default_rng(2)
    table = rng.standard_normal((50, 64)).astype(np.float32)
    qw = f16_exact(quantize(table, 4, 32))
    prepared = ops.prepare(
        {"e.weight": raw(table, "F32"), **raw_quantized("q", qw)}, {"bits": 4, "group_size": 32}
    )
    ids = np.array([[3, 49, 0], [3, 7, 7]])
    np.testing.assert_array_equal(to_np(ops, ops.embed(prepared["e.weight"], ids)), table[ids])
    got = to_np(ops, ops.embed(prepared["q.weight"], ids))
    assert got.shape == (2, 3, 64)
    np.testing.assert_array_equal(got, dequantize(qw)[ids])


@pytest.mark.parametrize("shape", [(2, 3, 64), (1, 4, 3, 16)])
def test_rms_norm(ops, shape):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape).astype(np.float32) * 3
    weight = rng.standard_normal(shape[-1]).astype(np.float32)
    got = to_np(ops, ops.rms_norm(ops.from_numpy(x), ops.from_numpy(weight), 1e-5))
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-5) * weight
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("offset,L", [(0, 5), (37, 1), (9, 3)])
def test_rope_matches_per_position_formula(ops, offset, L):
    rng = np.random.default_rng(4)
    B, H, D = 2, 3, 16
    x = rng.standard_normal((B, H, L, D)).astype(np.float32)
    inv_freq = (1.0 / 10000 ** (np.arange(0, D, 2) / D)).astype(np.float32)
    got = to_np(ops, ops.rope(ops.from_numpy(x), offset, inv_freq))
    ref = np.empty_like(x, dtype=np.float64)
    for i in range(L):
        theta = (offset + i) * inv_freq.astype(np.float64)  # (D/2,)
        for j in range(D // 2):
            c, s = np.cos(theta[j]), np.sin(theta[j])
            a, b = x[..., i, j], x[..., i, j + D // 2]
            ref[..., i, j] = a * c - b * s
            ref[..., i, j + D // 2] = b * c + a * s
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def reference_attention(q, k, v, scale, offset):
    B, Hq, L, D = q.shape
    G = Hq // k.shape[1]
    k, v = np.repeat(k, G, axis=1).astype(np.float64), np.repeat(v, G, axis=1).astype(np.float64)
    out = np.zeros((B, Hq, L, D))
    for i in range(L):
        s = np.einsum("bhd,bhtd->bht", q[:, :, i].astype(np.float64), k[:, :, : offset + i + 1])
        p = np.exp(scale * s - (scale * s).max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[:, :, i] = np.einsum("bht,bhtd->bhd", p, v[:, :, : offset + i + 1])
    return out


@pytest.mark.parametrize("offset,L", [(0, 1), (0, 6), (7, 1), (5, 4)])
def test_attention_gqa_causal(ops, offset, L):
    rng = np.random.default_rng(5)
    B, Hq, Hkv, D = 2, 6, 2, 16
    T = offset + L
    q = rng.standard_normal((B, Hq, L, D)).astype(np.float32)
    k = rng.standard_normal((B, Hkv, T, D)).astype(np.float32)
    v = rng.standard_normal((B, Hkv, T, D)).astype(np.float32)
    got = to_np(ops, ops.attention(*(ops.from_numpy(a) for a in (q, k, v)), 0.25, offset))
    assert got.shape == (B, Hq, L, D)
    np.testing.assert_allclose(
        got, reference_attention(q, k, v, 0.25, offset), rtol=1e-5, atol=1e-5
    )


def test_elementwise_and_shape_ops(ops):
    rng = np.random.default_rng(6)
    gate = (rng.standard_normal((2, 3, 8)) * 30).astype(np.float32)
    gate[0, 0, :2] = [-200.0, 200.0]
    up = rng.standard_normal((2, 3, 8)).astype(np.float32)
    got = to_np(ops, ops.silu_mul(ops.from_numpy(gate), ops.from_numpy(up)))
    g64 = gate.astype(np.float64)
    np.testing.assert_allclose(got, g64 / (1 + np.exp(-g64)) * up, rtol=1e-5, atol=1e-6)
    a, b = ops.from_numpy(gate), ops.from_numpy(up)
    np.testing.assert_array_equal(to_np(ops, ops.add(a, b)), gate + up)
    t = ops.transpose(ops.reshape(a, (2, 3, 2, 4)), (0, 2, 1, 3))
    np.testing.assert_array_equal(to_np(ops, t), gate.reshape(2, 3, 2, 4).transpose(0, 2, 1, 3))
    ops.synchronize(t)


def test_kv_cache(ops):
    rng = np.random.default_rng(7)
    n_layers, B, Hkv, D, max_len = 2, 1, 2, 4, 8
    cache = ops.make_kv_cache(n_layers, B, Hkv, D, max_len)
    assert cache.offset == 0
    ks = rng.standard_normal((B, Hkv, 8, D)).astype(np.float32)
    vs = -ks
    for start, stop in [(0, 5), (5, 6), (6, 8)]:
        for layer_idx in range(n_layers):
            k, v = (ops.from_numpy(a[:, :, start:stop] + layer_idx) for a in (ks, vs))
            keys, values = cache.update(layer_idx, k, v)
            np.testing.assert_array_equal(to_np(ops, keys), ks[:, :, :stop] + layer_idx)
            np.testing.assert_array_equal(to_np(ops, values), vs[:, :, :stop] + layer_idx)
        cache.advance(stop - start)
        if start == 5:  # roll back the single-token step, then redo it
            cache.trim(1)
            assert cache.offset == 5
            keys, _ = cache.update(0, ops.from_numpy(ks[:, :, 5:6]), ops.from_numpy(vs[:, :, 5:6]))
            assert keys.shape[2] == 6
            cache.advance(1)
    assert cache.offset == 8
    with pytest.raises(ValueError, match=r"overflow.*9.*exceeds max_len=8"):
        cache.update(0, ops.from_numpy(ks[:, :, :1]), ops.from_numpy(vs[:, :, :1]))
    with pytest.raises(ValueError, match="cannot trim 9"):
        cache.trim(9)


def test_get_backend():
    assert kernels.get_backend("numpy").name == "numpy"
    assert "numpy" in kernels.available_backends()
    assert kernels.get_backend().name in kernels.available_backends()
    with pytest.raises(ValueError, match=r"unknown backend 'cuda'; expected one of"):
        kernels.get_backend("cuda")
