"""Make numba's TBB threading layer loadable from the pip `tbb` package.

The decode kernels open several short parallel regions per layer. With numba's OpenMP layer the
workers must sleep between regions (OMP_WAIT_POLICY=passive, see kernels/numba_kernels.py), and
waking them cost about a third of SmolLM2's decode time on 2 cores; TBB's workers spin briefly,
then sleep, and decoded ~40 % faster here with prefill about unchanged (README, issue 7).

pip puts libtbb.so.12 in <prefix>/lib, which the dynamic linker does not search, and numba's
tbbpool extension has no RPATH: numba then silently falls back to OpenMP. Loading the library
by path first (RTLD_GLOBAL) satisfies the extension's dependency by its soname. numba picks the
layer at the first parallel launch, so this must run before any kernel does; importing
kernels.numba_kernels does it. NUMBA_THREADING_LAYER, when set, still decides.
"""

from __future__ import annotations

import ctypes
import site
import sys
from pathlib import Path

SONAME = "libtbb.so.12"


def candidates() -> list[Path]:
    prefixes = dict.fromkeys([sys.prefix, sys.base_prefix, site.getuserbase()])
    dirs = [Path(p) / "lib" for p in prefixes]
    return [d / SONAME for d in dirs]


def preload() -> Path | None:
    """Load the pip tbb library if there is one; returns its path, or None."""
    if not sys.platform.startswith("linux"):
        return None
    for path in candidates():
        if path.exists():
            try:
                ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            return path
    return None


LOADED = preload()
