"""The engine and llama.cpp on the same file inside the same cgroup memory limit, caches dropped:
the issue-16 streaming comparison, one command.

    python -m stream_run.bench.limit_compare MODEL.gguf --limit 0.5 --tokens 8 --threads 2

MODEL is a .gguf file or a stream-convert directory (the engine rows only). --limit is a size
(2GiB) or a fraction of the model's bytes. Each run is a child process in a fresh
cgroup v1 memory limit (page cache included; bench/llamacpp_stream.make_cgroup), the model file
evicted from the page cache first:
- the engine: `stream-run MODEL --memory-budget auto --direct-io`, so the engine picks its own
  budget from the cgroup's limit (cli/common.py), as a user inside a container would;
- llama.cpp, its default (mmap, repacked) and with repacking off (bench/llamacpp_stream.py).
Per run: decode s/token and GB read per token (the median of the engine's decode passes, of
llama.cpp's per-token evals), the cgroup's peak and whether it was OOM-killed, and the load
average at its end.

The disk's ceiling is measured in the same run, before the first row and after the last: the
best of sequential O_DIRECT reads of the model file (bench/disk.py) at the engine's read sizes
and queue depths. The engine runs with a hook that prints one line per scheduler pass, so the
decode passes are profiled too: seconds, GB read against the file bytes of the units the plan
streams, GB/s against the ceiling, the share of the pass with a read in flight, I/O stall,
compute, hit rate and prefetch depth. Root only (skipped otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

from stream_run.bench import disk
from stream_run.bench.env import load_average
from stream_run.bench.llamacpp_stream import (
    VARIANTS,
    _oom_kills,
    _read_int,
    make_cgroup,
    remove_cgroup,
    run_row,
)
from stream_run.engine.config import parse_size

GB = 1e9
MiB = 2**20
PASS = "limit_compare pass "  # the engine child's per-pass lines on stderr
PASS_FIELDS = ("wall_s", "compute_s", "io_stall_s", "read_s", "prepare_s", "disk_busy_s",
               "bytes_read", "units_read", "hits", "misses", "prefetch_depth", "late_hits",
               "late_misses", "late_bytes_read", "lookahead_reads", "lookahead_used",
               "lookahead_wasted_bytes")


def _size(text: str, file_bytes: int) -> int:
    try:
        frac = float(text)
    except ValueError:
        return int(parse_size(text))
    return int(frac * file_bytes)


def random_reads(path: str, size: int, max_bytes: int = 1 << 30) -> str:
    """GB/s of random O_DIRECT reads of `size` bytes (4 KiB multiples) of the file at 1, 4
    and 8 threads: what the disk gives for reads of one expert's size."""
    block = max(4096, size // 4096 * 4096)
    points = [disk.measure_point([path], "direct", "rand", block, threads, max_bytes, 1.5)
              for threads in (1, 4, 8)]
    return ", ".join(f"{p.threads} threads {p.gbs:.2f}" if not p.skipped else
                     f"{p.threads} threads skipped" for p in points) + f" GB/s ({block} B reads)"


def model_files(model: str) -> list[str]:
    """The files of a model: the .gguf itself, or every file of a stream-convert directory."""
    if not os.path.isdir(model):
        return [model]
    return sorted(os.path.join(model, f) for f in os.listdir(model)
                  if os.path.isfile(os.path.join(model, f)))


def drop_caches() -> str:
    """Drop the whole page cache (root): `sync; echo 3 > /proc/sys/vm/drop_caches`."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        return f"drop_caches failed: {exc}"
    return "page cache dropped"


def disk_ceiling(model: str, max_bytes: int = 2 << 30) -> tuple[float, str]:
    """The best GB/s of sequential O_DIRECT reads of the file (or a directory's files), over
    the read sizes and queue depths the engine uses (one unit per I/O thread, preads of up to
    64 MiB); with the points."""
    points = [disk.measure_point(model_files(model), "direct", "seq", block, threads,
                                 max_bytes, 2.0)
              for block in (4 * MiB, 64 * MiB) for threads in (1, 2, 4, 8)]
    done = [p for p in points if not p.skipped]
    if not done:
        return 0.0, points[0].skipped or "no point measured"
    best = max(done, key=lambda p: p.gbs)
    return best.gbs, (f"{best.gbs:.2f} GB/s at {best.block_bytes // MiB} MiB x "
                      f"{best.threads} threads (of {', '.join(f'{p.gbs:.2f}' for p in done)})")


def _engine_child(argv: list[str]) -> int:
    """stream-run (cli/run.py) with one line per scheduler pass on stderr: the pass's RunStats,
    the depth after it, and the file bytes of the units the residency plan streams."""
    from stream_run.cli import run as cli_run
    from stream_run.scheduler.loop import LayerScheduler

    plain = LayerScheduler.run

    async def run(self, steps, *args, **kwargs):  # type: ignore[no-untyped-def]
        x, stats = await plain(self, steps, *args, **kwargs)
        shape = self._shape
        rec = {k: getattr(stats, k) for k in PASS_FIELDS}
        rec.update(steps=len(steps), depth_after=self.depth, resident=len(self.resident),
                   streamed_file_bytes=None if shape is None else sum(
                       self.loader.raw_nbytes(k) for k in shape.order
                       if k not in self.resident))
        print(PASS + json.dumps(rec), file=sys.stderr, flush=True)
        return x, stats

    LayerScheduler.run = run  # type: ignore[method-assign]
    return cli_run.main(argv)


def _decode_profile(passes: list[dict], tokens: int) -> dict:
    """Medians over the decode passes (the last `tokens` passes; the first is the prompt)."""
    dec = passes[-tokens:] if len(passes) > tokens else passes[1:]
    if not dec:
        return {}

    def med(fn) -> float:  # type: ignore[no-untyped-def]
        return statistics.median(fn(p) for p in dec)

    return {
        "passes": len(dec),
        "s_per_pass": med(lambda p: p["wall_s"]),
        "gb_per_pass": med(lambda p: p["bytes_read"] / GB),
        "streamed_file_gb": med(lambda p: (p["streamed_file_bytes"] or 0) / GB),
        "gbs": med(lambda p: p["bytes_read"] / p["wall_s"] / GB if p["wall_s"] else 0),
        "busy": med(lambda p: p["disk_busy_s"] / p["wall_s"] if p["wall_s"] else 0),
        "gbs_busy": med(lambda p: p["bytes_read"] / p["disk_busy_s"] / GB
                        if p["disk_busy_s"] else 0),
        "stall_s": med(lambda p: p["io_stall_s"]),
        "compute_s": med(lambda p: p["compute_s"]),
        "hit_rate": med(lambda p: p["hits"] / max(1, p["hits"] + p["misses"])),
        "depth": f"{dec[0]['prefetch_depth']}->{dec[-1]['depth_after']}",
        # routed experts (MoE; 0 for a dense model) and --expert-lookahead, summed
        "expert_hit_rate": sum(p["late_hits"] for p in dec) / max(1, sum(
            p["late_hits"] + p["late_misses"] for p in dec)),
        "lookahead": tuple(sum(p[k] for p in dec) for k in (
            "lookahead_reads", "lookahead_used", "lookahead_wasted_bytes")),
        "resident": dec[-1]["resident"],
    }


def run_engine(model: str, limit: int, tokens: int, threads: int, extra: list[str],
               drop: bool = False) -> dict:
    """stream-run in a cgroup of `limit` bytes; returns its figures or why it failed.
    drop: drop the whole page cache first (else the model's files are evicted)."""
    row: dict = {"engine": "stream-run", "limit_gb": limit / GB}
    cgroup = make_cgroup(limit)
    try:
        if drop:
            drop_caches()
        disk.evict(model_files(model))
        cmd = [sys.executable, "-m", "stream_run.bench.limit_compare", "--engine-child",
               model, "--prompt", "Hello",
               "--max-tokens", str(tokens + 1), "--temp", "0", "--threads", str(threads),
               "--memory-budget", "auto", "--direct-io", *extra]
        script = f'echo $$ > {cgroup}/cgroup.procs && exec "$@"'
        t0 = time.perf_counter()
        proc = subprocess.run(["sh", "-c", script, "sh", *cmd], capture_output=True, text=True)
        row["wall_s"] = time.perf_counter() - t0
        out = proc.stdout + proc.stderr
        gen = re.search(r"Generation: (\d+) tokens, ([\d.]+) tokens-per-sec", out)
        diskl = re.search(r"Disk: ([\d.]+) (MB|GB) read", out)
        budget = re.search(r"memory budget auto: ([^\n]*)", out)
        row["budget"] = budget.group(1).strip() if budget else None
        if gen:
            n, rate = int(gen.group(1)), float(gen.group(2))
            row["s_per_token"] = 1 / rate if rate else None
            row["tokens"] = n
        if diskl:
            gbytes = float(diskl.group(1)) * (1e6 if diskl.group(2) == "MB" else 1e9) / GB
            row["gb_read_total"] = gbytes
        row["oom"] = _oom_kills(cgroup) > 0 or proc.returncode == -9
        row["rc"] = proc.returncode
        passes = [json.loads(x[len(PASS):]) for x in out.splitlines() if x.startswith(PASS)]
        row["profile"] = _decode_profile(passes, tokens)
        row["passes"] = passes
        if proc.returncode != 0:
            lines = [x for x in out.strip().splitlines() if x.strip()]
            row["error"] = lines[-1] if lines else f"exit {proc.returncode}"
    finally:
        row["cgroup_peak_gb"] = (_read_int(os.path.join(cgroup, "memory.max_usage_in_bytes"))
                                 or 0) / GB
        remove_cgroup(cgroup)
        row["load"] = load_average()
    return row


def _load(load: list[float] | None) -> str:
    return "/".join(f"{x:.1f}" for x in load) if load else "-"


def _profile_line(p: dict, ceiling_gbs: float) -> str:
    share = f" ({100 * p['gbs'] / ceiling_gbs:.0f} % of the ceiling)" if ceiling_gbs else ""
    return (f"  decode passes ({p['passes']}, medians): {p['s_per_pass']:.3f} s, "
            f"{p['gb_per_pass']:.3f} GB read (plan streams {p['streamed_file_gb']:.3f} GB of "
            f"the file), {p['gbs']:.2f} GB/s{share}, a read in flight {100 * p['busy']:.0f} % "
            f"of the pass ({p['gbs_busy']:.2f} GB/s then), I/O stall {p['stall_s']:.3f} s, "
            f"compute {p['compute_s']:.3f} s, hit rate {100 * p['hit_rate']:.1f} %, depth "
            f"{p['depth']}, {p['resident']} units resident"
            + (f", expert hit rate {100 * p['expert_hit_rate']:.1f} %"
               if p.get("expert_hit_rate") else "")
            + (f", lookahead {p['lookahead'][1]} of {p['lookahead'][0]} guessed reads picked "
               f"({p['lookahead'][2] / GB:.3f} GB wasted)" if p.get("lookahead", (0,))[0]
               else ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stream_run.bench.limit_compare",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--limit", default="0.5", help="cgroup limit: a size or a fraction of the "
                                                  "file (0.5)")
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--no-llama-cpp", action="store_true")
    p.add_argument("--llama-variants", default="default,no-repack",
                   help="llama.cpp rows to run, comma-separated: default (mmap, repacked), "
                        "no-repack (default: both)")
    p.add_argument("--engine-args", default="", help="extra stream-run flags, one string")
    p.add_argument("--engine-args-b", default=None,
                   help="an A/B: each repeat also runs an engine row with these flags instead")
    p.add_argument("--ceiling-file", default=None,
                   help="measure the disk ceiling on this file (default: the model's files)")
    p.add_argument("--random-read-size", default=None,
                   help="also measure random O_DIRECT reads of this size (an expert's, e.g. "
                        "2.8MiB) on the ceiling file at 1, 4 and 8 threads, before and after")
    p.add_argument("--drop-caches", action="store_true",
                   help="echo 3 > /proc/sys/vm/drop_caches before each engine row")
    p.add_argument("--no-disk", action="store_true", help="skip the disk ceiling")
    p.add_argument("--passes", action="store_true", help="print every engine pass's figures")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--engine-child"]:
        return _engine_child(argv[1:])
    args = p.parse_args(argv)
    names = {("no-repack" if no_repack else "default"): (v, no_repack) for v, no_repack in VARIANTS}
    wanted = [v.strip() for v in args.llama_variants.split(",") if v.strip()]
    bad = [v for v in wanted if v not in names]
    if bad or not wanted:
        print(f"limit_compare: error: --llama-variants: unknown {bad[0] if bad else '(none)'!r}; "
              "choose from default, no-repack", file=sys.stderr)
        return 2
    variants_llama = [names[v] for v in wanted]
    if os.geteuid() != 0:
        print("limit_compare: needs root (cgroup v1 memory limits); skipped", file=sys.stderr)
        return 2
    file_bytes = sum(os.path.getsize(f) for f in model_files(args.model))
    limit = _size(args.limit, file_bytes)
    if os.path.isdir(args.model) and not args.no_llama_cpp:
        print("limit_compare: a stream-convert directory: engine rows only")
        args.no_llama_cpp = True
    ceiling_of = args.ceiling_file or args.model
    print(f"{os.path.basename(args.model)}: {file_bytes / GB:.2f} GB, cgroup limit "
          f"{limit / GB:.2f} GB, {args.tokens} tokens, {args.threads} threads")
    ceiling = 0.0
    if not args.no_disk:
        ceiling, how = disk_ceiling(ceiling_of)
        print(f"disk ceiling (O_DIRECT, sequential, {os.path.basename(ceiling_of)}): {how}, "
              f"load {_load(load_average())}",
              flush=True)
        if args.random_read_size:
            rand = random_reads(ceiling_of, int(parse_size(args.random_read_size)))
            print(f"random reads: {rand}, load {_load(load_average())}", flush=True)
    print("| engine | s/token | GB read/token | cgroup peak GB | result | load 1/5/15 |")
    print("|---|---|---|---|---|---|")
    variants = [("", args.engine_args)]
    if args.engine_args_b is not None:  # A and B alternate within each repeat
        variants = [(" A", args.engine_args), (" B", args.engine_args_b)]
    for _ in range(args.repeats):
        for tag, extra in variants:
            _engine_row(args, limit, ceiling, tag, extra)
        if args.no_llama_cpp:
            continue
        for variant, no_repack in variants_llama:
            row = run_row(args.model, "cgroup", None, limit, args.tokens, args.threads,
                          no_repack, variant)
            s = statistics.median(row.s_per_token) if row.s_per_token else None
            b = statistics.median(row.bytes_per_token) / GB if row.bytes_per_token else 0
            peak = (row.cgroup_peak_bytes or 0) / GB
            print(f"| llama.cpp {variant} | {f'{s:.3f}' if s else '-'} | {b:.2f} | {peak:.2f} "
                  f"| {row.result} | {_load(load_average())} |", flush=True)
    if not args.no_disk:
        _, how = disk_ceiling(ceiling_of)
        print(f"disk ceiling after the rows: {how}, load {_load(load_average())}")
        if args.random_read_size:
            print(f"random reads after the rows: "
                  f"{random_reads(ceiling_of, int(parse_size(args.random_read_size)))}, "
                  f"load {_load(load_average())}")
    return 0


def _engine_row(args: argparse.Namespace, limit: int, ceiling: float, tag: str,
                extra: str) -> None:
    r = run_engine(args.model, limit, args.tokens, args.threads, extra.split(),
                   args.drop_caches)
    # per decode pass, as llama.cpp's rows (per eval); the Generation line's rate counts
    # the prompt's token over the decode time (n tokens in n - 1 passes)
    prof = r.get("profile") or {}
    result = "OOM-killed" if r["oom"] else r.get("error", "ok")
    s, per = prof.get("s_per_pass"), prof.get("gb_per_pass", 0.0)
    name = f"stream-run{tag}" + (f" `{extra}`" if tag else "")
    print(f"| {name} (budget {r.get('budget')}) | {s:.3f} | {per:.2f} | "
          f"{r['cgroup_peak_gb']:.2f} | {result} | {_load(r['load'])} |" if s else
          f"| {name} | - | - | {r['cgroup_peak_gb']:.2f} | {result} | "
          f"{_load(r['load'])} |", flush=True)
    if prof:
        cli = r.get("s_per_token")
        print(_profile_line(prof, ceiling) + (f"; the CLI's Generation line: {cli:.3f} s/token"
                                              if cli else ""), flush=True)
    for i, rec in enumerate(r["passes"] if args.passes else []):
        print(f"  pass {i}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else
                                         f"{k} {v}" for k, v in rec.items()))


if __name__ == "__main__":
    raise SystemExit(main())
