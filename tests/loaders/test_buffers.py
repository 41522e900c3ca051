"""The read-buffer pool: reuse only once nothing references a buffer; alignment; trim."""

import gc

import numpy as np

from stream_run.loaders.buffers import ALIGN, BufferPool


def test_buffers_are_aligned_and_sized():
    pool = BufferPool()
    for n in (1, 4095, 4096, 1 << 20):
        buf = pool.take(n)
        assert buf.nbytes == n and buf.ctypes.data % ALIGN == 0


def test_a_referenced_buffer_is_never_handed_out_again():
    pool = BufferPool()
    a = pool.take(1 << 16)
    a[:] = 7
    view = a[100:200].view(np.uint16)  # a derived view, as prepared weights are
    del a
    b = pool.take(1 << 16)  # the first buffer is still referenced through `view`
    b[:] = 9
    assert (view == 0x0707).all()
    assert pool.allocations == 2 and pool.reuses == 0


def test_a_released_buffer_is_reused_with_the_same_pages():
    pool = BufferPool()
    a = pool.take(1 << 16)
    address = a.ctypes.data
    view = a[10:20]
    del a, view
    gc.collect()
    b = pool.take(1 << 16)
    assert b.ctypes.data == address and pool.reuses == 1 and pool.allocations == 1


def test_idle_buffers_of_another_size_are_freed_before_a_new_allocation():
    pool = BufferPool()
    a = pool.take(1 << 16)
    del a
    assert pool.idle_bytes() >= 1 << 16
    held = pool.take(1 << 17)  # no idle buffer of this size: the idle one is dropped first
    assert pool.idle_bytes() == 0
    del held
    assert pool.idle_bytes() > 0
    pool.trim()
    assert pool.idle_bytes() == 0


def test_a_slightly_smaller_or_larger_request_reuses_an_idle_buffer():
    """Units of one model differ by a few pages when they straddle two files."""
    pool = BufferPool()
    a = pool.take(1 << 20)
    address = a.ctypes.data
    del a
    b = pool.take((1 << 20) + 3 * ALIGN)
    assert b.ctypes.data == address and b.nbytes == (1 << 20) + 3 * ALIGN
    del b
    c = pool.take(1 << 19)  # half the size: not worth pinning the big one to it
    assert c.ctypes.data != address and pool.allocations == 2


def test_reusing_one_size_frees_idle_buffers_of_other_sizes():
    pool = BufferPool()
    small, big = pool.take(1 << 16), pool.take(1 << 20)
    del small, big
    again = pool.take(1 << 16)  # reuses the small one; the idle big one is outside any budget
    assert pool.reuses == 1 and pool.idle_bytes() == 0
    del again
