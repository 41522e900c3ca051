"""The 3/5/6-bit matvec kernels (elements straddle bytes) against a plain-numpy dequantize-then-dot
reference that unpacks the bitstream on its own, through both callers of qdot_tile: qmatvec and
the fused block kernels' matvec."""

import itertools

import numba
import numpy as np
import pytest

from stream_run.kernels import fused, numba_kernels
from stream_run.kernels.numpy_backend import MATVEC_MAX_ROWS
from stream_run.kernels.quant import QuantizedWeight, quantize

ODD_BITS = (3, 5, 6)
CASES = list(itertools.product(ODD_BITS, (32, 64, 128)))
# (out, in): odd row counts (not a multiple of the thread count); an `in` past one decode
# segment, a whole number of them, and one ending in a partial segment
SHAPES = [(1, 128), (7, 256), (33, 384), (5, numba_kernels.SEGMENT),
          (3, 2 * numba_kernels.SEGMENT + 384)]


def unpack_plain(packed: np.ndarray, bits: int) -> np.ndarray:
    """Codes (out, in) from the definition: element j is bits [j*bits, (j+1)*bits) of the row's
    little-endian bytes."""
    stream = np.unpackbits(packed.view(np.uint8), axis=1, bitorder="little")
    digits = stream.reshape(packed.shape[0], -1, bits).astype(np.int64)
    return digits @ (1 << np.arange(bits))


def pack_plain(codes: np.ndarray, bits: int) -> np.ndarray:
    stream = ((codes[..., None] >> np.arange(bits)) & 1).astype(np.uint8)
    row_bytes = np.packbits(stream.reshape(codes.shape[0], -1), axis=1, bitorder="little")
    return np.ascontiguousarray(row_bytes).view(np.uint32)


def reference(x: np.ndarray, qw: QuantizedWeight) -> tuple[np.ndarray, np.ndarray]:
    """x @ w.T in float64 for the dequantized w, and the magnitude of the terms summed."""
    q = unpack_plain(qw.packed, qw.bits).astype(np.float64)
    s = np.repeat(qw.scales, qw.group_size, axis=1).astype(np.float64)
    b = np.repeat(qw.biases, qw.group_size, axis=1).astype(np.float64)
    x64 = x.astype(np.float64)
    return x64 @ (s * q + b).T, np.abs(x64) @ (np.abs(s) * q + np.abs(b)).T


def both_paths(x: np.ndarray, qw: QuantizedWeight) -> list[np.ndarray]:
    via_qmatvec = numba_kernels.qmatvec(x, qw.packed, qw.scales, qw.biases, qw.bits,
                                        qw.group_size)
    via_fused = np.empty_like(via_qmatvec)
    fused._matvec(x, (qw.packed, qw.scales, qw.biases, qw.bits, qw.group_size), via_fused)
    return [via_qmatvec, via_fused]


def check(x: np.ndarray, qw: QuantizedWeight) -> None:
    want, mag = reference(x, qw)
    for got in both_paths(x, qw):
        assert got.shape == want.shape and got.dtype == np.float32
        # float32 sums (summation order differs): an error relative to the terms summed
        np.testing.assert_array_less(np.abs(got - want), 1e-5 * mag + 1e-30)


@pytest.mark.parametrize("bits, group_size", CASES)
@pytest.mark.parametrize("out, n_in", SHAPES)
def test_matvec_matches_dequantize_then_dot(bits, group_size, out, n_in):
    rng = np.random.default_rng(bits * 1000 + group_size + out)
    qw = quantize((rng.standard_normal((out, n_in)) / np.sqrt(n_in)).astype(np.float32), bits,
                  group_size)
    np.testing.assert_array_equal(pack_plain(unpack_plain(qw.packed, bits), bits), qw.packed)
    for n in (1, 2, MATVEC_MAX_ROWS):
        check(rng.standard_normal((n, n_in)).astype(np.float32), qw)


@pytest.mark.parametrize("bits", ODD_BITS)
def test_thread_counts_agree_bit_for_bit(bits):
    rng = np.random.default_rng(bits)
    qw = quantize(rng.standard_normal((37, 256)).astype(np.float32), bits, 64)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    before = numba.get_num_threads()
    results = []
    try:
        for threads in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(threads)
            results.append(both_paths(x, qw))
    finally:
        numba.set_num_threads(before)
    for got, want in zip(results[-1], results[0], strict=True):
        np.testing.assert_array_equal(got, want)  # a row's sum never depends on the split


def hand_built(codes: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int,
               group_size: int) -> QuantizedWeight:
    return QuantizedWeight(pack_plain(codes, bits), scales.astype(np.float32),
                           biases.astype(np.float32), bits, group_size)


@pytest.mark.parametrize("bits, group_size", CASES)
def test_extreme_codes_and_scales(bits, group_size):
    rng = np.random.default_rng(bits + group_size)
    out, n_in = 6, 512
    n_groups = n_in // group_size
    top = (1 << bits) - 1
    codes = np.full((out, n_in), top, dtype=np.int64)  # every code at its maximum
    codes[1] = 0
    codes[2, ::2] = 0  # alternating extremes: every straddling bit pattern flips
    codes[3] = rng.integers(0, top + 1, n_in)
    scales = np.full((out, n_groups), 1e4)
    scales[4] = 0.0  # zero scales: the row is its biases
    scales[5] = -3e-8
    biases = rng.uniform(-2, 2, (out, n_groups))
    qw = hand_built(codes, scales, biases, bits, group_size)
    np.testing.assert_array_equal(unpack_plain(qw.packed, bits), codes)
    x = rng.standard_normal((3, n_in)).astype(np.float32)
    check(x, qw)
    ones = np.ones((1, n_in), np.float32)
    b = qw.biases.astype(np.float64) * group_size  # each group's bias term for x = 1
    codes_term = {0: top * 1e4 * n_in, 1: 0.0, 4: 0.0}  # row 1: codes 0; row 4: scales 0
    for got in both_paths(ones, qw):
        for row, term in codes_term.items():
            mag = term + np.abs(b[row]).sum()
            assert abs(got[0, row] - (term + b[row].sum())) <= 1e-6 * mag


@pytest.mark.parametrize("bits", ODD_BITS)
def test_non_finite_inputs_propagate(bits):
    qw = quantize(np.ones((4, 64), np.float32), bits, 32)
    x = np.ones((2, 64), np.float32)
    x[0, 5] = np.nan
    x[1, 40] = np.inf
    for got in both_paths(x, qw):
        assert np.isnan(got[0]).all()
        assert not np.isfinite(got[1]).any()


def test_qmatvec_refuses_x_that_does_not_fit_the_weight():
    """The row kernels take their length from x: a mismatch is a clear error, not a read past
    the packed row."""
    qw = quantize(np.ones((4, 128), np.float32), 6, 32)
    with pytest.raises(ValueError, match="x has 256 features, a 6-bit weight of 24 words"):
        numba_kernels.qmatvec(np.ones((1, 256), np.float32), qw.packed, qw.scales, qw.biases,
                              6, 32)
