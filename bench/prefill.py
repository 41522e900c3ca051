"""Long prompts on a streamed model (issue 24): time to first token and bytes read for a prompt
of N tokens, layer-major (the engine as it runs: the prompt goes through each unit in as few
passes as the prefill memory allows) against the chunked path (a pass per prefill_chunk rows,
the cache advancing between passes: what the engine ran before) and llama.cpp, each in a child
process inside the same cgroup v1 memory limit, the page cache dropped first.

    stream-bench prefill MODEL --prompts 512,2048 --limit 4GiB --threads 2
    python -m stream_run.bench.prefill MODEL --prompts 1943 --memory-budget 75MB --no-llama-cpp

The engine runs with --memory-budget auto inside a limit (the budget it picks leaves room for
the KV cache of the prompt), or with the budget given. llama.cpp evaluates the prompt in one
llama_eval call (its ubatches of 512 rows), repacking off under a limit (its default repack
is OOM-killed while loading a Q4 file at half its size), or both variants with
--llama-cpp-variants both. A child killed by the limit is a row result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from stream_run.bench.disk import drop_page_cache
from stream_run.bench.llamacpp_stream import (
    _peak_rss,
    _read_bytes,
    _read_int,
    make_cgroup,
    remove_cgroup,
)

MODES = ("layer-major", "chunked")
LLAMA_VARIANTS = {"no-repack": True, "default": False}


# --- children: one JSON line on stdout ----------------------------------------------------------

def _join(cgroup: str | None) -> None:
    if cgroup:  # first, so that everything the child maps is charged to the limit
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))


def prompt_ids(n: int, vocab: int) -> list[int]:
    """n random ids from a fixed seed (the same prompt for every mode), clear of id 0..2."""
    return np.random.default_rng(0).integers(3, vocab, n).tolist()


async def _engine_child(args: argparse.Namespace) -> dict:
    from stream_run.engine import Engine, EngineConfig, GenerationParams
    from stream_run.engine.config import MARGIN_BYTES, parse_size
    from stream_run.loaders import LoaderConfig

    auto = args.memory_budget == "auto"
    config = EngineConfig(
        backend="numpy", threads=args.threads, max_context=args.tokens + 8,
        memory_budget_auto=auto, auto_kv_tokens=args.tokens + 8 if auto else None,
        memory_budget_bytes=None if auto or args.memory_budget is None
        else parse_size(args.memory_budget),
        prefill_chunk=args.chunk, kv_bits=args.kv_bits,
        loader=LoaderConfig(direct_io=args.direct_io))
    t_open = time.perf_counter()
    engine = await Engine.open(args.model, config)
    try:
        out = {"open_s": time.perf_counter() - t_open,
               "budget_bytes": engine.cache.compute.budget_bytes,
               "prefill_memory_bytes": engine.runner.prefill_memory_bytes}
        ids = prompt_ids(args.tokens, engine.spec.vocab_size)
        r0 = _read_bytes()
        if args.mode == "layer-major":
            done = await engine.complete(ids, GenerationParams(max_tokens=1, ignore_eos=True))
            s = done.stats
            out.update(ttft_s=s.ttft_s, passes=s.prefill_passes,
                       engine_bytes=s.prefill_bytes_read, io_stall_s=s.io_stall_s,
                       compute_s=s.compute_s, split=s.prefill_split)
        else:
            kv = await engine.runner.make_kv_cache(args.tokens + 1)
            t0, nbytes, stall, compute, passes = time.perf_counter(), 0, 0.0, 0.0, 0
            for a in range(0, args.tokens, args.chunk):
                rows = np.asarray(ids[a:a + args.chunk], dtype=np.int64)
                more = a + args.chunk < args.tokens
                _, rs = await engine.forward(rows, kv, more=more, span_end=args.tokens)
                nbytes, stall, compute = (nbytes + rs.bytes_read, stall + rs.io_stall_s,
                                          compute + rs.compute_s)
                passes += 1
            out.update(ttft_s=time.perf_counter() - t0, passes=passes, engine_bytes=nbytes,
                       io_stall_s=stall, compute_s=compute)
        out.update(read_bytes=_read_bytes() - r0, peak_rss_bytes=_peak_rss())
        budget = engine.cache.compute.budget_bytes
        if budget is not None:  # the memory promise: baseline + budget + KV cache + margin
            out["bound_bytes"] = (engine.runner.baseline_rss_bytes + budget
                                  + engine.runner.kv_bytes(args.tokens + 1) + MARGIN_BYTES)
        return out
    finally:
        await engine.aclose()


def _llama_child(args: argparse.Namespace) -> dict:
    import contextlib

    import llama_cpp

    from stream_run.bench.llamacpp_stream import _disable_repack

    if LLAMA_VARIANTS[args.mode.removeprefix("llama.cpp ")]:
        _disable_repack(llama_cpp)
    t0 = time.perf_counter()
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
        llm = llama_cpp.Llama(args.model, n_threads=args.threads, n_threads_batch=args.threads,
                              n_ctx=args.tokens + 16, n_batch=512, verbose=False)
    out = {"open_s": time.perf_counter() - t0}
    ids = prompt_ids(args.tokens, llm.n_vocab())
    r0, t0 = _read_bytes(), time.perf_counter()
    llm.eval(ids)
    out.update(ttft_s=time.perf_counter() - t0, read_bytes=_read_bytes() - r0,
               passes=-(-args.tokens // 512), peak_rss_bytes=_peak_rss())
    return out


def child_main(args: argparse.Namespace) -> int:
    _join(args.cgroup)
    if args.mode.startswith("llama.cpp"):
        out = _llama_child(args)
    else:
        out = asyncio.run(_engine_child(args))
    print(json.dumps(out), flush=True)
    return 0


# --- the parent -----------------------------------------------------------------------------

def run_child(model: str, mode: str, tokens: int, args: argparse.Namespace) -> dict:
    cgroup = make_cgroup(args.limit_bytes) if args.limit_bytes else None
    try:
        dropped = drop_page_cache()
        argv = [sys.executable, "-m", "stream_run.bench.prefill", model, "--child", mode,
                "--tokens", str(tokens), "--threads", str(args.threads),
                "--chunk", str(args.chunk), "--cgroup", cgroup or ""]
        if args.memory_budget:
            argv += ["--memory-budget", args.memory_budget]
        if args.direct_io:
            argv.append("--direct-io")
        if args.kv_bits:
            argv += ["--kv-bits", str(args.kv_bits)]
        t0 = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=args.timeout)
        row: dict = {"mode": mode, "tokens": tokens, "wall_s": time.perf_counter() - t0,
                     "caches_dropped": dropped, "load": os.getloadavg()[0]}
        if proc.returncode == 0 and proc.stdout.strip():
            row.update(json.loads(proc.stdout.strip().splitlines()[-1]), result="ok")
        elif proc.returncode in (-9, 137):
            row["result"] = "killed (OOM at the limit)"
        else:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            row["result"] = f"failed ({proc.returncode}): {tail[:200]}"
        if cgroup:
            peak = _read_int(os.path.join(cgroup, "memory.max_usage_in_bytes"))
            row["cgroup_peak_bytes"] = peak
        return row
    except subprocess.TimeoutExpired:
        return {"mode": mode, "tokens": tokens, "result": f"timed out after {args.timeout} s"}
    finally:
        if cgroup:
            remove_cgroup(cgroup)


def _fmt(value: float | None, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value / scale:.2f}"


def table(rows: list[dict]) -> str:
    lines = ["| prompt | mode | TTFT s | prompt tok/s | passes | GB read | I/O stall s | "
             "peak RSS GB | promise GB | result |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = r.get("result") == "ok"
        ttft = r.get("ttft_s") if ok else None
        read = r.get("engine_bytes", r.get("read_bytes")) if ok else None
        tps = r["tokens"] / ttft if ttft else None
        lines.append(
            f"| {r['tokens']} | {r['mode']} | {_fmt(ttft)} | {_fmt(tps)} | "
            f"{r.get('passes', '-')} | {_fmt(read, 1e9) if read is None else f'{read / 1e9:.3f}'}"
            f" | {_fmt(r.get('io_stall_s') if ok else None)} | "
            f"{_fmt(r.get('peak_rss_bytes') if ok else None, 1e9)} | "
            f"{_fmt(r.get('bound_bytes') if ok else None, 1e9)} | {r.get('result')} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> list[str]:
    """Per prompt length: layer-major's TTFT and bytes against the chunked path's and
    llama.cpp's best surviving variant."""
    out = []
    for n in sorted({r["tokens"] for r in rows}):
        ok = {r["mode"]: r for r in rows if r["tokens"] == n and r.get("result") == "ok"}
        lm = ok.get("layer-major")
        if lm is None:
            continue
        for other, r in ok.items():
            if other == "layer-major":
                continue
            ratio = r["ttft_s"] / lm["ttft_s"]
            read_lm, read_o = lm["engine_bytes"], r.get("engine_bytes", r.get("read_bytes"))
            out.append(f"{n} tokens: layer-major TTFT {lm['ttft_s']:.2f} s vs {other} "
                       f"{r['ttft_s']:.2f} s = {ratio:.2f}x faster; reads "
                       f"{read_lm / 1e9:.3f} vs {read_o / 1e9:.3f} GB")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model")
    p.add_argument("--prompts", default="512,2048",
                   help="prompt lengths in tokens, comma-separated (default 512,2048)")
    p.add_argument("--modes", default="layer-major,chunked,llama.cpp",
                   help="layer-major, chunked, llama.cpp (a .gguf, llama-cpp-python installed)")
    p.add_argument("--llama-cpp-variants", choices=("no-repack", "default", "both"),
                   default="no-repack")
    p.add_argument("--limit", default=None,
                   help="cgroup v1 memory limit for each run (root), e.g. 4GiB; the engine "
                   "then runs with --memory-budget auto unless --memory-budget is given")
    p.add_argument("--memory-budget", default=None)
    p.add_argument("--direct-io", action="store_true")
    p.add_argument("--kv-bits", type=int, choices=(4, 8), default=None,
                   help="the engine's KV cache quantized (a 2k prompt's float32 KV on a 7B is "
                   "2.2 GB; llama.cpp's is float16)")
    p.add_argument("--threads", "-t", type=int, default=2)
    p.add_argument("--chunk", type=int, default=512,
                   help="prefill_chunk: the chunked path's rows per pass, layer-major's tile")
    p.add_argument("--repeats", "-r", type=int, default=1)
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    p.add_argument("--json", default=None, help="write the rows here as JSON")


