"""Numpy-backend specifics: the blocked dequantize+BLAS prefill path, the decode/prefill switch,
GGUF units through prepare(), id checks, and the KV cache's byte size."""

from dataclasses import dataclass

import numpy as np
import pytest

from stream_run.kernels import numpy_backend
from stream_run.kernels.formats import dequantize_gguf_reference
from stream_run.kernels.gguf_blocks import dequantize_rows
from stream_run.kernels.numpy_backend import NumpyBackend
from stream_run.kernels.quant import BlockWeight, dequantize, quantize


@dataclass
class Raw:
    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray


def gguf_blocks(rng, dtype, out, n_in):
    block_bytes = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[dtype]
    n_blocks = out * n_in // 32
    raw = rng.integers(0, 256, (n_blocks, block_bytes), dtype=np.uint8)
    raw[:, 0:2] = rng.uniform(-0.1, 0.1, n_blocks).astype("<f2").view(np.uint8).reshape(-1, 2)
    if dtype == "Q4_1":
        raw[:, 2:4] = rng.uniform(-1, 1, n_blocks).astype("<f2").view(np.uint8).reshape(-1, 2)
    return Raw(dtype, (out, n_in), raw.reshape(-1))


def scale_free_close(got, x, w, rtol=1e-5):
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    mag = np.abs(x.astype(np.float64)) @ np.abs(w.T.astype(np.float64))
    assert np.all(np.abs(got - ref) <= rtol * mag + 1e-30)


@pytest.mark.parametrize("n_rows", [8, 9, 33])
def test_quantized_linear_both_paths_and_blocks(monkeypatch, n_rows):
    # a tiny block size forces several dequantize+BLAS blocks, the last one partial
    monkeypatch.setattr(numpy_backend, "DEQUANT_BLOCK_ELEMENTS", 7 * 128)
    rng = np.random.default_rng(n_rows)
    qw = quantize(rng.standard_normal((50, 128)).astype(np.float32), 4, 32)
    x = rng.standard_normal((n_rows, 128)).astype(np.float32)
    got = NumpyBackend().linear(x, qw)
    assert got.shape == (n_rows, 50) and got.dtype == np.float32
    scale_free_close(got, x, dequantize(qw))


@pytest.mark.parametrize("dtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_unit_through_prepare(dtype):
    rng = np.random.default_rng(3)
    t = gguf_blocks(rng, dtype, 16, 96)
    w = NumpyBackend().prepare({"w.weight": t}, None)["w.weight"]
    ref = dequantize_gguf_reference(t.data, dtype, t.shape)
    assert isinstance(w, BlockWeight) and np.shares_memory(w.data, t.data)
    np.testing.assert_array_equal(dequantize_rows(w), ref)
    ops = NumpyBackend()
    ids = np.array([[15, 0, 3]])
    np.testing.assert_array_equal(ops.embed(w, ids), ref[ids])
    x = rng.standard_normal((1, 2, 96)).astype(np.float32)
    # the int8 types round x per 32-element block (kernels/gguf_blocks.matvec): |dx| <= max/254
    rtol = 1e-5 if dtype == "Q8_0" else 1.5e-2
    scale_free_close(ops.linear(x, w).reshape(2, 16), x.reshape(2, 96), ref, rtol)


def test_per_tensor_quantization_override_and_bad_size():
    rng = np.random.default_rng(4)
    qw = quantize(rng.standard_normal((8, 64)).astype(np.float32), 8, 32)
    parts = {"weight": ("U32", qw.packed), "scales": ("F32", qw.scales)}
    parts["biases"] = ("F32", qw.biases)
    tensors = {
        f"mlp.up_proj.{k}": Raw(dtype, a.shape, a.reshape(-1).view(np.uint8))
        for k, (dtype, a) in parts.items()
    }
    quantization = {"bits": 4, "group_size": 64, "mlp.up_proj": {"bits": 8, "group_size": 32}}
    w = NumpyBackend().prepare(tensors, quantization)["mlp.up_proj.weight"]
    assert (w.bits, w.group_size, w.shape) == (8, 32, (8, 64))
    np.testing.assert_array_equal(dequantize(w), dequantize(qw))
    tensors["mlp.up_proj.weight"].data = tensors["mlp.up_proj.weight"].data[:-4]
    with pytest.raises(ValueError, 
                       match=r"mlp.up_proj.weight: U32 .*truncated: got 508 of its 512 bytes"):
        NumpyBackend().prepare(tensors, quantization)


def test_embed_rejects_out_of_range_ids():
    ops = NumpyBackend()
    qw = quantize(np.ones((10, 32), np.float32), 4, 32)
    for table in (np.ones((10, 32), np.float32), qw):
        with pytest.raises(ValueError, match="token id 10 is out of range for a table of 10 rows"):
            ops.embed(table, np.array([[1, 10]]))
        with pytest.raises(ValueError, match="token id -1"):
            ops.embed(table, np.array([[-1]]))


def test_attention_with_longer_cache_than_offset_plus_len():
    # keys past offset + L (a cache view longer than needed) must stay masked out
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, 4, 2, 8)).astype(np.float32)
    k = rng.standard_normal((1, 2, 6, 8)).astype(np.float32)
    v = rng.standard_normal((1, 2, 6, 8)).astype(np.float32)
    ops = NumpyBackend()
    want = ops.attention(q, k[:, :, :3], v[:, :, :3], 0.3, offset=1)
    np.testing.assert_allclose(ops.attention(q, k, v, 0.3, offset=1), want, rtol=1e-6, atol=1e-7)


def test_kv_cache_nbytes_and_views():
    cache = NumpyBackend().make_kv_cache(3, 2, 4, 16, 32)
    assert cache.nbytes == 2 * 3 * 2 * 4 * 32 * 16 * 4
    k = np.ones((2, 4, 5, 16), np.float32)
    keys, values = cache.update(1, k, 2 * k)
    assert keys.shape == values.shape == (2, 4, 5, 16)
    assert np.shares_memory(keys, cache.layers[1].k)  # a view: no copy of the history per step
    with pytest.raises(ValueError, match="max_len=32"):
        cache.advance(33)
