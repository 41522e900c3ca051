"""Continuous batching: one task owns the forward passes; requests join and leave between them.

Every pass walks the model's units once (embed, blocks, head) for all active sequences: a
decoding sequence feeds its last token, a new one feeds its prompt, so a streamed layer is read
once per step however many requests share it.

Prompts (layer-major prefill): with no sequence decoding, a pass takes as many prompt rows as
the prefill memory allows (PassRunner.prefill_rows), so a prompt that fits goes through each
unit once, whatever its length, and each block computes its rows in tiles of prefill_chunk
rows. With sequences decoding, a pass carries at most prefill_chunk prompt rows beside their
tokens: the decoders need a pass per token anyway, so the prompt's chunks cost no extra reads,
and a decoder waits at most one chunk's compute for its next token instead of a whole long
prompt's (the trade-off: a prompt that arrives while others decode is read once per chunk).

Each sequence has its own KV cache, sampler, stop conditions and output slot; the consumer
(Engine.generate) drains the slot.

Cancellation: a consumer that goes away marks its sequence cancelled. If every sequence of the
running pass is cancelled, the pass is cancelled and stops at the next layer boundary (the
scheduler finishes the layer in flight and drops its reads); otherwise the sequence leaves
after the pass. Either way its KV cache is dropped with it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stream_run.engine.errors import QueueFullError
from stream_run.engine.prefix_cache import PrefixCache
from stream_run.engine.request import Chunk, GenerationParams, StopFilter
from stream_run.engine.runner import PassRunner
from stream_run.engine.sampling import Sampler, TokenLogprob
from stream_run.engine.speculative import (
    MAX_PASS_ROWS,
    PassCost,
    SpecState,
    Speculation,
    cut_for_cost,
    draft_with_model,
    settle_draft_kv,
    sweep_rows,
    verify,
)
from stream_run.engine.stats import GenerationStats, peak_rss_bytes
from stream_run.engine.tokenizer import StreamingDetokenizer, Tokenizer
from stream_run.models.base import Batch, SeqRows
from stream_run.scheduler import RunStats

log = logging.getLogger(__name__)

@dataclass
class PassRecord:
    """One forward pass of the batcher: how many sequences and tokens, what it read."""

    n_seqs: int
    n_tokens: int  # rows through the linear layers (1 per decoding sequence + prompt chunks)
    n_prefill: int  # sequences that fed a prompt chunk
    bytes_read: int
    wall_s: float
    compute_s: float = 0.0  # the pass's compute on the compute thread
    io_stall_s: float = 0.0  # compute waiting for reads


@dataclass(eq=False)
class SeqState:
    """A request inside the batcher: prompt, generation state, KV cache and output slot."""

    id: int
    prompt: list[int]
    params: GenerationParams
    sampler: Sampler
    stops: set[int]
    detok: StreamingDetokenizer
    text_filter: StopFilter
    history: list[int] = field(default_factory=list)
    kv: Any = None
    n_prefilled: int = 0  # prompt tokens already in the KV cache
    generated: int = 0
    pending: list[int] = field(default_factory=list)  # ids not yet in a yielded chunk
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)  # theirs, when asked
    stats: GenerationStats = field(default_factory=GenerationStats)
    run: RunStats = field(default_factory=RunStats)
    t_submit: float = field(default_factory=time.perf_counter)
    t_start: float = 0.0
    t_first: float = 0.0
    spec: SpecState | None = None  # speculative decoding (None: off)
    cancelled: bool = False
    done: bool = False
    finish_reason: str | None = None
    out: collections.deque = field(default_factory=collections.deque)  # Chunk | BaseException
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def prefilling(self) -> bool:
        return self.n_prefilled < len(self.prompt)

    def push(self, item: Chunk | BaseException) -> None:
        self.out.append(item)
        self.ready.set()

    async def next(self) -> Chunk:
        """The next chunk for the consumer; raises the error that ended the sequence."""
        while not self.out:
            self.ready.clear()
            await self.ready.wait()
        item = self.out.popleft()
        if isinstance(item, BaseException):
            raise item
        return item


class Generation:
    """A submitted request (Engine.submit): async-iterate it for Chunks, the last with the
    finish reason; `aclose()` (or leaving `async with`) cancels it if it is still running
    and returns once the batcher has let go of it."""

    def __init__(self, batcher: Batcher, seq: SeqState) -> None:
        self._batcher = batcher
        self.seq = seq
        self._ended = False

    @property
    def prompt_tokens(self) -> int:
        return len(self.seq.prompt)

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> Chunk:
        if self._ended:
            raise StopAsyncIteration
        try:
            chunk = await self.seq.next()
        except BaseException:
            self._ended = True
            raise
        self._ended = chunk.finish_reason is not None
        return chunk

    async def aclose(self) -> None:
        self._ended = True
        await self._batcher.release(self.seq)

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class Batcher:
    """Owns the engine's forward passes while requests are active (one task, started on
    demand and ended when idle, so an engine can serve one event loop after another)."""

    def __init__(self, runner: PassRunner, lock: asyncio.Lock, tokenizer: Tokenizer,
                 max_batch: int, max_queue: int | None, prefill_chunk: int) -> None:
        """lock: held for each run of passes (Engine.logits takes it too)."""
        self.runner = runner
        self.lock = lock
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.waiting: collections.deque[SeqState] = collections.deque()
        self.active: list[SeqState] = []
        self.passes: collections.deque[PassRecord] = collections.deque(maxlen=4096)
        self.pass_cost = PassCost()  # decoding passes' seconds by rows (speculative cuts)
        self.finished: collections.Counter[str] = collections.Counter()
        self.passes_cancelled = 0  # passes stopped at a layer boundary (nobody wanted them)
        self.on_pass: Callable[[PassRecord, RunStats], None] | None = None  # after each pass
        self._retired: list[SeqState] = []
        self._task: asyncio.Task[None] | None = None
        self._pass: asyncio.Task[Any] | None = None
        self._pass_seqs: list[SeqState] = []
        self._ids = 0
        # finished requests' KV, kept for later prompts that start like them (Engine sets it
        # with kv_cache_budget_bytes); _keep: (ids fed, cache) to copy in after the pass
        self.prefix: PrefixCache | None = None
        self._keep: list[tuple[list[int], Any]] = []
        self.speculation = Speculation()  # the engine sets its defaults and draft model

    @property
    def n_active(self) -> int:
        """Sequences holding a batch slot (and a KV cache)."""
        return len(self.active)

    @property
    def n_waiting(self) -> int:
        return len(self.waiting)

    @property
    def kv_bytes(self) -> int:
        """Bytes of the KV caches held by active sequences."""
        return sum(int(s.kv.nbytes) for s in self.active if s.kv is not None)

    def submit(self, seq: SeqState) -> None:
        """Queue a sequence; the batcher task starts if it is not running.

        Raises:
            QueueFullError: max_queue sequences already wait for a slot.
        """
        if (self.max_queue is not None
                and len(self.active) + len(self.waiting) >= self.max_batch + self.max_queue):
            raise QueueFullError(
                f"request queue is full ({len(self.waiting)} waiting, {len(self.active)} "
                f"running, max_batch={self.max_batch}, max_queue={self.max_queue}); retry later")
        self.waiting.append(seq)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    def new_seq(self, prompt: list[int], params: GenerationParams) -> SeqState:
        tok = self.tokenizer
        # a constrained request (response_format json_object) samples token by token: its
        # recognizer advances with each token, which a rejected draft would have to undo
        spec = None if params.sampling.constraint is not None else \
            self.speculation.state_for(params.speculative, params.num_draft_tokens)
        self._ids += 1
        return SeqState(
            id=self._ids, prompt=list(prompt), params=params, sampler=Sampler(params.sampling),
            stops=set() if params.ignore_eos else set(tok.eos_token_ids),
            detok=tok.detokenizer(), text_filter=StopFilter(params.stop), history=list(prompt),
            spec=spec)

    def cancel(self, seq: SeqState) -> None:
        """Cancel a sequence (its consumer went away). Called on the event loop."""
        if seq.done or seq.cancelled:
            return
        seq.cancelled = True
        if seq in self.waiting:
            self.waiting.remove(seq)
            self._finish(seq, "cancelled")
            self._release(seq)
        elif (self._pass is not None and seq in self._pass_seqs
              and all(s.cancelled for s in self._pass_seqs)):
            self._pass.cancel()  # nobody wants this pass: stop at the next layer boundary

    async def release(self, seq: SeqState) -> None:
        """Cancel seq if it has not finished and wait until the batcher has let go of it (its
        KV cache dropped; when it was the last one, reads carried for a next pass dropped)."""
        self.cancel(seq)
        if self._task is None or self._task.done():
            seq.released.set()  # no batcher: nothing holds it
        await seq.released.wait()

    async def aclose(self) -> None:
        """Cancel every request (finish_reason "cancelled") and stop the batcher task."""
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            async with self.lock:  # passes exclude Engine.logits and each other
                try:
                    await self._drain()
                except asyncio.CancelledError:
                    self._fail_all(None)
                    raise
                except Exception as exc:  # each sequence it held gets the error
                    log.exception("batcher failed")
                    self._fail_all(exc)
                finally:
                    await self.runner.idle()
                    self._release_retired()
            if not self.waiting:  # no await between this check and the task's end
                return

    async def _drain(self) -> None:
        while True:
            await self._admit()
            self._reap()
            if not self.active:
                return
            self._release_retired()
            batch = self._plan()
            await self._add_drafts(batch)
            await self._step(batch)
            if self._keep:
                await self._keep_prefixes()

    async def _admit(self) -> None:
        while self.waiting and len(self.active) < self.max_batch:
            seq = self.waiting.popleft()
            self.active.append(seq)
            seq.t_start = time.perf_counter()
            max_len = len(seq.prompt) + seq.params.max_tokens
            seq.kv = await self.runner.make_kv_cache(max_len)
            if self.prefix is not None:
                await self._reuse_prefix(seq, max_len)

    async def _reuse_prefix(self, seq: SeqState, max_len: int) -> None:
        """Load the longest cached prefix of seq's prompt into its cache (see prefix_cache)."""
        assert self.prefix is not None
        entry, n = self.prefix.lookup(seq.prompt)
        if entry is None or not self.runner.model.reuses_prefix(len(entry.tokens),
                                                                len(seq.prompt)):
            return
        try:
            await self.runner.scheduler.run_on_compute(seq.kv.load_state, entry.states, n)
        except ValueError as exc:  # a sliding ring wrapped past it: start afresh
            log.debug("prefix of %d tokens not reused: %s", n, exc)
            seq.kv = await self.runner.make_kv_cache(max_len)
            return
        seq.n_prefilled = seq.stats.prompt_tokens_reused = n
        self.prefix.record_hit(n)

    async def _keep_prefixes(self) -> None:
        """Copy the KV of the requests that finished in the last pass into the prefix cache."""
        keep, self._keep = self._keep, []
        for ids, kv in keep:
            assert self.prefix is not None
            self.prefix.put(ids, await self.runner.scheduler.run_on_compute(kv.state))

    def _reap(self) -> None:
        for seq in [s for s in self.active if s.cancelled]:
            self._finish(seq, "cancelled")

    def _plan(self, seqs: Sequence[SeqState] | None = None
              ) -> list[tuple[SeqState, list[int]]]:
        """The (sequence, ids to feed) of the next pass: every decoding sequence's last token,
        and prompt rows first come first served: at most prefill_chunk of them while any
        sequence decodes, else as many as the prefill memory allows (see the module doc).
        seqs: the sequences the pass may carry (default: every active one; a pipeline's
        micro-batch: some of them)."""
        batch: list[tuple[SeqState, list[int]]] = []
        decoding = any(not s.prefilling for s in self.active)
        budget = self.prefill_chunk
        spans: list[tuple[int, int]] = []  # (offset, rows) of the pass so far
        for seq in self.active if seqs is None else seqs:
            if not seq.prefilling:
                batch.append((seq, seq.history[-1:]))
                spans.append((seq.kv.offset, 1))
                continue
            want = len(seq.prompt) - seq.n_prefilled
            if decoding:
                n = min(budget, want)
                budget -= n
            else:
                n = self.runner.prefill_rows(spans, seq.n_prefilled, want)
            if n > 0:
                batch.append((seq, seq.prompt[seq.n_prefilled:seq.n_prefilled + n]))
                spans.append((seq.n_prefilled, n))
        return batch

    async def _add_drafts(self, batch: list[tuple[SeqState, list[int]]]) -> None:
        """Append draft tokens to the rows of decoding sequences that speculate, while the
        pass stays within MAX_PASS_ROWS rows (first come first served), a draft stays within
        max_tokens, and the KV cache can roll the draft back; then cut drafts (the last
        sequence's first) so the pass's rows are a count the kernels run in one sweep of the
        weights (sweep_rows)."""
        room = MAX_PASS_ROWS - sum(len(ids) for _, ids in batch)
        for seq, _ in batch:
            spec = seq.spec
            if spec is None or seq.prefilling:
                continue
            spec.draft, spec.draft_probs = [], None
            k = min(spec.length.want(), room, seq.params.max_tokens - seq.generated - 1)
            k = self.runner.model.verify_rows(seq.kv.offset, 1 + k) - 1
            if k <= 0 or not seq.kv.rollback_room(1 + k):
                continue
            if spec.mode == "prompt_lookup":
                spec.draft = spec.lookup(seq.history, k)
            else:
                draft = self.speculation.draft
                assert draft is not None
                await draft_with_model(draft, spec, seq.sampler, seq.history, k,
                                       len(seq.prompt) + seq.params.max_tokens)
            room -= len(spec.draft)
        total = MAX_PASS_ROWS - room  # rows of the pass with every draft
        drafts = [(len(seq.spec.draft), seq.spec.length) for seq, _ in batch
                  if seq.spec is not None and not seq.prefilling and seq.spec.draft]
        if drafts and not any(seq.prefilling for seq, _ in batch):
            cut = total - cut_for_cost(drafts, total - sum(d for d, _ in drafts),
                                       self.pass_cost)
        else:
            cut = total - sweep_rows(total)
        for i, (seq, ids) in reversed(list(enumerate(batch))):
            if seq.spec is None or seq.prefilling or not seq.spec.draft:
                continue
            if cut > 0:
                n = min(cut, len(seq.spec.draft))
                seq.spec.draft, cut = seq.spec.draft[:len(seq.spec.draft) - n], cut - n
                if seq.spec.draft_probs is not None:
                    seq.spec.draft_probs = seq.spec.draft_probs[:len(seq.spec.draft)]
            batch[i] = (seq, ids + seq.spec.draft)

    def _more(self, batch: list[tuple[SeqState, list[int]]]) -> bool:
        """Whether another pass follows this one (unless a stop condition ends it first)."""
        if self.waiting or len(batch) < len(self.active):
            return True
        for seq, ids in batch:
            if seq.prefilling and seq.n_prefilled + len(ids) < len(seq.prompt):
                return True
            if seq.generated + 1 < seq.params.max_tokens:
                return True
        return False

    async def _step(self, batch: list[tuple[SeqState, list[int]]]) -> None:
        rows = pass_rows(batch)
        t0 = time.perf_counter()
        self._pass_seqs = [seq for seq, _ in batch]
        self._pass = asyncio.get_running_loop().create_task(
            self.runner.run(rows, more=self._more(batch)))
        try:
            await asyncio.wait([self._pass])
        finally:
            if not self._pass.done():  # the batcher itself is cancelled (engine shutdown)
                self._pass.cancel()
                await asyncio.gather(self._pass, return_exceptions=True)
            task, self._pass, self._pass_seqs = self._pass, None, []
        if task.cancelled():
            self.passes_cancelled += 1
            return  # every sequence of the pass was cancelled; _reap drops them
        if task.exception() is not None:
            for seq, _ in batch:
                seq.push(task.exception())  # type: ignore[arg-type]
                self._finish(seq, None)
            return
        logits, rs = task.result()
        await self._after_pass(batch, logits, rs, t0)

    async def _after_pass(self, batch: list[tuple[SeqState, list[int]]], logits: np.ndarray,
                          rs: RunStats, t0: float) -> None:
        """A pass started at t0 returned logits: record it, count it in each sequence's
        stats, and sample."""
        n_prefill = sum(seq.prefilling for seq, _ in batch)
        if n_prefill == 0:
            self.pass_cost.add(sum(len(ids) for _, ids in batch), time.perf_counter() - t0)
        self.passes.append(PassRecord(len(batch), sum(len(ids) for _, ids in batch), n_prefill,
                                      rs.bytes_read, time.perf_counter() - t0, rs.compute_s,
                                      rs.io_stall_s))
        if self.on_pass is not None:  # a watcher (engine.monitor); None: nobody watches
            self.on_pass(self.passes[-1], rs)
        decoding = n_prefill < len(batch)
        for seq, ids in batch:
            seq.run.add(rs)
            if seq.prefilling:
                self._count_prefill(seq, len(ids), rs, decoding)
            else:
                seq.stats.decode_passes += 1
                seq.stats.decode_bytes_read += rs.bytes_read
        await self._sample(batch, logits)

    def _count_prefill(self, seq: SeqState, n: int, rs: RunStats, decoding: bool) -> None:
        """A pass carried n prompt rows of seq: the prefill stats (passes, bytes read, why a
        prompt took more than one pass)."""
        st = seq.stats
        st.prefill_passes += 1
        st.prefill_bytes_read += rs.bytes_read
        st.prefill_memory_bytes = self.runner.prefill_memory_bytes
        seq.n_prefilled += n
        if seq.prefilling and not st.prefill_split:
            st.prefill_split = "decoding" if decoding else "prefill memory"

    async def _sample(self, batch: list[tuple[SeqState, list[int]]], logits: np.ndarray
                      ) -> None:
        """Sample for each sequence that has its whole prompt in the cache: a token, or with a
        draft the tokens its verification yields (engine/speculative.py)."""
        starts = np.cumsum([0] + [_n_logits(seq) for seq, _ in batch])
        rows = [(slice(starts[i], starts[i + 1]), seq) for i, (seq, _) in enumerate(batch)
                if not seq.cancelled and not seq.prefilling]
        now = time.perf_counter()
        for _, seq in rows:
            if seq.generated == 0:
                seq.stats.prompt_s = now - seq.t_start
                seq.stats.ttft_s = now - seq.t_submit
                seq.t_first = now
        rows = [(sl, seq) for sl, seq in rows if not self._finish_if_empty(seq)]
        if not rows:
            return
        toks = await self.runner.scheduler.run_on_compute(
            _sample_rows, [seq for _, seq in rows], [logits[sl] for sl, _ in rows])
        for (_, seq), out in zip(rows, toks, strict=True):
            if not seq.cancelled:
                self._settle(seq, out)

    def _settle(self, seq: SeqState, out: list[tuple[int, TokenLogprob | None]]) -> None:
        """Emit a pass's tokens (with their logprobs) for seq; with a draft, roll back the KV
        positions of its rejected tokens first and record how it fared."""
        spec = seq.spec
        if spec is not None:
            k, accepted = len(spec.draft), len(out) - 1
            if k:
                seq.kv.trim(k - accepted)
                spec.length.update(k, accepted)
                seq.stats.draft_tokens += k
                seq.stats.accepted_tokens += accepted
            settle_draft_kv(spec, accepted)
            spec.draft, spec.draft_probs = [], None
        for tok, lp in out:
            self._emit(seq, tok, lp)
            if seq.done:
                return

    def _finish_if_empty(self, seq: SeqState) -> bool:
        if seq.params.max_tokens == 0:
            self._finish(seq, "length")
            return True
        return False

    def _emit(self, seq: SeqState, tok: int, lp: TokenLogprob | None = None) -> None:
        """Record a sampled token, push the text it completes, finish on a stop or length."""
        seq.history.append(tok)
        seq.pending.append(tok)
        if lp is not None:
            seq.pending_logprobs.append(lp)
        seq.generated += 1
        if tok in seq.stops:
            self._finish(seq, "stop")
            return
        text, cut = seq.text_filter.feed(seq.detok.add(tok))
        if text:
            seq.push(Chunk(text, seq.pending, logprobs=_take_logprobs(seq)))
            seq.pending = []
        if cut:
            self._finish(seq, "stop", cut=True)
        elif seq.generated >= seq.params.max_tokens:
            self._finish(seq, "length")

    def _finish(self, seq: SeqState, reason: str | None, cut: bool = False) -> None:
        """Push the last chunk (reason None: an error was pushed instead) and free the slot."""
        if seq.done:
            return
        seq.done, seq.finish_reason = True, reason
        if reason is not None:
            tail = ""
            if reason != "cancelled" and not cut:
                tail = seq.text_filter.feed(seq.detok.flush(), final=True)[0]
            seq.push(Chunk(tail, seq.pending, finish_reason=reason, stats=self._stats(seq),
                           logprobs=_take_logprobs(seq)))
            seq.pending = []
            self.finished[reason] += 1
        else:
            self.finished["error"] += 1
        if seq in self.active:
            self.active.remove(seq)
        if reason in ("stop", "length") and self.prefix is not None and seq.kv is not None:
            self._keep.append((seq.history[:seq.kv.offset], seq.kv))  # the ids fed, in order
        seq.kv = None
        self._retired.append(seq)

    def _stats(self, seq: SeqState) -> GenerationStats:
        s, run = seq.stats, seq.run
        s.prompt_tokens = len(seq.prompt)
        s.generation_tokens = seq.generated
        s.generation_s = time.perf_counter() - seq.t_first if seq.t_first else 0.0
        s.bytes_read, s.units_read = run.bytes_read, run.units_read
        s.io_stall_s, s.read_s, s.compute_s = run.io_stall_s, run.read_s, run.compute_s
        s.unit_hits, s.unit_misses = run.hits, run.misses
        s.expert_hits, s.expert_misses = run.late_hits, run.late_misses
        s.expert_bytes_read = run.late_bytes_read
        s.lookahead_reads, s.lookahead_used = run.lookahead_reads, run.lookahead_used
        s.lookahead_wasted_bytes = run.lookahead_wasted_bytes
        s.prefetch_depth = run.prefetch_depth
        s.peak_rss_bytes = peak_rss_bytes()
        s.speculative = seq.spec.mode if seq.spec is not None else ""
        return s

    def _release(self, seq: SeqState) -> None:
        seq.released.set()

    def _release_retired(self) -> None:
        retired, self._retired = self._retired, []
        for seq in retired:
            self._release(seq)

    def _fail_all(self, exc: Exception | None) -> None:
        """The batcher is going down: every sequence it holds ends with exc, or as cancelled
        (exc None: the engine shuts down)."""
        for seq in [*self.active, *self.waiting]:
            if exc is None:
                self._finish(seq, "cancelled")
            else:
                seq.push(exc)
                self._finish(seq, None)
        self.waiting.clear()


