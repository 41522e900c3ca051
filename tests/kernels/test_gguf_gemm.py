"""kernels/gguf_gemm.py (a prompt's rows against GGUF blocks, in int8) against gguf-py's
dequantization in float64: within the bound of x's two-code rounding plus float32 summation,
on odd shapes; a row's bits independent of the rows beside it; other targets agree."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from stream_run.kernels.gguf_gemm import GEMM_TYPES, LO, XBLOCK, gemm
from stream_run.kernels.quant import GGUF_BLOCK_TYPES, BlockWeight
from tests.test_gguf_blocks import (
    HALF_FIELDS,
    QTYPES,
    U,
    magnitudes,
    quantized_blocks,
    random_blocks,
    reference,
    unaligned,
)


def check_gemm(x: np.ndarray, data: np.ndarray, w: BlockWeight) -> np.ndarray:
    """x = dx (xh + xl / LO) per element within dx / (2 LO) (dx per block of 32 of x), plus
    a few float32 ulps of x; then per group one exact integer dot, converted and scaled (a few
    roundings each) and summed over the groups: within (groups + 8) ulps of |x| @ (|w| + |min
    terms|)."""
    got = gemm(x, w)
    weights = reference(data, w.qtype).astype(np.float64)
    x64 = x.astype(np.float64)
    dx = np.repeat(np.abs(x64).reshape(x.shape[0], -1, XBLOCK).max(axis=-1) / 127, XBLOCK,
                   axis=-1)
    groups = w.n_in // GEMM_TYPES[w.qtype][1]
    bound = (1 / (2 * LO) + 1e-4) * (dx @ np.abs(weights).T) + (groups + 8) * 2 * U * (
        np.abs(x64) @ magnitudes(data, w.qtype).T)
    assert got.shape == (x.shape[0], data.shape[0]) and got.dtype == np.float32
    excess = np.abs(got - x64 @ weights.T) - bound
    assert (excess <= 0).all(), f"{w.qtype} N={x.shape[0]}: max error over the bound " \
        f"{excess.max():.3g} at {np.unravel_index(excess.argmax(), excess.shape)}"
    return got


def test_every_gguf_block_type_has_a_kernel():
    assert set(GEMM_TYPES) == set(GGUF_BLOCK_TYPES)


@pytest.mark.parametrize("qtype", QTYPES)
def test_gemm_shapes(qtype):
    """Weight rows past a tile's end (1, 7, 37 rows), rows of x past a group of XR (9, 13)."""
    rng = np.random.default_rng(500 + QTYPES.index(qtype))
    elems = GGUF_BLOCK_TYPES[qtype][0]
    for out, n_in in ((1, elems), (7, 2 * elems), (37, 4 * elems), (48, 2048)):
        for make in (random_blocks, quantized_blocks):
            data = make(qtype, out, n_in, rng)
            w = BlockWeight(data, qtype, n_in)
            for n in (9, 13):
                check_gemm(rng.standard_normal((n, n_in)).astype(np.float32), data, w)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0", "Q4_K", "Q6_K"])
def test_gemm_unaligned_rows_and_wide_x(qtype):
    rng = np.random.default_rng(600 + QTYPES.index(qtype))
    data = quantized_blocks(qtype, 45, 768, rng)
    x = rng.standard_normal((11, 768)).astype(np.float32) * np.float32(30)
    x[3] *= np.float32(1e-6)  # blocks of tiny values: their own scale
    x[4, :32] = 0  # an all-zero block
    check_gemm(x, data, BlockWeight(unaligned(data), qtype, 768))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_K", "Q3_K"])
def test_a_rows_bits_do_not_depend_on_the_rows_beside_it(qtype):
    """A prompt row gets the same bits in a pass of any size or order (groups of XR, then
    single rows): a prompt's KV cache does not depend on how its rows were chunked."""
    rng = np.random.default_rng(7)
    n_in = GGUF_BLOCK_TYPES[qtype][0] * 4
    data = random_blocks(qtype, 37, n_in, rng)
    w = BlockWeight(data, qtype, n_in)
    x = rng.standard_normal((21, n_in)).astype(np.float32)
    full = gemm(x, w)
    for lo, hi in ((0, 9), (3, 17), (12, 21), (1, 10)):
        np.testing.assert_array_equal(gemm(x[lo:hi], w), full[lo:hi], err_msg=f"{lo}:{hi}")
    order = rng.permutation(21)
    np.testing.assert_array_equal(gemm(x[order], w), full[order])


def test_a_nan_stays_in_its_row():
    rng = np.random.default_rng(8)
    data = random_blocks("Q4_K", 20, 512, rng)
    w = BlockWeight(data, "Q4_K", 512)
    x = rng.standard_normal((10, 512)).astype(np.float32)
    clean = gemm(x, w)
    x[4, 300] = np.nan
    x[6, 3] = np.inf
    got = gemm(x, w)
    assert np.isnan(got[[4, 6]]).all()
    keep = [i for i in range(10) if i not in (4, 6)]
    np.testing.assert_array_equal(got[keep], clean[keep])


def test_gemm_refuses_bad_x():
    data = random_blocks("Q4_0", 4, 64, np.random.default_rng(9))
    w = BlockWeight(data, "Q4_0", 64)
    for x in (np.ones((9, 32)), np.ones(64), np.ones((9, 96))):
        with pytest.raises(ValueError, match=r"gemm: x must be \(N, 64\)"):
            gemm(x, w)


PORTABLE_RUN = """
import sys
import numpy as np
from stream_run.kernels import gguf_gemm
from stream_run.kernels.quant import GGUF_BLOCK_TYPES, BlockWeight
print(gguf_gemm.R)
rng = np.random.default_rng(6)
for qt in gguf_gemm.GEMM_TYPES:
    elems, nbytes = GGUF_BLOCK_TYPES[qt]
    d = rng.integers(0, 256, (21, 2, nbytes), dtype=np.uint8)
    for off in {fields}[qt]:
        d[..., off:off + 2] = np.array([0.01, -3e-6], '<f2')[qt[1] == '8':][:1].view('u1')
    x = rng.standard_normal((11, 2 * elems)).astype(np.float32)
    np.save(sys.argv[1] + qt + '.npy', gguf_gemm.gemm(x, BlockWeight(d.reshape(21, -1), qt,
                                                                      2 * elems)))
"""

# an AVX2-only x86 (8-row tiles, no VNNI: exact int16 products), plain IR on a Haswell
TARGETS = {"avx2": ("znver2", "+sse2,+ssse3,+sse4.1,+sse4.2,+avx,+avx2,+fma,+f16c,+bmi2"),
           "plain": ("haswell", "")}


@pytest.mark.slow
@pytest.mark.parametrize("target", list(TARGETS))
def test_portable_target(tmp_path, target):
    """The kernels compiled for another target (another tile width, no integer dot
    instruction) agree with the host's."""
    code = PORTABLE_RUN.format(fields=HALF_FIELDS)
    host = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CPU")}
    cpu, features = TARGETS[target]
    runs = {target: {**host, "NUMBA_CPU_NAME": cpu, "NUMBA_CPU_FEATURES": features,
                     "NUMBA_CACHE_DIR": str(tmp_path)}, "host": host}
    for name, env in runs.items():
        done = subprocess.run([sys.executable, "-c", code, str(tmp_path / name)], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        if name != "host":
            assert done.stdout.strip() == "8"
    for qt in GEMM_TYPES:
        np.testing.assert_allclose(np.load(tmp_path / f"{target}{qt}.npy"),
                                   np.load(tmp_path / f"host{qt}.npy"), rtol=1e-5, atol=1e-6)
