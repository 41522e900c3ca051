"""kernels/gguf_blocks.py against gguf-py: dequantize bit for bit, matvec within float32's
summation bound of a float64 reference, on odd shapes, unaligned bytes and bad sizes."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

gguf_quants = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType  # noqa: E402

from stream_run.kernels.gguf_blocks import (  # noqa: E402
    FAST_KERNELS,
    QUANTIZED_X,
    check_blocks,
    dequantize_rows,
    matvec,
    matvecs,
)
from stream_run.kernels.quant import GGUF_BLOCK_TYPES, BlockWeight  # noqa: E402

QTYPES = tuple(GGUF_BLOCK_TYPES)
U = 2.0**-24  # float32 unit roundoff
# byte offsets of each block's f16 fields (scales and mins)
HALF_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
               "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
# the bytes holding the codes (not scales): zeroed, the dequantized block is its -min terms
CODE_BYTES = {"Q4_1": (4, 20), "Q5_1": (4, 24), "Q2_K": (16, 80), "Q4_K": (16, 144),
              "Q5_K": (16, 176)}


def random_blocks(qtype: str, out: int, n_in: int, rng: np.random.Generator) -> np.ndarray:
    """Random codes with finite f16 scales of magnitudes 1e-7..1 (subnormal halves included):
    uint8 (out, row_bytes)."""
    elems, nbytes = GGUF_BLOCK_TYPES[qtype]
    raw = rng.integers(0, 256, (out, n_in // elems, nbytes), dtype=np.uint8)
    for off in HALF_FIELDS[qtype]:
        scale = rng.standard_normal(raw.shape[:2]) * 10.0 ** rng.uniform(-7, 0, raw.shape[:2])
        raw[..., off:off + 2] = scale.astype("<f2")[..., None].view(np.uint8)
    return raw.reshape(out, -1)


def quantized_blocks(qtype: str, out: int, n_in: int, rng: np.random.Generator) -> np.ndarray:
    """gguf-py's own quantization of normal weights where it has one, else random_blocks."""
    try:
        w = rng.standard_normal((out, n_in)).astype(np.float32)
        return gguf_quants.quantize(w, GGMLQuantizationType[qtype])
    except NotImplementedError:
        return random_blocks(qtype, out, n_in, rng)


def reference(data: np.ndarray, qtype: str) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        return gguf_quants.dequantize(data, GGMLQuantizationType[qtype]).astype(np.float32)


