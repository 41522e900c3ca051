"""Both backends' per-head products on a weight whose row blocks are heads (MLA's kv_b_proj,
models/deepseek.py's decode): head_linear (x[h] through rows of head h) and head_linear_t (the
transposed product x[h] @ rows of head h), on each stored form, against numpy on the weight the
backend's own embed dequantizes."""

import numpy as np
import pytest

from stream_run import kernels
from stream_run.kernels.quant import quantize
from tests.kernels.test_backends import (
    BACKENDS,
    f16_exact,
    gguf_q8_0,
    raw,
    raw_bf16,
    raw_quantized,
    to_np,
)

H, NOPE, V, RANK = 4, 16, 12, 64  # rows per head: NOPE key rows, then V value rows
RHO = NOPE + V


def tensors(form: str, rng) -> tuple[dict, dict | None]:
    w = rng.standard_normal((H * RHO, RANK)).astype(np.float32)
    if form.startswith("q"):
        bits = int(form[1:])
        return raw_quantized("w", f16_exact(quantize(w, bits, 32))), {"bits": bits,
                                                                       "group_size": 32}
    if form == "bf16":
        return {"w.weight": raw_bf16(w)}, None
    if form == "Q8_0":
        return {"w.weight": gguf_q8_0(rng, H * RHO, RANK)}, None
    if form in ("Q4_0", "Q4_K"):
        pytest.importorskip("gguf.quants")
        from tests.test_gguf_blocks import quantized_blocks

        n_in = 256 if form == "Q4_K" else RANK
        data = quantized_blocks(form, H * RHO, n_in, rng)
        from tests.kernels.test_backends import Raw

        return {"w.weight": Raw(form, (H * RHO, n_in), data.reshape(-1))}, None
    return {"w.weight": raw(w, {"f32": "F32", "f16": "F16"}[form])}, None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["q4", "q8", "q3", "bf16", "f16", "f32", "Q8_0", "Q4_0",
                                  "Q4_K"])
@pytest.mark.parametrize("L", [1, 3])
def test_head_products_match_the_dequantized_weight(backend, form, L):
    ops = kernels.get_backend(backend)
    rng = np.random.default_rng(L)
    t, quant = tensors(form, rng)
    w = ops.prepare(t, quant)["w.weight"]
    n_in = w.shape[1]
    dense = to_np(ops, ops.embed(w, np.arange(w.shape[0])[None]))[0].reshape(H, RHO, n_in)
    xk = rng.standard_normal((H, L, NOPE)).astype(np.float32)
    xv = rng.standard_normal((H, L, n_in)).astype(np.float32)

    got_t = ops.head_linear_t(ops.from_numpy(xk), w, 0)
    got_v = ops.head_linear(ops.from_numpy(xv), w, NOPE, V)
    want_t = xk @ dense[:, :NOPE]  # (H, L, n_in)
    # head_linear reads rows as linear does (GGUF's integer dot products round x to int8):
    # each head's rows of the whole weight's linear
    whole = np.stack([to_np(ops, ops.linear(ops.from_numpy(xv[h]), w)) for h in range(H)])
    want_v = np.stack([whole[h, :, h * RHO + NOPE:(h + 1) * RHO] for h in range(H)])
    for got, want in [(got_t, want_t), (got_v, want_v)]:
        assert got is not None
        got = to_np(ops, got)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # another start: the value rows' transposed product
    got = to_np(ops, ops.head_linear_t(ops.from_numpy(xv[..., :V].copy()), w, NOPE))
    want = xv[..., :V] @ dense[:, NOPE:]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
