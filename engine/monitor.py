"""Live statistics of an engine's passes, for watchers (stream-serve's /v1/stream-stats and
its page): where each unit is, and the recent passes' tokens, bytes, disk rate, I/O stall and
hit rates.

Pushed, not polled: while someone watches, the scheduler tells the monitor as each compute call
starts (LayerScheduler.observer) and the batcher after each pass (Batcher.on_pass); a frame is
built at most once per watcher interval from those events and the cache's public counters.
With nobody watching both hooks are None: the hot path pays one attribute test per step.

Everything here runs on the engine's event loop. A watcher that falls behind loses its oldest
frames (a bounded queue); it never slows a pass.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stream_run.scheduler.loop import UNIT_STATES

if TYPE_CHECKING:
    from stream_run.engine.batching import PassRecord
    from stream_run.engine.engine import Engine
    from stream_run.scheduler import RunStats

WINDOW_S = 3.0  # the recent passes a frame's rates are taken over
QUEUE_FRAMES = 4  # frames a watcher may fall behind before its oldest are dropped
MIN_INTERVAL_S = 0.02


@dataclass(frozen=True)
class _Pass:
    t: float  # perf_counter at its end
    n_seqs: int
    n_decode: int  # decoding rows, a token each (a first token, sampled after the last prompt
    # pass, is not counted: that pass is prefill)
    n_prompt: int  # prompt rows
    bytes_read: int
    wall_s: float
    compute_s: float
    io_stall_s: float
    disk_busy_s: float
    hits: int
    misses: int
    late_hits: int
    late_misses: int


class Watch:
    """One watcher's frames: `async for frame in watch` (dicts, see StreamMonitor.frame);
    leave with `close()` or `async with`. A frame comes at most every interval_s while passes
    run, and one every idle_s when nothing runs."""

    def __init__(self, monitor: StreamMonitor, interval_s: float, idle_s: float) -> None:
        self._monitor = monitor
        self.interval_s = max(MIN_INTERVAL_S, interval_s)
        self.idle_s = idle_s
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE_FRAMES)
        self.last = 0.0  # perf_counter of the last frame queued
        self.dropped = 0
        self.ended = False

    def offer(self, frame: dict[str, Any] | None, now: float) -> None:
        """Queue a frame (None: the end), dropping the oldest when the queue is full."""
        if self.ended:
            return
        self.last = now
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(frame)

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> dict[str, Any]:
        try:
            frame = await asyncio.wait_for(self.queue.get(), self.idle_s)
        except TimeoutError:  # nothing ran: the state as it is now
            if self.ended:
                raise StopAsyncIteration from None
            now = time.perf_counter()
            self.last = now
            return self._monitor.frame(now)
        if frame is None:
            raise StopAsyncIteration
        return frame

    def end(self) -> None:
        """End the iteration after the frames already queued (the server shuts down)."""
        self.offer(None, time.perf_counter())
        self.ended = True

    def close(self) -> None:
        self._monitor.unwatch(self)

    async def __aenter__(self) -> Watch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class StreamMonitor:
    """The engine's watchers and the recent passes they are shown (Engine.monitor)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._watches: list[Watch] = []
        self._recent: collections.deque[_Pass] = collections.deque()
        self.keys = _unit_keys(engine.runner.model.units())
        self.totals = {"passes": 0, "decode_tokens": 0, "prompt_tokens": 0, "bytes_read": 0}

    @property
    def watching(self) -> bool:
        return bool(self._watches)

    def watch(self, interval_s: float = 0.1, idle_s: float = 1.0) -> Watch:
        """Start watching (hooks attach with the first watcher, detach with the last)."""
        w = Watch(self, interval_s, idle_s)
        self._watches.append(w)
        if len(self._watches) == 1:
            self._engine.scheduler.observer = self._on_step
            self._engine.batcher.on_pass = self._on_pass
        w.offer(self.frame(), time.perf_counter())
        return w

    def end_watches(self) -> None:
        """End every watcher's iteration (Watch.end), e.g. as a server shuts down."""
        for w in list(self._watches):
            w.end()

    def unwatch(self, w: Watch) -> None:
        if w in self._watches:
            self._watches.remove(w)
        if not self._watches:
            self._engine.scheduler.observer = None
            self._engine.batcher.on_pass = None
            self._recent.clear()

    def model_info(self) -> dict[str, Any]:
        """What does not change per frame: the units in pass order with their bytes, the
        budget, and the state letters."""
        e = self._engine
        raw = e.source.index.units
        return {
            "units": [{"key": k, "bytes": e.units.prepared_nbytes(k),
                       "file_bytes": raw[k].nbytes} for k in self.keys],
            "budget_bytes": e.cache.compute.budget_bytes,
            "host_budget_bytes": e.cache.host.budget_bytes,
            "model_bytes": e.model_bytes,
            "states": UNIT_STATES,
            "window_s": WINDOW_S,
        }

    def _on_step(self, units: Sequence[str]) -> None:
        now = time.perf_counter()
        due = [w for w in self._watches if now - w.last >= w.interval_s]
        if due:
            frame = self.frame(now)
            for w in due:
                w.offer(frame, now)

    def _on_pass(self, record: PassRecord, rs: RunStats) -> None:
        now = time.perf_counter()
        n_decode = record.n_seqs - record.n_prefill
        p = _Pass(now, record.n_seqs, n_decode, record.n_tokens - n_decode, record.bytes_read,
                  record.wall_s, record.compute_s, record.io_stall_s, rs.disk_busy_s, rs.hits,
                  rs.misses, rs.late_hits, rs.late_misses)
        self._recent.append(p)
        t = self.totals
        t["passes"] += 1
        t["decode_tokens"] += p.n_decode
        t["prompt_tokens"] += p.n_prompt
        t["bytes_read"] += p.bytes_read
        self._on_step(())

    def frame(self, now: float | None = None) -> dict[str, Any]:
        """The state now: each unit's letter (model_info's order), the recent passes' rates,
        the tiers' counters and the running totals."""
        now = time.perf_counter() if now is None else now
        while self._recent and now - self._recent[0].t > WINDOW_S:
            self._recent.popleft()
        e = self._engine
        return {
            "t": time.time(),
            "units": e.scheduler.unit_states(self.keys),
            "depth": e.scheduler.depth,
            "active": e.batcher.n_active,
            "waiting": e.batcher.n_waiting,
            "recent": _rates(self._recent),
            "tiers": {tier.name: {"hits": tier.stats.hits, "misses": tier.stats.misses,
                                  "hit_rate": tier.stats.hit_rate, "used_bytes": tier.used_bytes,
                                  "budget_bytes": tier.budget_bytes}
                      for tier in (e.cache.compute, e.cache.host)},
            "disk": {"bytes_read": e.cache.disk_bytes_read, "reads": e.cache.disk_reads},
            "totals": dict(self.totals),
        }


