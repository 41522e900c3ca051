"""The link between a pipeline's ranks (engine/pipeline.py): Messages over mx.distributed's ring
backend, with a timeout on every wait inside a pass and dead-peer detection on every other.

One message is one fixed-size frame (frame_bytes, set from the model's hidden size so that a
decode pass fits): an int32 header (kind, JSON bytes, rows, width), the JSON (what the pass
is) and the hidden rows float32. A message larger than a frame sends the rest as a second
array, whose size the header gives. Every send and receive is a round of the ring backend
(an mx.array made, evaluated, copied out): one per message where it was two (header, then
payload), which halved the time a decode pass's round trip took on this machine.

Waits:
- inside a pass, every send and receive is watched by one watchdog thread (armed and disarmed
  per operation; a thread per operation cost ~0.1 ms each): past timeout_s it prints the line
  and ends the process, since a blocked receive cannot be interrupted;
- before a receive the rank sleeps in select() on the ring's sockets (the ring backend's own
  receive polls while it waits, taking a core's share from the rank that computes), with
  timeout_s inside a pass, without one for the next pass (a server may be idle for hours);
- a peer that dies closes its sockets: the ring backend raises, or select() wakes on a socket
  at its end, which is checked before the receive; a peer whose host vanishes without closing
  them is found by TCP keepalive probes (keepalive_s), so no wait is without an end.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil

PASS, IDLE, STOP, RESULT = 1, 2, 3, 4
DEFAULT_TIMEOUT_S = 600.0  # the longest a rank waits inside a pass for a peer
_HEADER_BYTES = 16  # int32: kind, JSON bytes, rows, width
MIN_FRAME_BYTES = 4096
SOCKET_BUFFER_BYTES = 4 * 2**20  # the receive buffer widen_receive asks for
MIN_BUFFERED_BYTES = 64 * 1024
_WATCHDOG = ("import os, sys, time; time.sleep(float(sys.argv[2])); "
             "print('stream-run: ' + sys.argv[3], file=sys.stderr, flush=True); "
             "os.kill(int(sys.argv[1]), 9)")


class PipelineError(RuntimeError):
    """The pipeline lost a rank (one line, naming the rank and the peer)."""


@dataclass
class Message:
    kind: int
    meta: dict[str, Any] = field(default_factory=dict)
    hidden: np.ndarray | None = None


def frame_bytes_for(hidden_size: int) -> int:
    """A frame that holds a pass of two rows (a decode step of two sequences) and its JSON."""
    return max(MIN_FRAME_BYTES, 2048 + 8 * hidden_size)


class Watchdog:
    """One thread that calls fire(message) when an armed deadline passes (Link's timeouts)."""

    def __init__(self, fire: Callable[[str], None]) -> None:
        self.fire = fire
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._message = ""
        # the deadline the thread sleeps until (None: without one): arm() wakes it only for
        # an earlier one, so arming again with the same timeout costs a lock, no wake-up
        self._until: float | None = None
        self._thread: threading.Thread | None = None

    def arm(self, timeout_s: float, message: str) -> None:
        with self._cond:
            self._deadline, self._message = time.monotonic() + timeout_s, message
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, daemon=True,
                                                name="pipeline-watchdog")
                self._thread.start()
            elif self._until is None or self._deadline < self._until:
                self._cond.notify()

    def disarm(self) -> None:
        with self._cond:  # no wake-up: the thread finds no deadline when its wait ends
            self._deadline = None

    def _watch(self) -> None:
        with self._cond:
            while True:
                self._until = self._deadline
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            message = self._message
        self.fire(message)


