"""Streaming study: the engine's read rate and s/token next to the disk's raw sequential read
rate of the same files, measured in the same run, with the page cache cold."""

from __future__ import annotations

import asyncio
import glob
import os
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np

from engine import Engine, EngineConfig
from engine.stats import peak_rss_bytes
from loaders import LoaderConfig
from scheduler import SchedulerConfig

READ_BLOCK = 64 * 2**20


def drop_page_cache() -> bool:
    """Drop the page cache (root only). Returns whether it was dropped."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def raw_read_gbs(paths: list[str], direct: bool) -> tuple[float, int]:
    """Sequential read of whole files with large preads; returns (GB/s, bytes)."""
    flags = os.O_RDONLY | (os.O_DIRECT if direct and hasattr(os, "O_DIRECT") else 0)
    raw = np.empty(READ_BLOCK + 4096, np.uint8)
    buf = memoryview(raw[-raw.ctypes.data % 4096:][:READ_BLOCK])
    total = 0
    t0 = time.perf_counter()
    for path in paths:
        fd = os.open(path, flags)
        try:
            offset = 0
            while n := os.preadv(fd, [buf], offset):
                offset += n
                total += n
                if n < READ_BLOCK:
                    break
        finally:
            os.close(fd)
    return total / (time.perf_counter() - t0) / 1e9, total


@dataclass
class StreamResult:
    model: str
    budget_bytes: int | None
    cache: str  # how the page cache was kept out of the figures
    raw_gbs: float
    tokens: int
    s_per_token: list[float]
    bytes_per_token: list[int]
    io_stall_s: list[float]
    compute_s: list[float]
    read_s: list[float]
    prefetch_depth: int
    resident_bytes: int
    model_disk_bytes: int
    peak_rss_bytes: int

    @property
    def engine_gbs(self) -> float:
        return sum(self.bytes_per_token) / sum(self.s_per_token) / 1e9

    def summary(self) -> dict:
        med = statistics.median
        return {**asdict(self), "engine_gbs": self.engine_gbs,
                "engine_vs_raw": self.engine_gbs / self.raw_gbs if self.raw_gbs else None,
                "s_per_token_median": med(self.s_per_token),
                "bytes_per_token_median": med(self.bytes_per_token),
                "io_stall_median_s": med(self.io_stall_s),
                "compute_median_s": med(self.compute_s)}


async def _decode(engine: Engine, n: int) -> list:
    kv = engine.model.make_kv_cache(1, n + 2)
    logits, _ = await engine.forward(np.asarray([[1]]), kv, more=True)
    out = []
    for i in range(n):
        tok = int(np.argmax(logits[0, -1]))
        t0 = time.perf_counter()
        logits, rs = await engine.forward(np.asarray([[tok]]), kv, more=i + 1 < n)
        out.append((time.perf_counter() - t0, rs))
    return out


def run_stream(model: str, budget: int | None, tokens: int, depth: int = 2,
               backend: str = "numpy", io_workers: int = 8) -> StreamResult:
    """Cold-cache raw read of the model files, then `tokens` decode steps of the engine."""
    files = sorted(glob.glob(os.path.join(model, "*.safetensors"))) or [model]
    # O_DIRECT for both the raw read and the engine keeps every token's reads cold even when
    # the files would fit in the page cache; as root the cache is dropped as well.
    dropped = drop_page_cache()
    raw_gbs, nbytes = raw_read_gbs(files, direct=True)
    config = EngineConfig(backend=backend, memory_budget_bytes=budget,
                          scheduler=SchedulerConfig(prefetch_depth=depth, io_workers=io_workers),
                          loader=LoaderConfig(direct_io=True))
    engine = asyncio.run(Engine.open(model, config))
    try:
        drop_page_cache()
        steps = asyncio.run(_decode(engine, tokens))
        resident = sum(engine.units.prepared_nbytes(k) for k in engine.scheduler.resident)
        depth_now = engine.scheduler.depth
    finally:
        engine.close()
    return StreamResult(
        model=model, budget_bytes=budget,
        cache="cold: O_DIRECT" + (", page cache dropped" if dropped else ""), raw_gbs=raw_gbs,
        tokens=tokens, s_per_token=[s for s, _ in steps],
        bytes_per_token=[rs.bytes_read for _, rs in steps],
        io_stall_s=[rs.io_stall_s for _, rs in steps], compute_s=[rs.compute_s for _, rs in steps],
        read_s=[rs.read_s for _, rs in steps], prefetch_depth=depth_now,
        resident_bytes=resident, model_disk_bytes=nbytes, peak_rss_bytes=peak_rss_bytes())
