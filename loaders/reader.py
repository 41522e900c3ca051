"""Reading a unit's bytes from disk: large preads into one host buffer, or mmap views."""

from __future__ import annotations

import errno
import logging
import mmap
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from stream_run.loaders import sigbus
from stream_run.loaders.buffers import ALIGN, BufferPool
from stream_run.loaders.errors import FormatError, ReadError
from stream_run.loaders.index import HostTensor, LayerIndex, TensorRef
from stream_run.loaders.packed import MANIFEST, sha256_file

log = logging.getLogger(__name__)

READ_MODES = ("pread", "mmap")
_CHUNK_BYTES = 64 * 1024 * 1024  # one pread at most; keeps each syscall interruptible
# A span of at least 2 parts is read as parts of this size in parallel (LoaderConfig.read_parts
# at once): one pread at a time left the disk at about half its rate while compute shared the
# CPU (a 7B Q4_K_M streamed at 2 GB: 0.61 -> 0.78-1.09 tok/s with 16 MiB parts, same bytes).
_PART_BYTES = 16 * 1024 * 1024  # a multiple of O_DIRECT's 4 KiB alignment
_HAS_PREADV = hasattr(os, "preadv")

# A test hook called before every read: (path, offset, nbytes). It may raise OSError.
FaultHook = Callable[[str, int, int], None]


@dataclass(frozen=True)
class LoaderConfig:
    """read_mode "pread" (reads into owned buffers) or "mmap" (zero-copy views of the page
    cache); direct_io: pread with O_DIRECT, bypassing the page cache (honest cold reads, no
    second copy of the weights in RAM), falling back to buffered reads where refused;
    verify: hash each unit's file before its first read and compare it with the packed
    model's manifest.json (stream-convert output only); read_parts: pread mode reads a large
    span as up to this many 16 MiB parts at once (1: one pread after another)."""

    read_mode: str = "pread"
    direct_io: bool = False
    verify: bool = False
    read_parts: int = 4

    def __post_init__(self) -> None:
        if self.read_mode not in READ_MODES:
            raise ValueError(f"read_mode must be one of {READ_MODES}, got {self.read_mode!r}")
        if self.direct_io and self.read_mode != "pread":
            raise ValueError("direct_io needs read_mode 'pread'")
        if self.read_parts < 1:
            raise ValueError(f"read_parts must be >= 1, got {self.read_parts}")


@dataclass
class _Span:
    path: str
    start: int
    end: int
    refs: list[TensorRef]


