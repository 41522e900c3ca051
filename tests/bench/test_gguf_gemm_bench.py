"""bench/gguf_gemm.py: one small setting runs both paths and prints a row whose two paths agree."""

from __future__ import annotations

import numpy as np

from stream_run.bench import gguf_gemm as bench
from stream_run.kernels import gguf_gemm
from stream_run.kernels.quant import BlockWeight


def test_prints_one_row_per_setting(capsys):
    assert bench.main(["--types", "Q4_0,Q6_K", "--shapes", "256x48", "--rows", "16",
                       "-r", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "256x48" in line]
    assert [r.split()[0] for r in rows] == ["Q4_0", "Q6_K"]
    assert all(r.rstrip().endswith("x") for r in rows)


def test_the_two_paths_compute_the_same_product():
    rng = np.random.default_rng(1)
    w = BlockWeight(bench.blocks("Q4_K", 40, 512, rng), "Q4_K", 512)
    x = rng.standard_normal((12, 512)).astype(np.float32)
    want = bench.dequant_blas(x, w)
    np.testing.assert_allclose(gguf_gemm.gemm(x, w), want, rtol=1e-3,
                               atol=1e-3 * np.abs(want).max())
