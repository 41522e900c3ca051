"""Where numba keeps the kernels it compiled (cache=True), keyed by the kernels' source.

numba checks a cached kernel against its own source file only. A kernel that calls one in
another file (kernels/fused.py calls qdot_tile in kernels/numba_kernels.py) kept running the old
callee after that file changed. So every kernel is cached under a directory named by a hash of
all kernel sources and numba's version: a change anywhere compiles afresh, once.

The directory is $NUMBA_CACHE_DIR/stream-run-<hash> when that variable is set, else
$XDG_CACHE_HOME (or ~/.cache)/stream-run/numba-<hash>. Where it cannot be written, numba's
default (__pycache__ beside the sources) stays. Imported before any @njit(cache=True).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numba

# every module whose cached kernels call code in another file (gguf_gemm.py inlines
# gguf_blocks.py's decoders and emits IR with gguf_simd.py's helpers)
SOURCES = ("numba_kernels.py", "fused.py", "simd.py", "gguf_gemm.py", "gguf_blocks.py",
           "gguf_simd.py")


def source_hash() -> str:
    h = hashlib.sha256(numba.__version__.encode())
    here = Path(__file__).parent
    for name in SOURCES:
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    key = source_hash()
    if os.environ.get("NUMBA_CACHE_DIR"):
        return Path(os.environ["NUMBA_CACHE_DIR"]) / f"stream-run-{key}"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "stream-run" / f"numba-{key}"


def is_cold() -> bool:
    """No kernel has been compiled into the cache yet for these sources (the first run on a
    machine, or after the kernels changed): the first pass will compile them."""
    try:
        path = Path(numba.config.CACHE_DIR or cache_dir())
        return not any(path.rglob("*.nbi"))
    except (OSError, RuntimeError):
        return False


def configure() -> None:
    """Point numba's cache at cache_dir() if it can be written there."""
    try:
        path = cache_dir()  # Path.home() raises RuntimeError where there is no home
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except (OSError, RuntimeError):
        return
    numba.config.CACHE_DIR = str(path)


configure()
