"""MLX affine quantization: the numpy reference vs plain formulas and vs mx.quantize, and the
numba kernels vs the reference, for every supported bit width and group size."""

import itertools

import numpy as np
import pytest

from kernels import numba_kernels
from kernels.quant import (
    SUPPORTED_BITS,
    SUPPORTED_GROUP_SIZES,
    QuantizedWeight,
    dequantize,
    pack,
    quantize,
    unpack,
)

CASES = list(itertools.product(SUPPORTED_BITS, SUPPORTED_GROUP_SIZES))


def naive_pack(q, bits):
    """Element j of a row at bits [j*bits, (j+1)*bits) of the row's little-endian bytes."""
    out, n = q.shape
    words = np.zeros((out, n * bits // 32), dtype=np.uint32)
    for r in range(out):
        stream = 0
        for j in range(n):
            stream |= int(q[r, j]) << (j * bits)
        for i in range(words.shape[1]):
            words[r, i] = (stream >> (32 * i)) & 0xFFFFFFFF
    return words


def naive_dequantize(q, scales, biases, group_size):
    s = np.repeat(scales, group_size, axis=1)
    b = np.repeat(biases, group_size, axis=1)
    return (s * q.astype(np.float32) + b).astype(np.float32)


def weights(rng, out=16, n_in=256):
    w = (rng.standard_normal((out, n_in)) * 0.05).astype(np.float32)
    w[0, :128] = 0.0  # all-zero groups
    w[1, :128] = 0.37  # constant groups
    w[2, :128] = -2.5
    w[3] *= np.float32(1e-8)  # tiny scales
    w[4] *= np.float32(1e4)  # huge scales
    w[5, :128] = rng.uniform(0.1, 1.0, 128)  # all positive
    w[6, :128] = -rng.uniform(0.1, 1.0, 128)  # all negative
    return w


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_pack_matches_bitstream_definition(bits):
    rng = np.random.default_rng(bits)
    q = rng.integers(0, 1 << bits, (3, 64), dtype=np.uint8)
    packed = pack(q, bits)
    np.testing.assert_array_equal(packed, naive_pack(q, bits))
    np.testing.assert_array_equal(unpack(packed, bits, 64), q)


@pytest.mark.parametrize("bits,group_size", CASES)
def test_round_trip_vs_plain_formula(bits, group_size):
    rng = np.random.default_rng(bits * 1000 + group_size)
    w = weights(rng)
    qw = quantize(w, bits, group_size)
    n_groups = w.shape[1] // group_size
    assert qw.shape == w.shape
    assert qw.packed.shape == (16, 256 * bits // 32) and qw.packed.dtype == np.uint32
    assert qw.scales.shape == qw.biases.shape == (16, n_groups)
    assert qw.nbytes == qw.packed.nbytes + qw.scales.nbytes + qw.biases.nbytes
    q = unpack(qw.packed, bits, w.shape[1])
    ref = naive_dequantize(q, qw.scales, qw.biases, group_size)
    got = dequantize(qw)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, ref)
    # Error bound: one step (the group's scale). Not half a step: MLX refines the scale so the
    # larger-magnitude endpoint is exact, which can push the other endpoint past 2**bits - 1.
    step = np.repeat(np.abs(qw.scales), group_size, axis=1)
    assert np.all(np.abs(got - w) <= step * (1 + 1e-4) + 1e-6 * np.abs(w))
    # Zero groups stay exactly zero, constant groups exactly constant.
    np.testing.assert_array_equal(got[0, :128], 0.0)
    np.testing.assert_array_equal(got[1, :128], np.float32(0.37))
    np.testing.assert_array_equal(got[2, :128], np.float32(-2.5))


@pytest.mark.parametrize("bits,group_size", CASES)
def test_bit_exact_with_mlx(bits, group_size):
    mx = pytest.importorskip("mlx.core")
    rng = np.random.default_rng(7 * bits + group_size)
    w = weights(rng, out=24, n_in=384)
    qw = quantize(w, bits, group_size)
    packed, scales, biases = mx.quantize(mx.array(w), group_size=group_size, bits=bits)
    np.testing.assert_array_equal(np.array(packed), qw.packed)
    np.testing.assert_array_equal(np.array(scales), qw.scales)
    np.testing.assert_array_equal(np.array(biases), qw.biases)
    mx_w = mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits)
    np.testing.assert_array_equal(np.array(mx_w), dequantize(qw))


@pytest.mark.parametrize("bits,group_size", CASES)
def test_numba_kernels_vs_reference(bits, group_size):
    rng = np.random.default_rng(bits + group_size)
    qw = quantize(weights(rng, out=40, n_in=384), bits, group_size)
    w = dequantize(qw)
    for n in (1, 3):
        x = rng.standard_normal((n, 384)).astype(np.float32)
        got = numba_kernels.qmatvec(x, qw.packed, qw.scales, qw.biases, bits, group_size)
        ref = (x.astype(np.float64) @ w.T.astype(np.float64)).astype(np.float32)
        assert got.shape == (n, 40) and got.dtype == np.float32
        # tolerance relative to the magnitude of the terms summed (rows 0-4 have huge scales)
        mag = np.abs(x) @ np.abs(w).T
        np.testing.assert_array_less(np.abs(got - ref), 1e-5 * mag + 1e-30)
    rows = np.array([39, 0, 4, 4], dtype=np.int64)
    got_rows = numba_kernels.dequantize_rows(
        qw.packed, qw.scales, qw.biases, bits, group_size, rows
    )
    np.testing.assert_array_equal(got_rows, w[rows])
    np.testing.assert_array_equal(
        numba_kernels.dequantize_rows(qw.packed, qw.scales, qw.biases, bits, group_size), w
    )


def test_quantized_weight_is_frozen():
    qw = quantize(np.ones((2, 32), np.float32), 4, 32)
    assert isinstance(qw, QuantizedWeight)
    with pytest.raises(AttributeError):
        qw.bits = 8


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"bits": 7, "group_size": 64}, "bits=7"),
        ({"bits": 4, "group_size": 48}, "group_size=48"),
    ],
)
def test_unsupported_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize(np.zeros((2, 128), np.float32), **kwargs)


def test_indivisible_shapes():
    with pytest.raises(ValueError, match="in=96 is not divisible by group_size=64"):
        quantize(np.zeros((2, 96), np.float32), 4, 64)
    with pytest.raises(ValueError, match="expected a 2-D"):
        quantize(np.zeros(64, np.float32), 4, 64)
    with pytest.raises(ValueError, match="multiple of 32"):
        pack(np.zeros((2, 16), np.uint8), 4)
    with pytest.raises(ValueError, match="does not hold n=64"):
        unpack(np.zeros((2, 3), np.uint32), 4, 64)