def main_from_args(args: argparse.Namespace) -> int:
    from stream_run.engine.config import parse_size

    try:
        args.limit_bytes = parse_size(args.limit) if args.limit else None
    except ValueError as exc:
        print(f"stream-bench prefill: error: --limit: {exc}", file=sys.stderr)
        return 2
    if args.limit_bytes and args.memory_budget is None:
        args.memory_budget = "auto"
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    runs: list[str] = []
    for m in modes:
        if m == "llama.cpp":
            variants = list(LLAMA_VARIANTS) if args.llama_cpp_variants == "both" \
                else [args.llama_cpp_variants]
            runs += [f"llama.cpp {v}" for v in variants]
        elif m in MODES:
            runs.append(m)
        else:
            print(f"stream-bench prefill: error: --modes: unknown mode {m!r} (choose from "
                  f"{', '.join((*MODES, 'llama.cpp'))})", file=sys.stderr)
            return 2
    try:
        prompts = [int(t) for t in args.prompts.split(",")]
        if min(prompts) <= 0:
            raise ValueError
    except ValueError:
        print(f"stream-bench prefill: error: --prompts: not a list of positive integers: "
              f"{args.prompts!r}", file=sys.stderr)
        return 2
    rows = []
    for n in prompts:
        for mode in runs:
            for _ in range(args.repeats):
                row = run_child(args.model, mode, n, args)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    print(f"\n{os.path.basename(args.model)}, limit {args.limit or 'none'}, budget "
          f"{args.memory_budget or 'unlimited'}, {args.threads} threads, chunk {args.chunk}")
    print(table(rows))
    for line in summary(rows):
        print(line)
    if args.repeats > 1:
        for n in prompts:
            for mode in runs:
                t = [r["ttft_s"] for r in rows if r["tokens"] == n and r["mode"] == mode
                     and r.get("result") == "ok"]
                if t:
                    print(f"{n} {mode}: TTFT median {statistics.median(t):.2f} min "
                          f"{min(t):.2f} max {max(t):.2f} s over {len(t)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stream_run.bench.prefill")
    add_arguments(p)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tokens", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--cgroup", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.mode = args.child
        args.cgroup = args.cgroup or None
        return child_main(args)
    return main_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
