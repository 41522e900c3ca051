"""Markdown tables and JSON lines for the stream-bench subcommands (strings and files only;
the CLI prints)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from stream_run.engine import format_size


def write_jsonl(path: str | None, records: Iterable[dict], meta: dict) -> None:
    """Append one line per record, each with the run's metadata (self-contained lines)."""
    if not path:
        return
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps({**r, "meta": meta}) + "\n")


def read_jsonl(path: str, kind: str) -> list[dict]:
    """The records of one kind from a JSONL file written by stream-bench.

    Raises:
        OSError: unreadable; ValueError: not JSON lines, or none of that kind.
    """
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError:
                raise ValueError(f"{path}:{n}: not a JSON line") from None
            if isinstance(r, dict) and r.get("kind") == kind:
                out.append(r)
    if not out:
        raise ValueError(f"{path}: no {kind!r} records (write them with stream-bench "
                         f"{kind} --json {path})")
    return out


def size(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes:g} B"


def seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} µs"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def disk_table(records: Sequence[dict]) -> str:
    rows = []
    for r in records:
        if r.get("skipped"):
            rows.append([r["mode"], r["pattern"], size(r["block_bytes"]), str(r["threads"]),
                         "—", "—", "—", "—", "—", f"skipped: {r['skipped']}"])
            continue
        rows.append([r["mode"], r["pattern"], size(r["block_bytes"]), str(r["threads"]),
                     f"{r['gbs']:.3f}", f"{r['iops']:,.0f}", seconds(r["lat_p50_s"]),
                     seconds(r["lat_p99_s"]), format_size(r["bytes_read"]), r["cache"]])
    return _table(["mode", "pattern", "block", "QD", "GB/s", "IOPS", "p50", "p99", "read",
                   "page cache"], rows)


def stream_table(records: Sequence[dict]) -> str:
    rows = []
    for r in records:
        s = r["s_per_token"]
        budget = ("unlimited" if r["budget_bytes"] is None else
                  format_size(r["budget_bytes"]) if any(c.isalpha() for c in r["budget"])
                  else f"{r['budget']} ({format_size(r['budget_bytes'])})")
        depth = str(r["prefetch_depth"]) + (
            f"→{r['prefetch_depth_reached']}"
            if r["prefetch_depth_reached"] != r["prefetch_depth"] else "")
        host = "" if r["host_hit_rate"] is None else f" / host {r['host_hit_rate']:.0%}"
        frac = "—" if r["engine_vs_disk"] is None else f"{r['engine_vs_disk']:.2f}"
        rows.append([
            r["model"], budget, r["cache"], depth,
            f"{r['s_per_token_median']:.3g} [{min(s):.3g}-{max(s):.3g}]", f"{r['tok_s']:.3g}",
            format_size(r["bytes_per_token_mean"]), f"{r['engine_gbs']:.2f}", frac,
            f"{r['stall_fraction']:.0%}", f"{r['compute_s_per_token']:.3g}",
            f"{r['hit_rate']:.0%}{host}", format_size(r["peak_rss_bytes"]),
        ])
    return _table(["model", "budget", "cache", "depth", "s/token median [min-max]", "tok/s",
                   "bytes/token", "engine GB/s", "of best disk", "I/O stall",
                   "compute s/token", "hit rate", "peak RSS"], rows)


def tokens_table(records: Sequence[dict], model: dict, params: int) -> str:
    from stream_run.bench.decode import mean_std

    rows = []
    quant = model["quantization"]
    label = model["name"]
    if isinstance(quant, dict) and "bits" in quant:
        label += f" ({quant['bits']}-bit g{quant.get('group_size', '?')})"
    elif isinstance(quant, dict) and "gguf" in quant:
        label += f" ({', '.join(quant['gguf'])})"
    for backend in dict.fromkeys(r["backend"] for r in records):
        for test in dict.fromkeys(r["test"] for r in records if r["backend"] == backend):
            rows_bt = [r for r in records if r["backend"] == backend and r["test"] == test]
            mean, std = mean_std([r["tok_s"] for r in rows_bt])
            budget = rows_bt[0]["budget_bytes"]
            count = f"{params / 1e9:.2f} B" if params >= 1e9 else f"{params / 1e6:.1f} M"
            rows.append([label, format_size(model["disk_bytes"]), count,
                         backend, format_size(budget) if budget else "unlimited", test,
                         f"{mean:.2f} ± {std:.2f}"])
    return _table(["model", "size", "params", "backend", "budget", "test", "t/s"], rows)


def bandwidth_lines(results: Sequence, test: str) -> str:
    """Decode against the memory-bandwidth bound: the bytes each backend touches per token (its
    compute-form weights; llama.cpp: the .gguf file) over the measured RAM read bandwidth."""
    import statistics

    from stream_run.bench.env import memory_bandwidth_gbs

    bw = memory_bandwidth_gbs()
    lines = [f"RAM read bandwidth (best of 5, 512 MiB, all cores): {bw:.2f} GB/s"]
    for r in results:
        rates = r.rates(test)
        if not rates:
            continue
        bound = bw * 1e9 / r.model_bytes
        tg = statistics.median(rates)
        lines.append(f"{r.backend}: {format_size(r.model_bytes)}/token -> bound "
                     f"{bound:.1f} tok/s; {test} median {tg:.2f} tok/s = {tg / bound:.2f} of "
                     f"the bound ({bound / tg:.2f}x from it)")
    return "\n".join(lines)


def project_table(records: Sequence[dict]) -> str:
    rows = []
    for r in records:
        rows.append([
            "unlimited" if r["budget_bytes"] is None else format_size(r["budget_bytes"]),
            str(r["prefetch_depth"]), format_size(r["resident_bytes"]),
            format_size(r["streamed_bytes"]),
            f"{r['disk_gbs']:.2f} ({size(r['disk_block_bytes'])} × {r['disk_threads']})",
            seconds(r["read_s"]), seconds(r["prepare_s"]), seconds(r["compute_s"]),
            seconds(r["overhead_s"]), f"**{seconds(r['s_per_token'])}**",
            f"{r['tok_s']:.3g}", seconds(r["bound_s"]), r["bound"],
        ])
    return _table(["budget", "depth", "resident", "read/token", "disk GB/s (block × QD)",
                   "read", "prepare", "compute", "overhead", "s/token", "tok/s",
                   "bound (perfect overlap)", "limited by"], rows)
