"""Engine: the public API. Wires loaders, cache, scheduler and kernels; runs the token loop."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cache import BudgetError, WeightCache
from engine.config import EngineConfig, format_size
from engine.errors import ContextLengthError
from engine.models import model_class
from engine.models.llama import ForwardState
from engine.sampling import Sampler, SamplingParams
from engine.stats import GenerationStats, peak_rss_bytes
from engine.tokenizer import Tokenizer
from engine.units import BackendUnitLoader
from kernels import get_backend
from loaders import ModelSource, UnitReader, open_model
from scheduler import LayerScheduler, RunStats

log = logging.getLogger(__name__)

Prompt = str | Sequence[dict[str, Any]] | Sequence[int]


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise ValueError(f"max_tokens must be an int >= 0, got {self.max_tokens!r}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


@dataclass
class Chunk:
    """One streamed piece: a text delta and the ids sampled since the previous chunk (all ids,
    the EOS id included, appear in exactly one chunk). The last chunk has finish_reason
    ("stop" | "length") and stats."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stats: GenerationStats | None = None


class Engine:
    """A loaded model. Use `await Engine.open(path)` (or `async with`), then `generate`."""

    def __init__(self, source: ModelSource, config: EngineConfig) -> None:
        self.source = source
        self.config = config
        self.spec = source.index.spec
        self.tokenizer = Tokenizer(source.tokenizer)
        self.backend = get_backend(config.backend)
        self.model = model_class(self.spec.model_type)(self.spec, self.backend)
        self.cache = WeightCache(config.cache)
        self.reader = UnitReader(source.index, config.loader)
        self.units = BackendUnitLoader(source.index, self.reader, self.backend)
        self.scheduler = LayerScheduler(self.cache, self.units, config.scheduler,
                                        getattr(self.backend, "init_compute_thread", None))
        self._lock = asyncio.Lock()
        # the unit walk of one forward pass (closures over a dummy state), for planning
        self._plan = self.model.steps(ForwardState(np.zeros((1, 1), np.int64), kv=None))  # type: ignore[arg-type]
        self._check_budget()
        self.scheduler.plan_residency(self._plan)

    @classmethod
    async def open(cls, model: str, config: EngineConfig | None = None) -> Engine:
        """Open a model directory or .gguf file (headers only; weights stream on demand).

        Raises:
            FormatError, MissingTensorError: a bad model; BudgetError: budget too small;
            ValueError: a bad config value.
        """
        def build() -> Engine:  # header parsing, tokenizer and backend set-up block
            return cls(open_model(model), config or EngineConfig())

        return await asyncio.to_thread(build)

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.scheduler.close()
        self.cache.compute.clear()
        self.reader.close()

    @property
    def model_bytes(self) -> int:
        """Compute-tier bytes of the whole model (what an unlimited budget holds)."""
        return sum(self.units.prepared_nbytes(k) for k in self.source.index.units)

    @property
    def max_context(self) -> int:
        return self.config.max_context or self.spec.max_position_embeddings

    @property
    def min_budget_bytes(self) -> int:
        """The smallest memory budget this model runs with (its largest step's units)."""
        return self.scheduler.min_budget_bytes(self._plan)

    def _check_budget(self) -> None:
        budget = self.config.memory_budget_bytes
        if budget is None:
            return
        need = self.min_budget_bytes
        if budget < need:
            raise BudgetError(
                f"memory budget {format_size(budget)} is smaller than the largest unit set one "
                f"step needs ({format_size(need)}); use at least {format_size(need)} "
                f"(the whole model takes {format_size(self.model_bytes)})"
            )

    def encode_prompt(self, prompt: Prompt, system_prompt: str | None = None) -> list[int]:
        """str -> ids as given; a list of messages -> the chat template; a list of ints as is."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        items = list(prompt)
        if items and all(isinstance(t, (int, np.integer)) for t in items):
            return [int(t) for t in items]
        if system_prompt:
            items = [{"role": "system", "content": system_prompt}, *items]
        text = self.tokenizer.apply_chat_template(items, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_bos=False)

    async def forward(self, ids: np.ndarray, kv: Any, all_logits: bool = False,
                      more: bool = False) -> tuple[np.ndarray, RunStats]:
        """One streamed forward pass over ids (B, L); returns logits and the run's stats.

        more: another pass follows (decoding), so reads for its first units may start now.
        """
        st = ForwardState(ids=ids, kv=kv, all_logits=all_logits)
        stats = await self.scheduler.run(self.model.steps(st), cyclic=more)
        assert st.logits is not None
        return st.logits, stats

    async def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits (L, V) for every position of ids, in one streamed pass (tests, perplexity)."""
        arr = np.asarray(ids, dtype=np.int64)[None, :]
        async with self._lock:
            kv = await self.scheduler.run_on_compute(self.model.make_kv_cache, 1, arr.shape[1])
            logits, _ = await self.forward(arr, kv, all_logits=True)
        return logits[0]

    async def generate(self, prompt: Prompt, params: GenerationParams | None = None,
                       system_prompt: str | None = None) -> AsyncIterator[Chunk]:
        """Stream a completion. Cancelling the consuming task stops at the next layer boundary.

        Raises:
            ContextLengthError: prompt + max_tokens exceed the context.
            ReadError / BudgetError: the weights could not be streamed.
        """
        params = params or GenerationParams()
        ids = self.encode_prompt(prompt, system_prompt)
        if not ids:
            raise ValueError("the prompt is empty (no tokens)")
        total = len(ids) + params.max_tokens
        if total > self.max_context:
            raise ContextLengthError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = {total} "
                f"exceeds the context length {self.max_context}"
            )
        async with self._lock:
            try:
                async for chunk in self._generate(ids, params):
                    yield chunk
            finally:  # an early stop (EOS, stop string, cancel) leaves no read in flight
                await self.scheduler.drop_carried()
                self.reader.buffers.trim()  # idle read buffers are outside the budget

    async def _generate(self, ids: list[int], params: GenerationParams
                        ) -> AsyncIterator[Chunk]:
        stats = GenerationStats(prompt_tokens=len(ids))
        run = RunStats()
        kv = await self.scheduler.run_on_compute(
            self.model.make_kv_cache, 1, len(ids) + params.max_tokens)
        sampler = Sampler(params.sampling)
        stops = set() if params.ignore_eos else set(self.tokenizer.eos_token_ids)
        detok = self.tokenizer.detokenizer()
        text_filter = _StopFilter(params.stop)
        history = list(ids)
        t0 = time.perf_counter()
        logits = None
        chunk = self.config.prefill_chunk
        for start in range(0, len(ids), chunk):
            chunk_ids = np.asarray(ids[start:start + chunk])[None, :]
            # a pass follows unless this is the last chunk and no decode step comes
            more = start + chunk < len(ids) or params.max_tokens >= 2
            logits, rs = await self.forward(chunk_ids, kv, more=more)
            run.add(rs)
        t1 = time.perf_counter()
        stats.prompt_s = stats.ttft_s = t1 - t0
        finish, cut = "length", False
        pending: list[int] = []  # ids not yet attached to a yielded chunk
        for n in range(params.max_tokens):
            assert logits is not None
            tok = sampler(logits[0, -1], history)
            history.append(tok)
            pending.append(tok)
            stats.generation_tokens += 1
            if tok in stops:
                finish = "stop"
                break
            text, cut = text_filter.feed(detok.add(tok))
            if text:
                yield Chunk(text, pending)
                pending = []
            if cut:
                finish = "stop"
                break
            if n + 1 < params.max_tokens:
                logits, rs = await self.forward(np.asarray([[tok]]), kv,
                                                more=n + 2 < params.max_tokens)
                run.add(rs)
        tail = "" if cut else text_filter.feed(detok.flush(), final=True)[0]
        stats.generation_s = time.perf_counter() - t1
        stats.bytes_read, stats.units_read = run.bytes_read, run.units_read
        stats.io_stall_s, stats.read_s, stats.compute_s = run.io_stall_s, run.read_s, run.compute_s
        stats.unit_hits, stats.unit_misses = run.hits, run.misses
        stats.prefetch_depth = run.prefetch_depth
        stats.peak_rss_bytes = peak_rss_bytes()
        yield Chunk(tail, pending, finish_reason=finish, stats=stats)


class _StopFilter:
    """Holds back text that could be the start of a stop string; cuts at a full match."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = list(stops)
        self.pending = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending = self.pending[:cut], ""
            return out, True
        keep = 0 if final else max(
            (k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])),
            default=0,
        )
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out, False
