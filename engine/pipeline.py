"""Pipeline stages over mx.distributed: each rank streams its own contiguous range of layers.

Rank 0 is a whole Engine (tokenizer, batcher, sampling, the embedding and the head); ranks
1..N-1 run only their blocks. A pass on rank 0 runs the embedding and its own blocks, then
one call with no units that sends the hidden state to rank 1 and waits for it to come back
from rank N-1 (the last block's output), then the head. The head lives on rank 0 in every
case: tied to the embedding it must, and untied the hidden rows that come back are smaller
than the logits would be (E against V per row). Each rank streams its units under its own
memory budget, with the same scheduler, cache and policy as one process.

The messages travel the ring 0 -> 1 -> ... -> N-1 -> 0 (the ring backend's send/recv reach
neighbours only); engine/pipeline_link.py frames them (each sequence's id, offset, ids, span
end, cache length and logit rows, the sequences rank 0 has dropped, and the hidden rows
float32). The last rank sends back only the rows the head needs. A numpy backend converts at
the boundary (mx.array <-> numpy). Every link operation runs on the scheduler's compute thread
(the one thread that touches MLX).

Concurrent requests: rank 0 keeps up to `microbatches` passes in flight around the ring, each
over part of the running sequences (engine/microbatch.py), so the ranks compute at once.

Failure: a peer that closes its socket ends the run with one line (PipelineError's, or the
link's); a peer that stops answering inside a pass is caught by the link's watchdog
(timeout_s), and one that vanishes while the ranks wait for the next pass by TCP keepalive.
mlx.launch, or our launcher, ends the other ranks when one exits with an error (their SIGTERM
handler prints one line too: cli/pipeline.py).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stream_run.engine.engine import Engine
from stream_run.engine.microbatch import MicroBatcher
from stream_run.engine.pipeline_link import (
    DEFAULT_TIMEOUT_S,
    IDLE,
    PASS,
    RESULT,
    STOP,
    Link,
    Message,
    PipelineError,
    frame_bytes_for,
    init_group,
)
from stream_run.engine.runner import PassRunner
from stream_run.loaders import EMBED, HEAD, ModelSource
from stream_run.models.base import Batch, Call, LateUnits, SeqRows, Units
from stream_run.scheduler import RunStats

__all__ = ["DEFAULT_TIMEOUT_S", "Link", "Message", "PipelineEngine", "PipelineError",
           "PipelineRunner", "Stage", "StageModel", "init_group", "layer_of", "split_layers"]

log = logging.getLogger(__name__)


def layer_of(key: str) -> int | None:
    """The layer a unit key or call name belongs to ("layers.3", "layers.3.experts.5",
    "layers.3.experts"); None for the embedding and the head."""
    parts = key.split(".")
    return int(parts[1]) if parts[0] == "layers" and len(parts) > 1 else None


@dataclass(frozen=True)
class Stage:
    """What rank `rank` of `size` runs: layers [start, stop). Rank 0 also has embed and head."""

    rank: int
    size: int
    start: int
    stop: int

    def owns(self, key: str) -> bool:
        layer = layer_of(key)
        return self.rank == 0 if layer is None else self.start <= layer < self.stop

    @property
    def describe(self) -> str:
        extra = " + embedding and head" if self.rank == 0 else ""
        layers = f"layers {self.start}..{self.stop - 1}" if self.stop > self.start \
            else "no layers"
        return f"rank {self.rank}/{self.size}: {layers}{extra}"


def split_layers(sizes: Sequence[int], fixed: int, ranks: int,
                 counts: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """Layer ranges [start, stop) per rank. counts: layers per rank as given (--pipeline-split);
    else by bytes: rank 0 carries `fixed` (embedding and head) beside its blocks, and each
    rank's boundary falls where the running total of bytes is nearest its even share. Every
    rank past 0 gets at least one layer.

    Raises:
        ValueError: counts that do not sum to the layers, or a rank past 0 with none; more
            ranks than layers + 1.
    """
    n = len(sizes)
    if ranks < 2 or ranks - 1 > n:
        raise ValueError(f"{ranks} pipeline ranks need 2..{n + 1} (the model has {n} layers)")
    if counts is not None:
        if len(counts) != ranks or sum(counts) != n or min(counts) < 0 \
                or min(counts[1:]) < 1:
            raise ValueError(f"--pipeline-split {','.join(map(str, counts))}: give {ranks} "
                             f"layer counts summing to {n}, each rank past 0 at least 1")
        bounds = np.cumsum([0, *counts]).tolist()
        return [(bounds[r], bounds[r + 1]) for r in range(ranks)]
    cum = np.cumsum([fixed, *sizes]).astype(np.float64)  # cum[i]: fixed + layers before i
    total = cum[-1]
    bounds = [0]
    for r in range(1, ranks):
        target = total * r / ranks
        b = int(np.argmin(np.abs(cum - target)))
        lo, hi = bounds[-1] + (1 if r > 1 else 0), n - (ranks - r)
        bounds.append(min(max(b, lo), hi))
    bounds.append(n)
    return [(bounds[r], bounds[r + 1]) for r in range(ranks)]


class StageModel:
    """A model seen by one stage: units() are the stage's units only (residency plan, minimum
    budget); everything else is the whole model's."""

    def __init__(self, inner: Any, stage: Stage) -> None:
        self.inner = inner
        self.stage = stage

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def units(self) -> list[Units | LateUnits]:
        out: list[Units | LateUnits] = []
        for u in self.inner.units():
            keys = u.candidates if isinstance(u, LateUnits) else u
            if keys and self.stage.owns(keys[0]):
                out.append(u)
        return out or [()]

    def stage_calls(self, batch: Batch, tile_rows: int | None) -> tuple[list[Call], list[Call],
                                                                         list[Call]]:
        """The whole pass's calls cut in three: before the hand-off (rank 0: embed and its
        blocks), this stage's blocks, after (rank 0: the head)."""
        calls = self.inner.calls(batch, tile_rows)
        head = [c for c in calls if c.name == "head"]
        body = [c for c in calls if c.name not in ("embed", "head")
                and self.stage.owns(c.name)]
        if self.stage.rank == 0:
            return [calls[0], *body], [], head
        return [], body, []


