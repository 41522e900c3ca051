"""Streaming study: the engine's s/token, read rate and stalls over a sweep of memory budgets
and prefetch depths, next to the disk's own O_DIRECT sequential rate of the same files,
measured first in the same run.

Each point opens the engine (O_DIRECT reads, fixed prefetch depth unless adaptive), evicts the
model's files from the page cache, runs one forward pass that loads the resident units (and
compiles kernels), then times `tokens` decode steps. By default each point runs in a fresh
process (`python -m stream_run.bench.stream_point`), so its peak RSS (VmHWM) is its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from stream_run.bench import disk
from stream_run.engine import Engine, EngineConfig, format_size, parse_size
from stream_run.engine.stats import peak_rss_bytes
from stream_run.loaders import LoaderConfig
from stream_run.scheduler import SchedulerConfig

DISK_BLOCKS = (disk.MiB, 16 * disk.MiB, 64 * disk.MiB)
DISK_THREADS = (1, 4)


@dataclass(frozen=True)
class PointConfig:
    model: str
    budget_bytes: int | None
    prefetch_depth: int
    tokens: int
    backend: str = "numpy"
    io_workers: int = 8
    adaptive: bool = False

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise ValueError(f"--tokens must be >= 1, got {self.tokens}")


@dataclass
class StreamPoint:
    """One sweep point: per-token lists (decode steps after the first pass) and totals."""

    config: PointConfig
    s_per_token: list[float]
    bytes_per_token: list[int]
    io_stall_s: list[float]
    compute_s: list[float]
    read_s: list[float]
    hits: int
    misses: int
    host_hits: int
    host_misses: int
    evictions: int
    prefetch_depth_reached: int
    resident_bytes: int  # compute-tier bytes of the units kept resident
    streamed_disk_bytes: int  # disk bytes of the units streamed every pass (expected B/token)
    model_bytes: int  # compute-tier bytes of the whole model
    model_disk_bytes: int
    engine_direct: bool  # False: the filesystem refused O_DIRECT and reads were buffered
    cache: str
    peak_rss_bytes: int
    peak_rss_scope: str  # "point" (fresh process or VmHWM reset) or "process"
    loadavg: list[float] | None = None

    @property
    def tokens(self) -> int:
        return len(self.s_per_token)

    @property
    def seconds(self) -> float:
        return sum(self.s_per_token)

    @property
    def bytes_read(self) -> int:
        return sum(self.bytes_per_token)

    def summary(self) -> dict:
        """The point's figures (without the run-level disk and metadata fields)."""
        s, n = self.seconds, self.tokens
        looked = self.hits + self.misses
        host_looked = self.host_hits + self.host_misses
        d = asdict(self)
        cfg = d.pop("config")
        return {
            **cfg, **d, "tokens": n, "bytes_read": self.bytes_read,
            "s_per_token_mean": s / n, "s_per_token_median": statistics.median(self.s_per_token),
            "tok_s": n / s if s > 0 else 0.0, "bytes_per_token_mean": self.bytes_read / n,
            "engine_gbs": self.bytes_read / s / 1e9 if s > 0 else 0.0,
            "stall_fraction": sum(self.io_stall_s) / s if s > 0 else 0.0,
            "compute_s_per_token": sum(self.compute_s) / n,
            "hit_rate": self.hits / looked if looked else 0.0,
            "host_hit_rate": self.host_hits / host_looked if host_looked else None,
        }


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux clear_refs 5). Returns whether it
    was reset, i.e. whether peak_rss_bytes() now measures from here."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


async def _decode(engine: Engine, n: int) -> tuple[list, dict]:
    kv = engine.model.make_kv_cache(n + 2)
    # the first pass loads the resident units and compiles kernels; it is not timed
    logits, _ = await engine.forward(np.asarray([[1]]), kv, more=True)
    tiers = engine.cache.compute.stats, engine.cache.host.stats
    before = [(t.hits, t.misses, t.evictions) for t in tiers]
    out = []
    for i in range(n):
        tok = int(np.argmax(logits[0, -1]))
        t0 = time.perf_counter()
        logits, rs = await engine.forward(np.asarray([[tok]]), kv, more=i + 1 < n)
        out.append((time.perf_counter() - t0, rs))
    after = [(t.hits, t.misses, t.evictions) for t in tiers]
    (_, _, ev0), (hh0, hm0, _) = before
    (_, _, ev1), (hh1, hm1, _) = after
    return out, {"evictions": ev1 - ev0, "host_hits": hh1 - hh0, "host_misses": hm1 - hm0}


