"""16-bit dense weights (HalfWeight): exact widening, prepare() kept at 2 bytes per element and
its byte count vs kernels.sizes, and linear/embed on both backends vs float32 reference math."""

from dataclasses import dataclass

import numpy as np
import pytest

from stream_run import kernels
from stream_run.kernels import numpy_backend
from stream_run.kernels.formats import prepare_unit
from stream_run.kernels.numba_kernels import half_matvec, half_rows
from stream_run.kernels.quant import HalfWeight, half_to_float32, quantize
from stream_run.kernels.sizes import prepared_nbytes, unit_nbytes

BACKENDS = [
    "numpy",
    pytest.param(
        "mlx",
        marks=pytest.mark.skipif(
            "mlx" not in kernels.available_backends(), reason="mlx is not installed"
        ),
    ),
]
HALF = ["F16", "BF16"]


@dataclass
class Raw:
    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


def half_bits(a: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values -> little-endian 16-bit patterns (bf16 truncates, as a test input)."""
    if dtype == "F16":
        return a.astype("<f2").view("<u2")
    return (a.astype(np.float32).view(np.uint32) >> 16).astype("<u2")


def raw(a: np.ndarray, dtype: str) -> Raw:
    if dtype == "F32":
        data = a.astype("<f4")
    elif dtype == "U32":
        data = a.astype("<u4")
    else:
        data = half_bits(a, dtype)
    return Raw(dtype, a.shape, np.ascontiguousarray(data).reshape(-1).view(np.uint8))


def reference(a: np.ndarray, dtype: str) -> np.ndarray:
    """What a stored 16-bit tensor means in float32."""
    return half_to_float32(HalfWeight(half_data(half_bits(a, dtype), dtype), dtype))


def half_data(bits: np.ndarray, dtype: str) -> np.ndarray:
    """16-bit patterns -> HalfWeight.data (float16 for F16, uint16 bf16 bits for BF16)."""
    return bits.view(np.float16) if dtype == "F16" else bits.view(np.uint16)


def assert_close_matmul(got, x, w, rtol=1e-5):
    """|got - x @ w.T| within rtol of the sum of |terms| (float32 accumulation order only)."""
    x2 = x.reshape(-1, x.shape[-1]).astype(np.float64)
    ref = x2 @ w.T.astype(np.float64)
    mag = np.abs(x2) @ np.abs(w.T.astype(np.float64))
    err = np.abs(got.reshape(ref.shape) - ref)
    assert np.all(err <= rtol * mag + 1e-30), float((err / mag).max())


@pytest.fixture(params=BACKENDS)
def ops(request):
    return kernels.get_backend(request.param)


def to_np(ops, x):
    return np.asarray(ops.to_numpy(x))


@pytest.mark.parametrize("dtype", HALF)
def test_widening_is_exact_for_every_bit_pattern(dtype):
    bits = np.arange(1 << 16, dtype=np.uint16).reshape(256, 256)
    data = half_data(bits, dtype)
    want = half_to_float32(HalfWeight(data, dtype))
    got = half_rows(data, dtype)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))  # nan payloads too
    rows = np.array([255, 0, 7, 7])
    got = half_rows(data, dtype, rows)
    np.testing.assert_array_equal(got.view(np.uint32), want[rows].view(np.uint32))


@pytest.mark.parametrize("dtype", HALF)
def test_matvec_special_values(dtype):
    w = np.array([[1.0, -2.0, 0.0, 3.0], [np.inf, 1.0, 0.0, 0.0], [6e-8, 0.0, 0.0, 0.0]])
    data = half_data(half_bits(w, dtype), dtype)
    x = np.array([[1.0, 1.0, 5.0, 1.0], [0.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    y = half_matvec(x, data, dtype)
    w32 = half_to_float32(HalfWeight(data, dtype))
    assert y[0, 0] == 2.0 and y[0, 1] == np.inf and y[0, 2] == w32[2, 0] > 0
    assert np.isnan(y[1, 1])  # inf * 0 propagates


def test_prepare_keeps_matrices_16_bit():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 32)).astype(np.float32)
    norm = rng.standard_normal(32).astype(np.float32)
    tensors = {
        "a.weight": raw(w, "BF16"),
        "b.weight": raw(w, "F16"),
        "n.weight": raw(norm, "BF16"),
        "c.weight": raw(w, "F32"),
    }
    out = prepare_unit(tensors, None)
    a, b = out["a.weight"], out["b.weight"]
    assert isinstance(a, HalfWeight) and isinstance(b, HalfWeight)
    assert (a.dtype, a.data.dtype, a.shape) == ("BF16", np.uint16, (8, 32))
    assert (b.dtype, b.data.dtype, b.nbytes) == ("F16", np.float16, 512)
    assert np.shares_memory(a.data, tensors["a.weight"].data)  # zero-copy
    np.testing.assert_array_equal(half_to_float32(a), reference(w, "BF16"))
    np.testing.assert_array_equal(half_to_float32(b), reference(w, "F16"))
    assert out["n.weight"].dtype == np.float32 and out["n.weight"].shape == (32,)
    assert out["c.weight"].dtype == np.float32


def test_prepare_copies_misaligned_bytes():
    w = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    r = raw(w, "F16")
    buf = np.empty(r.data.size + 1, dtype=np.uint8)
    buf[1:] = r.data
    misaligned = Raw("F16", r.shape, buf[1:])
    hw = prepare_unit({"w": misaligned}, None)["w"]
    assert hw.data.ctypes.data % 2 == 0 and not np.shares_memory(hw.data, buf)
    np.testing.assert_array_equal(half_to_float32(hw), reference(w, "F16"))


def test_prepared_nbytes_rules():
    assert prepared_nbytes("BF16", (3, 5)) == 30
    assert prepared_nbytes("F16", (3, 5)) == 30
    assert prepared_nbytes("BF16", (5,)) == 20
    assert prepared_nbytes("F16", (3, 5), widened=True) == 60
    assert prepared_nbytes("F32", (3, 5)) == 60


def test_prepare_matches_unit_nbytes(ops):
    rng = np.random.default_rng(2)
    qw = quantize(rng.standard_normal((16, 128)).astype(np.float32), 4, 64)
    w = rng.standard_normal((24, 64)).astype(np.float32)
    norm = rng.standard_normal(64).astype(np.float32)
    tensors = {
        "q.weight": raw(qw.packed, "U32"),
        "q.scales": raw(qw.scales, "F16"),  # 2-D F16, widened with its packed weight
        "q.biases": raw(qw.biases, "BF16"),
        "a.weight": raw(w, "BF16"),
        "b.weight": raw(w, "F16"),
        "n.weight": raw(norm, "F16"),
        "c.weight": raw(w, "F32"),
    }
    prepared = ops.prepare(tensors, {"bits": 4, "group_size": 64})
    assert ops.nbytes(prepared) == unit_nbytes(tensors, ops.half_scales)
    assert int(prepared["a.weight"].nbytes) == 2 * w.size
    np.testing.assert_array_equal(to_np(ops, prepared["n.weight"]), reference(norm, "F16"))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("n_rows", [1, 3, 8, 9, 64])
def test_linear_half(ops, dtype, n_rows):
    rng = np.random.default_rng(n_rows)
    w = rng.standard_normal((72, 256)).astype(np.float32)
    hw = ops.prepare({"p.weight": raw(w, dtype)}, None)["p.weight"]
    x = rng.standard_normal((1, n_rows, 256)).astype(np.float32)
    bias = rng.standard_normal(72).astype(np.float32)
    y = to_np(ops, ops.linear(ops.from_numpy(x), hw, ops.from_numpy(bias)))
    assert y.shape == (1, n_rows, 72) and y.dtype == np.float32
    assert_close_matmul(y - bias, x, reference(w, dtype))


@pytest.mark.parametrize("dtype", HALF)
def test_linear_half_blocked_prefill(monkeypatch, dtype):
    """Several widen+BLAS blocks (the block size forced small) give the same result."""
    monkeypatch.setattr(numpy_backend, "DEQUANT_BLOCK_ELEMENTS", 5 * 128)
    rng = np.random.default_rng(3)
    w = rng.standard_normal((23, 128)).astype(np.float32)
    ops = numpy_backend.NumpyBackend()
    hw = ops.prepare({"p.weight": raw(w, dtype)}, None)["p.weight"]
    x = rng.standard_normal((20, 128)).astype(np.float32)
    # Not bit-exact: BLAS picks its kernel (and summation order) by matrix shape, so a 5-row
    # block may round differently from the whole 23-row product (seen on some CPUs here).
    np.testing.assert_allclose(ops.linear(x, hw), x @ reference(w, dtype).T,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", HALF)
def test_embed_half(ops, dtype):
    table = np.random.default_rng(4).standard_normal((50, 64)).astype(np.float32)
    hw = ops.prepare({"e.weight": raw(table, dtype)}, None)["e.weight"]
    ids = np.array([[3, 49, 0], [3, 7, 7]])
    got = to_np(ops, ops.embed(hw, ids))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, reference(table, dtype)[ids])


@pytest.mark.parametrize("offset", [0, 2])
def test_prepare_views_packed_words_when_aligned(offset):
    """MLX packed words stay views of the read buffer (a streamed 4-bit unit is not copied);
    misaligned bytes are copied, and the weights are the same either way."""
    w = np.random.default_rng(2).standard_normal((8, 64)).astype(np.float32)
    qw = quantize(w, 4, 32)
    words = qw.packed.view(np.uint8).reshape(-1)
    buf = np.empty(words.size + 8, dtype=np.uint8)[offset:offset + words.size]
    buf[:] = words
    tensors = {"q.weight": Raw("U32", qw.packed.shape, buf),
               "q.scales": raw(qw.scales, "F32"), "q.biases": raw(qw.biases, "F32")}
    got = prepare_unit(tensors, {"bits": 4, "group_size": 32})["q.weight"]
    assert np.shares_memory(got.packed, buf) == (offset == 0)
    np.testing.assert_array_equal(got.packed, qw.packed)


def test_held_bytes_count_the_read_buffer_a_view_keeps_alive():
    """numpy keeps packed words as views, so the whole raw unit stays allocated beside the
    float32 scales and biases widened out of it; MLX copies, so only its compute form."""
    from stream_run.kernels.sizes import held_nbytes, transient_nbytes

    rng = np.random.default_rng(3)
    qw = quantize(rng.standard_normal((16, 128)).astype(np.float32), 4, 64)
    norm = rng.standard_normal(128).astype(np.float32)
    tensors = {"q.weight": raw(qw.packed, "U32"), "q.scales": raw(qw.scales, "F16"),
               "q.biases": raw(qw.biases, "F16"), "n.weight": raw(norm, "BF16")}
    raw_bytes = sum(int(t.data.nbytes) for t in tensors.values())
    widened = 4 * (qw.scales.size + qw.biases.size + norm.size)
    assert held_nbytes(tensors, views_raw=True) == raw_bytes + widened
    assert transient_nbytes(tensors, views_raw=True) == 0
    assert held_nbytes(tensors, views_raw=False) == unit_nbytes(tensors)
    assert transient_nbytes(tensors, views_raw=False) == raw_bytes
    # half_scales: the F16 scales and biases are views too; only the norm is widened
    assert held_nbytes(tensors, True, half_scales=True) == raw_bytes + 4 * norm.size
    assert unit_nbytes(tensors, half_scales=True) == (
        qw.packed.nbytes + 2 * (qw.scales.size + qw.biases.size) + 4 * norm.size)
    widened_only = {"n.weight": raw(norm, "BF16")}  # nothing viewed: freed after prepare
    assert held_nbytes(widened_only, views_raw=True) == unit_nbytes(widened_only)
    assert transient_nbytes(widened_only, views_raw=True) == norm.size * 2


def test_gguf_unit_forms_and_sizes():
    """With blocks (numpy) a GGUF unit keeps its blocks and its F32 norm as views of the one
    read buffer: held = the raw bytes, nothing transient. Converted (MLX), the norm is copied
    (a view would keep every block byte beside the converted weights) and the read buffer is
    transient."""
    from stream_run.kernels.quant import BlockWeight
    from stream_run.kernels.sizes import held_nbytes, transient_nbytes
    from tests.kernels.test_formats import random_blocks

    rng = np.random.default_rng(4)
    blocks = random_blocks(rng, "Q4_1", 16, 64).reshape(-1)
    buf = np.empty(blocks.size + 256, dtype=np.uint8)  # one read buffer holds both tensors
    buf[:blocks.size] = blocks
    norm = buf[blocks.size:].view(np.float32)
    norm[:] = rng.standard_normal(64)
    tensors = {"q.weight": Raw("Q4_1", (16, 64), buf[:blocks.size]),
               "n.weight": Raw("F32", (64,), buf[blocks.size:])}
    viewed = prepare_unit(tensors, None, blocks=True)
    assert isinstance(viewed["q.weight"], BlockWeight)
    assert np.shares_memory(viewed["q.weight"].data, buf)
    assert np.shares_memory(viewed["n.weight"], buf)
    assert held_nbytes(tensors, views_raw=True) == buf.size
    assert transient_nbytes(tensors, views_raw=True) == 0
    got = prepare_unit(tensors, None)
    assert not np.shares_memory(got["n.weight"], buf)
    np.testing.assert_array_equal(got["n.weight"], norm)
    assert held_nbytes(tensors, views_raw=False) == unit_nbytes(tensors)
    assert transient_nbytes(tensors, views_raw=False) == buf.size
