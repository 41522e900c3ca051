"""SIGTERM unwinds like Ctrl-C, so `finally` blocks run (temp output removed, buffers freed),
and the exit status names the signal as shells do: 130 for SIGINT, 143 for SIGTERM.

Synchronous commands raise Terminated from the handler (sigterm_raises); an event loop's
command cancels its main task instead (cancel_on_sigterm), as asyncio.run does for SIGINT: an
exception raised by a handler lands in whichever task runs then, which is left with it."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Coroutine, Iterator
from types import FrameType
from typing import Any, TypeVar

T = TypeVar("T")


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


async def cancel_on_sigterm(coro: Coroutine[Any, Any, T]) -> T:
    """Await coro as the loop's main task; SIGTERM cancels it (its finally blocks run) and
    raises Terminated here. Unix event loops only; elsewhere coro runs as it is."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    got: list[int] = []

    def on_sigterm() -> None:
        got.append(signal.SIGTERM)
        if task is not None:
            task.cancel()

    try:
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    except (NotImplementedError, RuntimeError):  # Windows, or not the main thread
        return await coro
    try:
        return await coro
    except asyncio.CancelledError:
        if got:
            raise Terminated() from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def exit_status(exc: KeyboardInterrupt) -> int:
    """128 + the signal number: 143 for Terminated, 130 for a plain KeyboardInterrupt."""
    return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)
