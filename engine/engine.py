"""Engine: the public API. Wires loaders, cache, scheduler and kernels; generations run through
the batcher (engine/batching.py), which owns the token loop."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from stream_run.cache import BudgetError, WeightCache
from stream_run.engine.batching import Batcher, Generation
from stream_run.engine.config import EngineConfig, default_threads, format_size, parse_size
from stream_run.engine.errors import ContextLengthError
from stream_run.engine.request import Chunk, Completion, GenerationParams, StopFilter
from stream_run.engine.runner import BackendUnitLoader, PassRunner
from stream_run.engine.speculative import Speculation
from stream_run.engine.tokenizer import Tokenizer
from stream_run.kernels import get_backend
from stream_run.kernels.backend import ComputeThreadInit
from stream_run.loaders import ModelSource, UnitReader
from stream_run.models import model_class, open_model
from stream_run.scheduler import LayerScheduler, RunStats

log = logging.getLogger(__name__)

Prompt = str | Sequence[dict[str, Any]] | Sequence[int]
_StopFilter = StopFilter  # the name tests and older callers import
__all__ = ["Chunk", "Completion", "Engine", "Generation", "GenerationParams", "Prompt"]


class Engine:
    """A loaded model. Use `async with await Engine.open(path) as engine`, then `generate` or
    `complete`. Concurrent generations are decoded together (engine.batching)."""

    def __init__(self, source: ModelSource, config: EngineConfig) -> None:
        self.source = source
        self.config = config
        self.spec = source.index.spec
        self.tokenizer = Tokenizer(source.tokenizer)
        self.threads = config.threads or default_threads()
        threadpool_limits(self.threads, user_api="blas")  # process-wide, as OpenBLAS is
        self.backend = get_backend(config.backend, self.threads)
        self.model = model_class(self.spec.model_type)(self.spec, self.backend)
        self.cache = WeightCache(config.cache)
        self.reader = UnitReader(source.index, config.loader)
        self.units = BackendUnitLoader(source.index, self.reader, self.backend)
        init = self.backend.init_compute_thread \
            if isinstance(self.backend, ComputeThreadInit) else None
        self.scheduler = LayerScheduler(self.cache, self.units, config.scheduler, init,
                                        self.backend.start)
        self.runner = PassRunner(self.model, self.scheduler, self.units, config.prefill_chunk,
                                 config.prefill_memory_bytes)
        self._lock = asyncio.Lock()  # one pass at a time: the batcher, logits()
        self.batcher = Batcher(self.runner, self._lock, self.tokenizer, config.max_batch,
                               config.max_queue, config.prefill_chunk)
        self.draft = self._open_draft() if config.draft_model else None
        self.batcher.speculation = Speculation(
            config.speculative, config.num_draft_tokens,
            self.draft.runner if self.draft is not None else None)
        self._check_budget()
        self.runner.plan()

    def _open_draft(self) -> Engine:
        """The draft model (EngineConfig.draft_model), resident within draft_budget_bytes.

        Raises:
            ValueError: its tokenizer's vocabulary is not the target's.
        """
        path = self.config.draft_model
        assert path is not None
        draft = Engine(open_model(path), EngineConfig(
            backend=self.config.backend, memory_budget_bytes=self.config.draft_budget_bytes,
            threads=self.config.threads, max_batch=1))
        ours, theirs = self.tokenizer.tok.get_vocab(True), draft.tokenizer.tok.get_vocab(True)
        if ours != theirs:
            draft.close()
            raise ValueError(
                f"draft model {path}: its vocabulary ({len(theirs)} tokens) is not the "
                f"target's ({len(ours)} tokens); a draft model must share the target's "
                "tokenizer")
        return draft

    @classmethod
    async def open(cls, model: str, config: EngineConfig | None = None, *,
                   memory_budget: int | str | None = None, backend: str | None = None,
                   **options: Any) -> Engine:
        """Open a model directory or .gguf file (headers only; weights stream on demand).

        Args:
            model: the model directory or .gguf path.
            config: a full EngineConfig; the keywords below override its fields.
            memory_budget: compute-tier bytes, an int or a size such as "4GB".
            backend: "auto", "numpy" or "mlx".
            options: other EngineConfig fields (max_context, max_batch, prefill_chunk, ...).

        Raises:
            FormatError, MissingTensorError: a bad model; BudgetError: budget too small;
            ValueError: a bad config value; TypeError: an unknown option.
        """
        config = config or EngineConfig()
        if memory_budget is not None:
            options["memory_budget_bytes"] = parse_size(memory_budget)
        if backend is not None:
            options["backend"] = backend
        if options:
            config = dataclasses.replace(config, **options)

        def build() -> Engine:  # header parsing, tokenizer and backend set-up block
            return cls(open_model(model), config)

        return await asyncio.to_thread(build)

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Cancel running generations (their last chunk says "cancelled"), then close."""
        await self.batcher.aclose()
        self.close()

    def close(self) -> None:
        """Release threads, weights and files. Generations must have ended (see aclose)."""
        self.scheduler.close()
        self.cache.compute.clear()
        self.reader.close()
        if self.draft is not None:
            self.draft.close()

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
        return self.runner.min_budget_bytes

    def _check_budget(self) -> None:
        prefill, tile = self.config.prefill_memory_bytes, self.runner.tile_need_bytes
        if prefill is not None and prefill < tile:
            raise BudgetError(
                f"prefill memory (--prefill-memory) {format_size(prefill)} is below what one "
                f"tile of {self.config.prefill_chunk} prompt rows needs ({format_size(tile)}); "
                f"use at least {format_size(tile)}, or a smaller --prefill-chunk")
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
                      more: bool = False, span_end: int | None = None
                      ) -> tuple[np.ndarray, RunStats]:
        """One streamed forward pass over one sequence's ids (1, L) against its KV cache;
        returns logits (1, L, V) with all_logits, else (1, 1, V), and the run's stats.

        more: another pass follows (decoding), so reads for its first units may start now.
        span_end: these ids are a chunk of a prompt that ends there (positions in kv).
        """
        logits, stats = await self.runner.forward(ids, kv, all_logits, more, span_end)
        return logits[None], stats

    async def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits (L, V) for every position of ids, in one streamed pass (tests, perplexity)."""
        arr = np.asarray(ids, dtype=np.int64)[None, :]
        async with self._lock:
            kv = await self.runner.make_kv_cache(arr.shape[1])
            logits, _ = await self.forward(arr, kv, all_logits=True)
        return logits[0]

    def make_params(self, params: GenerationParams | None = None, **overrides: Any
                    ) -> GenerationParams:
        """params (default GenerationParams()) with keyword overrides: max_tokens, stop,
        ignore_eos, speculative, num_draft_tokens and the SamplingParams fields (temperature,
        top_p, top_k, min_p, repetition_penalty, seed); None keeps the value."""
        return (params or GenerationParams()).replace(**overrides)

    def check_prompt(self, ids: Sequence[int], max_tokens: int) -> None:
        """Raises ValueError for an empty prompt, ContextLengthError when it cannot fit."""
        if not ids:
            raise ValueError("the prompt is empty (no tokens)")
        total = len(ids) + max_tokens
        if total > self.max_context:
            raise ContextLengthError(
                f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) = {total} "
                f"exceeds the context length {self.max_context}"
            )

    def submit(self, prompt: Prompt, params: GenerationParams | None = None, *,
               system_prompt: str | None = None, **overrides: Any) -> Generation:
        """Start a generation now (checks and queueing happen here, before any await) and
        return its handle; iterate it for Chunks, `aclose()` it to cancel. `generate` is this
        plus the iteration; a server uses it to answer errors before it starts a response.

        Raises:
            ContextLengthError, ValueError, QueueFullError: as for generate.
        """
        params = self.make_params(params, **overrides)
        ids = self.encode_prompt(prompt, system_prompt)
        self.check_prompt(ids, params.max_tokens)
        seq = self.batcher.new_seq(ids, params)
        self.batcher.submit(seq)
        return Generation(self.batcher, seq)

    async def generate(self, prompt: Prompt, params: GenerationParams | None = None, *,
                       system_prompt: str | None = None, **overrides: Any
                       ) -> AsyncIterator[Chunk]:
        """Stream a completion as Chunks (text delta, token ids; the last one has the finish
        reason and stats). Generations running at the same time share each forward pass.

        Args:
            prompt: text, chat messages (the chat template is applied) or token ids.
            params: GenerationParams; keyword overrides (max_tokens=, temperature=, top_p=,
                seed=, stop=, ...) replace its fields.
            system_prompt: prepended as a system message to a message list.

        Cancelling the consuming task (or closing the iterator) stops the generation at the
        next layer boundary when no other request shares the pass, and frees its KV cache.

        Raises:
            ContextLengthError: prompt + max_tokens exceed the context.
            QueueFullError: EngineConfig.max_queue requests already wait.
            ReadError / BudgetError: the weights could not be streamed.
        """
        async with self.submit(prompt, params, system_prompt=system_prompt,
                               **overrides) as generation:
            async for chunk in generation:
                yield chunk

    async def complete(self, prompt: Prompt, params: GenerationParams | None = None, *,
                       system_prompt: str | None = None, **overrides: Any) -> Completion:
        """The whole completion of `generate` (same arguments): text, ids, finish reason,
        stats and usage."""
        text, ids = [], []
        chunks = self.generate(prompt, params, system_prompt=system_prompt, **overrides)
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                text.append(chunk.text)
                ids += chunk.token_ids
                if chunk.finish_reason is not None:
                    assert chunk.stats is not None
                    return Completion("".join(text), ids, chunk.finish_reason, chunk.stats)
        raise AssertionError("generate ended without a finish reason")