def run_point(cfg: PointConfig, fresh_process: bool = False) -> StreamPoint:
    """Measure one point in this process (see the module docstring).

    Raises:
        BudgetError, FormatError, ValueError, OSError: bad model or budget (one line each).
    """
    from stream_run.bench.env import load_average

    scope = "point" if reset_peak_rss() or fresh_process else "process"
    config = EngineConfig(
        backend=cfg.backend, memory_budget_bytes=cfg.budget_bytes,
        scheduler=SchedulerConfig(prefetch_depth=cfg.prefetch_depth, io_workers=cfg.io_workers,
                                  adaptive=cfg.adaptive),
        loader=LoaderConfig(direct_io=True))
    engine = asyncio.run(Engine.open(cfg.model, config))
    try:
        index = engine.source.index
        files = sorted({t.path for u in index.units.values() for t in u.tensors.values()})
        cache, _ = disk.evict(files)
        loadavg = load_average()
        steps, tiers = asyncio.run(_decode(engine, cfg.tokens))
        resident = engine.scheduler.resident
        streamed = sum(u.nbytes for k, u in index.units.items() if k not in resident)
        direct = engine.reader.direct
        cache = "cold: O_DIRECT" if direct else "warm: buffered reads (O_DIRECT refused); " + cache
        return StreamPoint(
            config=cfg, s_per_token=[s for s, _ in steps],
            bytes_per_token=[rs.bytes_read for _, rs in steps],
            io_stall_s=[rs.io_stall_s for _, rs in steps],
            compute_s=[rs.compute_s for _, rs in steps], read_s=[rs.read_s for _, rs in steps],
            hits=sum(rs.hits for _, rs in steps), misses=sum(rs.misses for _, rs in steps),
            host_hits=tiers["host_hits"], host_misses=tiers["host_misses"],
            evictions=tiers["evictions"], prefetch_depth_reached=engine.scheduler.depth,
            resident_bytes=sum(engine.units.prepared_nbytes(k) for k in resident),
            streamed_disk_bytes=streamed, model_bytes=engine.model_bytes,
            model_disk_bytes=index.nbytes, engine_direct=direct, cache=cache,
            peak_rss_bytes=peak_rss_bytes(), peak_rss_scope=scope, loadavg=loadavg)
    finally:
        engine.close()


