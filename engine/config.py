"""EngineConfig composes the per-package configs; sizes parsing for the CLI and API; the
memory this process may still take (for `memory_budget_auto`).

The memory budget's promise: peak RSS <= baseline + budget + KV caches + MARGIN_BYTES, where
the baseline is the process's RSS once the engine has opened (imports, tokenizer, the kernels
loaded by a warm-up run on tiny weights) and before the first weight is read
(engine.runner.PassRunner.baseline_rss_bytes).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from stream_run.cache import BudgetError, CacheConfig
from stream_run.engine.speculative import MAX_DRAFT_TOKENS
from stream_run.engine.speculative import MODES as SPEC_MODES
from stream_run.kernels.kv_cache import KV_BITS
from stream_run.loaders import LoaderConfig
from stream_run.scheduler import SchedulerConfig

BACKENDS = ("auto", "numpy", "mlx")
# What the budget's promise allows beyond baseline + budget + KV: activations, logits, BLAS
# and numba scratch, allocator slack, the q/k rows a GGUF read un-permutes.
MARGIN_BYTES = 64 * 2**20
# The auto budget leaves this much of the memory available unused (page tables, the page cache
# buffered reads pass through, other processes): 5 %, at least 64 MiB, at most 512 MiB.
RESERVE_FRACTION, RESERVE_MIN, RESERVE_MAX = 0.05, 64 * 2**20, 512 * 2**20
_UNLIMITED = 2**60  # cgroup v1 reports "no limit" as a page-rounded 2**63 - 1
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
    # pick the budget when the engine opens, from the memory available (pick_budget), leaving
    # room for a KV cache of auto_kv_tokens positions (default: max_context)
    memory_budget_auto: bool = False
    auto_kv_tokens: int | None = None
    # raw unit bytes kept in RAM below the compute tier; on a CPU backend the compute tier is
    # RAM already, so 0 avoids holding weights twice
    host_budget_bytes: int = 0
    # the order routed experts leave the compute tier in (cache/experts.py): lfru
    # (frequency-weighted) or lru; a dense model evicts in LRU order either way
    expert_cache: str = "lfru"
    # Mixture-of-Experts: each sparse layer also guesses the next one's experts (its router
    # on this layer's hidden state) and the scheduler reads them early (models/moe.py)
    expert_lookahead: bool = False
    max_context: int | None = None  # default: the model's max_position_embeddings
    # rows per tile of a block's computation; also the prompt tokens per pass while other
    # requests decode (their passes carry the prompt in chunks of this size)
    prefill_chunk: int = 512
    # activation memory a prefill pass may take (reserved in the memory budget while it runs):
    # a prompt runs through each unit in as few passes as fit in it. None: what the budget
    # leaves beside the largest step (no budget: a quarter of the memory available)
    prefill_memory_bytes: int | None = None
    # KV cache storage: None float32; 8 or 4: group-wise quantized full layers (kv_quant.py)
    kv_bits: int | None = None
    # bytes of finished requests' KV kept for prompts that start like them (prefix_cache.py);
    # 0: none kept. Counted with the KV caches in the memory promise and the auto budget.
    kv_cache_budget_bytes: int = 0
    max_batch: int = 16  # requests decoded together; more wait for a slot
    max_queue: int | None = None  # requests waiting for a slot; None = unbounded
    threads: int | None = None  # CPU threads for numba kernels and BLAS; None = physical cores
    # speculative decoding (engine/speculative.py): the default of requests that do not say
    # ("off", "prompt_lookup", "draft_model"), the most draft tokens per pass, and a draft
    # model (a path; it shares the tokenizer and stays resident within draft_budget_bytes)
    speculative: str = "off"
    num_draft_tokens: int = 7
    draft_model: str | None = None
    draft_budget_bytes: int | None = None
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.memory_budget_bytes is not None and self.memory_budget_bytes <= 0:
            raise ValueError(f"memory_budget_bytes must be > 0, got {self.memory_budget_bytes}")
        if self.memory_budget_auto and self.memory_budget_bytes is not None:
            raise ValueError("memory_budget_auto picks the budget: leave memory_budget_bytes "
                             f"None, got {self.memory_budget_bytes}")
        if self.auto_kv_tokens is not None and self.auto_kv_tokens <= 0:
            raise ValueError(f"auto_kv_tokens must be > 0, got {self.auto_kv_tokens}")
        if self.expert_cache not in ("lru", "lfru"):
            raise ValueError(f"expert_cache must be lru or lfru, got {self.expert_cache!r}")
        if self.host_budget_bytes < 0:
            raise ValueError(f"host_budget_bytes must be >= 0, got {self.host_budget_bytes}")
        if self.max_context is not None and self.max_context <= 0:
            raise ValueError(f"max_context must be > 0, got {self.max_context}")
        if self.prefill_chunk <= 0:
            raise ValueError(f"prefill_chunk must be > 0, got {self.prefill_chunk}")
        if self.prefill_memory_bytes is not None and self.prefill_memory_bytes <= 0:
            raise ValueError(f"prefill_memory_bytes must be > 0, got {self.prefill_memory_bytes}")
        if self.kv_bits is not None and self.kv_bits not in KV_BITS:
            raise ValueError(f"kv_bits must be one of {', '.join(map(str, KV_BITS))} or None, "
                             f"got {self.kv_bits}")
        if self.kv_cache_budget_bytes < 0:
            raise ValueError(f"kv_cache_budget_bytes must be >= 0, got "
                             f"{self.kv_cache_budget_bytes}")
        if self.max_batch <= 0:
            raise ValueError(f"max_batch must be > 0, got {self.max_batch}")
        if self.threads is not None and not 1 <= self.threads <= usable_cpus():
            raise ValueError(f"threads must be between 1 and {usable_cpus()} (the CPUs this "
                             f"process may use), got {self.threads}")
        if self.speculative not in SPEC_MODES:
            raise ValueError(f"speculative must be one of {', '.join(SPEC_MODES)}, got "
                             f"{self.speculative!r}")
        if not 1 <= self.num_draft_tokens <= MAX_DRAFT_TOKENS:
            raise ValueError(f"num_draft_tokens must be in 1..{MAX_DRAFT_TOKENS}, got "
                             f"{self.num_draft_tokens}")
        if self.speculative == "draft_model" and self.draft_model is None:
            raise ValueError("speculative='draft_model' needs draft_model (a model path)")
        if self.draft_budget_bytes is not None and self.draft_budget_bytes <= 0:
            raise ValueError(f"draft_budget_bytes must be > 0, got {self.draft_budget_bytes}")
        if self.max_queue is not None and self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")

    @property
    def cache(self) -> CacheConfig:
        auto = (self.auto_kv_tokens or self.max_context or 0) if self.memory_budget_auto else None
        return CacheConfig(compute_bytes=self.memory_budget_bytes,
                           host_bytes=self.host_budget_bytes, auto_kv_tokens=auto,
                           expert_policy=self.expert_cache)


# -- the memory available, and the auto budget -------------------------------------------------

@dataclass(frozen=True)
class Headroom:
    """Bytes this process may still take, and where the figure comes from (for the message)."""

    available_bytes: int
    source: str


def memory_headroom(proc: str | os.PathLike[str] = "/proc",
                    cgroup_root: str | os.PathLike[str] = "/sys/fs/cgroup") -> Headroom:
    """The least of what the machine has available (MemAvailable) and what this process's
    memory cgroup, and each cgroup above it, still allows. Reclaimable page cache counts as
    available: cgroup v1 limit - usage + inactive file pages (memory.stat
    total_inactive_file; the limit is hierarchical_memory_limit, the least one above), v2
    memory.max - memory.current + inactive_file, for each cgroup up to the root.

    Raises:
        OSError: /proc/meminfo cannot be read (not Linux); the caller falls back.
    """
    proc, root = Path(proc), Path(cgroup_root)
    meminfo = _keyed(proc / "meminfo")
    best = Headroom(meminfo["MemAvailable"] * 1024,
                    f"MemAvailable {format_size(meminfo['MemAvailable'] * 1024)}")
    for limit in _cgroup_headrooms(proc / "self" / "cgroup", root):
        if limit.available_bytes < best.available_bytes:
            best = limit
    return best


def _cgroup_headrooms(self_cgroup: Path, root: Path) -> list[Headroom]:
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if "memory" in controllers.split(","):  # v1
            out += _v1_headroom(root / "memory" / rel)
        elif controllers == "" and (root / "cgroup.controllers").exists():  # v2, unified
            out += _v2_headrooms(root, rel)
    return out


def _v1_headroom(d: Path) -> list[Headroom]:
    try:
        limit = int((d / "memory.limit_in_bytes").read_text())
        usage = int((d / "memory.usage_in_bytes").read_text())
        stat = _keyed(d / "memory.stat")
    except (OSError, ValueError):
        return []
    limit = min(limit, stat.get("hierarchical_memory_limit", limit))
    if limit >= _UNLIMITED:
        return []
    free = limit - usage + stat.get("total_inactive_file", stat.get("inactive_file", 0))
    return [Headroom(max(0, free), f"cgroup limit {format_size(limit)}, "
                     f"{format_size(usage)} in use")]


def _v2_headrooms(root: Path, rel: str) -> list[Headroom]:
    out = []
    d = root / rel if rel else root
    while True:
        try:
            text = (d / "memory.max").read_text().strip()
            if text != "max":
                limit, usage = int(text), int((d / "memory.current").read_text())
                inactive = _keyed(d / "memory.stat").get("inactive_file", 0)
                out.append(Headroom(max(0, limit - usage + inactive),
                                    f"cgroup limit {format_size(limit)}, "
                                    f"{format_size(usage)} in use"))
        except (OSError, ValueError):
            pass
        if d == root or root not in d.parents:
            return out
        d = d.parent


def _keyed(path: Path) -> dict[str, int]:
    """'key value [kB]' lines (/proc/meminfo, memory.stat) -> {key: value}."""
    out = {}
    for line in path.read_text().splitlines():
        parts = line.replace(":", " ").split()
        if len(parts) >= 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


@dataclass(frozen=True)
class BudgetChoice:
    """What memory_budget_auto picked, and from what."""

    budget_bytes: int
    headroom: Headroom
    kv_bytes: int
    reserve_bytes: int
    whole_bytes: int

    def describe(self) -> str:
        capped = ", all the model needs" if self.budget_bytes == self.whole_bytes else ""
        return (f"{format_size(self.budget_bytes)}{capped} ({self.headroom.source}: "
                f"{format_size(self.headroom.available_bytes)} available, minus KV cache "
                f"{format_size(self.kv_bytes)}, margin {format_size(MARGIN_BYTES)}, reserve "
                f"{format_size(self.reserve_bytes)})")


def pick_budget(headroom: Headroom, kv_bytes: int, whole_bytes: int, min_bytes: int
                ) -> BudgetChoice:
    """The largest budget that fits: what is available now (the process's baseline is in use
    already, so it is not subtracted again) minus the KV cache, the promise's margin and a
    reserve (RESERVE_FRACTION of the available, within RESERVE_MIN..RESERVE_MAX), capped at
    what keeps the whole model resident (whole_bytes: with the room its passes need).

    Raises:
        BudgetError: that is less than the model's minimum budget (min_bytes).
    """
    avail = headroom.available_bytes
    reserve = int(min(RESERVE_MAX, max(RESERVE_MIN, RESERVE_FRACTION * avail)))
    budget = min(whole_bytes, avail - kv_bytes - MARGIN_BYTES - reserve)
    if budget < min_bytes:
        raise BudgetError(
            f"memory budget auto: {format_size(avail)} available ({headroom.source}) leaves "
            f"{format_size(max(0, budget))} for weights after the KV cache "
            f"({format_size(kv_bytes)}), margin ({format_size(MARGIN_BYTES)}) and reserve "
            f"({format_size(reserve)}); the model needs at least {format_size(min_bytes)}; "
            "hint: free memory, raise the limit, or shorten the context")
    return BudgetChoice(budget, headroom, kv_bytes, reserve, whole_bytes)
