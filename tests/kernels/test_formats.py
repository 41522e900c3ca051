"""Raw bytes -> arrays: dense floats, and the GGUF types that are affine over 32 elements
(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K) -> affine form losslessly, checked against
gguf-py's own dequantization."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

from stream_run.kernels.formats import dequantize_gguf_reference, gguf_to_affine, to_float32
from stream_run.kernels.quant import GGUF_BLOCK_TYPES, dequantize

AFFINE_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K"]


def random_blocks(rng, dtype, out, n_in):
    """Random block bytes with f16 d (and m / dmin) in a sane range; some blocks zero-scaled
    (the types whose f16 fields lead the block)."""
    block, block_bytes = GGUF_BLOCK_TYPES[dtype]
    n_blocks = out * n_in // block
    raw = rng.integers(0, 256, (n_blocks, block_bytes), dtype=np.uint8)
    d = rng.uniform(-2, 2, n_blocks) * 10.0 ** rng.integers(-6, 3, n_blocks)
    d[::7] = 0.0  # zero blocks
    raw[:, 0:2] = d.astype("<f2").view(np.uint8).reshape(n_blocks, 2)
    if dtype in ("Q4_1", "Q5_1", "Q4_K", "Q5_K"):
        m = rng.uniform(-4, 4, n_blocks).astype("<f2")
        raw[:, 2:4] = m.view(np.uint8).reshape(n_blocks, 2)
    return raw


@pytest.mark.parametrize("dtype", AFFINE_TYPES)
def test_gguf_to_affine_is_lossless(dtype):
    rng = np.random.default_rng(len(dtype) + ord(dtype[-1]) + ord(dtype[1]))
    out, n_in = 12, 512
    raw = random_blocks(rng, dtype, out, n_in)
    expected = quants.dequantize(raw.reshape(out, -1), GGMLQuantizationType[dtype])
    assert expected.shape == (out, n_in)
    qw = gguf_to_affine(raw.reshape(-1), dtype, (out, n_in))
    bits = {"Q8_0": 8, "Q5_0": 5, "Q5_1": 5, "Q5_K": 5}.get(dtype, 4)
    assert (qw.bits, qw.group_size, qw.shape) == (bits, 32, (out, n_in))
    assert qw.packed.dtype == np.uint32 and qw.scales.dtype == qw.biases.dtype == np.float32
    np.testing.assert_array_equal(dequantize(qw), expected)
    half = gguf_to_affine(raw.reshape(-1), dtype, (out, n_in), half_scales=True)
    np.testing.assert_array_equal(dequantize(half), expected)
    if dtype in ("Q4_0", "Q4_1", "Q8_0"):
        np.testing.assert_array_equal(dequantize_gguf_reference(raw, dtype, (out, n_in)),
                                      expected)


def test_q4_0_hand_built_block():
    # d = 0.5; byte t holds element t (low nibble) and element t + 16 (high nibble)
    qs = np.array([(t % 16) | ((15 - t % 16) << 4) for t in range(16)], dtype=np.uint8)
    raw = np.concatenate([np.array([0.5], "<f2").view(np.uint8), qs])
    want = np.concatenate([0.5 * (np.arange(16) - 8), 0.5 * (15 - np.arange(16) - 8)])
    qw = gguf_to_affine(raw, "Q4_0", (1, 32))
    np.testing.assert_array_equal(dequantize(qw)[0], want.astype(np.float32))
    np.testing.assert_array_equal(qw.scales, [[0.5]])
    np.testing.assert_array_equal(qw.biases, [[-4.0]])


def test_q8_0_hand_built_block():
    q = np.arange(-16, 16, dtype=np.int8)
    raw = np.concatenate([np.array([0.25], "<f2").view(np.uint8), q.view(np.uint8)])
    np.testing.assert_array_equal(dequantize(gguf_to_affine(raw, "Q8_0", (1, 32)))[0], 0.25 * q)


def test_half_scales_keep_float16_where_exact(recwarn):
    """half_scales: GGUF scales stay float16; biases too unless one is not exact in float16
    (-128 d overflows for d > 511.98), then that tensor's biases stay float32, silently."""
    q = np.arange(-16, 16, dtype=np.int8).view(np.uint8)

    def q8(*ds):
        return np.concatenate([np.concatenate([np.array([d], "<f2").view(np.uint8), q])
                               for d in ds])

    for ds, bias_dtype in (((0.25, 2.0), np.float16), ((0.25, np.nan), np.float16),
                           ((0.25, 600.0), np.float32)):
        qw = gguf_to_affine(q8(*ds), "Q8_0", (2, 32), half_scales=True)
        assert (qw.scales.dtype, qw.biases.dtype) == (np.float16, bias_dtype)
        np.testing.assert_array_equal(dequantize(qw),
                                      dequantize(gguf_to_affine(q8(*ds), "Q8_0", (2, 32))))
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize("dtype,np_dtype", [("F32", "<f4"), ("F16", "<f2")])
def test_to_float32_dense(dtype, np_dtype):
    a = np.random.default_rng(0).standard_normal((3, 5)).astype(np_dtype)
    raw = a.reshape(-1).view(np.uint8)
    got = to_float32(raw, dtype, (3, 5))
    assert got.dtype == np.float32 and got.shape == (3, 5)
    np.testing.assert_array_equal(got, a.astype(np.float32))
    assert not np.shares_memory(got, raw)


def test_to_float32_bf16():
    f = np.array([1.0, -2.5, 3.140625, 0.0, 1e-3], np.float32)
    bf16 = (f.view(np.uint32) >> 16).astype("<u2")  # truncation: exact for these values but 1e-3
    got = to_float32(bf16.view(np.uint8), "BF16", (5,))
    np.testing.assert_array_equal(got, (bf16.astype(np.uint32) << 16).view(np.float32))
    np.testing.assert_array_equal(got[:4], f[:4])


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"truncated: got 10 of its 12 bytes"):
        to_float32(np.zeros(10, np.uint8), "F32", (3,))
    with pytest.raises(ValueError, match=r"got 14 bytes, expected 12"):
        to_float32(np.zeros(14, np.uint8), "F32", (3,))
    with pytest.raises(ValueError, match="not a dense float type"):
        to_float32(np.zeros(4, np.uint8), "Q4_0", (1,))
    with pytest.raises(ValueError, match="Q6_K.* has no lossless affine form"):
        gguf_to_affine(np.zeros(210, np.uint8), "Q6_K", (1, 256))
    with pytest.raises(ValueError, match="in a multiple of 256"):
        gguf_to_affine(np.zeros(144, np.uint8), "Q4_K", (1, 32))
    with pytest.raises(ValueError, match="in a multiple of 32"):
        gguf_to_affine(np.zeros(18, np.uint8), "Q4_0", (1, 48))
    with pytest.raises(ValueError, match="truncated"):
        gguf_to_affine(np.zeros(17, np.uint8), "Q4_0", (1, 32))
