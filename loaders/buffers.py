"""Reusable, page-aligned read buffers.

A fresh buffer for every unit read costs a page fault (and the kernel zeroing a page) per
4 KiB: for a 7B model streaming 11 GB per token that is millions of faults, on the same two
cores that run the compute. The pool hands a buffer out again once nothing references it:
the cache evicts a unit, its arrays (views of the buffer) die, and the next read of a unit of
the same size lands in the same, already mapped, pages.

A buffer is known to be unused by its reference count: every view of it (the prepared weights
in the cache, a tensor being converted) holds a reference to it. No eviction callback is
needed, so a weight that is still in use somewhere can never be overwritten.

The memory budget counts a buffer while the unit in it is cached or being read, never while
it is idle. So the pool keeps an idle buffer only for a read that is expected (`expect`: the
scheduler reserved room for it, and evicted a unit to make that room) and frees every other
one at once: idle bytes never exceed the bytes reserved for reads not yet started.
"""

from __future__ import annotations

import mmap
import sys
import threading
from dataclasses import dataclass

import numpy as np

ALIGN = 4096  # O_DIRECT needs buffer addresses aligned to the block size


def _refs(owner: np.ndarray) -> int:
    return sys.getrefcount(owner)


def page_rounded(nbytes: int) -> int:
    """Bytes of whole pages that nbytes of a buffer occupy once written."""
    return -(-nbytes // ALIGN) * ALIGN


@dataclass
class _Owner:
    array: np.ndarray  # the base array; views of it are handed out
    mapping: mmap.mmap | None  # to give pages back (madvise)


class BufferPool:
    """Aligned uint8 buffers, reused by size. Thread-safe.

    Idle buffers are kept only to serve expected reads (`expect` / `forget`); a buffer handed
    out for fewer bytes than it has gives back the pages past them, so a buffer's resident
    pages are the bytes of its last read, rounded up to a page.
    """

    def __init__(self) -> None:
        self._owners: list[_Owner] = []
        self._expected: list[int] = []  # sizes of reads announced but not yet taken
        self._lock = threading.Lock()
        self.allocations = 0
        self.reuses = 0
        probe = [np.empty(1, dtype=np.uint8)]
        self._free_refs = _refs(probe[0])  # the count of an owner only the pool holds

    def expect(self, nbytes: int) -> None:
        """A read of nbytes will take a buffer soon: keep one idle buffer that fits it. Frees
        idle buffers that no expected read fits (a unit just evicted to make room for a read
        of another size)."""
        with self._lock:
            self._expected.append(nbytes)
            self._drop_unexpected()

    def forget(self, nbytes: int) -> None:
        """An expected read of nbytes will not come (cancelled before it started, or it took
        its buffer already: then this does nothing). Frees idle buffers no longer expected."""
        with self._lock:
            if nbytes in self._expected:
                self._expected.remove(nbytes)
            self._drop_unexpected()

    def take(self, nbytes: int) -> np.ndarray:
        """An aligned buffer of nbytes (uninitialised: a previous read's bytes may be there).

        Reuses the smallest idle buffer that holds nbytes with at most 1/8 to spare (units of
        one model differ by a few pages of alignment when they straddle two files). Idle
        buffers that no other expected read fits are freed before a new one is mapped."""
        with self._lock:
            if nbytes in self._expected:
                self._expected.remove(nbytes)
            fits = [i for i in range(len(self._owners))
                    if self._fits(i, nbytes) and self._idle(i)]
            if fits:
                best = self._owners[min(fits, key=lambda i: self._owners[i].array.nbytes)]
                self._drop_unexpected(taken=best)
                self.reuses += 1
                _give_back_tail(best, nbytes)
                return best.array[:nbytes]
            self._drop_unexpected()
            owner = _anonymous(nbytes)
            self._owners.append(owner)
            self.allocations += 1
            return owner.array[:nbytes]

    def idle_bytes(self) -> int:
        with self._lock:
            return sum(self._owners[i].array.nbytes for i in range(len(self._owners))
                       if self._idle(i))

    def owned_bytes(self) -> int:
        """Bytes of every buffer the pool tracks, idle or in use (mapped, not all resident)."""
        with self._lock:
            return sum(o.array.nbytes for o in self._owners)

    def trim(self) -> None:
        """Free every idle buffer and forget expected reads (buffers in use stay tracked)."""
        with self._lock:
            self._expected.clear()
            self._drop_unexpected()

    def _idle(self, i: int) -> bool:
        return _refs(self._owners[i].array) == self._free_refs

    def _fits(self, i: int, nbytes: int) -> bool:
        return nbytes <= self._owners[i].array.nbytes <= nbytes + nbytes // 8 + ALIGN

    def _drop_unexpected(self, taken: _Owner | None = None) -> None:
        """Keep the buffers in use, `taken`, and one idle buffer per expected read that fits
        it (largest reads first); free the other idle ones."""
        idle = [i for i in range(len(self._owners))
                if self._idle(i) and self._owners[i] is not taken]
        keep: set[int] = set()
        for nbytes in sorted(self._expected, reverse=True):
            fits = [i for i in idle if i not in keep and self._fits(i, nbytes)]
            if fits:
                keep.add(min(fits, key=lambda i: self._owners[i].array.nbytes))
        self._owners = [o for i, o in enumerate(self._owners) if i in keep or i not in idle]


def _give_back_tail(owner: _Owner, nbytes: int) -> None:
    """Return the pages past nbytes to the OS (a larger read used them, or a huge page
    reached past the last one): the budget counts a unit's bytes, not its buffer's."""
    start = page_rounded(nbytes)
    if owner.mapping is not None and start < len(owner.mapping) and hasattr(mmap,
                                                                            "MADV_DONTNEED"):
        owner.mapping.madvise(mmap.MADV_DONTNEED, start, len(owner.mapping) - start)


def _rounded(nbytes: int) -> int:
    """Whole pages, with 1/16 to spare for a slightly larger unit later. Pages of an anonymous
    mapping that are never written take no memory."""
    return -(-(nbytes + nbytes // 16 + 1) // ALIGN) * ALIGN


def _anonymous(nbytes: int) -> _Owner:
    """Page-aligned private memory of its own mapping, unmapped when the last view dies.

    Not np.empty: glibc raises its mmap threshold after large frees, so buffers of a few MB
    would then come from the heap and stay in the process after the cache drops them.
    Transparent huge pages are asked for (as numpy does for its large arrays): O_DIRECT reads
    into 4 KiB pages measured 20-35 % slower here (3.1 vs 4.0 GB/s, same file, same run), and
    the kernels walk the weights with fewer TLB misses."""
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    m = mmap.mmap(-1, _rounded(nbytes), flags=flags) if flags else mmap.mmap(-1, _rounded(nbytes))
    if hasattr(mmap, "MADV_HUGEPAGE"):
        m.madvise(mmap.MADV_HUGEPAGE)
    return _Owner(np.frombuffer(m, dtype=np.uint8), m)