def pass_rows(batch: Sequence[tuple[SeqState, Sequence[int]]]) -> Batch:
    """The model's Batch for a planned pass: each sequence's ids with its cache."""
    return Batch([SeqRows(np.asarray(ids, dtype=np.int64), seq.kv,
                          len(seq.prompt) if seq.prefilling else None, _n_logits(seq))
                  for seq, ids in batch])


def _n_logits(seq: SeqState) -> int:
    """Logit rows a pass returns for seq: its last token and each draft token."""
    if seq.prefilling or seq.spec is None:
        return 1
    return 1 + len(seq.spec.draft)


def _sample_rows(seqs: Sequence[SeqState], logits: Sequence[np.ndarray]
                 ) -> list[list[tuple[int, TokenLogprob | None]]]:
    """The tokens of each sequence from its logit rows (1 + draft, V), each with its logprob
    (from the row it was sampled or accepted at) when its request asks; runs on the compute
    thread."""
    out = []
    for seq, rows in zip(seqs, logits, strict=True):
        spec = seq.spec
        if spec is None or not spec.draft:
            toks = [seq.sampler(rows[0], seq.history)]
        else:
            toks = verify(seq.sampler, rows, seq.history, spec.draft, spec.draft_probs)
        out.append([(tok, seq.sampler.logprob(rows[j], tok)) for j, tok in enumerate(toks)])
    return out


def _take_logprobs(seq: SeqState) -> list[TokenLogprob] | None:
    """The logprobs of seq.pending for its next chunk (None when the request asks for none)."""
    if seq.params.sampling.logprobs is None:
        return None
    out, seq.pending_logprobs = seq.pending_logprobs, []
    return out
