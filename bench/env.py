"""Run metadata recorded with every benchmark figure (STYLE.md H.43)."""

from __future__ import annotations

import os
import platform
import subprocess
import time

import numpy as np


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=os.path.dirname(__file__), timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_metadata() -> dict:
    try:
        import mlx.core as mx
        mlx_version = mx.__version__
    except ImportError:
        mlx_version = None
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(), "machine": platform.machine(), "os": platform.platform(),
        "python": platform.python_version(), "numpy": np.__version__, "mlx": mlx_version,
        "cpus": os.cpu_count(), "git": git_sha(),
    }


def memory_bandwidth_gbs(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Best-of-N read bandwidth of RAM: sum over a large float32 array (read-only pass)."""
    a = np.ones(nbytes // 4, dtype=np.float32)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9