class Link:
    """Sends and receives Messages over an mx.distributed group (compute thread only)."""

    def __init__(self, group: Any, timeout_s: float = DEFAULT_TIMEOUT_S,
                 keepalive_s: float | None = None) -> None:
        """keepalive_s: how long an idle ring socket goes before TCP probes its peer (3 probes
        that far apart; default: a quarter of timeout_s, at most 60 s)."""
        import mlx.core as mx

        self.mx = mx
        self.group = group
        self.rank = group.rank()
        self.size = group.size()
        self.timeout_s = timeout_s
        self.keepalive_s = keepalive_s or max(1.0, min(60.0, timeout_s / 4))
        self.frame_bytes = MIN_FRAME_BYTES  # both ends set the same (frame_bytes_for)
        self.on_lost: Callable[[str], None] = _die  # prints the line and ends the process
        self.watchdog = Watchdog(lambda message: self.on_lost(message))
        self._socks = ring_sockets(self.keepalive_s)  # [] with another backend
        self.buffered_bytes = buffered_bytes(self._socks)
        self.next = (self.rank + 1) % self.size
        self.prev = (self.rank - 1) % self.size

    def widen_receive(self) -> int:
        """Ask for SOCKET_BUFFER_BYTES of receive buffer on this rank's ring sockets (the
        kernel caps it: net.core.rmem_max); the new buffered_bytes. Only where micro-batching
        needs it: a fixed buffer ends the kernel's own sizing of it, and runs of one stream
        with fixed buffers on every socket measured slower here (noisy: 4 runs each)."""
        for sock in self._socks:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
        self.buffered_bytes = max(self.buffered_bytes, buffered_bytes(self._socks))
        return self.buffered_bytes

    @contextlib.contextmanager
    def _guard(self, what: str, peer: int, watch: bool = True) -> Iterator[None]:
        if watch:
            self.watchdog.arm(self.timeout_s, (
                f"pipeline rank {self.rank}: no answer from rank {peer} within "
                f"{self.timeout_s:g} s ({what}); stopping (hint: --pipeline-timeout)"))
        try:
            yield
        except RuntimeError as exc:  # the pipeline cannot go on without it: end at once
            self.on_lost(f"pipeline rank {self.rank}: lost rank {peer} while it {what} "
                         f"({exc}); stopping")
        finally:
            if watch:
                self.watchdog.disarm()

    def send(self, msg: Message, dst: int) -> None:
        """One frame (and the rest of a message larger than one)."""
        mx = self.mx
        blob = json.dumps(msg.meta).encode() if msg.meta else b""
        rows, width = msg.hidden.shape if msg.hidden is not None else (0, 0)
        start = _HEADER_BYTES + len(blob)
        total = start + 4 * rows * width
        buf = np.zeros(max(self.frame_bytes, total), np.uint8)
        buf[:_HEADER_BYTES] = np.array([msg.kind, len(blob), rows, width], np.int32).view(
            np.uint8)
        buf[_HEADER_BYTES:start] = np.frombuffer(blob, np.uint8)
        if msg.hidden is not None:
            buf[start:total] = np.ascontiguousarray(msg.hidden, np.float32).reshape(-1).view(
                np.uint8)
        frame = self.frame_bytes
        with self._guard("was sent a message", dst):
            mx.eval(mx.distributed.send(mx.array(buf[:frame]), dst, group=self.group,
                                        stream=mx.cpu))
            if total > frame:
                mx.eval(mx.distributed.send(mx.array(buf[frame:total]), dst, group=self.group,
                                            stream=mx.cpu))

    def recv(self, src: int, watch: bool = True) -> Message:
        """watch=False: no timeout (a stage waiting for the next pass may wait for ever; a
        dead peer still ends it)."""
        self._wait_readable(src, self.timeout_s if watch else None)
        with self._guard("was to send a message", src, watch):
            frame = self._recv(self.frame_bytes, src)
        kind, nbytes, rows, width = (int(v) for v in frame[:_HEADER_BYTES].view(np.int32))
        start = _HEADER_BYTES + nbytes
        total = start + 4 * rows * width
        if total > len(frame):
            with self._guard("was to send a message", src):
                frame = np.concatenate([frame, self._recv(total - len(frame), src)])
        meta = json.loads(frame[_HEADER_BYTES:start].tobytes()) if nbytes else {}
        hidden = (np.frombuffer(frame[start:total].tobytes(), np.float32).reshape(rows, width)
                  if rows else None)  # a copy: the JSON before it leaves the view unaligned
        return Message(kind, meta, hidden)

    def _wait_readable(self, src: int, timeout_s: float | None) -> None:
        """Sleep in select() until a ring socket has bytes (see the module doc); a socket
        that woke it at its end (the peer closed it) ends the run. Nothing to wait on
        (another backend, sockets not found): the receive waits as it does."""
        if not self._socks:
            return
        ready, _, _ = select.select(self._socks, [], [], timeout_s)
        if not ready:
            self.on_lost(f"pipeline rank {self.rank}: no answer from rank {src} within "
                         f"{timeout_s:g} s; stopping (hint: --pipeline-timeout)")
        for sock in ready:
            if not _alive(sock):
                self.on_lost(f"pipeline rank {self.rank}: lost a peer (its connection "
                             f"{_describe(sock)} closed) while waiting for rank {src}; "
                             "stopping")

    def _recv(self, nbytes: int, src: int) -> np.ndarray:
        mx = self.mx
        a = mx.distributed.recv((nbytes,), mx.uint8, src, group=self.group, stream=mx.cpu)
        mx.eval(a)
        return np.array(a)


