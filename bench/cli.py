"""stream-bench: the SSD bandwidth study. Disk and engine, side by side, on the same files.

    stream-bench disk PATH                      fio-style read sweep of a file or directory
    stream-bench stream MODEL                   s/token vs memory budget and prefetch depth
    stream-bench tokens MODEL -p 512 -n 128     llama-bench style pp/tg table
    stream-bench project --shape 70b --bits 4 --budget 24GB    predicted s/token
    stream-bench synth --shape 7b --out DIR     synthetic HF model with random weights
    stream-bench synth --format gguf --quant q4_k_m --out F.gguf    ... as one GGUF file
    stream-bench soak MODEL --duration 3600 --clients 8    stream-serve under a mixed load
    stream-bench prefill MODEL --prompts 512,2048 --limit 4GiB    time to first token, long prompts
    stream-bench turns MODEL --tokens 2000 --memory-budget 50%    a chat's second turn
    stream-bench speculative [MODEL] --memory-budget 75MB    tok/s with and without drafts

Every study prints a Markdown table, appends JSON lines (--json FILE) and draws PNGs
(--plot DIR); --quick runs a small sweep (under a minute on small models).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import sys

from stream_run.cli.common import USER_ERRORS
from stream_run.engine import format_size, parse_size
from stream_run.models import REGISTRY

SIZE_HELP = "sizes like 4KiB,1MiB"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _outputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", default=None, metavar="FILE", help="append JSON lines here")
    p.add_argument("--plot", default=None, metavar="DIR", help="write PNG plots here")
    p.add_argument("--quick", action="store_true", help="a small sweep (CI, a first look)")


def _dims(p: argparse.ArgumentParser) -> None:
    for name in ("hidden-size", "intermediate-size", "layers", "heads", "kv-heads", "vocab"):
        p.add_argument(f"--{name}", type=int, help="with --shape custom")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="stream-bench", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    d = sub.add_parser("disk", help="read GB/s, IOPS, latency: block size x queue depth x mode")
    d.add_argument("path", help="a file or a directory of files (e.g. a model directory)")
    d.add_argument("--modes", help="buffered,direct,mmap (default: all)")
    d.add_argument("--patterns", help="seq,rand (default: both)")
    d.add_argument("--blocks", help=f"block sizes, {SIZE_HELP} (default 4KiB..64MiB, x4)")
    d.add_argument("--threads", help="reader threads = queue depth (default 1,2,4,8,16,32)")
    d.add_argument("--qd-blocks", help="block sizes of the queue-depth curves (4KiB,1MiB)")
    d.add_argument("--grid", action="store_true", help="every block x every thread count")
    d.add_argument("--bytes-per-point", help="stop a point after this many bytes (256MiB)")
    d.add_argument("--seconds-per-point", type=float, help="... or this long (1.5)")
    d.add_argument("--warm", action="store_true", help="do not evict the page cache first")
    d.add_argument("--hints", action="store_true",
                   help="fio's fadvise_hint: fadvise/madvise SEQUENTIAL or RANDOM per pattern")
    _outputs(d)

    t = sub.add_parser("stream", help="engine s/token, GB/s, stalls vs budget and depth")
    t.add_argument("model")
    t.add_argument("--budget", default=None,
                   help="memory budgets: fractions of the model's compute-tier bytes and/or "
                        "sizes, 'min', 'none' (default 0.25,0.5,1.0)")
    t.add_argument("--prefetch-depth", default=None, help="depths, e.g. 0,2,4 or 0-4 (0-4)")
    t.add_argument("--tokens", type=int, default=None, help="decode steps timed per point (4)")
    t.add_argument("--backend", default="numpy", choices=("numpy", "mlx", "auto"))
    t.add_argument("--io-workers", type=int, default=8)
    t.add_argument("--adaptive", action="store_true",
                   help="let the engine deepen the prefetch window (off: depth is fixed)")
    t.add_argument("--in-process", action="store_true",
                   help="run points in this process (faster; peak RSS then needs VmHWM reset)")
    t.add_argument("--disk-bytes", default=None, help="bytes per disk point (1GiB)")
    t.add_argument("--no-llama-cpp", action="store_true",
                   help="skip the llama.cpp rows (run for a .gguf when llama-cpp-python is "
                   "installed: same file, same budgets, in a cgroup memory limit)")
    _outputs(t)

    k = sub.add_parser("tokens", help="llama-bench style pp/tg tokens per second")
    k.add_argument("model")
    k.add_argument("-p", "--n-prompt", default=None, help="prompt lengths, e.g. 512 (0: skip)")
    k.add_argument("-n", "--n-gen", default=None, help="generated lengths, e.g. 128 (0: skip)")
    k.add_argument("-r", "--repetitions", type=int, default=None, help="after a warm-up (5)")
    k.add_argument("--backends", default="numpy",
                   help="comma list of numpy,mlx,auto,llama.cpp (llama.cpp: a .gguf model and "
                   "llama-cpp-python installed)")
    k.add_argument("--threads", "-t", type=int, default=None,
                   help="CPU threads for every backend (default: physical cores)")
    k.add_argument("--budget", default=None, help="memory budget: a size or a fraction")
    k.add_argument("--prefetch-depth", type=int, default=2)
    k.add_argument("--seed", type=int, default=0)
    _outputs(k)

    j = sub.add_parser("project", help="predict s/token for shapes this machine cannot hold")
    src = j.add_mutually_exclusive_group(required=True)
    src.add_argument("--shape", help="7b, 13b, 70b, 405b, 1t, or custom (with the sizes); "
                     "Mixture-of-Experts: deepseek-v3, kimi-k2, qwen3-235b-a22b, "
                     "qwen3-30b-a3b, gpt-oss-120b, mixtral-8x7b, ... (bench/moe_project.py)")
    src.add_argument("--model", help="project a model directory instead of a shape")
    _dims(j)
    j.add_argument("--bits", type=int, default=4, help="2, 3, 4, 5, 6, 8 or 16 (bf16)")
    j.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128))
    j.add_argument("--budget", required=True, help="memory budgets, e.g. 24GB or 24GB,48GB")
    j.add_argument("--prefetch-depth", default="2", help="depths, e.g. 2 or 0,2,4")
    j.add_argument("--io-workers", type=int, default=8)
    j.add_argument("--backend", default="numpy", choices=("numpy", "mlx", "auto"))
    j.add_argument("--disk-json", help="the disk curve from a `disk` or `stream` --json file")
    j.add_argument("--disk", help="measure the disk curve on this file/directory instead")
    j.add_argument("--probe-width", type=int, default=None,
                   help="hidden size of the compute probe (2048, MoE shapes 4096; 1024 with "
                   "--quick)")
    j.add_argument("--scratch", default=None, help="where the probe model is written (tmp)")
    j.add_argument("--hosts", default="1", help="pipeline hosts, e.g. 4 or 4,8 (stream-run "
                   "--pipeline: each host its own disk and budget; default 1: no pipeline)")
    j.add_argument("--link-gbps", type=float, default=10.0,
                   help="the hosts' link, Gb/s (with --hosts; default 10)")
    j.add_argument("--link-latency-ms", type=float, default=1.0,
                   help="per hop (with --hosts; default 1)")
    j.add_argument("--streams", type=int, default=4,
                   help="concurrent streams for the aggregate throughput (with --hosts)")
    j.add_argument("--verify-rows", type=int, default=None,
                   help="speculative decoding: rows per verification pass (1 + draft tokens, "
                   "2..8); their compute is timed on the probe")
    j.add_argument("--tokens-per-pass", default=None,
                   help="with --verify-rows: tokens kept per pass, e.g. 1.6,2.1 (as `stream-bench "
                   "speculative` measures them)")
    j.add_argument("--router-skew", default="0,0.5,1",
                   help="MoE shapes: Zipf exponents of expert popularity for the expert hit "
                   "rate (0: a uniform router), e.g. 0,0.5,1")
    j.add_argument("--hit-rate", default=None,
                   help="MoE shapes: measured expert hit rates (0..1, e.g. 0.76) projected "
                   "beside the Zipf ones")
    _outputs(j)

    s = sub.add_parser("synth", help="write a synthetic model (HF or GGUF) with random weights")
    s.add_argument("--arch", default="llama", choices=REGISTRY.model_types)
    s.add_argument("--shape", default="7b", help="7b, 13b, 70b, tiny, or custom; with an MoE "
                   "--arch: qwen3-30b-a3b, qwen3-moe-mid (qwen3_moe), mixtral-8x7b (mixtral), "
                   "deepseek-v3, kimi-k2, deepseek-v3-mini (deepseek_v3), gpt-oss-20b, "
                   "gpt-oss-120b (gpt_oss), tiny-moe")
    s.add_argument("--format", default="hf", choices=("hf", "gguf"),
                   help="hf: a model directory; gguf: one .gguf file, as llama.cpp writes it")
    s.add_argument("--dtype", default=None, choices=("bf16", "f16", "f32", "mxfp4"),
                   help="HF weights dtype (bf16); mxfp4: gpt_oss's experts MXFP4 as OpenAI "
                   "ships them, the rest bf16")
    s.add_argument("--quant", default=None,
                   help="with --format gguf: f32, f16, bf16 (default), q8_0, q4_0, q4_1, q5_0, "
                   "q5_1, q2_k, q3_k, q4_k, q5_k, q6_k, or llama.cpp's mixes q4_k_m, q5_k_m; "
                   "--arch gpt_oss: experts MXFP4 (as llama.cpp's gpt-oss GGUFs), biases F32, "
                   "the rest this type")
    s.add_argument("--out", required=True,
                   help="output directory, or .gguf file with --format gguf (must not exist)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--router-skew", type=float, default=0.0,
                   help="MoE: Zipf exponent of expert popularity (0: the uniform routing of "
                   "random weights; 1: expert of rank r picked about 1/r as often as the top; "
                   "not for gpt_oss)")
    _dims(s)
    for name, what in (("experts", "routed experts per layer"),
                       ("experts-per-tok", "experts each token picks"),
                       ("expert-size", "each expert's intermediate size"),
                       ("head-dim", "attention head size (default hidden / heads)")):
        s.add_argument(f"--{name}", type=int, default=None, help=f"with --shape custom: {what}")

    from stream_run.bench import soak

    soak.add_arguments(sub.add_parser("soak", help="drive stream-serve with concurrent clients "
                                      "for a set time; errors, RSS growth, latency"))
    from stream_run.bench import prefill

    prefill.add_arguments(sub.add_parser("prefill", help="time to first token and bytes read "
                                         "for long prompts: layer-major, chunked, llama.cpp"))
    from stream_run.bench import turns

    turns.add_arguments(sub.add_parser("turns", help="a chat's second turn: time to first "
                                       "token with the prefix cache and without"))
    from stream_run.bench import speculative

    speculative.add_arguments(sub.add_parser("speculative", help="decode tok/s with and "
                                             "without speculative decoding (prompt lookup, "
                                             "a draft model) on grounded tasks and random text"))
    return p


def _sizes(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(parse_size(x) for x in text.split(","))
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None


def _header(what: str, meta: dict) -> None:
    load = " ".join(f"{x:.2f}" for x in meta["loadavg"] or [])
    print(f"stream-bench {what} — {meta['cpu']} ({meta['cpus']} CPUs), {meta['os']}, "
          f"git {meta['git']}, load average {load}\n")


def _plot(kind: str, args: argparse.Namespace, title: str, *data: object) -> None:
    """Draw bench.plots.<kind>(*data, out_dir, title) when --plot was given."""
    if args.plot:
        from stream_run.bench import plots

        for path in getattr(plots, kind)(*data, args.plot, title):
            print(f"wrote {path}", file=sys.stderr)


def disk_cmd(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from stream_run.bench import disk
    from stream_run.bench.env import run_metadata
    from stream_run.bench.report import disk_table, write_jsonl
    from stream_run.bench.streaming import parse_ints

    base = disk.QUICK if args.quick else disk.SweepConfig()
    fields = {"modes": args.modes and tuple(args.modes.split(",")),
              "patterns": args.patterns and tuple(args.patterns.split(",")),
              "blocks": args.blocks and _sizes(args.blocks, "--blocks"),
              "qd_blocks": args.qd_blocks and _sizes(args.qd_blocks, "--qd-blocks"),
              "threads": args.threads and tuple(parse_ints(args.threads, "--threads", 1, 256)),
              "bytes_per_point": args.bytes_per_point and parse_size(args.bytes_per_point),
              "seconds_per_point": args.seconds_per_point}
    config = replace(base, **{k: v for k, v in fields.items() if v is not None},
                     grid=args.grid, warm=args.warm, hints=args.hints)
    files = disk.list_files(args.path)
    meta = run_metadata(files[0])
    _header(f"disk {args.path}", meta)
    run = disk.sweep(args.path, config, progress=lambda p: print(
        f"  {p.mode} {p.pattern} {p.block_bytes} x{p.threads}: {p.gbs:.3f} GB/s", file=sys.stderr))
    records = [{**p.to_dict(), "path": os.path.abspath(args.path), "files": len(run.files),
                "nbytes": run.nbytes} for p in run.points]
    write_jsonl(args.json, records, meta)
    print(f"{len(run.files)} file(s), {format_size(run.nbytes)}; at most "
          f"{format_size(config.bytes_per_point)} or {config.seconds_per_point:g} s per point; "
          "buffers: page-aligned anonymous mappings with transparent huge pages, one per "
          "thread; access hints: " + ("fadvise/madvise by pattern" if config.hints else
                                      "none (kernel readahead: "
                                      f"{(meta.get('device') or {}).get('read_ahead_kb')} KiB)")
          + "\n")
    print(disk_table(records))
    if any(r["mode"] != "direct" and r["cache"].startswith("warm") for r in records):
        print("\nbuffered/mmap points marked warm read (partly) from the page cache")
    _plot("disk", args, os.path.basename(os.path.normpath(args.path)), records)
    return 0


def stream_cmd(args: argparse.Namespace) -> int:
    from stream_run.bench.env import run_metadata
    from stream_run.bench.report import size, stream_table, write_jsonl
    from stream_run.bench.streaming import parse_ints, run_sweep

    quick = args.quick
    depths = parse_ints(args.prefetch_depth or ("0,2" if quick else "0-4"), "--prefetch-depth",
                        0, 16)
    tokens = args.tokens if args.tokens is not None else (2 if quick else 4)
    budgets = args.budget or ("0.5,1.0" if quick else "0.25,0.5,1.0")
    disk_bytes = parse_size(args.disk_bytes) if args.disk_bytes else (
        64 * 2**20 if quick else 2**30)
    meta = run_metadata(args.model)
    _header(f"stream {args.model}", meta)
    sweep = run_sweep(
        args.model, budgets, depths, tokens, backend=args.backend, io_workers=args.io_workers,
        adaptive=args.adaptive, in_process=args.in_process, disk_bytes=disk_bytes,
        disk_seconds=0.3 if quick else 2.0, clamp_budgets=args.budget is None,
        progress=lambda r: print(f"  budget {r['budget']} depth {r['prefetch_depth']}: "
                                 f"{r['s_per_token_median']:.3g} s/token", file=sys.stderr))
    records = [sweep.record(b, p) for b, p in sweep.points]
    disk_records = [{**p.to_dict(), "source": "stream", "path": sweep.model["path"]}
                    for p in sweep.disk.points]
    write_jsonl(args.json, [*disk_records, *records], meta)
    m = sweep.model
    best = sweep.disk.best
    print(f"{m['name']}: {m['dtype']}"
          + (f", quantization {m['quantization']}" if m["quantization"] else "")
          + f", {format_size(m['disk_bytes'])} on disk, {format_size(sweep.model_bytes)} in "
          f"compute form (budget fractions are of this), minimum budget "
          f"{format_size(sweep.min_budget_bytes)}; backend {args.backend}, {tokens} decode "
          f"steps timed per point after one untimed pass")
    if best is not None:
        print(f"disk, same files, this run ({best.mode}, sequential): best {best.gbs:.2f} GB/s "
              f"({size(best.block_bytes)} blocks, {best.threads} thread(s)); one thread "
              f"{sweep.raw_gbs:.2f} GB/s")
    scope = {p.peak_rss_scope for _, p in sweep.points}
    print("peak RSS: " + ("each point in a fresh process (VmHWM)" if not args.in_process else
                          "per point (VmHWM reset)" if scope == {"point"} else
                          "this process's peak so far") + "\n")
    print(stream_table(records))
    _plot("stream", args, m["name"], records)
    if args.model.endswith(".gguf") and os.path.isfile(args.model) and not args.no_llama_cpp:
        _llama_cpp_rows(args, sweep, tokens, meta)
    return 0


def _llama_cpp_rows(args: argparse.Namespace, sweep, tokens: int, meta: dict) -> None:
    """llama.cpp on the same GGUF at the sweep's budgets (bench.llamacpp_stream)."""
    from stream_run.bench import llamacpp_stream
    from stream_run.bench.llamacpp import available
    from stream_run.bench.report import write_jsonl
    from stream_run.engine.config import default_threads

    if not available():
        print("\nllama.cpp rows skipped: llama-cpp-python is not installed (pip install "
              "llama-cpp-python; build flags in bench/llamacpp.py)")
        return
    threads = default_threads()
    rows = llamacpp_stream.run_rows(
        args.model, llamacpp_stream.budget_limits(sweep), tokens, threads, timeout_s=1800,
        progress=lambda r: print(f"  llama.cpp {r.variant}, budget {r.budget}: {r.result}",
                                 file=sys.stderr))
    write_jsonl(args.json, [r.record() for r in rows], meta)
    print(f"\nllama.cpp, same file, {threads} threads, {tokens} tokens timed after one untimed "
          "pass, file evicted from the page cache first; each run in a cgroup memory limit "
          "(page cache included) of the budget plus the engine's peak RSS beyond it; read = "
          "the process's read_bytes\n")
    print(llamacpp_stream.table(rows))


