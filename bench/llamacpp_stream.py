"""llama.cpp (llama-cpp-python) beside the engine in `stream-bench stream MODEL.gguf`: s/token of
the same file under the same memory budget, read from disk.

llama.cpp has no weight budget of its own: it mmaps the file and the kernel pages weights in
and out. So each run is a child process in a cgroup v1 memory limit (page cache included)
of the budget plus what the engine used on top of it (its peak RSS beyond the budget), made
under this process's own memory cgroup, the file evicted from the page cache first. Two rows
per budget: llama.cpp's default (mmap, weights repacked for the CPU into anonymous memory where
the CPU backend has a layout for the type) and repacking off (use_extra_bufts = false, as
llama.cpp's --no-repack), which keeps the weights in the mmap'd, reclaimable page cache.
Per token: seconds and bytes read from disk (/proc/self/io read_bytes). An OOM kill is a row
result, never an error of the bench.

    python -m stream_run.bench.llamacpp_stream MODEL.gguf --tokens 4 [--cgroup DIR] [--no-repack]

is the child: one JSON line per event (loaded, token, done) on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from stream_run.bench import disk

CGROUP_V1_MEMORY = "/sys/fs/cgroup/memory"
VARIANTS = (("mmap (default)", False), ("mmap, no repack", True))
_counter = itertools.count()


@dataclass
class LlamaStreamRow:
    variant: str
    budget: str  # as the sweep labels it: "0.25", "4GB", "none"
    budget_bytes: int | None
    limit_bytes: int | None  # the cgroup memory limit; None: no limit
    result: str  # "ok", "OOM-killed while loading/decoding", "skipped: ...", "failed: ..."
    cache: str = ""
    s_per_token: list[float] = field(default_factory=list)
    bytes_per_token: list[int] = field(default_factory=list)
    load_s: float | None = None
    load_bytes: int | None = None
    peak_rss_bytes: int | None = None
    cgroup_peak_bytes: int | None = None  # memory.max_usage_in_bytes (page cache included)
    threads: int = 1

    def record(self) -> dict:
        n, s = len(self.s_per_token), sum(self.s_per_token)
        return {"kind": "stream_llamacpp", "backend": "llama.cpp", **asdict(self),
                "tokens": n,
                "s_per_token_median": statistics.median(self.s_per_token) if n else None,
                "tok_s": n / s if s > 0 else None,
                "bytes_per_token_mean": sum(self.bytes_per_token) / n if n else None}


def budget_limits(sweep) -> list[tuple[object, int | None]]:
    """(budget, cgroup limit) per budget of a StreamSweep: the budget plus what the engine
    used on top of it (its largest peak RSS at that budget beyond the budget); None when the
    budget is unlimited."""
    out = []
    for budget in sweep.budgets:
        if budget.nbytes is None:
            out.append((budget, None))
            continue
        peaks = [p.peak_rss_bytes for b, p in sweep.points if b is budget]
        out.append((budget, budget.nbytes + max([0] + [r - budget.nbytes for r in peaks])))
    return out


def run_rows(model: str, limits, tokens: int, threads: int, progress=None,
             timeout_s: float | None = None) -> list[LlamaStreamRow]:
    """Both variants at every (budget, limit) of budget_limits."""
    rows = []
    for budget, limit in limits:
        for variant, no_repack in VARIANTS:
            row = run_row(model, budget.label, budget.nbytes, limit, tokens, threads,
                          no_repack, variant, timeout_s)
            rows.append(row)
            if progress is not None:
                progress(row)
    return rows


def run_row(model: str, budget: str, budget_bytes: int | None, limit_bytes: int | None,
            tokens: int, threads: int, no_repack: bool, variant: str,
            timeout_s: float | None = None) -> LlamaStreamRow:
    """One llama.cpp run in a child process (see the module docstring). Never raises for
    what happens in the child: the row's result says it."""
    row = LlamaStreamRow(variant, budget, budget_bytes, limit_bytes, "ok", threads=threads)
    cgroup = None
    if limit_bytes is not None:
        try:
            cgroup = make_cgroup(limit_bytes)
        except OSError as exc:
            row.result = f"skipped: no memory cgroup ({exc.strerror or exc})"
            return row
    try:
        row.cache, _ = disk.evict([model])
        _run_child(row, model, tokens, threads, no_repack, cgroup, timeout_s)
    finally:
        if cgroup is not None:
            row.cgroup_peak_bytes = _read_int(os.path.join(cgroup, "memory.max_usage_in_bytes"))
            remove_cgroup(cgroup)
    return row


def _run_child(row: LlamaStreamRow, model: str, tokens: int, threads: int, no_repack: bool,
               cgroup: str | None, timeout_s: float | None) -> None:
    cmd = [sys.executable, "-m", "stream_run.bench.llamacpp_stream", model,
           "--tokens", str(tokens), "--threads", str(threads)]
    cmd += ["--cgroup", cgroup] if cgroup else []
    cmd += ["--no-repack"] if no_repack else []
    # as bench.llamacpp: the engine's OMP_WAIT_POLICY=passive slows llama.cpp's threads
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err, rc = f"timed out after {timeout_s:g} s", None
    loaded = False
    for line in out.splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if ev.get("stage") == "loaded":
            loaded, row.load_s, row.load_bytes = True, ev["load_s"], ev["load_bytes"]
        elif ev.get("stage") == "token":
            row.s_per_token.append(ev["s"])
            row.bytes_per_token.append(ev["bytes"])
        elif ev.get("stage") == "done":
            row.peak_rss_bytes = ev["peak_rss_bytes"]
    oom = (cgroup is not None and _oom_kills(cgroup) > 0) or rc == -signal.SIGKILL
    if oom:
        row.result = "OOM-killed while " + ("decoding" if loaded else "loading")
    elif rc is None:
        row.result = err
    elif rc != 0:
        lines = [x for x in err.strip().splitlines() if x.strip()] or [f"exit status {rc}"]
        row.result = f"failed: {lines[-1].strip()}"


