"""Cost model: predicted s/token of a streamed model from a measured disk curve and a measured
compute rate, for shapes this machine cannot hold.

    read    = streamed bytes / disk GB/s at the engine's request size and queue depth
    compute = embed + sum over blocks and head of (compute-form bytes x measured s/byte)
    s/token = the steady state of a step-by-step simulation of the engine's pipeline (reads
              issued depth + 1 steps ahead, one disk queue, ring slots, preparation, compute),
              which is at least the perfect-overlap bound max(read, compute + overhead)

The streamed set is what the engine itself would stream: the scheduler's own residency plan
(LayerScheduler.plan_residency) runs on the target's unit sizes, computed with the kernels'
own byte accounting (kernels.sizes), so bytes/token is exact for the engine's policy. The
compute rate is measured on a real run (a probe model of the target's bit width, or the model
itself) and scaled by bytes: decoding one token is a matrix-vector product per weight, so its
time grows with the weight bytes touched (the memory-bandwidth roofline).
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np

from stream_run.bench import disk
from stream_run.bench.streaming import model_sizes
from stream_run.bench.synth import SHAPES as SYNTH_SHAPES
from stream_run.bench.synth import SynthSpec, synthesize
from stream_run.cache import CacheConfig, WeightCache
from stream_run.engine import Engine, EngineConfig, format_size
from stream_run.kernels import get_backend
from stream_run.kernels.sizes import held_nbytes, transient_nbytes
from stream_run.loaders import EMBED, HEAD, TensorRef, layer_key
from stream_run.scheduler import LayerScheduler, SchedulerConfig

# (hidden, intermediate, layers, heads, kv_heads, vocab)
SHAPES = {
    **SYNTH_SHAPES,
    "405b": (16384, 53248, 126, 128, 8, 128256),  # Llama-3.1 405B
    # hypothetical dense 1T (public 1T models are MoE): 405B's recipe, wider and deeper
    "1t": (24576, 98304, 116, 192, 16, 128256),
}
READ_CHUNK = 64 * disk.MiB  # the reader's largest single pread (loaders/reader.py)


@dataclass(frozen=True)
class UnitSize:
    key: str
    disk_bytes: int
    compute_bytes: int  # what the cache budget counts (kernels.sizes.held_nbytes)
    transient_bytes: int  # raw bytes held beside it while it is prepared


@dataclass
class Layout:
    """A model as the cost model sees it: unit sizes in execution order."""

    name: str
    units: list[UnitSize]
    tied: bool
    params: int
    bits: int  # 16: bf16

    @property
    def disk_bytes(self) -> int:
        return sum(u.disk_bytes for u in self.units)

    @property
    def compute_bytes(self) -> int:
        return sum(u.compute_bytes for u in self.units)

    def steps(self) -> list[tuple[str, ...]]:
        blocks = [(u.key,) for u in self.units if u.key not in (EMBED, HEAD)]
        if not any(u.key == EMBED for u in self.units):  # a pipeline stage past rank 0
            return blocks
        return [(EMBED,), *blocks, (HEAD, EMBED) if self.tied else (HEAD,)]


def _tensor(name: str, shape: tuple[int, ...], bits: int, group: int) -> list[TensorRef]:
    """One HF tensor as stored: bf16, or MLX affine (U32 words + F16 scales and biases)."""
    if bits >= 16 or len(shape) != 2:
        return [TensorRef(name, "", 0, 2 * math.prod(shape), "BF16", shape)]
    out, inp = shape
    base = name.removesuffix(".weight")
    return [TensorRef(name, "", 0, out * inp * bits // 8, "U32", (out, inp * bits // 32)),
            *(TensorRef(f"{base}.{part}", "", 0, 2 * out * (inp // group), "F16",
                        (out, inp // group)) for part in ("scales", "biases"))]


def layout_from_shape(name: str, dims: tuple[int, ...], bits: int, group_size: int = 64,
                      backend: str = "numpy") -> Layout:
    """The units of a Llama-shaped model at `bits` (uniform recipe: every 2-D weight, the
    embedding and lm_head included, at the same bits; norms bf16)."""
    E, I, L, H, KV, V = dims
    spec = SynthSpec(hidden_size=E, intermediate_size=I, num_hidden_layers=L,
                     num_attention_heads=H, num_key_value_heads=KV, vocab_size=V)
    ops = get_backend(backend)
    views_raw, half_scales = ops.prepare_views_raw, ops.half_scales
    groups: dict[str, list[TensorRef]] = {}
    params = 0
    for full, shape, _ in spec.tensors():
        params += math.prod(shape)
        if full.startswith("model.layers."):
            i, rel = full.removeprefix("model.layers.").split(".", 1)
            key = layer_key(int(i))
        else:
            key = EMBED if "embed_tokens" in full else HEAD
            rel = full.removeprefix("model.")
        groups.setdefault(key, []).extend(_tensor(rel, shape, bits, group_size))
    order = [EMBED, *(layer_key(i) for i in range(L)), HEAD]
    units = []
    for key in order:
        tensors = {t.name: t for t in groups[key]}
        units.append(UnitSize(key, sum(t.nbytes for t in tensors.values()),
                              held_nbytes(tensors, views_raw, half_scales),
                              transient_nbytes(tensors, views_raw, half_scales)))
    return Layout(name, units, False, params, bits)


def layout_from_model(path: str, backend: str = "numpy") -> Layout:
    """The units of a model on disk, sized exactly as the engine sizes them."""
    from stream_run.bench.env import model_info, param_count

    engine = asyncio.run(Engine.open(path, EngineConfig(backend=backend)))
    try:
        index, loader = engine.source.index, engine.units
        units = [UnitSize(k, u.nbytes, loader.prepared_nbytes(k), loader.transient_nbytes(k))
                 for k, u in index.units.items()]
        spec = index.spec
        quant = model_info(path)["quantization"] or {}
        bits = quant.get("bits", 16) if isinstance(quant, dict) else 16
        return Layout(os.path.basename(os.path.normpath(path)), units,
                      spec.tie_word_embeddings, param_count(spec), bits)
    finally:
        engine.close()


class _Sizes:
    """The scheduler's UnitLoader, reduced to the sizes its residency plan asks for."""

    prepare_off_compute_thread = True

    def __init__(self, size_of: Callable[[str], UnitSize]) -> None:
        self._size_of = size_of

    def prepared_nbytes(self, key: str) -> int:
        return self._size_of(key).compute_bytes

    def transient_nbytes(self, key: str) -> int:
        return self._size_of(key).transient_bytes

    def raw_nbytes(self, key: str) -> int:
        return self._size_of(key).disk_bytes