def tokens_cmd(args: argparse.Namespace) -> int:
    from stream_run.bench.decode import bench_model
    from stream_run.bench.env import model_info, param_count, run_metadata
    from stream_run.bench.report import bandwidth_lines, tokens_table, write_jsonl
    from stream_run.bench.streaming import model_sizes, parse_budgets, parse_ints
    from stream_run.engine import EngineConfig
    from stream_run.models import open_model
    from stream_run.scheduler import SchedulerConfig

    quick = args.quick
    pp = parse_ints(args.n_prompt or ("32" if quick else "512"), "-p", 0, 1 << 20)
    tg = parse_ints(args.n_gen or ("8" if quick else "128"), "-n", 0, 1 << 20)
    reps = args.repetitions if args.repetitions is not None else (2 if quick else 5)
    if reps < 1:
        raise ValueError(f"-r must be >= 1, got {reps}")
    info = model_info(args.model)
    params = param_count(open_model(args.model).index.spec)
    meta = run_metadata(args.model)
    _header(f"tokens {args.model}", meta)
    records: list[dict] = []
    if args.budget and "," in args.budget:
        raise ValueError(f"--budget: tokens takes one budget, got {args.budget!r}")
    from stream_run.bench.llamacpp import NAME as LLAMA_CPP
    from stream_run.bench.llamacpp import bench_llama_cpp, check
    from stream_run.engine.config import default_threads, usable_cpus

    backends = args.backends.split(",")
    if LLAMA_CPP in backends:
        check(args.model)
    threads = default_threads() if args.threads is None else args.threads
    if not 1 <= threads <= usable_cpus():
        raise ValueError(f"--threads must be between 1 and {usable_cpus()}, got {threads}")
    tests = [("pp", n) for n in pp] + [("tg", n) for n in tg]
    results = []
    for backend in backends:
        budget = None
        if backend == LLAMA_CPP:
            result = bench_llama_cpp(args.model, tests, reps, threads, args.seed)
        else:
            if args.budget:
                model_bytes, min_bytes = model_sizes(args.model, backend)
                budget = parse_budgets(args.budget, model_bytes, min_bytes)[0].nbytes
            config = EngineConfig(backend=backend, memory_budget_bytes=budget, threads=threads,
                                  scheduler=SchedulerConfig(prefetch_depth=args.prefetch_depth))
            result = asyncio.run(bench_model(args.model, config, tests, reps, args.seed))
        results.append(result)
        records += [{**t.to_dict(), "model": info["name"], "quantization": info["quantization"],
                     "budget_bytes": budget, "threads": threads} for t in result.trials]
    write_jsonl(args.json, records, meta)
    print(f"{reps} repetitions after one warm-up run per test, random prompt ids (seed "
          f"{args.seed}), EOS ignored; ppN = one prompt of N tokens (prefilled in chunks of "
          "512), tgN = N decode steps after a one-token prompt\n")
    print(tokens_table(records, info, params))
    if tg:
        print(bandwidth_lines(results, f"tg{tg[0]}"))
    _plot("tokens", args, info["name"], records)
    return 0