def ring_sockets(keepalive_s: float) -> list[socket.socket]:
    """This process's ring connections (ring_fds), each a duplicate socket object, set with
    TCP_NODELAY (micro-batching sends two small messages back to back: Nagle's algorithm held
    the second until the first's delayed ACK, tens of ms) and TCP keepalive probes
    keepalive_s apart once idle that long (3 unanswered: the peer is gone, the socket
    errors, select() wakes)."""
    socks = []
    for fd in ring_fds():
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with contextlib.suppress(OSError, AttributeError):  # not every platform has them all
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(keepalive_s)))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, int(keepalive_s)))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        socks.append(sock)
    return socks


def buffered_bytes(socks: list[socket.socket]) -> int:
    """What a peer may send to this rank, while it reads nothing, before its send blocks: a
    quarter of the smallest receive buffer (the kernel reports twice what was set, and
    advertises about half of it as the window); at least MIN_BUFFERED_BYTES, a Linux
    default's share."""
    sizes = []
    for sock in socks:
        with contextlib.suppress(OSError):
            sizes.append(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 4)
    return max(MIN_BUFFERED_BYTES, min(sizes, default=0))


def ring_fds() -> list[int]:
    """File descriptors of this process's ring connections: TCP sockets established to or
    from a port of MLX_HOSTFILE (the ring backend's hostfile); [] when there is none."""
    try:
        with open(os.environ["MLX_HOSTFILE"]) as f:
            ports = {int(a.rsplit(":", 1)[1]) for node in json.load(f) for a in node}
        conns = psutil.Process().net_connections("tcp")
    except (KeyError, OSError, ValueError, TypeError, psutil.Error):
        return []
    return [c.fd for c in conns if c.status == psutil.CONN_ESTABLISHED and c.fd >= 0
            and (c.laddr.port in ports or (c.raddr and c.raddr.port in ports))]


def _alive(sock: socket.socket) -> bool:
    """A readable socket has bytes (True), or is at its end or in error (False)."""
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return True  # woken, yet nothing to read now: the receive will wait as it does
    except OSError:
        return False


def _describe(sock: socket.socket) -> str:
    try:
        return "{}:{} -> {}:{}".format(*sock.getsockname()[:2], *sock.getpeername()[:2])
    except OSError:
        return "to the peer"


def _die(message: str) -> None:
    print(f"stream-run: {message}", file=sys.stderr, flush=True)
    os._exit(1)


def init_group(timeout_s: float) -> Any:
    """mx.distributed's group (ring backend, as mlx.launch set it up), within timeout_s.

    Raises:
        PipelineError: no distributed environment (not started by mlx.launch).
    """
    import mlx.core as mx

    if not mx.distributed.is_available():
        raise PipelineError("--pipeline: this MLX build has no distributed backend")
    message = (f"pipeline rank {os.environ.get('MLX_RANK', '?')}: could not reach the other "
               f"ranks within {timeout_s:g} s (hint: the hostfile's addresses and ports)")
    # the ring's connect holds the GIL while it retries: a thread could not fire in time
    watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()),
                                 str(timeout_s), message], stdin=subprocess.DEVNULL)
    try:
        group = mx.distributed.init(strict=True, backend="ring")
    except RuntimeError as exc:
        raise PipelineError(f"pipeline rank {os.environ.get('MLX_RANK', '?')}: could not "
                            f"join the ring ({exc})") from None
    finally:
        watchdog.kill()
        watchdog.wait()
    return group
