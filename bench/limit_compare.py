"""The engine and llama.cpp on the same file inside the same cgroup memory limit, caches dropped:
the issue-16 streaming comparison, one command.

    python -m stream_run.bench.limit_compare MODEL.gguf --limit 0.5 --tokens 8 --threads 2

--limit is a size (2GiB) or a fraction of the file. Each run is a child process in a fresh
cgroup v1 memory limit (page cache included; bench/llamacpp_stream.make_cgroup), the model file
evicted from the page cache first:
- the engine: `stream-run MODEL --memory-budget auto --direct-io`, so the engine picks its own
  budget from the cgroup's limit (cli/common.py), as a user inside a container would;
- llama.cpp, its default (mmap, repacked) and with repacking off (bench/llamacpp_stream.py).
Per run: decode s/token (the engine's Generation line; llama.cpp's per-token evals), GB read
per token, the cgroup's peak and whether it was OOM-killed. Root only (skipped otherwise).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

from stream_run.bench import disk
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


def _size(text: str, file_bytes: int) -> int:
    try:
        frac = float(text)
    except ValueError:
        return int(parse_size(text))
    return int(frac * file_bytes)


def run_engine(model: str, limit: int, tokens: int, threads: int, extra: list[str]) -> dict:
    """stream-run in a cgroup of `limit` bytes; returns its figures or why it failed."""
    row: dict = {"engine": "stream-run", "limit_gb": limit / GB}
    cgroup = make_cgroup(limit)
    try:
        disk.evict([model])
        cmd = [sys.executable, "-m", "stream_run.cli.run", model, "--prompt", "Hello",
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
        if proc.returncode != 0:
            lines = [x for x in out.strip().splitlines() if x.strip()]
            row["error"] = lines[-1] if lines else f"exit {proc.returncode}"
    finally:
        row["cgroup_peak_gb"] = (_read_int(os.path.join(cgroup, "memory.max_usage_in_bytes"))
                                 or 0) / GB
        remove_cgroup(cgroup)
    return row


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
    p.add_argument("--engine-args", default="", help="extra stream-run flags, one string")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("limit_compare: needs root (cgroup v1 memory limits); skipped", file=sys.stderr)
        return 2
    file_bytes = os.path.getsize(args.model)
    limit = _size(args.limit, file_bytes)
    print(f"{os.path.basename(args.model)}: {file_bytes / GB:.2f} GB, cgroup limit "
          f"{limit / GB:.2f} GB, {args.tokens} tokens, {args.threads} threads")
    print("| engine | s/token | GB read/token | cgroup peak GB | result |")
    print("|---|---|---|---|---|")
    for _ in range(args.repeats):
        r = run_engine(args.model, limit, args.tokens, args.threads, args.engine_args.split())
        per = r.get("gb_read_total", 0) / max(1, r.get("tokens", 1) + 1)
        result = "OOM-killed" if r["oom"] else r.get("error", "ok")
        s = r.get("s_per_token")
        print(f"| stream-run (budget {r.get('budget')}) | {s:.3f} | {per:.2f} | "
              f"{r['cgroup_peak_gb']:.2f} | {result} |" if s else
              f"| stream-run | - | - | {r['cgroup_peak_gb']:.2f} | {result} |", flush=True)
        if args.no_llama_cpp:
            continue
        for variant, no_repack in VARIANTS:
            row = run_row(args.model, "cgroup", None, limit, args.tokens, args.threads,
                          no_repack, variant)
            s = statistics.median(row.s_per_token) if row.s_per_token else None
            b = statistics.median(row.bytes_per_token) / GB if row.bytes_per_token else 0
            peak = (row.cgroup_peak_bytes or 0) / GB
            print(f"| llama.cpp {variant} | {f'{s:.3f}' if s else '-'} | {b:.2f} | {peak:.2f} "
                  f"| {row.result} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