def _custom(args: argparse.Namespace) -> dict:
    fields = {"hidden_size": args.hidden_size, "intermediate_size": args.intermediate_size,
              "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
              "num_key_value_heads": args.kv_heads or args.heads, "vocab_size": args.vocab}
    missing = [k for k, v in fields.items() if v is None]
    if missing:
        raise ValueError(f"--shape custom needs {', '.join(missing)}")
    return fields


def _project_target(args: argparse.Namespace) -> tuple:
    """(layout, description, dims or None) of the model or shape to project."""
    from stream_run.bench import project
    from stream_run.bench.synth import SynthSpec

    if args.model:
        layout = project.layout_from_model(args.model, args.backend)
        bits = "bf16" if layout.bits >= 16 else f"{layout.bits}-bit"
        return layout, f"{layout.name} ({bits})", None
    if args.bits not in (2, 3, 4, 5, 6, 8, 16):
        raise ValueError(f"--bits must be 2, 3, 4, 5, 6, 8 or 16, got {args.bits}")
    if args.shape == "custom":
        f = SynthSpec(**_custom(args))  # checks the sizes
        dims = (f.hidden_size, f.intermediate_size, f.num_hidden_layers,
                f.num_attention_heads, f.num_key_value_heads, f.vocab_size)
    elif args.shape in project.SHAPES:
        dims = project.SHAPES[args.shape]
    else:
        raise ValueError(f"--shape must be one of {', '.join(project.SHAPES)} or custom, "
                         f"got {args.shape!r}")
    layout = project.layout_from_shape(args.shape, dims, args.bits, args.group_size,
                                       args.backend)
    what = (f"{args.shape} (hidden {dims[0]}, intermediate {dims[1]}, {dims[2]} layers, "
            f"{dims[3]}/{dims[4]} heads, vocab {dims[5]}) at "
            + ("bf16" if args.bits >= 16 else f"{args.bits}-bit g{args.group_size}"))
    return layout, what, dims


