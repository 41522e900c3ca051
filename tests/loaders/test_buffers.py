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


def test_an_idle_buffer_is_kept_only_for_an_expected_read():
    """Idle buffers are outside the budget: one waits only for a read that room was reserved
    for (the scheduler's expect), and goes when that read is cancelled (forget)."""
    pool = BufferPool()
    a = pool.take(1 << 20)
    del a  # the unit in it was evicted to make room for a read of the same size
    pool.expect(1 << 20)
    assert pool.idle_bytes() > 0
    pool.forget(1 << 20)  # cancelled before it started
    assert pool.idle_bytes() == 0 and pool.owned_bytes() == 0


def test_surplus_idle_buffers_go_when_a_read_is_expected():
    pool = BufferPool()
    bufs = [pool.take(1 << 20) for _ in range(3)]
    del bufs  # three units evicted, one read coming
    pool.expect(1 << 20)
    assert pool.owned_bytes() == pool.idle_bytes() > 0
    one = pool.owned_bytes()
    assert one < 2 * ((1 << 20) + (1 << 20) // 8 + ALIGN)
    got = pool.take(1 << 20)
    assert pool.reuses == 1 and pool.idle_bytes() == 0
    del got


def test_two_expected_reads_keep_two_buffers_and_take_consumes_the_expectation():
    pool = BufferPool()
    a, b, c = (pool.take(1 << 20) for _ in range(3))
    del a  # evicted for the first read (the scheduler expects it right after the eviction)
    pool.expect(1 << 20)
    del b  # evicted for the second
    pool.expect(1 << 20)
    first = pool.take(1 << 20)  # one idle buffer stays for the second read
    assert pool.idle_bytes() > 0
    second = pool.take(1 << 20)
    assert pool.reuses == 2 and pool.allocations == 3 and pool.idle_bytes() == 0
    pool.forget(1 << 20)  # after its take: nothing left to forget
    del first, second, c


def test_a_larger_buffer_reused_for_a_smaller_read_gives_back_its_tail():
    pool = BufferPool()
    a = pool.take(1 << 22)
    a[:] = 1
    del a
    smaller = (1 << 22) - (1 << 16)
    pool.expect(smaller)
    b = pool.take(smaller)  # a little smaller: reused
    assert pool.reuses == 1
    owner = b.base
    assert owner is not None
    tail = np.asarray(owner[smaller:1 << 22])
    assert not tail.any()  # MADV_DONTNEED: the pages past the read are gone (zero-filled)
    del b, owner, tail