def _scheduler(size_of: Callable[[str], UnitSize], budget: int | None,
               depth: int) -> LayerScheduler:
    """A scheduler over units of these sizes, for its planner alone (nothing is read)."""
    return LayerScheduler(WeightCache(CacheConfig(compute_bytes=budget)), _Sizes(size_of),
                          SchedulerConfig(prefetch_depth=depth))


def steps_min_budget(size_of: Callable[[str], UnitSize], steps: list) -> int:
    """The smallest budget the engine runs these steps with (its largest step's units; a
    late-bound step's largest picks), units sized by size_of."""
    sched = _scheduler(size_of, None, 0)
    try:
        return sched.min_budget_bytes(steps)
    finally:
        sched.close()


def steps_resident(size_of: Callable[[str], UnitSize], name: str, steps: list,
                   budget: int | None, depth: int) -> set[str]:
    """The units the engine's own planner keeps resident under `budget` over these steps.

    Raises:
        ValueError: the budget is below the largest step's units (names the minimum).
    """
    need = steps_min_budget(size_of, steps)
    if budget is not None and budget < need:
        raise ValueError(f"--budget {format_size(budget)} is below what one step of "
                         f"{name} needs ({format_size(need)}); use at least that")
    sched = _scheduler(size_of, budget, depth)
    try:
        return set(sched.plan_residency(steps))
    finally:
        sched.close()


def _steps(layout: Layout) -> list[tuple[str, ...]]:
    return [tuple(units) for units in layout.steps()]


def _size_of(layout: Layout) -> Callable[[str], UnitSize]:
    return {u.key: u for u in layout.units}.__getitem__


def min_budget(layout: Layout) -> int:
    """The smallest budget the engine runs the layout with (its largest step's units)."""
    return steps_min_budget(_size_of(layout), _steps(layout))


def plan_resident(layout: Layout, budget: int | None, depth: int) -> set[str]:
    """The units the engine keeps resident under `budget` (its own planner).

    Raises:
        ValueError: the budget is below the largest step's units (names the minimum).
    """
    return steps_resident(_size_of(layout), layout.name, _steps(layout), budget, depth)


# --- compute rates -------------------------------------------------------------------------