def _project_inputs(args: argparse.Namespace, layout, dims) -> tuple:
    """(compute rates, disk points, where the disk curve came from): compute measured on the
    model itself or on a probe of the shape; the disk read from --disk-json or measured."""
    import psutil

    from stream_run.bench import disk, project
    from stream_run.bench.report import read_jsonl
    from stream_run.bench.streaming import measure_disk

    points = read_jsonl(args.disk_json, "disk") if args.disk_json else None
    tokens = (3 if args.quick else 6) if args.model else (4 if args.quick else 16)  # probe: cheap
    width = args.probe_width or (1024 if args.quick else 2048)
    fits = not args.model or layout.compute_bytes < 0.5 * psutil.virtual_memory().available
    probe = (contextlib.nullcontext(args.model) if args.model else
             project.probe_model(dims, args.bits, args.group_size, width, args.scratch))
    rows = (args.verify_rows,) if args.verify_rows else ()
    with probe as model_dir:
        rates = project.measure_compute(model_dir, args.backend, tokens, resident=fits,
                                        verify_rows=rows)
        if not args.model:
            E, I, L = project.probe_dims(dims, width)[:3]
            rates.source = rates.source.replace(
                "measured on ", f"measured on a probe model (hidden {E}, intermediate {I}, "
                f"{L} layers) ") + ", scaled by compute-form bytes"
        if points is not None:
            return rates, points, f"read from {args.disk_json} ({len(points)} points)"
        where = args.disk or model_dir
        run = measure_disk(disk.list_files(where), (32 if args.quick else 512) * disk.MiB,
                           0.3 if args.quick else 2.0,
                           blocks=tuple(disk.KiB * 4**k for k in range(3, 9)),  # 64 KiB..64 MiB
                           threads=(1, 2, 4))
        source = (f"measured now on {where} ({format_size(run.nbytes)}"
                  + ("; the probe's small files: pass --disk-json from a `disk` run for your "
                     "SSD" if not (args.disk or args.model) else "") + ")")
        return rates, [p.to_dict() for p in run.points], source