def run_point_subprocess(cfg: PointConfig, timeout_s: float | None = None) -> StreamPoint:
    """Measure one point in a fresh Python process (its own peak RSS).

    Raises:
        RuntimeError: the child failed; the message is its last stderr line.
    """
    proc = subprocess.run([sys.executable, "-m", "stream_run.bench.stream_point",
                           json.dumps(asdict(cfg))],
                          capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
        raise RuntimeError(lines[-1] if lines else f"point exited with {proc.returncode}")
    d = json.loads(proc.stdout.strip().splitlines()[-1])
    d["config"] = PointConfig(**d["config"])
    return StreamPoint(**d)


# --- the sweep -------------------------------------------------------------------------------

@dataclass
class Budget:
    label: str  # as given: "0.25", "4GB", "none"
    nbytes: int | None  # None: unlimited

    def fraction(self, model_bytes: int) -> float:
        return 1.0 if self.nbytes is None else self.nbytes / model_bytes

    def describe(self, model_bytes: int) -> str:
        if self.nbytes is None:
            return "unlimited"
        size = format_size(self.nbytes)
        return size if _is_size(self.label) else f"{self.label} ({size})"


def _is_size(text: str) -> bool:
    return any(c.isalpha() for c in text)


def parse_budgets(text: str, model_bytes: int, min_bytes: int, clamp: bool = False
                  ) -> list[Budget]:
    """'0.25,0.5,1.0' (fractions of the model's compute-tier bytes), '2GB,4GB' (sizes), 'min'
    (the smallest budget the model runs with), 'none' (unlimited); mixed lists are fine.
    clamp: a budget below the minimum becomes 'min' (the default sweep, which must run on any
    model) instead of an error (a budget the user asked for).

    Raises:
        ValueError: not a budget, or below the model's minimum (says the minimum).
    """
    out = []
    for item in (x.strip() for x in text.split(",")):
        if item.lower() in ("none", "unlimited"):
            out.append(Budget(item, None))
            continue
        if item.lower() == "min":
            out.append(Budget(item, min_bytes))
            continue
        try:
            value = float(item)
        except ValueError:
            value = None
        if value is not None and 0 < value <= 1 and not _is_size(item):
            nbytes = int(value * model_bytes)
        elif value is not None and value <= 0:
            raise ValueError(f"--budget {item}: must be > 0 (a fraction in (0, 1] or a size)")
        else:
            nbytes = parse_size(item)
        if nbytes < min_bytes and clamp:
            if not any(b.label == "min" for b in out):
                out.append(Budget("min", min_bytes))
            continue
        if nbytes < min_bytes:
            raise ValueError(
                f"--budget {item} ({format_size(nbytes)}) is below the model's minimum "
                f"{format_size(min_bytes)} ({min_bytes / model_bytes:.3f} of the model's "
                f"{format_size(model_bytes)}); use at least that, or 'min'")
        out.append(Budget(item, nbytes))
    if not out:
        raise ValueError("--budget: no budget given")
    return out


def parse_ints(text: str, flag: str, lo: int, hi: int) -> list[int]:
    """'0,1,2' or '0-4' -> [0, 1, 2]; every value in lo..hi.

    Raises:
        ValueError: names the flag.
    """
    out: list[int] = []
    try:
        for item in text.split(","):
            a, _, b = item.strip().partition("-")
            out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    except ValueError:
        raise ValueError(f"{flag} must be integers like 0,2,4 or 0-4, got {text!r}") from None
    bad = [v for v in out if not lo <= v <= hi]
    if bad or not out:
        raise ValueError(f"{flag} values must be in {lo}..{hi}, got {text!r}")
    return list(dict.fromkeys(out))


@dataclass
class StreamSweep:
    model: dict  # bench.env.model_info
    model_bytes: int
    min_budget_bytes: int
    disk: disk.DiskRun
    budgets: list[Budget]
    points: list[tuple[Budget, StreamPoint]] = field(default_factory=list)

    @property
    def disk_best_gbs(self) -> float:
        best = self.disk.best
        return best.gbs if best else 0.0

    @property
    def raw_gbs(self) -> float:
        """One thread reading 64 MiB (or the largest measured) blocks in order: the old
        single-stream figure."""
        single = [p for p in self.disk.points if p.threads == 1 and not p.skipped]
        return max(single, key=lambda p: p.block_bytes).gbs if single else 0.0

    def record(self, budget: Budget, point: StreamPoint) -> dict:
        """One JSON line's figures: the point plus the run's disk rates and model facts."""
        s = point.summary()
        best = self.disk_best_gbs
        return {
            "kind": "stream", **s, "model": self.model["name"], "model_path": self.model["path"],
            "quantization": self.model["quantization"], "dtype": self.model["dtype"],
            "budget": budget.label, "budget_fraction": budget.fraction(self.model_bytes),
            "disk_best_gbs": best, "raw_gbs": self.raw_gbs,
            "engine_vs_disk": s["engine_gbs"] / best if best else None,
        }


def model_sizes(model: str, backend: str) -> tuple[int, int]:
    """(compute-tier bytes of the whole model, smallest budget it runs with)."""
    engine = asyncio.run(Engine.open(model, EngineConfig(backend=backend)))
    try:
        return engine.model_bytes, engine.min_budget_bytes
    finally:
        engine.close()


def measure_disk(files: Sequence[str], bytes_per_point: int, seconds_per_point: float,
                 blocks: Sequence[int] = DISK_BLOCKS, threads: Sequence[int] = DISK_THREADS
                 ) -> disk.DiskRun:
    """O_DIRECT sequential reads of the model's own files at the engine's request sizes;
    buffered (page cache evicted first) where the filesystem refuses O_DIRECT."""
    run = disk.DiskRun(list(files), sum(os.path.getsize(f) for f in files))
    for mode in ("direct", "buffered"):
        for block in blocks:
            for n in threads:
                run.points.append(disk.measure_point(files, mode, "seq", block, n,
                                                     bytes_per_point, seconds_per_point))
        if run.best is not None:
            break
    return run


def run_sweep(model: str, budgets: str, depths: Sequence[int], tokens: int, *,
              backend: str = "numpy", io_workers: int = 8, adaptive: bool = False,
              in_process: bool = False, disk_bytes: int = 2**30, disk_seconds: float = 2.0,
              progress: Callable[[dict], None] | None = None,
              clamp_budgets: bool = False) -> StreamSweep:
    """Disk first, then every (budget, depth) point.

    Raises:
        ValueError / OSError / engine errors: a bad model, budget or depth (before any run);
        RuntimeError: a point failed in its child process.
    """
    from stream_run.bench.env import model_info

    info = model_info(model)
    model_bytes, min_bytes = model_sizes(model, backend)
    parsed = parse_budgets(budgets, model_bytes, min_bytes, clamp_budgets)
    sweep = StreamSweep(info, model_bytes, min_bytes,
                        measure_disk(info["files"], disk_bytes, disk_seconds), parsed)
    for budget in parsed:
        for depth in depths:
            cfg = PointConfig(model, budget.nbytes, depth, tokens, backend, io_workers, adaptive)
            point = run_point(cfg) if in_process else run_point_subprocess(cfg)
            sweep.points.append((budget, point))
            if progress is not None:
                progress(sweep.record(budget, point))
    return sweep
