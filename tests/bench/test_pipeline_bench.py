"""bench/pipeline.py runs end to end on a tiny model and prints its figures (no timing is
asserted: the figures are for people)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.tiny_models import write_tiny_model

mx = pytest.importorskip("mlx.core")
pytestmark = pytest.mark.skipif(not mx.distributed.is_available(),
                                reason="this MLX build has no distributed backend")


def _bench(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "stream_run.bench.pipeline", *args],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_bench_pipeline_prints_each_configuration(tmp_path):
    write_tiny_model(tmp_path, "llama", n_layers=4)
    out = _bench(str(tmp_path), "--budget", "100MB", "--tokens", "3", "--repeats", "1",
                 "--streams", "2")
    assert "1 process, 100MB: one stream" in out
    assert "2 ranks, 100MB / 2 each" in out and "micro-batches auto (2)" in out
    assert out.count("tok/s aggregate; load") == 2


def test_bench_pipeline_link_round_trips(tmp_path):
    write_tiny_model(tmp_path, "llama", n_layers=4)
    out = _bench(str(tmp_path), "--budget", "1MB", "--link", "5")
    assert "2 ranks, link (one frame, select, watchdog):" in out
    assert "2 ranks, bare mx.distributed send/recv:" in out
