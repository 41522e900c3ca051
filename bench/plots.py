"""PNG plots of the studies (matplotlib, Agg canvas: no display, no pyplot global state).

Every function takes the JSON records the CLI writes (dicts), so a plot can be redrawn from a
saved JSONL file, and returns the paths it wrote.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

DPI = 110


def _figure(width: float = 7.5, height: float = 4.6) -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'stream-run[bench]'") from None
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig: Any, out_dir: str, name: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _size_label(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes:g} B"


def _block_axis(ax: Any, blocks: Sequence[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(blocks)))
    ax.set_xticklabels([_size_label(b) for b in sorted(set(blocks))], rotation=30)
    ax.minorticks_off()


COLORS = {"buffered": "tab:blue", "direct": "tab:red", "mmap": "tab:green"}
STYLES = {"seq": "-", "rand": "--"}


def disk(records: Sequence[dict], out_dir: str, title: str = "") -> list[str]:
    """GB/s vs block size (at the fewest threads; log-log) and GB/s vs queue depth (one panel
    per block size with more than one thread count). Colour: mode; line: pattern."""
    pts = [r for r in records if not r.get("skipped")]
    if not pts:
        return []
    t0 = min(r["threads"] for r in pts)
    fig, ax = _figure()
    for mode in dict.fromkeys(r["mode"] for r in pts):
        for pattern in dict.fromkeys(r["pattern"] for r in pts):
            line = sorted((r["block_bytes"], r["gbs"]) for r in pts
                          if r["mode"] == mode and r["pattern"] == pattern and r["threads"] == t0)
            if line:
                ax.plot(*zip(*line, strict=True), marker="o", color=COLORS.get(mode),
                        linestyle=STYLES.get(pattern, "-"), label=f"{mode} {pattern}")
    _block_axis(ax, [r["block_bytes"] for r in pts if r["threads"] == t0])
    ax.set_yscale("log")
    ax.set_xlabel("block size (bytes per request)")
    ax.set_ylabel("GB/s (log)")
    ax.set_title(f"{title}: read rate vs block size, {t0} thread{'s' * (t0 > 1)}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    paths = [_save(fig, out_dir, "disk_block_size.png")]

    blocks = [b for b in sorted({r["block_bytes"] for r in pts})
              if len({r["threads"] for r in pts if r["block_bytes"] == b}) > 1]
    if not blocks:
        return paths
    fig, _ = _figure(width=4.2 * len(blocks) + 1, height=4.4)
    fig.delaxes(fig.axes[0])
    threads = sorted({r["threads"] for r in pts})
    for i, block in enumerate(blocks):
        ax = fig.add_subplot(1, len(blocks), i + 1)
        for mode in dict.fromkeys(r["mode"] for r in pts):
            for pattern in dict.fromkeys(r["pattern"] for r in pts):
                line = sorted((r["threads"], r["gbs"]) for r in pts if r["mode"] == mode
                              and r["pattern"] == pattern and r["block_bytes"] == block)
                if line:
                    ax.plot(*zip(*line, strict=True), marker="o", color=COLORS.get(mode),
                            linestyle=STYLES.get(pattern, "-"), label=f"{mode} {pattern}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(threads)
        ax.set_xticklabels([str(t) for t in threads])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.set_xlabel("reader threads (requests in flight)")
        ax.set_ylabel("GB/s")
        ax.set_title(f"{_size_label(block)} blocks")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title}: read rate vs queue depth")
    paths.append(_save(fig, out_dir, "disk_queue_depth.png"))
    return paths


def stream(records: Sequence[dict], out_dir: str, title: str = "") -> list[str]:
    """s/token vs budget per prefetch depth, with the disk-bound and compute-bound lines; and
    I/O stall fraction vs prefetch depth per budget."""
    if not records:
        return []
    gb = 1e9
    fig, ax = _figure()
    for depth in sorted({r["prefetch_depth"] for r in records}):
        line = sorted((r["budget_bytes"] or r["model_bytes"], r["s_per_token_median"])
                      for r in records if r["prefetch_depth"] == depth)
        xs, ys = zip(*line, strict=True)
        ax.plot([x / gb for x in xs], ys, marker="o", label=f"measured, depth {depth}")
    budgets = sorted({r["budget_bytes"] or r["model_bytes"] for r in records})
    disk_gbs = records[0]["disk_best_gbs"]
    if disk_gbs:
        # bytes a token must read at this budget (the fewest over depths) at the disk's best
        bound = [min(r["bytes_per_token_mean"] for r in records
                     if (r["budget_bytes"] or r["model_bytes"]) == b) / (disk_gbs * gb)
                 for b in budgets]
        ax.plot([b / gb for b in budgets], bound, color="black", linestyle="--",
                label=f"disk bound: bytes/token / {disk_gbs:.2f} GB/s")
    compute = sorted(r["compute_s_per_token"] for r in records)[len(records) // 2]
    ax.axhline(compute, color="gray", linestyle=":",
               label=f"compute bound: {compute:.3g} s/token (median compute)")
    model = records[0]["model_bytes"]
    ax.axvline(model / gb, color="gray", linewidth=0.8,
               label=f"whole model: {model / gb:.3g} GB (nothing streams)")
    ax.set_xlabel("memory budget (GB, compute-tier bytes)")
    ax.set_ylabel("s/token (median)")
    ax.set_title(f"{title}: s/token vs memory budget")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths = [_save(fig, out_dir, "stream_s_per_token.png")]

    fig, ax = _figure()
    for b in budgets:
        line = sorted((r["prefetch_depth"], r["stall_fraction"]) for r in records
                      if (r["budget_bytes"] or r["model_bytes"]) == b)
        ax.plot(*zip(*line, strict=True), marker="o", label=f"budget {b / gb:.3g} GB")
    ax.set_xticks(sorted({r["prefetch_depth"] for r in records}))
    ax.set_xlabel("prefetch depth (steps read ahead)")
    ax.set_ylabel("I/O stall / wall time")
    ax.set_ylim(0, 1)
    ax.set_title(f"{title}: compute waiting on reads vs prefetch depth")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(_save(fig, out_dir, "stream_stall.png"))
    return paths


def tokens(records: Sequence[dict], out_dir: str, title: str = "") -> list[str]:
    """tok/s per test and backend, mean with a stddev error bar."""
    from stream_run.bench.decode import mean_std

    if not records:
        return []
    fig, ax = _figure()
    tests = list(dict.fromkeys(r["test"] for r in records))
    backends = list(dict.fromkeys(r["backend"] for r in records))
    width = 0.8 / len(backends)
    for i, backend in enumerate(backends):
        stats = [mean_std([r["tok_s"] for r in records
                           if r["test"] == t and r["backend"] == backend] or [0.0])
                 for t in tests]
        ax.bar([k + i * width for k in range(len(tests))], [m for m, _ in stats], width,
               yerr=[s for _, s in stats], capsize=4, label=backend)
    ax.set_xticks([k + width * (len(backends) - 1) / 2 for k in range(len(tests))])
    ax.set_xticklabels(tests)
    ax.set_ylabel("tokens/s (mean ± stddev)")
    ax.set_title(f"{title}: token rates")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return [_save(fig, out_dir, "tokens.png")]


def project(curve: Sequence[dict], marks: Sequence[dict], out_dir: str,
            title: str = "") -> list[str]:
    """Predicted s/token vs budget (a curve of predictions) with its disk and compute lines;
    marks are the requested budgets."""
    if not curve:
        return []
    gb = 1e9
    fig, ax = _figure()
    xs = [r["budget_bytes"] / gb for r in curve]
    ax.plot(xs, [r["s_per_token"] for r in curve], label="predicted s/token")
    ax.plot(xs, [r["read_s"] for r in curve], color="black", linestyle="--",
            label="disk bound: streamed bytes / disk GB/s")
    ax.plot(xs, [r["compute_s"] + r["overhead_s"] for r in curve], color="gray",
            linestyle=":", label="compute bound: compute + overhead")
    ax.scatter([r["budget_bytes"] / gb for r in marks], [r["s_per_token"] for r in marks],
               color="red", zorder=3, label="requested budgets")
    ax.set_xlabel("memory budget (GB, compute-tier bytes)")
    ax.set_ylabel("s/token")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{title}: projected s/token vs memory budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return [_save(fig, out_dir, "project.png")]
