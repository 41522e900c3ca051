"""numba's set-up: the cache directory follows every kernel source (kernels/jit_cache.py), and
the kernels run on TBB where the pip package is installed (kernels/tbb_layer.py)."""

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numba
import pytest

from stream_run.kernels import jit_cache


def test_cache_key_changes_with_any_kernel_source(tmp_path, monkeypatch):
    here = Path(jit_cache.__file__).parent
    for name in jit_cache.SOURCES:
        shutil.copy(here / name, tmp_path / name)
    monkeypatch.setattr(jit_cache, "__file__", str(tmp_path / "jit_cache.py"))
    before = jit_cache.source_hash()
    assert before == jit_cache.source_hash()
    # a change in the callee's file alone (fused.py's kernels call into numba_kernels.py)
    with open(tmp_path / "numba_kernels.py", "a") as f:
        f.write("\n# changed\n")
    assert jit_cache.source_hash() != before


def test_kernels_compile_into_the_keyed_directory(tmp_path, monkeypatch):
    import stream_run.kernels.numba_kernels  # noqa: F401  (configures the cache on import)

    assert Path(numba.config.CACHE_DIR).name.endswith(jit_cache.source_hash())
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    assert jit_cache.cache_dir() == tmp_path / f"stream-run-{jit_cache.source_hash()}"


def test_unwritable_cache_leaves_numba_default(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    monkeypatch.setattr(numba.config, "CACHE_DIR", "unchanged")
    jit_cache.configure()
    assert numba.config.CACHE_DIR == "unchanged"


def test_numba_runs_on_tbb_where_the_pip_package_is_installed():
    """kernels/tbb_layer.py makes pip's libtbb loadable (no LD_LIBRARY_PATH), so the kernels
    run on the TBB layer; checked in a fresh process, as numba picks its layer once."""
    try:
        importlib.metadata.distribution("tbb")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the tbb package is not installed")
    code = ("import numpy as np, numba\n"
            "from stream_run.kernels.numpy_backend import NumpyBackend\n"
            "from stream_run.kernels.quant import quantize\n"
            "w = quantize(np.ones((64, 128), np.float32), 4, 32)\n"
            "NumpyBackend().linear(np.ones((1, 128), np.float32), w)\n"
            "print(numba.threading_layer())\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_LIBRARY_PATH", "NUMBA_THREADING_LAYER")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True, cwd=Path(__file__).parents[2])
    assert out.stdout.strip().splitlines()[-1] == "tbb"


def test_is_cold_until_a_kernel_index_is_in_the_cache(tmp_path, monkeypatch):
    """stream-run says it is compiling (instead of ~30 s of silence) when this is true."""
    import numba

    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path))
    assert jit_cache.is_cold()
    (tmp_path / "kernels_x").mkdir()
    (tmp_path / "kernels_x" / "numba_kernels.qdot-1.py311.nbi").write_bytes(b"")
    assert not jit_cache.is_cold()
