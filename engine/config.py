"""EngineConfig composes the per-package configs; sizes parsing for the CLI and API."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import psutil

from stream_run.cache import CacheConfig
from stream_run.loaders import LoaderConfig
from stream_run.scheduler import SchedulerConfig

BACKENDS = ("auto", "numpy", "mlx")
_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9,
          "T": 1e12, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'4GB', '512MiB', '1.5G', '123' -> bytes.

    Raises:
        ValueError: not a size.
    """
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 4GB, 512MB, 1.5GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def format_size(nbytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{int(nbytes)} B"


def usable_cpus() -> int:
    """Logical CPUs this process may run on (numba starts at most this many threads)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_threads() -> int:
    """Physical cores, at most the usable CPUs: a second hyperthread per core adds little to
    bandwidth-bound kernels and takes cycles from the threads that do the work."""
    return max(1, min(psutil.cpu_count(logical=False) or usable_cpus(), usable_cpus()))


@dataclass(frozen=True)
class EngineConfig:
    backend: str = "auto"
    memory_budget_bytes: int | None = None  # compute tier budget; None = unlimited
    # raw unit bytes kept in RAM below the compute tier; on a CPU backend the compute tier is
    # RAM already, so 0 avoids holding weights twice
    host_budget_bytes: int = 0
    max_context: int | None = None  # default: the model's max_position_embeddings
    prefill_chunk: int = 512  # prompt tokens per pass, over all requests joining a batch
    max_batch: int = 16  # requests decoded together; more wait for a slot
    max_queue: int | None = None  # requests waiting for a slot; None = unbounded
    threads: int | None = None  # CPU threads for numba kernels and BLAS; None = physical cores
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.memory_budget_bytes is not None and self.memory_budget_bytes <= 0:
            raise ValueError(f"memory_budget_bytes must be > 0, got {self.memory_budget_bytes}")
        if self.host_budget_bytes < 0:
            raise ValueError(f"host_budget_bytes must be >= 0, got {self.host_budget_bytes}")
        if self.max_context is not None and self.max_context <= 0:
            raise ValueError(f"max_context must be > 0, got {self.max_context}")
        if self.prefill_chunk <= 0:
            raise ValueError(f"prefill_chunk must be > 0, got {self.prefill_chunk}")
        if self.max_batch <= 0:
            raise ValueError(f"max_batch must be > 0, got {self.max_batch}")
        if self.threads is not None and not 1 <= self.threads <= usable_cpus():
            raise ValueError(f"threads must be between 1 and {usable_cpus()} (the CPUs this "
                             f"process may use), got {self.threads}")
        if self.max_queue is not None and self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")

    @property
    def cache(self) -> CacheConfig:
        return CacheConfig(compute_bytes=self.memory_budget_bytes,
                           host_bytes=self.host_budget_bytes)
