"""Run metadata recorded with every benchmark figure (STYLE.md H.43): hardware, OS, versions,
git SHA, the load on the machine, and what a model is (files, bytes, dtype, quantization)."""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import subprocess
import time
from collections import Counter

import numpy as np


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=os.path.dirname(__file__), timeout=5)
        sha = out.stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True,
                               cwd=os.path.dirname(__file__), timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on the machine moves every figure."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


@functools.cache
def _hardware() -> dict:
    import psutil

    cpu = None
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    thp = _read("/sys/kernel/mm/transparent_hugepage/enabled")
    try:
        import mlx.core as mx
        mlx_version = mx.__version__
    except ImportError:
        mlx_version = None
    return {
        "host": platform.node(), "machine": platform.machine(), "os": platform.platform(),
        "cpu": cpu or platform.processor() or None, "cpus": os.cpu_count(),
        "ram_bytes": psutil.virtual_memory().total,
        "transparent_hugepages": thp.split("[")[1].split("]")[0] if thp and "[" in thp else thp,
        "python": platform.python_version(), "numpy": np.__version__, "mlx": mlx_version,
        "git": git_sha(), "root": is_root(),
    }


def block_device(path: str) -> dict | None:
    """The block device holding path (Linux sysfs): name, model, rotational, and the
    readahead window (buffered and mmap figures depend on it)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    base = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    uevent = dict(line.split("=", 1) for line in (_read(base + "/uevent") or "").splitlines()
                  if "=" in line)
    if not uevent:
        return None
    real = os.path.realpath(base)
    disk = real if os.path.exists(real + "/queue") else os.path.dirname(real)
    rotational = _read(disk + "/queue/rotational")
    readahead = _read(disk + "/queue/read_ahead_kb")
    return {"name": uevent.get("DEVNAME"), "model": _read(disk + "/device/model"),
            "rotational": None if rotational is None else rotational == "1",
            "read_ahead_kb": None if readahead is None else int(readahead)}


def run_metadata(path: str | None = None) -> dict:
    """Hardware, OS, versions and git SHA (cached), plus the time and load average now and,
    with path, the block device it lives on."""
    meta = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **_hardware(),
            "loadavg": load_average()}
    if path is not None:
        meta["device"] = block_device(path)
    return meta


def model_info(path: str) -> dict:
    """What a model is, for the records: name, dtype(s) by bytes, quantization, disk bytes.

    quantization comes from config.json ("quantization", or HF "quantization_config"), else
    manifest.json (stream-convert output), else the GGUF block types of its tensors.
    """
    from stream_run.models import open_model

    index = open_model(path).index
    by_dtype: Counter[str] = Counter()
    files: set[str] = set()
    for unit in index.units.values():
        for t in unit.tensors.values():
            by_dtype[t.dtype] += t.nbytes
            files.add(t.path)
    quant = None
    if os.path.isdir(path):
        for name, keys in (("config.json", ("quantization", "quantization_config")),
                           ("manifest.json", ("quantization",))):
            try:
                with open(os.path.join(path, name)) as f:
                    data = json.load(f)
            except (OSError, ValueError):
                continue
            quant = next((data[k] for k in keys if data.get(k)), None)
            if quant:
                break
    gguf_types = [d for d in by_dtype if d.startswith(("Q", "IQ"))]
    if quant is None and gguf_types:
        quant = {"gguf": sorted(gguf_types)}
    spec = index.spec
    return {
        "path": os.path.abspath(path), "name": os.path.basename(os.path.normpath(path)),
        "model_type": spec.model_type, "layers": spec.num_hidden_layers,
        "hidden_size": spec.hidden_size, "dtype": by_dtype.most_common(1)[0][0],
        "dtype_bytes": dict(by_dtype), "quantization": quant, "files": sorted(files),
        "disk_bytes": sum(by_dtype.values()),
    }


def param_count(spec) -> int:
    """Parameters of a model (norms and biases included), from the tensors its architecture
    expects (models/ registry)."""
    from stream_run.models import REGISTRY

    shapes = REGISTRY.for_model_type(spec.model_type, "param_count").expected_shapes(spec)
    return sum(math.prod(shape) for unit in shapes.values() for shape in unit.values())


def memory_bandwidth_gbs(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Best-of-N read bandwidth of RAM with every core reading (a numba prange sum of 64-bit
    words, one chunk per core): a one-thread numpy sum reads well below what the machine
    delivers to a multi-threaded matvec, so it is no bound."""
    import numba

    words = np.ones(nbytes // 8, dtype=np.uint64)
    chunks = max(1, numba.config.NUMBA_NUM_THREADS)
    _parallel_sum(words, chunks)  # compile, and touch the pages
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        _parallel_sum(words, chunks)
        best = min(best, time.perf_counter() - t0)
    return words.nbytes / best / 1e9


def _parallel_sum(words: np.ndarray, chunks: int) -> int:
    global _SUM
    if _SUM is None:
        from numba import njit, prange

        @njit(parallel=True, cache=False, nogil=True)
        def kernel(w, n_chunks):
            # 8 independent sums a chunk, so the adds vectorize: one running sum made this a
            # measure of the add chain (6.6-10 GB/s here while both engines read 25-29)
            per = w.shape[0] // n_chunks // 8 * 8
            sums = np.zeros(n_chunks, dtype=np.uint64)
            for c in prange(n_chunks):
                rows = w[c * per:(c + 1) * per].reshape(-1, 8)
                acc = np.zeros(8, dtype=np.uint64)
                for i in range(rows.shape[0]):
                    for j in range(8):
                        acc[j] += rows[i, j]
                sums[c] = acc.sum()
            return sums.sum()

        _SUM = kernel
    return int(_SUM(words, chunks))


_SUM = None