def _as_rows(ops: Any, h: Any) -> np.ndarray:
    """A (1, T, E) hidden state as (T, E) float32 numpy."""
    a = np.asarray(ops.to_numpy(h), dtype=np.float32)
    return a.reshape(-1, a.shape[-1])


class PipelineRunner(PassRunner):
    """A PassRunner whose passes run one stage and hand the hidden state on (see module doc)."""

    link: Link
    stage: Stage

    def attach(self, link: Link, stage: Stage) -> None:
        self.link, self.stage = link, stage
        self._more = False
        self.outstanding = 0  # rank 0: passes sent on (send_pass) whose rows are not back
        self._sids: dict[int, int] = {}  # id(kv) -> sequence id (rank 0)
        self._dropped: list[int] = []
        self._next_sid = 0
        self._hidden_in: np.ndarray | None = None
        self._meta_in: dict[str, Any] = {}

    async def run(self, batch: Batch, more: bool = False) -> tuple[np.ndarray, Any]:
        self._more = more
        return await super().run(batch, more)

    def steps(self, batch: Batch) -> list[Any]:
        before, body, after = self.model.stage_calls(batch, self.tile_rows)
        if self.stage.rank == 0:
            meta = self._pass_meta(batch)
            hand = Call((), lambda x, _w: self._hand_off(meta, x), "pipeline")
            return [*before, hand, *after]
        recv = Call((), lambda _x, _w: self.model.ops.from_numpy(self._hidden_in[None]),
                    "pipeline.in")
        out = Call((), lambda x, _w: self._forward(x, batch), "pipeline.out")
        return [recv, *body, out]

    async def send_pass(self, batch: Batch, more: bool = False) -> RunStats:
        """Rank 0, micro-batching (engine/microbatch.py): the first half of a pass, the
        embedding and this rank's blocks, its rows sent on; finish_pass takes them back. The
        KV caches advance here (rank 0's blocks have written them)."""
        self._more = more
        if self.units.reader.config.read_mode == "mmap":
            self.units.reader.check_files()
        before, _, _ = self.model.stage_calls(batch, self.tile_rows)
        meta = self._pass_meta(batch)
        send = Call((), lambda x, _w: self._send_on(meta, x), "pipeline.out")
        _, stats = await self.scheduler.run([*before, send], cyclic=True,
                                            scratch_bytes=self.scratch_bytes(batch))
        for seq in batch.seqs:
            seq.kv.advance(len(seq.ids))
        return stats

    async def finish_pass(self, batch: Batch) -> tuple[np.ndarray, RunStats]:
        """Rank 0: the oldest pass sent on comes back; its logits (the head on rank 0).
        cyclic: reads carried for the next pass's first units stay in flight."""
        _, _, after = self.model.stage_calls(batch, self.tile_rows)
        back = Call((), lambda _x, _w: self._take_back(), "pipeline.in")
        return await self.scheduler.run([back, *after], cyclic=True)

    def all_resident(self) -> bool:
        """Whether the residency plan keeps every unit of this stage resident."""
        keys = {k for u in self.model.units()
                for k in (u.candidates if isinstance(u, LateUnits) else u)}
        return keys <= self.scheduler.resident

    def flush(self) -> None:
        """Rank 0 (compute thread): take back, and drop, the passes sent on that nobody will
        finish (a batcher that failed or was cancelled between the halves)."""
        while self.outstanding:
            self._take_back()

    def _send_on(self, meta: dict[str, Any], h: Any) -> None:
        self.link.send(Message(PASS, meta, _as_rows(self.model.ops, h)), self.link.next)
        self.outstanding += 1

    def _take_back(self) -> Any:
        link = self.link
        back = link.recv(link.prev)
        self.outstanding -= 1
        if back.kind != RESULT or back.hidden is None:
            raise PipelineError(f"pipeline rank 0: rank {link.prev} answered message kind "
                                f"{back.kind}, not a pass's result")
        return self.model.ops.from_numpy(back.hidden[None])

    def _sid(self, kv: Any) -> int:
        sid = self._sids.get(id(kv))
        if sid is None:
            sid = self._sids[id(kv)] = self._next_sid
            self._next_sid += 1
            weakref.finalize(kv, self._forget, id(kv), sid)
        return sid

    def _forget(self, key: int, sid: int) -> None:
        self._sids.pop(key, None)
        self._dropped.append(sid)

    def _pass_meta(self, batch: Batch) -> dict[str, Any]:
        seqs = [[self._sid(s.kv), int(s.kv.offset), [int(t) for t in s.ids], s.span_end,
                 int(s.kv.max_len), s.n_logits] for s in batch.seqs]
        dropped, self._dropped = self._dropped, []
        return {"seqs": seqs, "all_logits": batch.all_logits, "more": self._more,
                "drop": dropped}

    def _hand_off(self, meta: dict[str, Any], h: Any) -> Any:
        """Rank 0: the hidden state to rank 1, and back from the last rank."""
        self._send_on(meta, h)
        return self._take_back()

    def _forward(self, h: Any, batch: Batch) -> None:
        """Ranks past 0: the rows on; the last rank sends back only the rows the head needs
        (each sequence's last, or its last n_logits), as rank 0's head would pick them."""
        link, rows = self.link, _as_rows(self.model.ops, h)
        if link.next != 0:
            link.send(Message(PASS, self._meta_in, rows), link.next)
            return
        if not batch.all_logits and len(rows) != len(batch.logit_rows):
            rows = rows[batch.logit_rows]
        link.send(Message(RESULT, {}, rows), link.next)

    def send_control(self, kind: int) -> None:
        """Rank 0: IDLE or STOP down the chain (compute thread)."""
        self.link.send(Message(kind), self.link.next)