class UnitReader:
    """Reads units of a LayerIndex. Thread-safe: read() runs on the I/O pool.

    pread mode reads into buffers of `buffers`, reused once the arrays read into them are
    gone (evicted from the cache), so a streamed unit does not fault in fresh pages. mmap mode
    maps each read's byte ranges on their own, so the pages leave RSS when the unit's arrays
    die (one mapping of the whole file kept every page ever touched resident).

    buffer_nbytes(key) is what a read of the unit holds in RAM (the budget counts it), and
    expect(key) / forget(key) tell the pool which reads are coming (it keeps idle buffers
    for them only).

    Files are opened at their first read and kept open, so a file replaced on disk (renamed
    over, deleted) keeps being read as it was opened (a warning says so). Before each read the
    file is measured (fstat): one that shrank below the bytes the model reads from it (mmap
    mode: a mapped page past the end would raise SIGBUS) or grew (rewritten in place with other
    contents) is a ReadError; check_files() does the same for every open file. In mmap mode
    loaders/sigbus.py turns a bus error that no check caught into one line and exit 2."""

    def __init__(self, index: LayerIndex, config: LoaderConfig | None = None) -> None:
        self.index = index
        self.config = config or LoaderConfig()
        self.fault_hook: FaultHook | None = None
        self.buffers = BufferPool()
        self._fds: dict[str, int] = {}
        self._opened: dict[str, os.stat_result] = {}  # each open file as it was opened
        self._warned_replaced: set[str] = set()
        self._need = _bytes_needed(index)  # per file: the end of its last tensor
        self._lock = threading.Lock()
        self._parts: ThreadPoolExecutor | None = None  # made at the first span worth splitting
        self.direct = self.config.direct_io and hasattr(os, "O_DIRECT")
        if self.config.direct_io and not self.direct:
            log.warning("O_DIRECT is not available on this platform; using buffered reads")
        self._verified: set[str] = set()  # files whose sha256 matched the manifest
        if self.config.verify and index.checksums is None:
            raise FormatError(
                f"{index.source}: cannot verify checksums: the model has no {MANIFEST} (only "
                "stream-convert output has one); hint: run without --verify"
            )
        if self.config.read_mode == "mmap":
            sigbus.prepare()  # compiled now, not at the first read

    def read(self, key: str) -> dict[str, HostTensor]:
        """Read all tensors of unit `key` (blocking). With config.verify, the unit's files are
        hashed and checked against the manifest before their first read.

        Raises:
            ReadError: the file is gone, truncated, the read failed, or (verify) its sha256
                differs from the manifest; names file and unit.
        """
        unit = self.index.units[key]
        if self.config.verify:
            for path in unit.files:
                if path not in self._verified:
                    self._verify(path, key)
        spans = _coalesce(list(unit.tensors.values()))
        if self.config.read_mode == "mmap":
            return self._map_unit(spans, key)
        bounds = self._bounds(spans)
        buf = self.buffers.take(sum(b - a for a, b in bounds))
        out: dict[str, HostTensor] = {}
        pos = 0
        for span, (lo, hi) in zip(spans, bounds, strict=True):
            dest = buf[pos:pos + hi - lo]
            if not self._read_span(span.path, lo, dest, span.end - lo, key):
                del buf, dest, out  # idle now: the retry's take reuses it
                return self.read(key)  # O_DIRECT was refused; self.direct is now False
            for r in span.refs:
                at = pos + r.offset - lo
                out[r.name] = self._host(r, buf[at:at + r.nbytes], in_place=True)
            pos += hi - lo
        return out

    def check_files(self) -> None:
        """Check every file read so far against how it was opened (what read() checks for
        its unit's files). Cheap (an fstat and a stat per file): stream-serve calls it in mmap
        mode before each request, whose passes touch mapped pages of resident units.

        Raises:
            ReadError: a file shrank below the bytes the model reads from it, or grew.
        """
        with self._lock:
            fds = dict(self._fds)
        for path, fd in fds.items():
            self._check_file(path, fd, None)

    def buffer_nbytes(self, key: str) -> int:
        """Bytes a read of the unit holds in RAM: its byte ranges as read, with the gaps
        between tensors that coalescing reads too (in mmap mode plus the copies of GGUF q/k
        rows; pread un-permutes them in place). At least the unit's tensor bytes: its raw
        arrays are views of these. Page slack (O_DIRECT alignment, a partly used last page,
        an mmap's start) is left to the margin: under 12 KiB per unit."""
        spans = _coalesce(list(self.index.units[key].tensors.values()))
        copies = sum(r.nbytes for s in spans for r in s.refs if r.unpermute_heads)
        return sum(s.end - s.start for s in spans) + (
            copies if self.config.read_mode == "mmap" else 0)

    def expect(self, key: str) -> None:
        """A read of the unit will start soon (room is reserved for it): the pool keeps an
        idle buffer that fits it, and frees idle buffers that no expected read fits."""
        if self.config.read_mode == "pread":
            self.buffers.expect(self._read_nbytes(key))

    def forget(self, key: str) -> None:
        """An expected read of the unit was cancelled before it started (after it took its
        buffer this does nothing): the pool frees the idle buffer it kept for it."""
        if self.config.read_mode == "pread":
            self.buffers.forget(self._read_nbytes(key))

    def _read_nbytes(self, key: str) -> int:
        return sum(b - a for a, b in self._bounds(
            _coalesce(list(self.index.units[key].tensors.values()))))

    def _bounds(self, spans: list[_Span]) -> list[tuple[int, int]]:
        direct = self.direct
        return [_aligned(s.start, s.end) if direct else (s.start, s.end) for s in spans]

    def _map_unit(self, spans: list[_Span], key: str) -> dict[str, HostTensor]:
        """Map each span on its own: the mapping lives as long as the arrays viewing it."""
        out: dict[str, HostTensor] = {}
        for span in spans:
            start = _map_start(span.start)
            view = self._map(span.path, start, span.end - start, key)
            for r in span.refs:
                at = r.offset - start
                out[r.name] = self._host(r, view[at:at + r.nbytes])
        return out

    def _verify(self, path: str, key: str) -> None:
        want = (self.index.checksums or {}).get(path)
        if want is None:
            raise ReadError(f"{path}: unit {key!r} reads a file that {MANIFEST} has no checksum "
                            "for; hint: re-run stream-convert")
        try:
            got = sha256_file(path)
        except OSError as exc:
            raise ReadError(f"{path}: cannot hash for unit {key!r}: {exc.strerror or exc}"
                            ) from None
        if got != want:
            raise ReadError(
                f"{path}: checksum mismatch for unit {key!r}: sha256 {got[:16]}..., {MANIFEST} "
                f"expects {want[:16]}...; the file is corrupt or was modified; hint: re-run "
                "stream-convert"
            )
        with self._lock:
            self._verified.add(path)

    def _read_span(self, path: str, offset: int, dest: np.ndarray, need: int, key: str) -> bool:
        """Fill dest[:need] from path at offset; False if O_DIRECT was refused (retry)."""
        try:
            self._pread_into(path, offset, dest, need, key)
            return True
        except _DirectRefused:
            with self._lock:
                if self.direct:
                    log.warning("%s: the filesystem refuses O_DIRECT; using buffered reads", path)
                    self.direct = False
                    for fd in self._fds.values():
                        os.close(fd)
                    self._fds.clear()
            return False

    def _check_file(self, path: str, fd: int, key: str | None) -> None:
        """The open file still holds the model's bytes as far as a size can tell."""
        try:
            now = os.fstat(fd)
        except OSError as exc:
            raise ReadError(f"{path}: cannot stat the open file: {exc.strerror}") from None
        opened, need = self._opened[path], self._need.get(path, 0)
        reading = f" (reading unit {key!r})" if key is not None else ""
        # pread mode finds the end where a read crosses it (units before it still read right)
        if now.st_size < need and self.config.read_mode == "mmap":
            raise ReadError(
                f"{path}: the file was truncated while the engine ran: it has {now.st_size} "
                f"bytes, the model reads up to byte {need}{reading}; hint: restore the file")
        if now.st_size > opened.st_size:
            raise ReadError(
                f"{path}: the file changed while the engine ran: it has {now.st_size} bytes, "
                f"{opened.st_size} when it was opened (rewritten in place with other "
                "contents?); hint: restore the file, or restart to load the new one")
        if path not in self._warned_replaced:
            try:
                same = os.path.samestat(os.stat(path), now)
            except OSError:
                same = False
            if not same:
                self._warned_replaced.add(path)
                log.warning("%s: the file was replaced or removed after the engine opened it; "
                            "still reading the file as it was opened (restart to load the new "
                            "one)", path)

    def _host(self, ref: TensorRef, data: np.ndarray, in_place: bool = False) -> HostTensor:
        """in_place: data is the reader's own buffer, so un-permuted rows are written back
        into it (the unit then holds no second copy of its q/k bytes)."""
        if ref.unpermute_heads:
            from stream_run.loaders.gguf_file import unpermute_rows

            rows, heads = ref.shape[0], ref.unpermute_heads
            if in_place and rows % heads == 0:
                # head by head: a temporary of one head's rows, not of the whole tensor
                per_head = data.reshape(heads, rows // heads, -1)
                for h in range(heads):
                    per_head[h] = unpermute_rows(per_head[h], 1)
            else:
                data = np.ascontiguousarray(unpermute_rows(data.reshape(rows, -1), heads)
                                            ).reshape(-1)
        return HostTensor(ref.dtype, ref.shape, data)

    def _fd(self, path: str, key: str) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                flags = os.O_RDONLY | (os.O_DIRECT if self.direct else 0)
                try:
                    fd = os.open(path, flags)
                except OSError as exc:
                    if self.direct and exc.errno == errno.EINVAL:
                        raise _DirectRefused from None
                    raise ReadError(
                        f"{path}: cannot open for unit {key!r}: {exc.strerror}"
                    ) from None
                self._fds[path] = fd
                self._opened[path] = os.fstat(fd)
                if self.config.read_mode == "mmap":
                    sigbus.register(fd, path, self._need.get(path, 0))
            return fd

    def _map(self, path: str, start: int, length: int, key: str) -> np.ndarray:
        fd = self._fd(path, key)
        self._check_file(path, fd, key)
        try:
            if self.fault_hook is not None:
                self.fault_hook(path, start, length)
            m = mmap.mmap(fd, length, access=mmap.ACCESS_READ, offset=start)
        except (OSError, ValueError) as exc:
            raise ReadError(f"{path}: cannot map bytes [{start}, {start + length}) for unit "
                            f"{key!r}: {exc}; the file was truncated or replaced") from None
        return np.frombuffer(m, dtype=np.uint8)

    def _pread_into(self, path: str, offset: int, dest: np.ndarray, need: int, key: str) -> None:
        fd = self._fd(path, key)
        self._check_file(path, fd, key)
        view = memoryview(dest)
        try:
            if self.fault_hook is not None:
                self.fault_hook(path, offset, need)
        except ReadError:
            raise
        except OSError as exc:
            raise self._read_error(path, key, offset, exc) from None
        # dest may run past need to O_DIRECT's alignment: reads fill it to its end
        parts = min(self.config.read_parts, need // _PART_BYTES)
        if parts < 2:
            self._pread_part(fd, path, key, view, offset, 0, len(view), need)
            return
        pool = self._part_pool()
        futures = [pool.submit(self._pread_part, fd, path, key, view, offset, lo,
                               min(len(view), lo + _PART_BYTES), need)
                   for lo in range(_PART_BYTES, need, _PART_BYTES)]
        try:
            self._pread_part(fd, path, key, view, offset, 0, _PART_BYTES, need)
        finally:  # wait for every part before dest is used or reused, even on an error
            errors = [e for e in (f.exception() for f in futures) if e is not None]
        if errors:
            raise errors[0]

    def _pread_part(self, fd: int, path: str, key: str, view: memoryview, offset: int,
                    lo: int, hi: int, need: int) -> None:
        """Fill view[lo:hi] from the file at offset + lo, short reads continued, until the
        span's first need bytes are in (the file may end within hi's alignment slack)."""
        done = lo
        try:
            while done < min(hi, need):
                chunk = view[done:min(hi, done + _CHUNK_BYTES)]
                if _HAS_PREADV:
                    n = os.preadv(fd, [chunk], offset + done)
                else:  # pragma: no cover - platforms without preadv
                    data = os.pread(fd, len(chunk), offset + done)
                    chunk[: len(data)] = data
                    n = len(data)
                if n == 0:
                    raise ReadError(
                        f"{path}: unexpected end of file at byte {offset + done} while reading "
                        f"unit {key!r} (the file was truncated or replaced)"
                    )
                done += n
        except ReadError:
            raise
        except OSError as exc:
            raise self._read_error(path, key, offset + done, exc) from None

    def _read_error(self, path: str, key: str, at: int, exc: OSError) -> Exception:
        if self.direct and exc.errno == errno.EINVAL:
            return _DirectRefused()
        return ReadError(f"{path}: read of unit {key!r} failed at byte {at}: "
                         f"{exc.strerror or exc}")

    def _part_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._parts is None:
                self._parts = ThreadPoolExecutor(self.config.read_parts - 1,
                                                 thread_name_prefix="stream-read-part")
            return self._parts

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                sigbus.unregister(fd)
                os.close(fd)
            self._fds.clear()
            pool, self._parts = self._parts, None
        if pool is not None:
            pool.shutdown(wait=True)
        self.buffers.trim()


class _DirectRefused(Exception):
    """The filesystem refused O_DIRECT (EINVAL on open or read)."""


def _bytes_needed(index: LayerIndex) -> dict[str, int]:
    need: dict[str, int] = {}
    for unit in index.units.values():
        for t in unit.tensors.values():
            need[t.path] = max(need.get(t.path, 0), t.offset + t.nbytes)
    return need


def _map_start(offset: int) -> int:
    return offset - offset % mmap.ALLOCATIONGRANULARITY


def _aligned(start: int, end: int) -> tuple[int, int]:
    return start - start % ALIGN, -(-end // ALIGN) * ALIGN


def _coalesce(refs: list[TensorRef], max_waste: float = 0.1) -> list[_Span]:
    """Merge a unit's tensors into few large contiguous reads, per file."""
    spans: list[_Span] = []
    for r in sorted(refs, key=lambda r: (r.path, r.offset)):
        last = spans[-1] if spans else None
        if last and last.path == r.path:
            gap = r.offset - last.end
            if 0 <= gap <= max_waste * (last.end - last.start + r.nbytes):
                last.end = max(last.end, r.offset + r.nbytes)
                last.refs.append(r)
                continue
        spans.append(_Span(r.path, r.offset, r.offset + r.nbytes, [r]))
    return spans
