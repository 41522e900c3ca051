"""Micro-batching over a pipeline's stages (rank 0 of engine/pipeline.py).

One pass over the whole pipeline leaves every rank but one idle: while rank 1 runs its blocks,
rank 0 waits for the rows to come back. With several concurrent requests the batcher here cuts
the running sequences into up to `groups` micro-batches (by default as many as ranks) and keeps
one pass of each in flight around the ring: rank 0 runs the embedding and its blocks for
micro-batch B and sends it on while rank 1 runs micro-batch A; when A's rows come back rank 0
runs the head, samples, and sends A's next tokens on. Passes leave and come back in order (the
ring is FIFO), so the results are landed oldest first.

Attention is per sequence and linear layers are per row, so a sequence's rows compute what they
would in any batch, up to the kernels' summation order for a given number of rows (issue 19:
not bit-exact across row counts for every GGUF type); the tests check that greedy tokens equal
one process's, on tiny models and SmolLM2. What it costs:
each micro-batch is its own pass over every rank's units, so a layer that is not resident is
read once per micro-batch instead of once per token step (docs/pipeline.md).

One sequence alone (or groups == 1) runs the single-pass path of the plain Batcher. `when`
decides, before each run of passes, whether to micro-batch at all (a pipeline's auto setting:
only while its layers are resident).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stream_run.engine.batching import Batcher, SeqState, pass_rows
from stream_run.models.base import Batch
from stream_run.scheduler import RunStats


@dataclass
class Flight:
    """A pass sent on, not yet back: its sequences and rows, when it started, its first half's
    stats (rank 0's embedding and blocks)."""

    batch: list[tuple[SeqState, list[int]]]
    rows: Batch
    t0: float
    front: RunStats
    result_bytes: int


class MicroBatcher(Batcher):
    """A Batcher whose runner splits a pass in two (send_pass, finish_pass) and keeps up to
    `groups` passes in flight."""

    groups = 2
    row_bytes = 4  # bytes of one row coming back (the engine sets: 4 x hidden size)
    frame_bytes = 0  # the least a message takes on the wire (the link's frame)
    # The most bytes of results (rows coming back to rank 0) that may be on their way at once
    # while rank 0 sends another pass: the last rank's sends must fit rank 0's socket buffer
    # while rank 0 is still in its own send, else both would wait on each other (the engine
    # sets the link's Link.buffered_bytes).
    slack_bytes = 64 * 1024
    widen: Callable[[], int] | None = None  # asked once for more slack when a pass needs it
    passes_overlapped = 0  # passes sent on while another was in flight
    when: Callable[[], bool] | None = None  # asked before each run of passes: None, always

    async def _drain(self) -> None:
        flights: collections.deque[Flight] = collections.deque()
        groups = self.groups if self.when is None or self.when() else 1
        while True:
            await self._admit()
            self._reap()
            busy = {id(seq) for f in flights for seq, _ in f.batch}
            free = [seq for seq in self.active if id(seq) not in busy]
            if not free and not flights:
                return
            self._release_retired()
            if free and len(flights) < groups:
                size = -(-len(self.active) // groups)  # ceil: as even as the count allows
                group = free[:size]
                back = self._result_bytes(len(group))  # a logit row each (drafts add few)
                solo = not flights and len(group) == len(self.active)
                waiting = back + sum(f.result_bytes for f in flights)
                if flights and waiting > self.slack_bytes and self.widen is not None:
                    self.slack_bytes, self.widen = self.widen(), None
                if solo or not flights or waiting <= self.slack_bytes:
                    batch = self._plan(group)
                    await self._add_drafts(batch)
                    if solo:
                        await self._step(batch)  # one micro-batch: the single-pass path
                    else:
                        flights.append(await self._send(batch))
                        self.passes_overlapped += len(flights) > 1
                    continue
            await self._land(flights.popleft())

    async def _send(self, batch: list[tuple[SeqState, list[int]]]) -> Flight:
        rows = pass_rows(batch)
        t0 = time.perf_counter()
        runner: Any = self.runner
        front = await runner.send_pass(rows, more=self._more(batch))
        return Flight(batch, rows, t0, front, self._result_bytes(len(rows.logit_rows)))

    def _result_bytes(self, rows: int) -> int:
        """What a pass's result takes on the wire: its rows, or the frame they fit in."""
        return max(self.frame_bytes, self.row_bytes * rows + 64)

    async def _land(self, flight: Flight) -> None:
        runner: Any = self.runner
        logits, rs = await runner.finish_pass(flight.rows)
        rs.add(flight.front)
        await self._after_pass(flight.batch, logits, rs, flight.t0)