@dataclass
class ComputeRates:
    """Measured on a real run; per token unless a unit says otherwise."""

    block_s_per_byte: float  # compute seconds per compute-form byte of a block
    head_s_per_byte: float
    embed_s: float
    overhead_s_per_step: float  # wall time per step outside compute and I/O waits
    prepare_s_per_byte: float  # host -> compute conversion, per disk byte read
    source: str = ""  # what was measured, in words
    tokens: int = 0
    # block compute of a pass of k rows (a speculative verification pass) over that of one
    # row, measured on the same model: {k: factor}
    rows_factor: dict[int, float] = field(default_factory=dict)


async def _measure(path: str, backend: str, budget: int | None, tokens: int,
                   verify_rows: tuple[int, ...] = ()) -> ComputeRates:
    engine = await Engine.open(path, EngineConfig(backend=backend, memory_budget_bytes=budget))
    try:
        engine.scheduler.record_intervals = True
        kv = engine.model.make_kv_cache(tokens + 2 + max(verify_rows, default=0))
        logits, _ = await engine.forward(np.asarray([[1]]), kv, more=True)
        size = engine.units.prepared_nbytes
        n_layers = engine.spec.num_hidden_layers
        block_bytes = sum(size(layer_key(i)) for i in range(n_layers))
        head_bytes = size(HEAD) + (size(EMBED) if engine.spec.tie_word_embeddings else 0)
        blocks, heads, embeds, over = [], [], [], []
        for i in range(tokens):
            tok = int(np.argmax(logits[0, -1]))
            t0 = time.perf_counter()
            logits, rs = await engine.forward(np.asarray([[tok]]), kv, more=i + 1 < tokens)
            wall = time.perf_counter() - t0
            spans = [(label, b - a) for kind, label, a, b in rs.intervals if kind == "compute"]
            blocks.append(sum(d for label, d in spans if label.startswith("layers.")))
            heads.append(sum(d for label, d in spans if label == "head"))
            embeds.append(sum(d for label, d in spans if label == "embed"))
            over.append(max(0.0, wall - rs.compute_s - rs.io_stall_s) / (n_layers + 2))
        med = statistics.median
        factor = {}
        for k in verify_rows:  # k rows after the context, as a verification pass computes them
            times = []
            for _ in range(max(3, tokens // 2)):
                _, rs = await engine.forward(np.asarray([[tok] * k]), kv, all_logits=True)
                kv.trim(k)
                times.append(sum(b - a for kind, label, a, b in rs.intervals
                                 if kind == "compute" and label.startswith("layers.")))
            factor[k] = med(times) / med(blocks)
        prepare = await asyncio.to_thread(_prepare_s_per_byte, engine, layer_key(n_layers - 1))
        return ComputeRates(med(blocks) / block_bytes, med(heads) / max(head_bytes, 1),
                            med(embeds), med(over), prepare, "", tokens, factor)
    finally:
        engine.close()


def _prepare_s_per_byte(engine: Engine, key: str, repeats: int = 3) -> float:
    """Host->compute conversion of one block, timed alone (warm kernels), per disk byte."""
    times = []
    for _ in range(repeats):
        raw = engine.units.read(key)
        t0 = time.perf_counter()
        value = engine.units.prepare(key, raw)
        times.append(time.perf_counter() - t0)
        del value, raw
    return statistics.median(times) / engine.units.raw_nbytes(key)


def measure_compute(path: str, backend: str = "numpy", tokens: int = 6,
                    resident: bool = True, verify_rows: tuple[int, ...] = ()) -> ComputeRates:
    """Compute rates from `tokens` decode steps of the model at path, after one untimed pass
    that loads units and compiles kernels: fully resident, or (resident=False, for a model
    larger than RAM) at the minimum budget, where the compute intervals are timed alone.
    verify_rows: also time passes of that many rows (rows_factor)."""
    budget = None if resident else model_sizes(path, backend)[1]
    rates = asyncio.run(_measure(path, backend, budget, tokens, verify_rows))
    how = "resident" if resident else "minimum budget"
    rates.source = (f"measured on {os.path.basename(os.path.normpath(path))} ({backend}, "
                    f"{how}, median of {tokens} decode steps)")
    return rates


def probe_dims(dims: tuple[int, ...], width: int) -> tuple[int, ...]:
    """A 2-layer model with the target's proportions at hidden size min(target, width)."""
    E, I, _, H, KV, _ = dims
    e = min(E, max(256, width // 256 * 256))  # whole quantization groups
    heads = max(1, e // (E // H))
    kv = max(1, heads * KV // H)
    while heads % kv:
        kv -= 1
    inter = max(256, round(e * I / E / 256) * 256)
    return (e, inter, 2, heads, kv, 4096)


@contextmanager
def probe_model(dims: tuple[int, ...], bits: int, group_size: int, width: int,
                scratch: str) -> Iterator[str]:
    """A probe model with probe_dims(dims, width), converted to `bits` by stream-convert's RTN
    quantizer, written under scratch and deleted on exit."""
    E, I, L, H, KV, V = probe_dims(dims, width)
    with synth_probe(SynthSpec(hidden_size=E, intermediate_size=I, num_hidden_layers=L,
                               num_attention_heads=H, num_key_value_heads=KV, vocab_size=V),
                     bits, group_size, scratch, "stream-bench-probe-") as model:
        yield model


@contextmanager
def synth_probe(spec: SynthSpec, bits: int, group_size: int, scratch: str | None,
                prefix: str) -> Iterator[str]:
    """spec synthesized under scratch (bf16), converted to `bits` below 16 by stream-convert's
    RTN quantizer; the directory (named prefix...) deleted on exit."""
    from stream_run.convert.convert import convert_model

    root = tempfile.mkdtemp(prefix=prefix, dir=scratch)
    try:
        src = os.path.join(root, "bf16")
        synthesize(spec, src)
        model = src
        if bits < 16:
            model = os.path.join(root, f"q{bits}")
            convert_model(src, model, bits=bits, group_size=group_size, progress=False,
                          quantizer="rtn")
        yield model
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- the prediction ------------------------------------------------------------------------

@dataclass
class Projection:
    budget_bytes: int | None
    prefetch_depth: int
    resident_bytes: int  # compute-tier bytes kept resident
    streamed_bytes: int  # disk bytes read per token
    disk_gbs: float
    disk_block_bytes: int
    disk_threads: int
    read_s: float  # per token, at disk_gbs
    prepare_s: float  # per token, host->compute of streamed units
    compute_s: float  # per token
    overhead_s: float  # per token
    s_per_token: float  # the pipeline's steady state
    bound_s: float  # max(read, compute + overhead): perfect overlap
    bound: str  # "disk", "compute", or "latency" (neither busy >= 90 %: too little overlap)
    rows: int = 1  # rows per pass (speculative verification: 1 + draft tokens)
    tokens_per_pass: float = 1.0  # tokens kept per pass; every per-token figure is divided by it

    @property
    def tok_s(self) -> float:
        return 1 / self.s_per_token if self.s_per_token > 0 else float("inf")

    def to_dict(self) -> dict:
        return {"kind": "project", **asdict(self), "tok_s": self.tok_s}


def simulate(steps: list[tuple[str, ...]], compute_s: list[float],
             reads: dict[str, tuple[float, float]], depth: int, slots: int | None = None,
             tokens: int = 4) -> float:
    """Steady-state seconds per token of the engine's pipeline, event by event.

    A streamed unit's read is issued when the step depth + 1 before it starts computing (the
    scheduler's window; it wraps into the next token) and starts once the disk is free (one
    FIFO queue at the measured rate) and one of `slots` ring slots is: a slot holds a unit from
    the start of its read until its step has computed (None: unlimited). Then the unit is
    prepared; a step computes once the previous step is done and its units are ready.
    reads: {unit: (read_s, prepare_s)}; compute_s per step, overhead included.
    """
    n = len(steps)
    start, end = [0.0] * (n * tokens), [0.0] * (n * tokens)
    disk_free = 0.0
    holders: list[int] = []  # the step consuming each load so far, in load order
    for g in range(n * tokens):
        issue = start[g - depth - 1] if g > depth else 0.0
        ready = 0.0
        for key in steps[g % n]:
            if key in reads:
                read, prep = reads[key]
                begin = max(issue, disk_free)
                if slots is not None and len(holders) >= slots:
                    begin = max(begin, end[holders[-slots]])
                disk_free = begin + read
                holders.append(g)
                ready = max(ready, disk_free + prep)
        start[g] = max(end[g - 1] if g else 0.0, ready)
        end[g] = start[g] + compute_s[g % n]
    return end[-1] - end[-1 - n]


def predict(layout: Layout, budget: int | None, depth: int, io_workers: int,
            rates: ComputeRates, disk_points: list, rows: int = 1,
            tokens_per_pass: float = 1.0) -> Projection:
    """Predicted steady-state decode s/token (see the module docstring).

    rows, tokens_per_pass: speculative decoding, each pass verifying `rows` rows (block and
    head compute scaled by rates.rows_factor[rows]: every row needs its logits) and keeping
    tokens_per_pass tokens on average; the pass's time is divided by them (reads are the same
    for any rows).

    Raises:
        ValueError: budget below one step, or no O_DIRECT sequential point in disk_points.
    """
    resident = plan_resident(layout, budget, depth)
    units = {u.key: u for u in layout.units}
    streamed = [u for u in layout.units if u.key not in resident]
    nbytes = sum(u.disk_bytes for u in streamed)
    block = min(READ_CHUNK, max((u.disk_bytes for u in streamed), default=READ_CHUNK))
    threads = min(depth + 1, io_workers)
    point = disk.rate_at(disk_points, block, threads)
    if point is None:
        raise ValueError("the disk curve has no O_DIRECT sequential point; run "
                         "`stream-bench disk PATH --modes direct --patterns seq` first")
    gbs = point["gbs"]
    reads = {u.key: (u.disk_bytes / (gbs * 1e9), u.disk_bytes * rates.prepare_s_per_byte)
             for u in streamed}
    steps = layout.steps()
    per_step = rates.overhead_s_per_step
    scale = 1.0 if rows == 1 else rates.rows_factor[rows]
    step_s = []
    for keys in steps:
        if keys == (EMBED,):
            work = rates.embed_s
        elif keys[0] == HEAD:
            work = sum(units[k].compute_bytes for k in keys) * rates.head_s_per_byte * scale
        else:
            work = units[keys[0]].compute_bytes * rates.block_s_per_byte * scale
        step_s.append(work + per_step)
    overhead_s = per_step * len(steps)
    compute_s = sum(step_s) - overhead_s
    read_s = sum(r for r, _ in reads.values())
    prepare_s = sum(p for _, p in reads.values())
    # the ring: what the budget leaves beside the resident units, in streamed-unit loads
    load = max((u.compute_bytes + u.transient_bytes for u in streamed), default=1)
    resident_bytes = sum(u.compute_bytes for u in layout.units if u.key in resident)
    slots = None if budget is None else max(1, (budget - resident_bytes) // load)
    s = simulate(steps, step_s, reads, depth, slots)
    bound = ("disk" if read_s >= 0.9 * s else "compute" if compute_s + overhead_s >= 0.9 * s
             else "latency")
    a = tokens_per_pass
    return Projection(
        budget, depth, resident_bytes, nbytes,
        gbs, block, point["threads"], read_s / a, prepare_s / a, compute_s / a, overhead_s / a,
        s / a, max(read_s, compute_s + overhead_s) / a, bound, rows, tokens_per_pass)


def assumptions(rates: ComputeRates, disk_source: str) -> list[str]:
    """The model's assumptions, in words, for the report."""
    return [
        "s/token = the steady state of the engine's pipeline, simulated step by step: a "
        "streamed unit's read is issued when the step depth + 1 before it starts (the prefetch "
        "window, wrapping into the next token), waits for the disk (one FIFO queue at the "
        "measured rate) and for a free slot in the ring the budget leaves beside the resident "
        "units (a unit holds its slot until its step has computed), is prepared, then "
        "computed; with enough depth and room this reaches max(I/O, compute + overhead), "
        "printed as the bound",
        "streamed units = the engine's own residency plan for this budget and prefetch depth "
        "(resident units pinned, the rest read every token); unit sizes from kernels.sizes",
        f"disk: {disk_source}; each streamed unit is one sequential O_DIRECT read (in "
        f"<= {READ_CHUNK >> 20} MiB preads) with min(depth + 1, io_workers) units in flight, "
        "at the rate measured for that request size (log-interpolated) and thread count",
        f"compute: {rates.source}; time per compute-form byte is the same at the target's "
        "size (decode is memory-bandwidth bound; a probe that fits CPU caches is optimistic) "
        "and the same while reads run (not so on few cores: reads and preparation take CPU)",
        f"preparation (host -> compute form) of streamed units: "
        f"{rates.prepare_s_per_byte * 1e9:.3f} s/GB, timed alone on a warm unit, after each "
        "read on its I/O thread (it delays that unit, not the disk)",
        f"overhead: {rates.overhead_s_per_step * 1e6:.0f} us per step (scheduling, thread "
        "hand-offs, sampling), measured on the same run, times the target's steps",
        "attention over the KV cache is ignored (short contexts); batch 1; nothing else "
        "loads the disk or the CPUs",
    ]