def _rates(passes: Sequence[_Pass]) -> dict[str, Any]:
    """Sums and rates over these passes (decode rates over the passes that decoded)."""
    dec = [p for p in passes if p.n_decode]
    wall = sum(p.wall_s for p in passes)
    dec_wall = sum(p.wall_s for p in dec)
    tokens = sum(p.n_decode for p in dec)
    busy = sum(p.disk_busy_s for p in passes)
    nbytes = sum(p.bytes_read for p in passes)
    hits, misses = sum(p.hits for p in passes), sum(p.misses for p in passes)
    lh, lm = sum(p.late_hits for p in passes), sum(p.late_misses for p in passes)
    return {
        "passes": len(passes),
        "decode_tokens": tokens,
        "prompt_tokens": sum(p.n_prompt for p in passes),
        "tokens_per_s": tokens / dec_wall if dec_wall > 0 else 0.0,
        "bytes_per_token": sum(p.bytes_read for p in dec) / tokens if tokens else 0.0,
        "bytes_read": nbytes,
        "disk_bytes_per_s": nbytes / busy if busy > 0 else 0.0,  # while a read was in flight
        "read_bytes_per_s": nbytes / wall if wall > 0 else 0.0,  # over the passes' wall time
        "disk_busy_share": busy / wall if wall > 0 else 0.0,
        "io_stall_share": sum(p.io_stall_s for p in passes) / wall if wall > 0 else 0.0,
        "compute_share": sum(p.compute_s for p in passes) / wall if wall > 0 else 0.0,
        "unit_hit_rate": hits / (hits + misses) if hits + misses else None,
        "expert_hit_rate": lh / (lh + lm) if lh + lm else None,
        "batch": max((p.n_seqs for p in passes), default=0),
    }


def _unit_keys(units: Sequence[Any]) -> list[str]:
    """Each unit once, in pass order (a late-bound call's candidates in their order)."""
    out: dict[str, None] = {}
    for u in units:
        for k in (u if isinstance(u, tuple) else getattr(u, "candidates", ())):
            out.setdefault(k, None)
    return list(out)
