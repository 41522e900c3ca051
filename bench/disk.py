"""Disk study: fio-style read sweeps over a file or a directory of files.

Each point reads blocks of one size, sequentially or at random, with N reader threads (the
queue depth: N requests in flight), through one of three paths:

- "buffered": os.preadv through the page cache;
- "direct": os.preadv with O_DIRECT (no page cache; what `--direct-io` streaming does);
- "mmap": a memcpy out of a shared read-only mapping (page faults bring the pages in).

and reports GB/s, IOPS and per-request latency percentiles. Sequential points are one stream
walked in order by all threads (a shared cursor, as an io_uring queue of depth N on one file);
random points read distinct blocks (no block twice, so nothing hits a page read earlier in the
point). A point stops at its byte cap, its time cap or the end of the files, whichever comes
first, and never wraps around.

Cold cache: before every buffered or mmap point the files' pages are evicted from the page
cache (posix_fadvise DONTNEED, which any user may do on a file it can open; as root, a global
drop_caches if pages stay) and the fraction still cached is measured with mincore(2) and
recorded. O_DIRECT points do not touch the page cache. By default no fadvise/madvise access
hints are given (the engine gives none), so the device's readahead window applies (8 MiB on
this project's VM: one random mmap page fault read 7.5 MB); `hints` gives fio's fadvise_hint
(SEQUENTIAL / RANDOM to fadvise or madvise by pattern).

Buffers are page-aligned anonymous mappings with transparent huge pages requested (as
loaders/buffers.py does: O_DIRECT into 4 KiB pages measured 20-35 % slower here), one per
thread, faulted in before the clock starts and reused for every request of the point.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import errno
import itertools
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

MODES = ("buffered", "direct", "mmap")
PATTERNS = ("seq", "rand")
KiB, MiB = 2**10, 2**20
BLOCKS = (4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, MiB, 4 * MiB, 16 * MiB, 64 * MiB)
THREADS = (1, 2, 4, 8, 16, 32)
QD_BLOCKS = (4 * KiB, MiB)  # the block sizes of the queue-depth curves
ALIGN = 4096


@dataclass(frozen=True)
class SweepConfig:
    """Which points to measure. The default "cross" sweep is every block size at threads[0]
    plus every thread count at each of qd_blocks (fio's two classic curves); grid=True measures
    the full product instead."""

    modes: tuple[str, ...] = MODES
    patterns: tuple[str, ...] = PATTERNS
    blocks: tuple[int, ...] = BLOCKS
    threads: tuple[int, ...] = THREADS
    qd_blocks: tuple[int, ...] = QD_BLOCKS
    grid: bool = False
    bytes_per_point: int = 256 * MiB
    seconds_per_point: float = 1.5
    warm: bool = False  # keep the page cache as it is (buffered/mmap figures are then warm)
    hints: bool = False  # fio's fadvise_hint: tell the kernel the pattern (readahead on/off)
    seed: int = 0

    def __post_init__(self) -> None:
        for name, allowed in (("modes", MODES), ("patterns", PATTERNS)):
            bad = [v for v in getattr(self, name) if v not in allowed]
            if bad or not getattr(self, name):
                raise ValueError(f"--{name} must be a list of {', '.join(allowed)}, got "
                                 f"{','.join(getattr(self, name)) or 'nothing'}")
        for b in (*self.blocks, *self.qd_blocks):
            if b < ALIGN or b % ALIGN:
                raise ValueError(f"block sizes must be multiples of 4 KiB (O_DIRECT), got {b}")
        if not self.blocks or not self.threads:
            raise ValueError("--blocks and --threads need at least one value")
        if any(not 1 <= t <= 256 for t in self.threads):
            raise ValueError(f"--threads must be in 1..256, got {list(self.threads)}")
        if self.bytes_per_point < ALIGN:
            raise ValueError(f"--bytes-per-point must be >= 4 KiB, got {self.bytes_per_point}")
        if self.seconds_per_point <= 0:
            raise ValueError(f"--seconds-per-point must be > 0, got {self.seconds_per_point}")

    def points(self) -> list[tuple[str, str, int, int]]:
        """(mode, pattern, block_bytes, threads) in measuring order, without repeats."""
        if self.grid:
            shape = [(b, t) for b in self.blocks for t in self.threads]
        else:
            shape = [(b, self.threads[0]) for b in self.blocks]
            shape += [(b, t) for b in self.qd_blocks for t in self.threads]
        shape = list(dict.fromkeys(shape))
        return [(m, p, b, t) for m in self.modes for p in self.patterns for b, t in shape]


QUICK = SweepConfig(blocks=(4 * KiB, 64 * KiB, MiB, 16 * MiB), threads=(1, 4),
                    qd_blocks=(4 * KiB, MiB), bytes_per_point=16 * MiB, seconds_per_point=0.25)


@dataclass
class DiskPoint:
    mode: str
    pattern: str
    block_bytes: int
    threads: int
    bytes_read: int = 0
    ops: int = 0
    seconds: float = 0.0
    gbs: float = 0.0
    iops: float = 0.0
    lat_p50_s: float = 0.0
    lat_p99_s: float = 0.0
    lat_mean_s: float = 0.0
    cache: str = ""  # how the page cache was handled, in words
    cached_at_start: float | None = None  # fraction of the files' pages cached (mincore)
    skipped: str | None = None  # why the point was not measured
    loadavg: list[float] | None = None

    def to_dict(self) -> dict:
        return {"kind": "disk", **asdict(self)}


@dataclass
class DiskRun:
    files: list[str]
    nbytes: int
    points: list[DiskPoint] = field(default_factory=list)

    @property
    def best(self) -> DiskPoint | None:
        done = [p for p in self.points if not p.skipped]
        return max(done, key=lambda p: p.gbs) if done else None


def list_files(path: str) -> list[str]:
    """A file, or the regular non-empty files directly in a directory (sorted).

    Raises:
        FileNotFoundError / ValueError: no such path, or nothing to read in it.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    if os.path.isfile(path):
        files = [path]
    elif os.path.isdir(path):
        files = sorted(os.path.join(path, n) for n in os.listdir(path))
        files = [f for f in files if os.path.isfile(f) and not os.path.islink(f)]
    else:
        raise ValueError(f"{path}: not a regular file or directory")
    files = [f for f in files if os.path.getsize(f) > 0]
    if not files:
        raise ValueError(f"{path}: no non-empty files to read")
    for f in files:
        if not os.access(f, os.R_OK):
            raise PermissionError(f"{f}: file is not readable")
    return files


# --- page cache -------------------------------------------------------------------------

def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None or not hasattr(os, "posix_fadvise"):
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return libc


_LIBC = _libc()


def cached_fraction(files: Sequence[str]) -> float | None:
    """Fraction of the files' pages in the page cache now (mincore on a fresh mapping, which
    faults nothing in); None where mincore is not available."""
    if _LIBC is None:
        return None
    cached = total = 0
    for path in files:
        size = os.path.getsize(path)
        pages = -(-size // mmap.PAGESIZE)
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = _LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                vec = (ctypes.c_ubyte * pages)()
                if _LIBC.mincore(addr, size, vec) != 0:
                    return None
                cached += int(np.count_nonzero(np.frombuffer(vec, np.uint8) & 1))
                total += pages
            finally:
                _LIBC.munmap(addr, size)
        finally:
            os.close(fd)
    return cached / total if total else 0.0


def drop_page_cache() -> bool:
    """Drop the whole page cache (root only). Returns whether it was dropped."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def evict(files: Sequence[str]) -> tuple[str, float | None]:
    """Evict the files' pages from the page cache. Returns how, in words, with the fraction
    still cached (measured), and that fraction (None where it cannot be measured)."""
    how = "fadvise DONTNEED"
    if hasattr(os, "posix_fadvise"):
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    else:  # pragma: no cover - non-POSIX
        how = "no eviction available"
    frac = cached_fraction(files)
    if (frac is None or frac > 0.01) and drop_page_cache():
        how += " + drop_caches"
        frac = cached_fraction(files)
    if frac is None:
        return f"cold: {how} (cached fraction unknown)", None
    state = "cold" if frac <= 0.01 else "warm"
    return f"{state}: {how}, {frac:.1%} cached at start", frac


# --- buffers and reads -------------------------------------------------------------------

def aligned_buffer(nbytes: int) -> np.ndarray:
    """Page-aligned private anonymous memory with transparent huge pages asked for, faulted
    in now so that no page fault lands inside a timed read."""
    size = -(-nbytes // ALIGN) * ALIGN
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    m = mmap.mmap(-1, size, flags=flags) if flags else mmap.mmap(-1, size)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        m.madvise(mmap.MADV_HUGEPAGE)
    buf = np.frombuffer(m, dtype=np.uint8)
    buf[:] = 1
    return buf


class _Blocks:
    """Block i of the concatenated files -> (file index, offset); only whole blocks count."""

    def __init__(self, sizes: Sequence[int], block: int) -> None:
        self.block = block
        self.starts = list(itertools.accumulate((s // block for s in sizes), initial=0))

    def __len__(self) -> int:
        return self.starts[-1]

    def locate(self, i: int) -> tuple[int, int]:
        f = bisect.bisect_right(self.starts, i) - 1
        return f, (i - self.starts[f]) * self.block


class _Refused(Exception):
    pass


def _open_all(files: Sequence[str], mode: str) -> list:
    if mode == "mmap":
        out = []
        for path in files:
            with open(path, "rb") as f:
                out.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        return out
    flags = os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if mode == "direct" else 0)
    if mode == "direct" and not hasattr(os, "O_DIRECT"):
        raise _Refused("O_DIRECT is not available on this platform")
    fds: list[int] = []
    try:
        for path in files:
            fds.append(os.open(path, flags))
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        if mode == "direct" and exc.errno == errno.EINVAL:
            raise _Refused("the filesystem refuses O_DIRECT") from None
        raise
    return fds


def _close_all(handles: list, mode: str) -> None:
    for h in handles:
        h.close() if mode == "mmap" else os.close(h)


def _hint(handles: list, mode: str, pattern: str) -> None:
    """fio's fadvise_hint: sequential or random access advice for every file."""
    if mode == "mmap":
        advice = mmap.MADV_SEQUENTIAL if pattern == "seq" else mmap.MADV_RANDOM
        for m in handles:
            if len(m):
                m.madvise(advice)
    elif mode == "buffered" and hasattr(os, "posix_fadvise"):
        advice = os.POSIX_FADV_SEQUENTIAL if pattern == "seq" else os.POSIX_FADV_RANDOM
        for fd in handles:
            os.posix_fadvise(fd, 0, 0, advice)


def _reader(mode: str, handles: list) -> Callable[[int, int, np.ndarray], int]:
    if mode == "mmap":
        arrays = [np.frombuffer(m, dtype=np.uint8) if len(m) else None for m in handles]

        def read(f: int, offset: int, buf: np.ndarray) -> int:
            src = arrays[f][offset:offset + len(buf)]  # type: ignore[index]
            np.copyto(buf[:len(src)], src)  # numpy releases the GIL for the copy
            return len(src)
        return read

    def pread(f: int, offset: int, buf: np.ndarray) -> int:
        return os.preadv(handles[f], [memoryview(buf)], offset)
    return pread


def measure_point(files: Sequence[str], mode: str, pattern: str, block: int, threads: int,
                  max_bytes: int, max_seconds: float, warm: bool = False,
                  seed: int = 0, hints: bool = False) -> DiskPoint:
    """Measure one point (see the module docstring). A point that cannot run (O_DIRECT
    refused, no file holds one block) comes back with `skipped` set."""
    from stream_run.bench.env import load_average

    point = DiskPoint(mode, pattern, block, threads)
    blocks = _Blocks([os.path.getsize(f) for f in files], block)
    if not len(blocks):
        point.skipped = f"no file holds a whole {block} B block"
        return point
    n_ops = min(len(blocks), -(-max_bytes // block))
    if pattern == "rand":
        order = np.random.default_rng(seed).choice(len(blocks), size=n_ops, replace=False)
    else:
        order = np.arange(n_ops)
    try:
        handles = _open_all(files, mode)
    except _Refused as exc:
        point.skipped = str(exc)
        return point
    try:
        if mode == "direct":
            point.cache = "cold: O_DIRECT"
        elif warm:
            frac = cached_fraction(files)
            point.cached_at_start = frac
            point.cache = "warm" + ("" if frac is None else f": {frac:.1%} cached at start")
        else:
            point.cache, point.cached_at_start = evict(files)
        if hints:
            _hint(handles, mode, pattern)
        point.loadavg = load_average()
        _run(point, _reader(mode, handles), blocks, order, threads, max_seconds)
    except _Refused as exc:
        point.skipped = str(exc)
    finally:
        _close_all(handles, mode)
    return point


def _run(point: DiskPoint, read: Callable[[int, int, np.ndarray], int], blocks: _Blocks,
         order: np.ndarray, threads: int, max_seconds: float) -> None:
    buffers = [aligned_buffer(blocks.block) for _ in range(threads)]
    cursor = itertools.count()  # next() on a count is atomic under the GIL
    lat: list[list[float]] = [[] for _ in range(threads)]
    done = [0] * threads
    errors: list[BaseException] = []
    start = threading.Barrier(threads + 1)
    deadline = [0.0]

    def work(k: int) -> None:
        buf, mine, clock = buffers[k], lat[k], time.perf_counter
        start.wait()
        try:
            while (i := next(cursor)) < len(order) and clock() < deadline[0]:
                f, offset = blocks.locate(int(order[i]))
                t0 = clock()
                n = read(f, offset, buf)
                mine.append(clock() - t0)
                done[k] += n
        except OSError as exc:
            errors.append(exc)

    pool = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(threads)]
    for t in pool:
        t.start()
    t0 = time.perf_counter()
    deadline[0] = t0 + max_seconds
    start.wait()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        exc = errors[0]
        if point.mode == "direct" and getattr(exc, "errno", None) == errno.EINVAL:
            raise _Refused("the filesystem refuses O_DIRECT reads")
        raise exc
    all_lat = np.concatenate([np.asarray(x) for x in lat])
    point.bytes_read, point.ops, point.seconds = sum(done), len(all_lat), elapsed
    point.gbs = point.bytes_read / elapsed / 1e9
    point.iops = point.ops / elapsed
    if len(all_lat):
        point.lat_p50_s, point.lat_p99_s = (float(x) for x in np.percentile(all_lat, [50, 99]))
        point.lat_mean_s = float(all_lat.mean())


def sweep(path: str, config: SweepConfig,
          progress: Callable[[DiskPoint], None] | None = None) -> DiskRun:
    """Measure every point of config on the files at path.

    Raises:
        FileNotFoundError / PermissionError / ValueError: a bad path.
    """
    files = list_files(path)
    run = DiskRun(files, sum(os.path.getsize(f) for f in files))
    for mode, pattern, block, threads in config.points():
        p = measure_point(files, mode, pattern, block, threads, config.bytes_per_point,
                          config.seconds_per_point, config.warm, config.seed, config.hints)
        run.points.append(p)
        if progress is not None:
            progress(p)
    return run


def rate_at(points: Iterable[DiskPoint | dict], block: int, threads: int,
            pattern: str = "seq") -> dict | None:
    """The rate a reader of `block`-byte sequential (pattern "rand": random) O_DIRECT requests
    with up to `threads` in flight would see, from measured direct points of that pattern: for
    each thread count <= threads (else the fewest measured), GB/s interpolated linearly in
    log(block size) between the nearest measured blocks (clamped at the ends); the best thread
    count wins.

    Buffered points are used where there are no O_DIRECT ones.

    Returns {"gbs", "block_bytes", "threads", "mode", "measured_blocks"}, or None.
    """
    def get(p: DiskPoint | dict, k: str):
        return p[k] if isinstance(p, dict) else getattr(p, k)

    seq = [p for p in points if get(p, "pattern") == pattern and not get(p, "skipped")
           and get(p, "gbs") > 0]
    # buffered points stand in where the filesystem refused O_DIRECT (the engine falls back)
    pts = [p for p in seq if get(p, "mode") == "direct"] or [
        p for p in seq if get(p, "mode") == "buffered"]
    if not pts:
        return None
    counts = sorted({get(p, "threads") for p in pts})
    usable = [t for t in counts if t <= threads] or counts[:1]
    best = None
    for t in usable:
        curve: dict[int, float] = {}
        for p in pts:
            if get(p, "threads") == t:
                b = get(p, "block_bytes")
                curve[b] = max(curve.get(b, 0.0), get(p, "gbs"))
        xs = sorted(curve)
        x = min(max(block, xs[0]), xs[-1])
        gbs = float(np.interp(np.log2(x), np.log2(xs), [curve[b] for b in xs]))
        if best is None or gbs > best["gbs"]:
            best = {"gbs": gbs, "block_bytes": block, "threads": t, "mode": get(pts[0], "mode"),
                    "measured_blocks": xs}
    return best