def _pipeline_report(args: argparse.Namespace, layout, dims, hosts: list[int], budgets,
                     depth: int, rates, points) -> None:
    """--hosts: the projection over a pipeline of hosts (bench/pipeline_project.py)."""
    from stream_run.bench import pipeline_project as pp
    from stream_run.bench.report import seconds

    if args.link_gbps <= 0 or args.link_latency_ms < 0 or args.streams < 1:
        raise ValueError("--link-gbps must be > 0, --link-latency-ms >= 0, --streams >= 1")
    hidden = dims[0] if dims else layout_hidden(args)
    print(f"\npipeline over hosts (budget per host; prefetch depth {depth}):")
    head = ["hosts", "budget/host", "layers/host", "stage read", "stage compute",
            "s/token (1 stream)", "tok/s (1 stream)", f"tok/s ({args.streams} streams, "
            "one pass)", f"tok/s ({args.streams}, micro-batched, bound)"]
    rows = []
    for n in (h for h in hosts if h > 1):
        for b in budgets:
            p = pp.predict_pipeline(layout, hidden, n, args.link_gbps,
                                    args.link_latency_ms / 1e3, b.nbytes, depth,
                                    args.io_workers, rates, points, args.streams)
            rows.append([str(n), "unlimited" if b.nbytes is None else format_size(b.nbytes),
                         ",".join(map(str, p.layers_per_host)),
                         seconds(max(p.stage_read_s)), seconds(max(p.stage_compute_s)),
                         f"**{seconds(p.s_per_token)}**", f"{1 / p.s_per_token:.3g}",
                         f"{p.batched_tok_s:.3g}", f"{p.microbatch_tok_s:.3g}"])
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print("\npipeline assumptions:")
    for line in pp.assumptions(max(hosts), args.link_gbps, args.link_latency_ms / 1e3):
        print(f"- {line}")