def assert_bits_equal(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape and got.dtype == np.float32
    diff = got.view(np.uint32) != want.view(np.uint32)
    assert not diff.any(), (f"{diff.sum()} of {diff.size} differ, first at "
                            f"{np.argwhere(diff)[0]}: {got[diff][0]!r} != {want[diff][0]!r}")


def unaligned(data: np.ndarray) -> np.ndarray:
    """The same bytes in a buffer starting at an odd address."""
    buf = np.zeros(data.size + 3, dtype=np.uint8)
    view = buf[1:1 + data.size]
    view[:] = data.reshape(-1)
    assert view.ctypes.data % 2 == 1
    return view.reshape(data.shape)


# --- check_blocks ---


def test_check_blocks_view():
    data = random_blocks("Q4_K", 3, 512, np.random.default_rng(0))
    flat = data.reshape(-1)
    got = check_blocks(flat, "Q4_K", (3, 512))
    assert got.shape == (3, 288) and np.shares_memory(got, flat)


@pytest.mark.parametrize("args, message", [
    ((np.zeros(18 * 4, np.uint8), "Q4_Z", (4, 32)), "unknown GGUF block type 'Q4_Z'"),
    ((np.zeros(18 * 4, np.uint8), "Q4_0", (4, 48)), "Q4_0 (4, 48): in must be a positive "
     "multiple of the 32-element block"),
    ((np.zeros(18 * 4 - 1, np.uint8), "Q4_0", (4, 32)), "Q4_0 (4, 32): got 71 bytes, expected "
     "72 (truncated)"),
    ((np.zeros(145, np.uint8), "Q4_K", (1, 256)), "Q4_K (1, 256): got 145 bytes, expected 144"),
    ((np.zeros(9, np.float64), "Q4_0", (4, 32)), "data must be uint8"),
])
def test_check_blocks_errors(args, message):
    with pytest.raises(ValueError) as err:
        check_blocks(*args)
    assert message in str(err.value) and "\n" not in str(err.value)
    if "got 145" in message:
        assert "truncated" not in str(err.value)


def test_truncated_weight_is_refused():
    data = random_blocks("Q6_K", 4, 256, np.random.default_rng(1))[:, :-5]  # rows cut short
    w = BlockWeight(data, "Q6_K", 256)
    for call in (lambda: dequantize_rows(w), lambda: matvec(np.ones((1, 256), np.float32), w)):
        with pytest.raises(ValueError, match=r"Q6_K \(4, 256\): got 820 bytes, expected 840 "
                                             r"\(truncated\)"):
            call()


# --- dequantize_rows: bit for bit ---


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("make", [random_blocks, quantized_blocks])
def test_dequantize_matches_gguf(qtype, make):
    rng = np.random.default_rng(QTYPES.index(qtype))
    elems = GGUF_BLOCK_TYPES[qtype][0]
    for out, n_in in ((1, elems), (13, 3 * elems), (5, 1024)):
        data = make(qtype, out, n_in, rng)
        assert_bits_equal(dequantize_rows(BlockWeight(data, qtype, n_in)), reference(data, qtype))


@pytest.mark.parametrize("qtype", QTYPES)
def test_dequantize_any_bytes_unaligned_rows(qtype):
    """Every byte pattern, NaN and inf scales included, from an odd address; a row subset."""
    elems, nbytes = GGUF_BLOCK_TYPES[qtype]
    rng = np.random.default_rng(100 + QTYPES.index(qtype))
    data = rng.integers(0, 256, (9, 2 * nbytes), dtype=np.uint8)
    w = BlockWeight(unaligned(data), qtype, 2 * elems)
    want = reference(data, qtype)
    assert_bits_equal(dequantize_rows(w), want)
    rows = np.array([8, 0, 3, 3, -1])
    assert_bits_equal(dequantize_rows(w, rows), want[rows])
    assert dequantize_rows(w, np.array([], np.int64)).shape == (0, 2 * elems)
    with pytest.raises(ValueError, match="row index out of range"):
        dequantize_rows(w, np.array([9]))


# --- matvec: within the float32 summation bound of x @ dequantize(w).T in float64 ---


def magnitudes(data: np.ndarray, qtype: str) -> np.ndarray:
    """|w| + |the block minimum terms| per weight: the scale of the values a kernel adds."""
    w = np.abs(reference(data, qtype).astype(np.float64))
    if qtype in CODE_BYTES:
        lo, hi = CODE_BYTES[qtype]
        zero = data.copy().reshape(data.shape[0], -1, GGUF_BLOCK_TYPES[qtype][1])
        zero[..., lo:hi] = 0
        w += np.abs(reference(zero.reshape(data.shape), qtype).astype(np.float64))
    return w


def quantize_x(x: np.ndarray, block: int) -> np.ndarray:
    """x as the integer kernels see it: dx * rint(x / dx) per block, dx = max|x| / 127
    (float32 operations in the kernel's order, so the same codes)."""
    xb = x.reshape(x.shape[0], -1, block)
    amax = np.abs(xb).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    dx = amax / np.float32(127)
    return (np.rint(xb * inv).astype(np.float64) * dx).reshape(x.shape), np.repeat(
        dx[..., 0], block, axis=-1)


def check_matvec(x: np.ndarray, w: BlockWeight, data: np.ndarray, generic: bool) -> None:
    """Float rounding: 16 lane-wise float32 chains of in / 16 terms (float fast path), or
    in-block sums of `elems` terms plus one per block (generic), or 8 lanes of up to 2 terms
    per block (integer path: its integer dots are exact), each term within an ulp of x w;
    every ulp relative to |x| (|w| + |min terms|). The integer path quantizes x, to x_q with
    |x - x_q| <= dx / 2 per element: its result must be within the rounding bound of x_q @ w
    and within that plus |w| @ dx / 2 of x @ w."""
    got = matvec(x, w, generic=generic)
    weights = reference(data, w.qtype).astype(np.float64)
    scale = magnitudes(data, w.qtype)
    elems = GGUF_BLOCK_TYPES[w.qtype][0]
    x64 = x.astype(np.float64)
    if generic or w.qtype not in FAST_KERNELS:
        terms = elems + w.n_in // elems
    elif w.qtype in QUANTIZED_X:
        terms = 2 * (w.n_in // QUANTIZED_X[w.qtype]) + 16  # 2 multiply-adds a block a lane
        xq, dx = quantize_x(x, QUANTIZED_X[w.qtype])
        rounding = (terms + 8) * U * (np.abs(xq) @ scale.T)
        assert_within(got, xq @ weights.T, rounding, w, "quantized x")
        quantization = (np.float64(0.5) + 1e-4) * (dx @ np.abs(weights).T)
        assert_within(got, x64 @ weights.T, rounding + quantization, w, "x")
        return
    else:
        terms = w.n_in // 16
    assert_within(got, x64 @ weights.T, (terms + 8) * U * (np.abs(x64) @ scale.T), w, "x")


def assert_within(got: np.ndarray, want: np.ndarray, bound: np.ndarray, w: BlockWeight,
                  name: str) -> None:
    assert got.shape == want.shape and got.dtype == np.float32
    excess = np.abs(got - want) - bound
    assert (excess <= 0).all(), f"max error over the bound {excess.max():.3g} at " \
        f"{np.unravel_index(excess.argmax(), excess.shape)} ({w.qtype}, N={got.shape[0]}, " \
        f"against {name})"


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("generic", [False, True])
def test_matvec_shapes(qtype, generic):
    rng = np.random.default_rng(200 + QTYPES.index(qtype))
    elems = GGUF_BLOCK_TYPES[qtype][0]
    for out, n_in in ((1, elems), (7, elems), (37, 2 * elems), (16, 4 * elems), (61, 2048)):
        data = random_blocks(qtype, out, n_in, rng)
        w = BlockWeight(data, qtype, n_in)
        for n in (1, 2, 3, 4, 5, 7, 8):
            check_matvec(rng.standard_normal((n, n_in)).astype(np.float32), w, data, generic)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q3_K"])
def test_matvec_unaligned_quantized(qtype):
    rng = np.random.default_rng(300 + QTYPES.index(qtype))
    data = quantized_blocks(qtype, 45, 768, rng)
    w = BlockWeight(unaligned(data), qtype, 768)
    for n in (1, 4, 6):
        x = rng.standard_normal((n, 768)).astype(np.float32)
        check_matvec(x, w, data, False)
        check_matvec(x, w, data, True)


@pytest.mark.parametrize("qtype", sorted(FAST_KERNELS))
def test_matvec_fast_is_batch_invariant(qtype):
    """Each row of x gets the same bits whatever rows it is computed with (N = 1..8, so every
    group size of x rows and both weight-row groupings run): a token's logits do not depend on
    its batch, and a speculative pass's rows equal one-row passes (issue 19)."""
    rng = np.random.default_rng(4)
    n_in = 512
    data = random_blocks(qtype, 37, n_in, rng)  # 37 rows: a tail after every row grouping
    w = BlockWeight(data, qtype, n_in)
    x = rng.standard_normal((8, n_in)).astype(np.float32)
    alone = np.concatenate([matvec(x[i:i + 1], w) for i in range(8)])
    for n in range(2, 9):
        np.testing.assert_array_equal(matvec(x[:n], w), alone[:n], err_msg=f"N={n}")
    np.testing.assert_array_equal(matvec(x[[5, 2, 7]], w), alone[[5, 2, 7]])


@pytest.mark.parametrize("types", [("Q4_0",) * 3, ("Q4_K", "Q4_K", "Q6_K"), ("Q6_K", "Q4_K"),
                                   ("Q4_1", "Q8_0", "Q5_0", "Q4_1", "Q5_1"), ("Q2_K", "Q3_K"),
                                   ("Q5_K",) * 4])
def test_matvecs_equal_matvec_bit_for_bit(types):
    """Several weights on one x (q|k|v, gate|up): per type one parallel region, x quantized
    once per block size and shared across types (Q4_K with Q6_K): the same bits as one matvec
    per weight, for every row count, weights of different heights (tiles crossing weights)."""
    rng = np.random.default_rng(6)
    n_in = 512
    ws = [BlockWeight(random_blocks(t, out, n_in, rng), t, n_in)
          for t, out in zip(types, (37, 16, 5, 64, 1), strict=False)]
    for n in (1, 3, 8):
        x = rng.standard_normal((n, n_in)).astype(np.float32)
        got = matvecs(x, ws)
        assert len(got) == len(ws)
        for g, w in zip(got, ws, strict=True):
            np.testing.assert_array_equal(g, matvec(x, w), err_msg=f"{w.qtype} N={n}")
    # the plan cached on the first weight is not reused for another list starting with it
    x = rng.standard_normal((2, n_in)).astype(np.float32)
    other = BlockWeight(random_blocks("Q8_0", 9, n_in, rng), "Q8_0", n_in)
    for later in ([ws[0], other], ws[:1], ws, [ws[0], other, *ws[1:]]):
        for g, w in zip(matvecs(x, later), later, strict=True):
            np.testing.assert_array_equal(g, matvec(x, w), err_msg=f"{w.qtype} later")


def test_matvecs_refuses_bad_x():
    w = BlockWeight(random_blocks("Q4_0", 4, 64, np.random.default_rng(5)), "Q4_0", 64)
    w2 = BlockWeight(random_blocks("Q4_0", 4, 32, np.random.default_rng(5)), "Q4_0", 32)
    with pytest.raises(ValueError, match=r"x must be \(N, 32\)"):
        matvecs(np.ones((1, 64), np.float32), [w, w2])


def test_matvec_refuses_bad_x():
    data = random_blocks("Q8_0", 4, 64, np.random.default_rng(5))
    w = BlockWeight(data, "Q8_0", 64)
    for x in (np.ones((0, 64)), np.ones((9, 64)), np.ones((1, 32)), np.ones(64)):
        with pytest.raises(ValueError, match=r"x must be \(N, 64\)"):
            matvec(x, w)
    got = matvec(np.ones((2, 128))[:, ::2], w)  # non-contiguous float64: converted
    np.testing.assert_allclose(got[0], reference(data, "Q8_0").sum(axis=1), rtol=1e-5)


PORTABLE_RUN = """
import sys
import numpy as np
from stream_run.kernels.gguf_blocks import FAST_KERNELS, matvec
from stream_run.kernels.gguf_simd import _fast_half
from stream_run.kernels.quant import GGUF_BLOCK_TYPES, BlockWeight
print(_fast_half())
rng = np.random.default_rng(6)
for qt in FAST_KERNELS:
    elems, nbytes = GGUF_BLOCK_TYPES[qt]
    d = rng.integers(0, 256, (11, 2, nbytes), dtype=np.uint8)
    for off in {fields}[qt]:
        d[..., off:off + 2] = np.array([0.01, -3e-6], '<f2')[qt[1] == '8':][:1].view('u1')
    x = rng.standard_normal((3, 2 * elems)).astype(np.float32)
    np.save(sys.argv[1] + qt + '.npy', matvec(x, BlockWeight(d.reshape(11, -1), qt, 2 * elems)))
"""


# numba targets: an AVX2-only x86 (AMD Zen 2) through the AVX2 intrinsics; plain IR (no target
# intrinsics, software f16 widening) on a Haswell. Each run compiles every fast kernel afresh.
TARGETS = {"avx2": ("znver2", "+sse2,+ssse3,+sse4.1,+sse4.2,+avx,+avx2,+fma,+f16c,+bmi2"),
           "plain": ("haswell", "")}


@pytest.mark.slow
@pytest.mark.parametrize("target", list(TARGETS))
def test_portable_target(tmp_path, target):
    """The fast kernels compiled for another target agree with the host's."""
    code = PORTABLE_RUN.format(fields=HALF_FIELDS)
    host = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CPU")}
    cpu, features = TARGETS[target]
    runs = {target: {**host, "NUMBA_CPU_NAME": cpu, "NUMBA_CPU_FEATURES": features,
                     "NUMBA_CACHE_DIR": str(tmp_path)}, "host": host}
    for name, env in runs.items():
        done = subprocess.run([sys.executable, "-c", code, str(tmp_path / name)], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        if name == "plain":
            assert done.stdout.strip() == "False"  # the software widening was compiled
    for qt in FAST_KERNELS:
        np.testing.assert_allclose(np.load(tmp_path / f"{target}{qt}.npy"),
                                   np.load(tmp_path / f"host{qt}.npy"), rtol=1e-6, atol=1e-7)
