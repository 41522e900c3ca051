"""Every GGUF block type through both backends' prepare() and ops, against gguf-py's
dequantization: numpy keeps the blocks as read (BlockWeight, a view of the read buffer);
MLX maps the 32-element affine types losslessly and dequantizes the others to float16.
The cache's size rules (kernels/sizes.py) must equal what prepare() holds."""

from dataclasses import dataclass

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

from stream_run.kernels.formats import FORMATS, GGUF_HALF_ON_MLX, GGUF_TYPES
from stream_run.kernels.gguf_blocks import QUANTIZED_X
from stream_run.kernels.numpy_backend import NumpyBackend
from stream_run.kernels.quant import GGUF_BLOCK_TYPES, BlockWeight, QuantizedWeight
from stream_run.kernels.sizes import held_nbytes, transient_nbytes, unit_nbytes

# byte offsets of each type's f16 fields (d, and m / dmin where the type has one)
HALF_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
               "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
TYPES = list(GGUF_BLOCK_TYPES)


@dataclass
class Raw:
    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


def random_gguf(rng, dtype, out, n_in):
    """Random codes with f16 scales of about 0.01 (a few zero, one block at 2**-24)."""
    block, block_bytes = GGUF_BLOCK_TYPES[dtype]
    n_blocks = out * n_in // block
    raw = rng.integers(0, 256, (n_blocks, block_bytes), dtype=np.uint8)
    for at in HALF_FIELDS[dtype]:
        v = rng.uniform(-0.02, 0.02, n_blocks)
        v[::5] = 0.0
        v[1] = 2.0 ** -24  # the smallest subnormal
        raw[:, at:at + 2] = v.astype("<f2").view(np.uint8).reshape(-1, 2)
    return raw.reshape(-1)


def reference(raw, dtype, shape):
    return quants.dequantize(raw.reshape(shape[0], -1), GGMLQuantizationType[dtype]).astype(
        np.float32).reshape(shape)


def close(got, x, w, rtol=2e-5):
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    mag = np.abs(x.astype(np.float64)) @ np.abs(w.T.astype(np.float64))
    worst = np.max(np.abs(got - ref) / (mag + 1e-30))
    assert np.all(np.abs(got - ref) <= rtol * mag + 1e-30), worst


def test_the_format_table_covers_every_storage_type():
    assert set(GGUF_BLOCK_TYPES) <= set(FORMATS)
    assert set(GGUF_TYPES) | set(GGUF_HALF_ON_MLX) == set(GGUF_BLOCK_TYPES)
    assert {FORMATS[t].mlx_exact for t in GGUF_HALF_ON_MLX} == {False}
    assert all(FORMATS[t].storage == "gguf-blocks" for t in GGUF_BLOCK_TYPES)


@pytest.mark.parametrize("dtype", TYPES)
def test_numpy_computes_on_the_blocks_as_read(dtype):
    rng = np.random.default_rng(TYPES.index(dtype))
    out, n_in = 20, 512
    blocks = random_gguf(rng, dtype, out, n_in)
    buf = np.empty(blocks.size + 1 + 4 * n_in, np.uint8)  # one read buffer: blocks, a norm
    buf[1:1 + blocks.size] = blocks  # at an odd offset: the kernels read bytes, not words
    tensors = {"w.weight": Raw(dtype, (out, n_in), buf[1:1 + blocks.size]),
               "n.weight": Raw("F32", (n_in,), buf[1 + blocks.size:])}
    ops = NumpyBackend()
    prepared = ops.prepare(tensors, None)
    w = prepared["w.weight"]
    assert isinstance(w, BlockWeight) and w.shape == (out, n_in) and w.qtype == dtype
    assert np.shares_memory(w.data, buf)
    ref = reference(blocks, dtype, (out, n_in))
    ids = np.array([[19, 0, 7]])
    np.testing.assert_array_equal(ops.embed(w, ids), ref[ids])
    for n_rows in (1, 3, 12):  # matvec, few rows, dequantize + BLAS
        x = rng.standard_normal((n_rows, n_in)).astype(np.float32)
        got = ops.linear(x, w)
        if n_rows <= 8 and dtype in QUANTIZED_X:  # x rounded to int8 per block
            block = QUANTIZED_X[dtype]
            dx = np.abs(x.reshape(n_rows, -1, block)).max(axis=2) / 127  # (N, blocks)
            slack = (np.repeat(dx, block, axis=1) / 2) @ np.abs(ref.T).astype(np.float64)
            ref64 = x.astype(np.float64) @ ref.T.astype(np.float64)
            assert np.all(np.abs(got - ref64) <= slack * 1.001 + 1e-5 * np.abs(ref64).max())
        else:
            close(got, x, ref)
    # what the cache counts for the unit is what it holds: the raw bytes, nothing transient
    assert held_nbytes(tensors, views_raw=True) == sum(t.nbytes for t in tensors.values())
    assert transient_nbytes(tensors, views_raw=True) == 0


@pytest.mark.parametrize("dtype", TYPES)
def test_mlx_maps_or_dequantizes_at_read(dtype):
    mlx_backend = pytest.importorskip("stream_run.kernels.mlx_backend")
    rng = np.random.default_rng(100 + TYPES.index(dtype))
    out, n_in = 24, 256
    blocks = random_gguf(rng, dtype, out, n_in)
    tensors = {"w.weight": Raw(dtype, (out, n_in), blocks)}
    ops = mlx_backend.MLXBackend(device="cpu")
    prepared = ops.prepare(tensors, None)
    w = prepared["w.weight"]
    ref = reference(blocks, dtype, (out, n_in))
    import mlx.core as mx

    if dtype in GGUF_TYPES:
        assert isinstance(w, QuantizedWeight) and w.group_size == 32
        got = np.array(mx.dequantize(w.packed, w.scales, w.biases, group_size=32, bits=w.bits))
        np.testing.assert_array_equal(got, ref)
    else:
        assert w.dtype == mx.float16  # dequantized at read
        np.testing.assert_allclose(np.array(w).astype(np.float32), ref, rtol=1e-3,
                                   atol=1e-7)
    x = rng.standard_normal((2, n_in)).astype(np.float32)
    got = ops.to_numpy(ops.linear(ops.from_numpy(x), w))
    close(got, x, ref, rtol=1e-3 if dtype in GGUF_HALF_ON_MLX else 2e-5)
    assert unit_nbytes(tensors) == ops.nbytes(prepared)


@pytest.mark.parametrize("dtype", ["Q4_K", "Q6_K"])
def test_a_truncated_tensor_is_reported_as_truncated(dtype):
    rng = np.random.default_rng(7)
    blocks = random_gguf(rng, dtype, 4, 256)
    tensors = {"blk.w": Raw(dtype, (4, 256), blocks[:-5])}
    with pytest.raises(ValueError, match=rf"blk.w: {dtype} tensor of shape \(4, 256\) is "
                                         r"truncated: got \d+ of its \d+ bytes"):
        NumpyBackend().prepare(tensors, None)
