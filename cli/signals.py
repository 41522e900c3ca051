"""SIGTERM unwinds like Ctrl-C, so `finally` blocks run (temp output removed, buffers freed),
and the exit status names the signal as shells do: 130 for SIGINT, 143 for SIGTERM."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread (a KeyboardInterrupt, so that code which stops on
    Ctrl-C stops on it too)."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Inside the block SIGTERM raises Terminated in the main thread instead of killing the
    process at once (outside the main thread, where handlers cannot be set, nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def exit_status(exc: KeyboardInterrupt) -> int:
    """128 + the signal number: 143 for Terminated, 130 for a plain KeyboardInterrupt."""
    return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)
