"""Engine: the public API. Wires loaders, cache, scheduler and kernels; generations run through
the batcher (engine/batching.py), which owns the token loop."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from stream_run.cache import BudgetError, WeightCache
from stream_run.engine.batching import Batcher, Generation
from stream_run.engine.config import EngineConfig, default_threads, format_size, parse_size
from stream_run.engine.errors import ContextLengthError
from stream_run.engine.monitor import StreamMonitor
from stream_run.engine.prefix_cache import PrefixCache, model_identity
from stream_run.engine.prefix_cache import load_file as load_prompt_file
from stream_run.engine.prefix_cache import save_file as save_prompt_file
from stream_run.engine.request import Chunk, Completion, GenerationParams, StopFilter
from stream_run.engine.runner import BackendUnitLoader, PassRunner
from stream_run.engine.sampling import TokenLogprob, token_logprobs
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

    runner_class = PassRunner  # engine.pipeline's stages run passes with their own
    batcher_class = Batcher  # and rank 0 of a pipeline keeps several passes in flight

    def __init__(self, source: ModelSource, config: EngineConfig) -> None:
        self.source = source
        self.config = config
        self.spec = source.index.spec
        self.tokenizer = Tokenizer(source.tokenizer)
        self.threads = config.threads or default_threads()
        threadpool_limits(self.threads, user_api="blas")  # process-wide, as OpenBLAS is
        self.backend = get_backend(config.backend, self.threads)
        self.model = model_class(self.spec.model_type)(self.spec, self.backend)
        if hasattr(self.model, "lookahead"):  # a MoE model that can guess its next experts
            # not across pipeline stages: a stage's last layer would take the next stage's unit
            staged = type(self).stage_model is not Engine.stage_model
            self.model.lookahead = config.expert_lookahead and not staged
            if config.expert_lookahead and staged:
                log.warning("--expert-lookahead is ignored with --pipeline")
        self.cache = WeightCache(config.cache)
        self.reader = UnitReader(source.index, config.loader)
        self.units = BackendUnitLoader(source.index, self.reader, self.backend)
        self.model = self.stage_model(self.model)
        init = self.backend.init_compute_thread \
            if isinstance(self.backend, ComputeThreadInit) else None
        self.scheduler = LayerScheduler(self.cache, self.units, config.scheduler, init,
                                        self.backend.start)
        self.runner = self.runner_class(self.model, self.scheduler, self.units,
                                        config.prefill_chunk, config.prefill_memory_bytes,
                                        config.kv_bits)
        self._lock = asyncio.Lock()  # one pass at a time: the batcher, logits()
        self.batcher = self.batcher_class(self.runner, self._lock, self.tokenizer,
                                          config.max_batch, config.max_queue,
                                          config.prefill_chunk)
        self._identity: str | None = None
        if config.kv_cache_budget_bytes:
            self.batcher.prefix = PrefixCache(config.kv_cache_budget_bytes)
            self.runner.kv_reserve_bytes = config.kv_cache_budget_bytes
        self.draft = self._open_draft() if config.draft_model else None
        self.batcher.speculation = Speculation(
            config.speculative, config.num_draft_tokens,
            self.draft.runner if self.draft is not None else None)
        self._check_budget()
        self.runner.plan()
        self.monitor = StreamMonitor(self)  # live pass statistics for watchers (engine/monitor)

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

    def stage_model(self, model: Any) -> Any:
        """The model this engine's passes run (a pipeline stage: its part of it)."""
        return model

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

    # -- the conversation's KV between requests (prefix_cache.py) ------------------------------
    @property
    def prefix_cache(self) -> PrefixCache | None:
        """Finished requests' KV, reused by prompts that start like them (kv_cache_budget_bytes;
        None: off, until a prompt-cache file is loaded)."""
        return self.batcher.prefix

    def enable_prefix_cache(self, budget_bytes: int) -> PrefixCache:
        """Keep finished requests' KV within budget_bytes from now on (a budget already larger
        stays)."""
        if self.batcher.prefix is None:
            self.batcher.prefix = PrefixCache(budget_bytes)
        self.batcher.prefix.budget_bytes = max(self.batcher.prefix.budget_bytes, budget_bytes)
        return self.batcher.prefix

    @property
    def kv_format(self) -> str:
        """What this engine's KV caches store; a prompt-cache file must have been made with the
        same (float32 caches are the same on every backend; quantized ones are not)."""
        bits = self.config.kv_bits
        return "float32" if bits is None else f"{bits}-bit ({self.backend.name})"

    def _file_identity(self) -> dict[str, str]:
        if self._identity is None:
            self._identity = model_identity(self.source.index)
        return {"model": self._identity, "kv": self.kv_format}

    async def save_prompt_cache(self, path: str | os.PathLike[str],
                                tokens: Sequence[int] | None = None) -> int:
        """Write the KV the prefix cache holds for tokens (the longest entry that is a prefix of
        them; None: the entry used or added last) to a prompt-cache file (safetensors, with
        the model's identity and the KV setting). Returns the number of tokens saved.

        Raises:
            ValueError: no prefix cache, or no entry for tokens.
        """
        prefix = self.batcher.prefix
        entry = None if prefix is None else (
            prefix.latest() if tokens is None else prefix.longest(list(tokens)))
        if entry is None:
            raise ValueError(f"prompt-cache file {os.fspath(path)}: nothing to save (no finished "
                             "request's KV is cached; hint: kv_cache_budget_bytes > 0)")
        ident = self._file_identity()
        await asyncio.to_thread(save_prompt_file, path, entry, ident)
        return len(entry.tokens)

    async def load_prompt_cache(self, path: str | os.PathLike[str]) -> list[int]:
        """Read a prompt-cache file into the prefix cache (enabled, or grown, to hold it): a
        later prompt starting with its tokens reuses their KV. Returns its token ids.

        Raises:
            ValueError: one line naming the file: not a prompt cache, damaged or cut short,
                made by another model, model format or KV setting, or longer than the context.
        """
        entry = await asyncio.to_thread(load_prompt_file, path, self._file_identity())
        n = len(entry.tokens)
        where = f"prompt-cache file {os.fspath(path)}"
        if not 0 < n <= self.max_context:
            raise ValueError(f"{where}: {n} tokens, the context holds 1..{self.max_context}")
        if int(entry.tokens.min()) < 0 or int(entry.tokens.max()) >= self.spec.vocab_size:
            raise ValueError(f"{where}: token ids outside the vocabulary of {self.spec.vocab_size}")
        kv = await self.runner.make_kv_cache(n)  # the states must load into this model's cache
        try:
            await self.scheduler.run_on_compute(kv.load_state, entry.states, n)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        del kv
        self.enable_prefix_cache(entry.nbytes).put(entry.tokens, entry.states)
        return [int(t) for t in entry.tokens]

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

    def encode_prompt(self, prompt: Prompt, system_prompt: str | None = None,
                      tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
        """str -> ids as given; a list of messages -> the chat template (given tools in its
        `tools` variable, OpenAI's function-tool objects, as HF renders them); a list of ints
        as is."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        items = list(prompt)
        if items and all(isinstance(t, (int, np.integer)) for t in items):
            return [int(t) for t in items]
        if system_prompt:
            items = [{"role": "system", "content": system_prompt}, *items]
        text = self.tokenizer.apply_chat_template(items, add_generation_prompt=True,
                                                  tools=tools)
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

    async def prompt_logprobs(self, ids: Sequence[int], top: int = 0,
                              next_token: bool = False) -> list[TokenLogprob | None]:
        """The logprob of each prompt token given the ones before it (the first has no context:
        None, as OpenAI's echo gives), with the top most likely tokens at each position.
        next_token: one more entry, the likeliest token after the prompt (what greedy decoding
        picks first). Log-softmax of the raw logits in float64 (the values stream-eval scores).

        The prompt goes through in as few streamed passes as the prefill memory allows, its
        logits included (as a prompt does in generate); waits for the batcher's passes (it
        takes the engine's lock).

        Raises:
            ValueError: no ids; ContextLengthError: more ids than the context.
        """
        if not ids:
            raise ValueError("the prompt is empty (no tokens)")
        if len(ids) > self.max_context:
            raise ContextLengthError(f"the prompt has {len(ids)} tokens, above the context "
                                     f"length {self.max_context}")
        arr = np.asarray(ids, dtype=np.int64)
        n = len(arr)
        out: list[TokenLogprob | None] = [None]
        async with self._lock:
            try:
                kv = await self.runner.make_kv_cache(n)
                c = 0
                while c < n:
                    e = c + self._score_rows(c, n - c)
                    logits, _ = await self.forward(arr[None, c:e], kv, all_logits=True,
                                                   more=e < n, span_end=n)
                    targets = arr[c + 1:e + 1]  # row p predicts ids[p + 1]; the last, nothing
                    out += await asyncio.to_thread(token_logprobs, logits[0, :len(targets)],
                                                   targets, top)
                    if e == n and next_token:
                        last = logits[0, -1:]
                        out += await asyncio.to_thread(token_logprobs, last,
                                                       [int(np.argmax(last[0]))], top)
                    c = e
            finally:  # an error or cancel leaves no read in flight
                await self.runner.idle()
        return out

    def _score_rows(self, offset: int, want: int) -> int:
        """How many of want prompt rows at offset one scoring pass takes: the most whose
        activations and logits fit the prefill memory, at least one tile."""
        runner = self.runner

        def fits(k: int) -> bool:
            return runner.activation_bytes([(offset, k)], k) <= runner.prefill_memory_bytes

        if fits(want):
            return want
        lo, hi = 0, want  # fits(lo), not fits(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return max(lo, min(want, runner.tile_rows))

    def make_params(self, params: GenerationParams | None = None, **overrides: Any
                    ) -> GenerationParams:
        """params (default GenerationParams()) with keyword overrides: max_tokens, stop,
        ignore_eos, speculative, num_draft_tokens and the SamplingParams fields (temperature,
        top_p, top_k, min_p, repetition_penalty, seed, logprobs); None keeps the value."""
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
        text, ids, logprobs = [], [], []
        chunks = self.generate(prompt, params, system_prompt=system_prompt, **overrides)
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                text.append(chunk.text)
                ids += chunk.token_ids
                logprobs += chunk.logprobs or []
                if chunk.finish_reason is not None:
                    assert chunk.stats is not None
                    return Completion("".join(text), ids, chunk.finish_reason, chunk.stats,
                                      logprobs if chunk.logprobs is not None else None)
        raise AssertionError("generate ended without a finish reason")