class PipelineEngine(Engine):
    """An Engine that runs one pipeline stage (rank 0: the whole API; other ranks: serve())."""

    runner_class = PipelineRunner

    def __init__(self, source: ModelSource, config: Any, link: Link,
                 split: Sequence[int] | None = None, microbatches: int | None = None) -> None:
        """microbatches: passes rank 0 keeps in flight around the ring for concurrent
        requests (engine/microbatch.py); 1: one pass at a time; None (auto): one per rank
        while rank 0's residency plan keeps all its units resident, else one (a streamed
        layer would be read once per micro-batch; the ranks' byte shares and budgets being
        alike, rank 0's plan stands for theirs)."""
        if config.kv_cache_budget_bytes:
            raise ValueError("--kv-cache-budget: the prefix cache is not supported with "
                             "--pipeline (each rank holds its own layers' KV)")
        self.link = link
        self._split = split
        self.microbatches_auto = microbatches is None
        self.microbatches = link.size if microbatches is None else microbatches
        if self.microbatches < 1:
            raise ValueError(f"--pipeline-microbatches must be >= 1, got {self.microbatches}")
        if link.rank == 0 and self.microbatches > 1:
            self.batcher_class = MicroBatcher
        super().__init__(source, config)
        link.frame_bytes = frame_bytes_for(self.spec.hidden_size)
        self.runner.attach(link, self.stage)
        if isinstance(self.batcher, MicroBatcher):
            self.batcher.groups = self.microbatches
            if self.microbatches_auto:
                self.batcher.when = self.runner.all_resident
            self.batcher.row_bytes = 4 * self.spec.hidden_size
            self.batcher.frame_bytes = link.frame_bytes
            self.batcher.slack_bytes = link.buffered_bytes
            self.batcher.widen = link.widen_receive
        if link.rank == 0:
            self.runner.idle = self._idle  # type: ignore[method-assign]
        self._closed = False
        self.served_bytes_read = 0  # ranks past 0: what their passes read
        self.served_positions = 0  # and the longest sequence they held KV for

    def stage_model(self, model: Any) -> Any:
        spec = model.spec
        index = self.source.index
        sizes = [sum(self.units.prepared_nbytes(k) for k in index.units if layer_of(k) == i)
                 for i in range(spec.num_hidden_layers)]
        fixed = sum(self.units.prepared_nbytes(k) for k in index.units if k in (EMBED, HEAD))
        ranges = split_layers(sizes, fixed, self.link.size, self._split)
        start, stop = ranges[self.link.rank]
        self.stage = Stage(self.link.rank, self.link.size, start, stop)
        self.stage_ranges = ranges
        return StageModel(model, self.stage)

    async def _idle(self) -> None:
        await PassRunner.idle(self.runner)
        await self.scheduler.run_on_compute(self.runner.flush)
        await self.scheduler.run_on_compute(self.runner.send_control, IDLE)

    def close(self) -> None:
        if self.link.rank == 0 and not self._closed:
            self._closed = True
            try:
                self.scheduler.call_on_compute(self.runner.send_control, STOP)
            except PipelineError as exc:
                log.warning("%s", exc)
        super().close()

    @classmethod
    async def open_stage(cls, model: str, config: Any, link: Link,
                         split: Sequence[int] | None = None,
                         microbatches: int | None = None) -> PipelineEngine:
        import asyncio

        from stream_run.models import open_model

        return await asyncio.to_thread(lambda: cls(open_model(model), config, link, split,
                                                   microbatches))

    async def serve(self, on_stop: Callable[[], None] | None = None) -> None:
        """Ranks past 0: run passes as they come until rank 0 says STOP."""
        assert self.link.rank != 0
        runner, link = self.runner, self.link
        kvs: dict[int, Any] = {}
        while True:
            msg = await self.scheduler.run_on_compute(link.recv, link.prev, False)
            if msg.kind in (IDLE, STOP) and link.next != 0:
                await self.scheduler.run_on_compute(link.send, Message(msg.kind), link.next)
            if msg.kind == STOP:
                break
            if msg.kind == IDLE:
                await PassRunner.idle(runner)
                continue
            if msg.kind != PASS or msg.hidden is None:
                raise PipelineError(f"pipeline rank {link.rank}: unexpected message kind "
                                    f"{msg.kind} from rank {link.prev}")
            for sid in msg.meta["drop"]:
                kvs.pop(sid, None)
            seqs = []
            for sid, offset, ids, span_end, max_len, n_logits in msg.meta["seqs"]:
                kv = kvs.get(sid)
                if kv is None:
                    kv = kvs[sid] = await runner.make_kv_cache(max_len)
                kv.offset = offset  # rank 0's cache may have been trimmed
                seqs.append(SeqRows(np.asarray(ids, np.int64), kv, span_end, n_logits))
            runner._hidden_in, runner._meta_in = msg.hidden, msg.meta
            _, stats = await runner.run(Batch(seqs, msg.meta["all_logits"]),
                                        msg.meta["more"])
            self.served_bytes_read += stats.bytes_read
            self.served_positions = max([self.served_positions,
                                         *(o + len(i) for _, o, i, *_ in msg.meta["seqs"])])
            runner._hidden_in = None
        if on_stop is not None:
            on_stop()