def table(rows: list[LlamaStreamRow]) -> str:
    from stream_run.bench.report import _table
    from stream_run.engine import format_size

    def size(n: float | None) -> str:
        return "—" if n is None else format_size(int(n))

    out = []
    for r in rows:
        d, s = r.record(), r.s_per_token
        med = (f"{d['s_per_token_median']:.3g} [{min(s):.3g}-{max(s):.3g}]" if s else "—")
        gbs = (f"{sum(r.bytes_per_token) / sum(s) / 1e9:.2f}" if s and sum(s) > 0 else "—")
        out.append([r.variant, "unlimited" if r.budget_bytes is None else
                    f"{r.budget} ({size(r.budget_bytes)})", size(r.limit_bytes), r.result,
                    r.cache or "—", med, "—" if d["tok_s"] is None else f"{d['tok_s']:.3g}",
                    size(d["bytes_per_token_mean"]), gbs,
                    "—" if r.load_s is None else f"{r.load_s:.2f}", size(r.peak_rss_bytes),
                    size(r.cgroup_peak_bytes)])
    return _table(["llama.cpp", "budget", "memory limit", "result", "cache",
                   "s/token median [min-max]", "tok/s", "read/token", "read GB/s", "load s",
                   "peak RSS", "cgroup peak"], out)


# --- cgroup v1 memory limits -----------------------------------------------------------------

def _own_memory_cgroup() -> str:
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if "memory" in controllers.split(","):
                return os.path.join(CGROUP_V1_MEMORY, path.lstrip("/"))
    raise OSError(f"no cgroup v1 memory controller (mounted at {CGROUP_V1_MEMORY})")


def make_cgroup(limit_bytes: int) -> str:
    """A child memory cgroup of this process's own, limited to limit_bytes (root only).

    Raises:
        OSError: no cgroup v1 memory hierarchy, or not writable (not root).
    """
    path = os.path.join(_own_memory_cgroup(), f"stream-bench-llamacpp-{os.getpid()}-"
                        f"{next(_counter)}")
    os.mkdir(path)
    try:
        with open(os.path.join(path, "memory.limit_in_bytes"), "w") as f:
            f.write(str(int(limit_bytes)))
    except OSError:
        os.rmdir(path)
        raise
    return path


def remove_cgroup(path: str) -> None:
    """rmdir the (now empty) cgroup; its page cache charges move to the parent."""
    for _ in range(50):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:  # EBUSY until the killed child is reaped
            time.sleep(0.1)


def _oom_kills(path: str) -> int:
    try:
        with open(os.path.join(path, "memory.oom_control")) as f:
            stats = dict(line.split() for line in f if line.strip())
    except OSError:
        return 0
    return int(stats.get("oom_kill", 0))


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


# --- the child -------------------------------------------------------------------------------

def _read_bytes() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _emit(**event) -> None:
    print(json.dumps(event), flush=True)


def _disable_repack(llama_cpp) -> None:
    """llama-cpp-python's Llama has no flag for it: its model params start from
    llama_model_default_params(), so that is wrapped to clear use_extra_bufts."""
    lib = llama_cpp.llama_cpp
    if "use_extra_bufts" not in {f[0] for f in lib.llama_model_params._fields_}:
        raise RuntimeError("this llama-cpp-python's llama.cpp has no use_extra_bufts "
                           "(no-repack needs llama.cpp from mid-2025 on)")
    default = lib.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params


def _child(model: str, tokens: int, threads: int, cgroup: str | None, no_repack: bool) -> None:
    if cgroup:  # first, so that the model's pages and buffers are charged to the limit
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    import llama_cpp

    if no_repack:
        _disable_repack(llama_cpp)
    r0, t0 = _read_bytes(), time.perf_counter()
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
        llm = llama_cpp.Llama(model, n_threads=threads, n_threads_batch=threads,
                              n_ctx=tokens + 16, n_batch=16, verbose=False)
    _emit(stage="loaded", load_s=time.perf_counter() - t0, load_bytes=_read_bytes() - r0)
    ids = np.random.default_rng(0).integers(0, llm.n_vocab(), tokens + 1).tolist()
    llm.eval(ids[:1])  # untimed, as the engine's first pass
    for token in ids[1:]:
        r, t = _read_bytes(), time.perf_counter()
        llm.eval([token])
        _emit(stage="token", s=time.perf_counter() - t, bytes=_read_bytes() - r)
    _emit(stage="done", peak_rss_bytes=_peak_rss())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stream_run.bench.llamacpp_stream")
    p.add_argument("model")
    p.add_argument("--tokens", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cgroup", default=None, help="join this cgroup v1 directory first")
    p.add_argument("--no-repack", action="store_true")
    args = p.parse_args(argv)
    _child(args.model, args.tokens, args.threads, args.cgroup, args.no_repack)
    return 0


if __name__ == "__main__":
    sys.exit(main())