def _tokens_per_pass(args: argparse.Namespace) -> list[float]:
    """--verify-rows / --tokens-per-pass, checked (ValueError names the flag)."""
    if args.verify_rows is None:
        if args.tokens_per_pass:
            raise ValueError("--tokens-per-pass needs --verify-rows")
        return []
    if not 2 <= args.verify_rows <= 8:
        raise ValueError(f"--verify-rows must be 2..8, got {args.verify_rows}")
    try:
        accept = [float(a) for a in (args.tokens_per_pass or "").split(",") if a.strip()]
    except ValueError:
        raise ValueError(f"--tokens-per-pass must be numbers, e.g. 1.6,2.1, got "
                         f"{args.tokens_per_pass!r}") from None
    if any(not 1 <= a <= args.verify_rows for a in accept):
        raise ValueError(f"--tokens-per-pass values must be 1..{args.verify_rows} (--verify-rows)"
                         f", got {args.tokens_per_pass!r}")
    return accept


def _speculative_report(args: argparse.Namespace, layout, budgets, depth: int, rates, points,
                        accept: list[float]) -> None:
    """--verify-rows: s/token with speculative decoding at the given tokens per pass, and the
    tokens per pass that halve plain decoding's s/token."""
    from stream_run.bench import project
    from stream_run.bench.report import seconds

    k = args.verify_rows
    print(f"\nspeculative decoding: passes of {k} rows (their block compute "
          f"{rates.rows_factor[k]:.2f}x one row's, timed on the probe; prefetch depth {depth}):")
    head = ["budget", "plain s/token", *[f"{a:g} tok/pass" for a in accept],
            "tok/pass to halve s/token"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for b in budgets:
        plain = project.predict(layout, b.nbytes, depth, args.io_workers, rates, points)
        spec = project.predict(layout, b.nbytes, depth, args.io_workers, rates, points, rows=k)
        need = 2 * spec.s_per_token / plain.s_per_token  # pass time over half a plain token
        gain = plain.s_per_token / spec.s_per_token  # per tok/pass
        cells = [f"{seconds(spec.s_per_token / a)} ({gain * a:.2f}x)" for a in accept]
        print("| " + " | ".join([
            "unlimited" if b.nbytes is None else format_size(b.nbytes),
            seconds(plain.s_per_token), *cells,
            f"{need:.2f}" if need <= k else f"{need:.2f} (more than {k} rows give)"]) + " |")


def layout_hidden(args: argparse.Namespace) -> int:
    """The hidden size of --model (a pipeline hop's row width)."""
    from stream_run.models import open_model

    return open_model(args.model).index.spec.hidden_size


def _floats(text: str | None, flag: str, lo: float, hi: float) -> list[float]:
    """'0,0.5,1' -> [0.0, 0.5, 1.0], each in [lo, hi] (ValueError names the flag)."""
    try:
        out = [float(x) for x in (text or "").split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be numbers, e.g. 0,0.5,1, got {text!r}") from None
    if any(not lo <= x <= hi for x in out):
        raise ValueError(f"{flag} values must be in {lo:g}..{hi:g}, got {text!r}")
    return out


def moe_project_cmd(args: argparse.Namespace) -> int:
    """project --shape of an MoE model (bench/moe_project.py)."""
    from stream_run.bench import moe_project as mp
    from stream_run.bench.env import run_metadata
    from stream_run.bench.report import read_jsonl, write_jsonl
    from stream_run.bench.streaming import parse_budgets, parse_ints

    if args.bits not in (2, 3, 4, 5, 6, 8, 16):
        raise ValueError(f"--bits must be 2, 3, 4, 5, 6, 8 or 16, got {args.bits}")
    for flag, value in (("--verify-rows", args.verify_rows), ("--hosts", args.hosts != "1")):
        if value:
            raise ValueError(f"{flag} is not supported for MoE shapes ({args.shape})")
    depths = parse_ints(args.prefetch_depth, "--prefetch-depth", 0, 16)
    skews = _floats(args.router_skew, "--router-skew", 0, 8)
    hits = _floats(args.hit_rate, "--hit-rate", 0, 1)
    if not skews and not hits:
        raise ValueError("--router-skew and --hit-rate are both empty: nothing to project")
    spec = mp.moe_spec(args.shape)
    layout = mp.moe_layout(spec, args.bits, args.group_size, args.backend, args.shape)
    budgets = parse_budgets(args.budget, layout.compute_bytes, mp.min_budget(layout))
    if args.disk_json and not os.path.exists(args.disk_json):
        raise FileNotFoundError(f"{args.disk_json}: no such file (--disk-json)")
    meta = run_metadata(args.disk or args.scratch or None)
    _header("project", meta)
    bits = "bf16" if args.bits >= 16 else f"{args.bits}-bit g{args.group_size}"
    what = (f"{args.shape} ({spec.arch}, {layout.params / 1e9:.0f}B parameters, "
            f"{layout.active_params / 1e9:.1f}B active; {layout.n_experts} experts of "
            f"{format_size(layout.expert.disk_bytes)}, top-{layout.top_k}, "
            f"{len(layout.sparse_layers)} sparse layers) at {bits}")
    print(f"{what}: {format_size(layout.disk_bytes)} on disk, dense part "
          f"{format_size(sum(u.disk_bytes for u in layout.dense))}", flush=True)
    probe = mp.probe_spec(spec, args.probe_width or (1024 if args.quick else 4096))
    with mp.probe_model(probe, args.bits, args.group_size, args.scratch) as model_dir:
        rates = mp.measure_compute(model_dir, probe.num_experts_per_tok, args.backend,
                                   4 if args.quick else 8)
        rates.source = (f"measured on a probe {spec.arch} (hidden {probe.hidden_size}, "
                        f"{probe.num_experts} experts of {probe.moe_intermediate_size}, top-"
                        f"{probe.num_experts_per_tok}, 2 layers, {bits}, {args.backend}, "
                        "resident, median of the decode steps)")
        if args.disk_json:
            points = read_jsonl(args.disk_json, "disk")
            disk_source = f"read from {args.disk_json} ({len(points)} points)"
        else:
            points, disk_source = _moe_disk(args.disk or model_dir, layout, args.quick)
    records = []
    for b in budgets:
        for d in depths:
            for how in [*(("skew", s) for s in skews), *(("hit", h) for h in hits)]:
                p = mp.predict(layout, b.nbytes, d, args.io_workers, rates, points,
                               skew=how[1] if how[0] == "skew" else 0.0,
                               measured_hit=how[1] if how[0] == "hit" else None)
                records.append({**p.to_dict(), "target": what, "rates": vars(rates),
                                "disk_source": disk_source})
    write_jsonl(args.json, records, meta)
    print()
    print(mp.table(records))
    print("\nassumptions:")
    for line in mp.assumptions(rates, disk_source, args.io_workers):
        print(f"- {line}")
    return 0


def _moe_disk(where: str, layout, quick: bool) -> tuple[list[dict], str]:
    """Random O_DIRECT reads of one expert's size (1..8 in flight) and sequential reads at the
    dense units' sizes, measured now on `where`."""
    from stream_run.bench import disk

    files = disk.list_files(where)
    nbytes = (64 if quick else 512) * disk.MiB
    secs = 0.3 if quick else 1.5
    block = max(4096, layout.expert.disk_bytes // 4096 * 4096)
    points = [disk.measure_point(files, "direct", "rand", block, t, nbytes, secs)
              for t in (1, 2, 4, 8)]
    points += [disk.measure_point(files, "direct", "seq", b, t, nbytes, secs)
               for b in (4 * disk.MiB, 64 * disk.MiB) for t in (1, 2, 4)]
    if all(p.skipped for p in points):  # O_DIRECT refused: buffered, page cache evicted
        points = [disk.measure_point(files, "buffered", pat, b, t, nbytes, secs)
                  for pat, b in (("rand", block), ("seq", 4 * disk.MiB)) for t in (1, 2, 4, 8)]
    total = sum(os.path.getsize(f) for f in files)
    return [p.to_dict() for p in points], (
        f"measured now on {where} ({format_size(total)}"
        + ("; a small file: pass --disk PATH (a large file on your SSD) or --disk-json"
           if total < 1 << 30 else "") + ")")


def project_cmd(args: argparse.Namespace) -> int:
    from stream_run.bench import project
    from stream_run.bench.synth_moe import SHAPES as MOE_SHAPES

    if args.shape in MOE_SHAPES:
        return moe_project_cmd(args)
    if args.hit_rate is not None:
        what = f"--shape {args.shape}" if args.shape else "--model"
        raise ValueError("--hit-rate is for Mixture-of-Experts shapes (deepseek-v3, kimi-k2, "
                         f"qwen3-235b-a22b, ...), not {what}")
    from stream_run.bench.env import run_metadata
    from stream_run.bench.report import project_table, write_jsonl
    from stream_run.bench.streaming import parse_budgets, parse_ints

    depths = parse_ints(args.prefetch_depth, "--prefetch-depth", 0, 16)
    accept = _tokens_per_pass(args)
    layout, what, dims = _project_target(args)
    budgets = parse_budgets(args.budget, layout.compute_bytes, project.min_budget(layout))
    if args.disk_json and not os.path.exists(args.disk_json):
        raise FileNotFoundError(f"{args.disk_json}: no such file (--disk-json)")
    meta = run_metadata(args.disk or args.model or args.scratch or None)
    _header("project", meta)
    rates, points, disk_source = _project_inputs(args, layout, dims)
    preds = [project.predict(layout, b.nbytes, d, args.io_workers, rates, points)
             for b in budgets for d in depths]
    records = [{**p.to_dict(), "target": what, "params": layout.params,
                "disk_bytes": layout.disk_bytes, "compute_bytes": layout.compute_bytes,
                "rates": vars(rates), "disk_source": disk_source} for p in preds]
    write_jsonl(args.json, records, meta)
    print(f"{what}: {layout.params / 1e9:.1f} B parameters, {format_size(layout.disk_bytes)} "
          f"on disk, {format_size(layout.compute_bytes)} in compute form ({args.backend})\n")
    print(project_table(records))
    print("\nassumptions:")
    for line in project.assumptions(rates, disk_source):
        print(f"- {line}")
    if args.verify_rows:
        _speculative_report(args, layout, budgets, depths[0], rates, points, accept)
    hosts = parse_ints(args.hosts, "--hosts", 1, 4096)
    if any(h > 1 for h in hosts):
        _pipeline_report(args, layout, dims, hosts, budgets, depths[0], rates, points)
    if args.plot:
        lo = project.min_budget(layout)
        grid = [int(lo + (layout.compute_bytes - lo) * i / 40) for i in range(41)]
        curve = [project.predict(layout, b, depths[0], args.io_workers, rates, points).to_dict()
                 for b in grid]
        _plot("project", args, what.split(" (")[0], curve, records)
    return 0


def _synth_kind(args: argparse.Namespace) -> tuple[str, str | None]:
    """(HF dtype, GGUF quant or None) from --format, --dtype and --quant."""
    if args.format == "hf":
        if args.quant:
            raise ValueError("--quant needs --format gguf (an HF synth takes --dtype)")
        return args.dtype or "bf16", None
    if args.quant and args.dtype:
        raise ValueError("--format gguf takes --quant (f32, f16 and bf16 included), not --dtype")
    if not args.out.endswith(".gguf"):
        raise ValueError(f"--out must be a .gguf file with --format gguf, got {args.out!r}")
    quant = args.quant or args.dtype or "bf16"
    return (quant if quant in ("bf16", "f16", "f32") else "bf16"), quant


def synth(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from stream_run.bench.synth import SynthSpec, synthesize

    dtype, quant = _synth_kind(args)
    if os.path.exists(args.out):
        raise FileExistsError(f"{args.out}: already exists; choose a new --out "
                              + ("directory" if quant is None else "file"))
    moe = {"router_skew": args.router_skew}
    if args.shape == "custom":
        moe.update({k: v for k, v in (("num_experts", args.experts),
                                      ("num_experts_per_tok", args.experts_per_tok),
                                      ("moe_intermediate_size", args.expert_size),
                                      ("head_dim", args.head_dim)) if v is not None})
        spec = SynthSpec(arch=args.arch, dtype=dtype, seed=args.seed, **_custom(args), **moe)
    else:
        for flag in ("experts", "experts_per_tok", "expert_size", "head_dim"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} needs --shape custom")
        spec = SynthSpec.from_shape(args.shape, arch=args.arch, dtype=dtype, seed=args.seed,
                                    **moe)
    if quant is None:
        nbytes, what = spec.nbytes, dtype
        write = functools.partial(synthesize, spec, args.out)
    else:
        from stream_run.bench.synth_gguf import file_bytes, synthesize_gguf

        nbytes, what = file_bytes(spec, quant), f"GGUF {quant}"  # checks quant and arch
        write = functools.partial(synthesize_gguf, spec, quant, args.out,
                                  f"synth-{args.shape}-{quant}")  # no arch: llama.cpp keys on phi3
    print(f"writing {args.out}: {args.arch} {args.shape} {what}, {format_size(nbytes)}",
          file=sys.stderr)
    with tqdm(total=nbytes, unit="B", unit_scale=True, file=sys.stderr) as bar:
        write(progress=bar.update)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from stream_run.bench import prefill, soak, speculative, turns

    commands = {"synth": synth, "disk": disk_cmd, "stream": stream_cmd, "tokens": tokens_cmd,
                "project": project_cmd, "soak": soak.main_from_args,
                "prefill": prefill.main_from_args, "turns": turns.main_from_args,
                "speculative": speculative.main_from_args}
    try:
        return commands[args.command](args)
    except (*USER_ERRORS, RuntimeError) as exc:
        text = "; ".join(x.strip() for x in str(exc).splitlines() if x.strip())
        print(f"stream-bench: error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nstream-bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
