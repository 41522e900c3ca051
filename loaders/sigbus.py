"""A bus error in mmap mode becomes one line naming the file and exit 2, not a silent death.

Touching a mapped page beyond a file's end (the file was truncated while mapped) or one the disk
cannot read raises SIGBUS in the thread that touched it. A Python handler cannot help: it runs
later, between bytecodes, and the faulting instruction re-executes first. So the handler is
native code (a numba cfunc) that only makes async-signal-safe calls: lseek() to measure each
mapped file, write() of texts prepared in static buffers when the file was registered, and
_exit(2). It is installed while at least one file is registered (UnitReader in mmap mode), and
the previous handler is put back after the last one leaves.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading

import numpy as np

log = logging.getLogger(__name__)

SIGBUS = 7 if sys.platform.startswith("linux") else 10  # macOS/BSD: 10
N_SLOTS = 64  # files mapped at once (shards of all open engines)
PATH_BYTES = 4000  # a path longer than this is cut in the message
# the int64 fields of a slot: in use, fd, bytes the file must have, path length
_USED, _FD, _NEED, _PATH_LEN, _FIELDS = 0, 1, 2, 3, 4
_SEEK_END = 2
_SIGACTION_BYTES = 512  # more than any libc's struct sigaction (glibc x86-64: 152)
_STDERR = 2
_PIECES = (
    ": the file shrank to ",
    " bytes while its pages were mapped (--read-mode mmap; the model needs ",
    "): it was truncated or replaced; hint: restore the file and run again (--read-mode pread "
    "reports this per request and recovers)\n",
    "a bus error (SIGBUS) reading the mapped pages of ",
    ": a disk I/O error, or a file changed under its mapping (--read-mode mmap); hint: check "
    "the disk and the file (--read-mode pread reports read errors per request)\n",
    ", ",
)
_PREFIX_BYTES = 256
_PIECE_BYTES = 256
_DIGITS_BYTES = 32

# Static memory the handler reads; never freed, written only under _lock. Layout of _TEXT: the
# prefix ("stream-run: error: "), the pieces, a scratch area for digits, then one path per slot.
_SLOTS = (ctypes.c_int64 * (N_SLOTS * _FIELDS))()
_TEXT_BYTES = _PREFIX_BYTES + _PIECE_BYTES * len(_PIECES) + _DIGITS_BYTES + N_SLOTS * PATH_BYTES
_TEXT = (ctypes.c_uint8 * _TEXT_BYTES)()
_PIECES_AT = _PREFIX_BYTES
_DIGITS_AT = _PIECES_AT + _PIECE_BYTES * len(_PIECES)
_PATHS_AT = _DIGITS_AT + _DIGITS_BYTES

_lock = threading.Lock()
_handler = None  # the compiled cfunc, kept alive while installed
_previous: ctypes.Array | None = None  # the struct sigaction before ours, while installed
_by_fd: dict[int, int] = {}  # registered fd -> slot


def _slots() -> np.ndarray:
    return np.ctypeslib.as_array(_SLOTS).reshape(N_SLOTS, _FIELDS)


def _text() -> np.ndarray:
    return np.ctypeslib.as_array(_TEXT)


def _put(at: int, data: bytes, limit: int) -> int:
    data = data[:limit]
    _text()[at:at + len(data)] = np.frombuffer(data, np.uint8)
    return len(data)


def set_program(name: str) -> None:
    """The name that starts the message ("NAME: error: ..."), as the CLI prints errors."""
    with _lock:
        _text()[0] = _put(1, f"{name}: error: ".encode(), _PREFIX_BYTES - 1)


set_program(os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python")
for _i, _piece in enumerate(_PIECES):
    _text()[_PIECES_AT + _i * _PIECE_BYTES] = _put(_PIECES_AT + _i * _PIECE_BYTES + 1,
                                                   _piece.encode(), _PIECE_BYTES - 1)


def _compile():
    """The handler, compiled on first use (~0.2 s; only mmap mode needs it)."""
    from numba import carray, cfunc, types
    from numba.extending import intrinsic

    @intrinsic
    def as_ptr(typingctx, addr):
        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(types.voidptr))
        return types.voidptr(types.intp), codegen

    libc = ctypes.CDLL(None)
    write = libc.write
    write.argtypes, write.restype = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t], \
        ctypes.c_ssize_t
    lseek = libc.lseek
    lseek.argtypes, lseek.restype = [ctypes.c_int, ctypes.c_int64, ctypes.c_int], ctypes.c_int64
    exit_now = libc._exit
    exit_now.argtypes, exit_now.restype = [ctypes.c_int], None
    slots_at, text_at = ctypes.addressof(_SLOTS), ctypes.addressof(_TEXT)
    n_slots, n_fields, n_text = N_SLOTS, _FIELDS, _TEXT_BYTES
    pieces_at, piece_bytes, digits_at = _PIECES_AT, _PIECE_BYTES, _DIGITS_AT
    paths_at, path_bytes = _PATHS_AT, PATH_BYTES
    err, seek_end = _STDERR, _SEEK_END

    @cfunc(types.void(types.int32))
    def on_sigbus(signum):
        slots = carray(as_ptr(slots_at), (n_slots, n_fields), np.int64)
        text = carray(as_ptr(text_at), n_text, np.uint8)

        def piece(i):  # a length byte, then the bytes
            at = pieces_at + i * piece_bytes
            write(err, as_ptr(text_at + at + 1), text[at])

        def number(n):
            at = digits_at + 31
            k = 0
            while True:
                text[at - k] = 48 + n % 10
                n //= 10
                k += 1
                if n == 0:
                    break
            write(err, as_ptr(text_at + at - k + 1), k)

        shrunk = 0
        for i in range(n_slots):
            if slots[i, 0] == 1:
                size = lseek(slots[i, 1], 0, seek_end)
                if 0 <= size < slots[i, 2]:
                    write(err, as_ptr(text_at + 1), text[0])
                    write(err, as_ptr(text_at + paths_at + i * path_bytes), slots[i, 3])
                    piece(0)
                    number(size)
                    piece(1)
                    number(slots[i, 2])
                    piece(2)
                    shrunk += 1
        if shrunk == 0:
            write(err, as_ptr(text_at + 1), text[0])
            piece(3)
            first = True
            for i in range(n_slots):
                if slots[i, 0] == 1:
                    if not first:
                        piece(5)
                    write(err, as_ptr(text_at + paths_at + i * path_bytes), slots[i, 3])
                    first = False
            piece(4)
        exit_now(2)

    return on_sigbus


def prepare() -> bool:
    """Compile the handler now (the engine opens), not at the first read. False where it cannot
    work (not Linux or macOS, or numba's cfunc unavailable)."""
    global _handler
    if not (sys.platform.startswith("linux") or sys.platform == "darwin"):
        return False
    with _lock:
        if _handler is None:
            try:
                _handler = _compile()
            except Exception as exc:  # noqa: BLE001 - a missing guard is not fatal
                log.warning("no SIGBUS guard for mapped files (%s): a file truncated while "
                            "mapped kills the process without a message", exc)
                _handler = False
        return bool(_handler)


def register(fd: int, path: str, need_bytes: int) -> None:
    """Guard the mapped file open as fd: a SIGBUS while any is registered prints one line naming
    path (and its size against need_bytes, the bytes the model reads from it), then _exit(2)."""
    global _previous
    if not prepare():
        return
    with _lock:
        if fd in _by_fd:
            return
        slots = _slots()
        free = [i for i in range(N_SLOTS) if slots[i, _USED] == 0]
        if not free:
            log.warning("%s: more than %d mapped files; no SIGBUS guard for it", path, N_SLOTS)
            return
        i = free[0]
        n = _put(_PATHS_AT + i * PATH_BYTES, os.fsencode(path), PATH_BYTES)
        slots[i, _FD], slots[i, _NEED], slots[i, _PATH_LEN] = fd, need_bytes, n
        slots[i, _USED] = 1  # last: the handler reads only complete slots
        _by_fd[fd] = i
        if _previous is None:
            _previous = _install(_handler.address)


def unregister(fd: int) -> None:
    """Stop guarding fd (before it is closed); the last one puts the previous handler back."""
    global _previous
    with _lock:
        i = _by_fd.pop(fd, None)
        if i is None:
            return
        _slots()[i, _USED] = 0
        if not _by_fd and _previous is not None:
            _restore(_previous)
            _previous = None


def installed() -> bool:
    """Whether the handler is installed now (a file is registered)."""
    return _previous is not None


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None)


def _install(address: int) -> ctypes.Array:
    """Make the function at address SIGBUS's handler; returns the previous struct sigaction,
    kept whole (its flags and mask too: faulthandler's, pytest's), for _restore."""
    libc = _libc()
    previous = ctypes.create_string_buffer(_SIGACTION_BYTES)
    libc.sigaction(SIGBUS, None, previous)
    libc.signal.argtypes, libc.signal.restype = [ctypes.c_int, ctypes.c_void_p], ctypes.c_void_p
    libc.signal(SIGBUS, address)
    return previous


def _restore(previous: ctypes.Array) -> None:
    _libc().sigaction(SIGBUS, previous, None)
