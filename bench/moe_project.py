"""Projected decode s/token of a Mixture-of-Experts model streamed from SSD, for shapes this
machine cannot hold (DeepSeek-V3, Kimi K2, Qwen3-235B-A22B, ...): `stream-bench project
--shape deepseek-v3 --budget 24GB,64GB,128GB` (issue 18), from measured figures.

A decode pass runs each sparse layer as the engine does: its dense unit (attention, norms,
router, shared experts), then the picked experts that are not in memory are read, all at once
(the engine issues a layer's missing experts together the moment its router has run), then
the experts compute. The next layer needs this layer's output, so those reads overlap nothing:

    expert_read = sum over sparse layers of E[m x b / R(b, m)]:  m ~ Binomial(k, 1 - h)
                  missed experts of b bytes each, R the measured random O_DIRECT rate for
                  requests of b bytes with m of them in flight (at most io_workers)
    dense_read  = the dense units the engine's own residency plan streams / the sequential
                  rate (prefetched behind compute, as for a dense model)
    s/token     = max(dense_read + expert_read, compute + overhead + expert_read)

The hit rate h: what the budget leaves beside the dense plan's resident units, the room kept
for one layer's picks and the streamed dense units' loads holds C experts, c = C / (sparse
layers) a layer. A frequency-aware cache in steady state keeps each layer's c most popular
experts, so h = sum of the top c experts' pick shares. With Zipf popularity p_r ~ r^-s
(--router-skew s): s = 0 is a uniform router (h = c / E, the floor), larger s a skewed one.
Real routers' skew is not measured here (no real MoE on this machine); --hit-rate takes one
measured elsewhere (`stream-bench stream`, `limit_compare --passes`).

Compute is measured on a probe MoE model of the target's architecture (2 layers, the target's
proportions at a smaller width, 16 experts of the target's top-k), decoded resident, and
scaled by compute-form bytes: dense units and experts each at their own s/byte.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np

from stream_run.bench import disk
from stream_run.bench.project import (
    UnitSize,
    _tensor,
    steps_min_budget,
    steps_resident,
    synth_probe,
)
from stream_run.bench.synth import SynthSpec
from stream_run.bench.synth_moe import SHAPES as MOE_SHAPES
from stream_run.engine import Engine, EngineConfig, format_size
from stream_run.kernels import get_backend
from stream_run.kernels.sizes import held_nbytes, transient_nbytes
from stream_run.loaders import EMBED, HEAD, TensorRef
from stream_run.loaders.spec import ModelSpec
from stream_run.models import REGISTRY

EXPERT = ".mlp.experts."
PROBE_EXPERTS = 16
KEEP_16BIT = ("mlp.gate.weight",)  # routers stay at full precision (stream-convert's recipes)


@dataclass(frozen=True)
class LateStep:
    """A sparse layer's routed experts as the planner sees them (cache.policy.LateLike)."""

    candidates: tuple[str, ...]
    picks: int


@dataclass
class MoELayout:
    """An MoE model as the cost model sees it: the dense units, one expert's size, the steps."""

    name: str
    arch: str
    dense: list[UnitSize]  # embed, every layer's dense unit, head: in pass order
    expert: UnitSize  # every routed expert has this size
    n_experts: int
    top_k: int
    sparse_layers: list[int]
    params: int
    active_params: int

    @property
    def expert_count(self) -> int:
        return self.n_experts * len(self.sparse_layers)

    @property
    def disk_bytes(self) -> int:
        return sum(u.disk_bytes for u in self.dense) + self.expert_count * self.expert.disk_bytes

    @property
    def compute_bytes(self) -> int:
        return (sum(u.compute_bytes for u in self.dense)
                + self.expert_count * self.expert.compute_bytes)

    def size_of(self, key: str) -> UnitSize:
        if EXPERT in key:
            return self.expert
        return self._dense[key]

    def __post_init__(self) -> None:
        self._dense = {u.key: u for u in self.dense}

    def steps(self) -> list[tuple[str, ...] | LateStep]:
        """The pass as the engine declares it to its planner: a sparse layer's experts as a
        late-bound step that may pick every expert (a prompt's rows may; models/moe.py)."""
        out: list[tuple[str, ...] | LateStep] = []
        sparse = set(self.sparse_layers)
        for u in self.dense:
            out.append((u.key,))
            if u.key.startswith("layers.") and int(u.key.split(".")[1]) in sparse:
                out.append(LateStep(tuple(f"{u.key}{EXPERT}{e}" for e in range(self.n_experts)),
                                    self.n_experts))
        return out


def moe_spec(shape: str, **kw) -> SynthSpec:
    """The SynthSpec of a named MoE shape (its first architecture)."""
    return SynthSpec.from_shape(shape, arch=MOE_SHAPES[shape].archs[0], **kw)


def moe_layout(spec: SynthSpec, bits: int, group_size: int = 64, backend: str = "numpy",
               name: str = "") -> MoELayout:
    """Unit sizes of an MoE spec at `bits` (every 2-D weight at `bits` but the router, which
    stays 16-bit as stream-convert keeps it; norms and biases 16-bit)."""
    arch = REGISTRY.for_model_type(spec.arch, "stream-bench project")
    units = arch.expected_shapes(ModelSpec.from_dict({**spec.config(), **arch.config_overrides}))
    ops = get_backend(backend)
    views_raw, half_scales = ops.prepare_views_raw, ops.half_scales

    def size(key: str, shapes: dict[str, tuple[int, ...]]) -> UnitSize:
        refs: dict[str, TensorRef] = {}
        for rel, shape in shapes.items():
            b = 16 if rel.endswith(KEEP_16BIT) else bits
            refs.update((t.name, t) for t in _tensor(rel, shape, b, group_size))
        return UnitSize(key, sum(t.nbytes for t in refs.values()),
                        held_nbytes(refs, views_raw, half_scales),
                        transient_nbytes(refs, views_raw, half_scales))

    dense, sparse, expert = [], set(), None
    params = active = expert_params = 0
    for key, shapes in units.items():
        count = sum(math.prod(s) for s in shapes.values())
        params += count
        if EXPERT in key:
            sparse.add(int(key.split(".")[1]))
            if expert is None:
                expert, expert_params = size(key, shapes), count
            continue
        active += count
        dense.append(size(key, shapes))
    if expert is None:
        raise ValueError(f"{name or spec.arch}: no routed experts in this shape")
    active += expert_params * spec.num_experts_per_tok * len(sparse)
    order = {EMBED: -1, HEAD: 1 << 30}
    dense.sort(key=lambda u: order.get(u.key, int(u.key.split(".")[1]) if "." in u.key else 0))
    return MoELayout(name or spec.arch, spec.arch, dense, expert, spec.num_experts,
                     spec.num_experts_per_tok, sorted(sparse), params, active)


def min_budget(layout: MoELayout) -> int:
    """The smallest budget the engine runs the layout with (its largest step, picks included)."""
    return steps_min_budget(layout.size_of, layout.steps())


def plan(layout: MoELayout, budget: int | None, depth: int) -> set[str]:
    """The dense units the engine's own planner keeps resident under `budget`.

    Raises:
        ValueError: the budget is below one step (names the minimum).
    """
    return {k for k in steps_resident(layout.size_of, layout.name, layout.steps(), budget,
                                      depth) if EXPERT not in k}


def hit_rate(per_layer: float, n_experts: int, skew: float) -> float:
    """Share of picks a frequency cache holding the per_layer most popular of n_experts
    experts serves, with Zipf popularity p_r ~ r^-skew (0: uniform)."""
    c = min(float(n_experts), max(0.0, per_layer))
    w = np.arange(1, n_experts + 1, dtype=np.float64) ** -skew
    whole = int(c)
    top = w[:whole].sum() + (c - whole) * (w[whole] if whole < n_experts else 0.0)
    return float(top / w.sum())


# --- compute rates, measured on a probe ------------------------------------------------------

@dataclass
class MoERates:
    dense_s_per_byte: float  # a sparse layer's dense unit, per compute-form byte
    expert_s_per_byte: float  # a picked expert, per compute-form byte
    head_s_per_byte: float
    embed_s: float
    overhead_s_per_step: float  # wall time per step outside compute and I/O waits
    prepare_s_per_byte: float  # an expert's host -> compute conversion, per disk byte
    source: str = ""


def probe_spec(spec: SynthSpec, width: int) -> SynthSpec:
    """A 2-layer probe with the target's architecture and proportions at hidden size
    min(target, width): PROBE_EXPERTS experts, the target's top-k (at most the experts)."""
    E = spec.hidden_size
    e = min(E, max(256, width // 256 * 256))

    def scaled(n: int) -> int:
        return n if e == E else max(128, round(n * e / E / 128) * 128)

    heads = max(1, round(spec.num_attention_heads * e / E))
    while e % heads:  # synth needs hidden % heads == 0
        heads -= 1
    kv = max(1, round(spec.num_key_value_heads * heads / spec.num_attention_heads))
    while heads % kv:
        kv -= 1
    n_exp = min(spec.num_experts, PROBE_EXPERTS)
    inter = scaled(spec.intermediate_size)
    moe = inter if spec.arch in ("mixtral", "gpt_oss") else scaled(spec.moe_intermediate_size)
    head_dim = spec.head_dim or E // spec.num_attention_heads
    return SynthSpec(arch=spec.arch, hidden_size=e, intermediate_size=inter,
                     num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv,
                     vocab_size=4096, head_dim=head_dim, num_experts=n_exp,
                     num_experts_per_tok=min(spec.num_experts_per_tok, n_exp),
                     moe_intermediate_size=moe)


@contextmanager
def probe_model(spec: SynthSpec, bits: int, group_size: int, scratch: str | None
                ) -> Iterator[str]:
    """The probe written under scratch (bf16, converted to `bits` by stream-convert's RTN
    quantizer below 16), deleted on exit."""
    with synth_probe(spec, bits, group_size, scratch, "stream-bench-moe-probe-") as model:
        yield model


async def _measure(path: str, backend: str, tokens: int, top_k: int) -> MoERates:
    engine = await Engine.open(path, EngineConfig(backend=backend))
    try:
        engine.scheduler.record_intervals = True
        kv = engine.model.make_kv_cache(tokens + 2)
        logits, _ = await engine.forward(np.asarray([[1]]), kv, more=True)  # loads, compiles
        size = engine.units.prepared_nbytes
        key = next(k for k in engine.source.index.units if EXPERT in k)  # all one size
        dense_t, exp_t, heads, embeds, over = [], [], [], [], []
        dense_b = exp_b = 0
        for i in range(tokens):
            tok = int(np.argmax(logits[0, -1]))
            t0 = time.perf_counter()
            logits, rs = await engine.forward(np.asarray([[tok]]), kv, more=i + 1 < tokens)
            wall = time.perf_counter() - t0
            spans = [(lab, b - a) for kind, lab, a, b in rs.intervals if kind == "compute"]
            sparse = {lab.removesuffix(".experts") for lab, _ in spans
                      if lab.endswith(".experts")}
            dense_t.append(sum(d for lab, d in spans if lab in sparse))
            exp_t.append(sum(d for lab, d in spans if lab.endswith(".experts")))
            heads.append(sum(d for lab, d in spans if lab == HEAD))
            embeds.append(sum(d for lab, d in spans if lab == EMBED))
            over.append(max(0.0, wall - rs.compute_s - rs.io_stall_s) / max(1, len(spans)))
            if i == 0:
                dense_b = sum(size(k) for k in sparse)
                exp_b = top_k * len(sparse) * size(key)
        head_b = size(HEAD) + (size(EMBED) if engine.spec.tie_word_embeddings else 0)
        med = statistics.median
        prep = []
        for _ in range(3):
            raw = engine.units.read(key)
            t0 = time.perf_counter()
            value = engine.units.prepare(key, raw)
            prep.append(time.perf_counter() - t0)
            del value, raw
        return MoERates(med(dense_t) / dense_b, med(exp_t) / exp_b, med(heads) / head_b,
                        med(embeds), med(over), med(prep) / engine.units.raw_nbytes(key))
    finally:
        engine.close()


def measure_compute(path: str, top_k: int, backend: str = "numpy", tokens: int = 8
                    ) -> MoERates:
    """MoERates from `tokens` resident decode steps of the MoE model at path (each token
    picks top_k experts a sparse layer)."""
    return asyncio.run(_measure(path, backend, tokens, top_k))


# --- the prediction --------------------------------------------------------------------------

@dataclass
class MoEProjection:
    budget_bytes: int | None
    prefetch_depth: int
    resident_bytes: int  # dense units kept resident (compute form)
    streamed_dense_bytes: int  # dense disk bytes read per token
    cached_experts: int  # experts the rest of the budget holds (all layers)
    cached_share: float  # of all routed experts
    hit_model: str  # "zipf s" or "measured"
    hit_rate: float
    expert_bytes_read: float  # per token
    expert_read_s: float
    expert_gbs: float  # random-read rate at one expert's size and the misses in flight
    dense_read_s: float
    compute_s: float
    overhead_s: float
    s_per_token: float
    bound: str  # "disk" (reads never overlap enough) or "serial" (compute + expert waits)

    @property
    def tok_s(self) -> float:
        return 1 / self.s_per_token if self.s_per_token > 0 else float("inf")

    @property
    def bytes_per_token(self) -> float:
        return self.expert_bytes_read + self.streamed_dense_bytes

    def to_dict(self) -> dict:
        return {"kind": "project_moe", **asdict(self), "tok_s": self.tok_s,
                "bytes_per_token": self.bytes_per_token}


def expert_rate(points: Sequence, block: int, in_flight: int, io_workers: int) -> float:
    """GB/s of random O_DIRECT reads of `block` bytes with the given reads in flight.

    Raises:
        ValueError: the disk points have no random O_DIRECT (or buffered) point.
    """
    threads = max(1, min(io_workers, in_flight))
    point = disk.rate_at(points, block, threads, pattern="rand")
    if point is None:
        raise ValueError("the disk curve has no random-read point; run `stream-bench disk PATH "
                         "--patterns rand` (or let project measure the disk)")
    return point["gbs"]


def layer_read_s(points: Sequence, top_k: int, hit: float, nbytes: int, io_workers: int,
                 prepare_s_per_byte: float) -> tuple[float, float]:
    """(expected seconds a sparse layer waits for its missed experts, the mean GB/s of those
    reads): each of the top_k picks misses with probability 1 - hit, so m misses are
    Binomial(top_k, 1 - hit); m reads in flight take m x nbytes / R(nbytes, m), then the last
    one's preparation."""
    block = max(4096, nbytes // 4096 * 4096)
    p = 1.0 - hit
    wait = read_bytes = read_s = 0.0
    for m in range(1, top_k + 1):
        chance = math.comb(top_k, m) * p**m * (1 - p) ** (top_k - m)
        if chance == 0:
            continue
        t = m * nbytes / (expert_rate(points, block, m, io_workers) * 1e9)
        wait += chance * (t + nbytes * prepare_s_per_byte)
        read_bytes += chance * m * nbytes
        read_s += chance * t
    return wait, (read_bytes / read_s / 1e9 if read_s else 0.0)


def predict(layout: MoELayout, budget: int | None, depth: int, io_workers: int,
            rates: MoERates, points: Sequence, skew: float = 0.0,
            measured_hit: float | None = None) -> MoEProjection:
    """Predicted steady-state decode s/token (see the module docstring)."""
    resident = plan(layout, budget, depth)
    streamed = [u for u in layout.dense if u.key not in resident]
    resident_bytes = sum(u.compute_bytes for u in layout.dense if u.key in resident)
    ex = layout.expert
    load = ex.compute_bytes + ex.transient_bytes
    ring = (depth + 1) * max((u.compute_bytes + u.transient_bytes for u in streamed), default=0)
    if budget is None:
        cached = layout.expert_count
    else:
        room = budget - resident_bytes - ring - layout.top_k * load
        cached = max(0, min(layout.expert_count, room // ex.compute_bytes))
    per_layer = cached / len(layout.sparse_layers)
    if measured_hit is not None:
        h, model = measured_hit, "measured"
    else:
        h, model = hit_rate(per_layer, layout.n_experts, skew), f"zipf {skew:g}"
    misses = layout.top_k * (1 - h)  # per sparse layer, on average
    per_layer_read, gbs = layer_read_s(points, layout.top_k, h, ex.disk_bytes, io_workers,
                                       rates.prepare_s_per_byte)
    expert_read_s = per_layer_read * len(layout.sparse_layers)
    dense_bytes = sum(u.disk_bytes for u in streamed)
    if streamed:
        block = max(u.disk_bytes for u in streamed)
        seq = disk.rate_at(points, min(block, 64 * disk.MiB), min(depth + 1, io_workers))
        if seq is None:
            raise ValueError("the disk curve has no sequential O_DIRECT point; run "
                             "`stream-bench disk PATH --patterns seq` first")
        dense_read_s = dense_bytes / (seq["gbs"] * 1e9)
    else:
        dense_read_s = 0.0
    compute = rates.embed_s
    n_steps = 0
    for u in layout.dense:
        n_steps += 1
        if u.key == HEAD:
            compute += u.compute_bytes * rates.head_s_per_byte
        elif u.key != EMBED:
            compute += u.compute_bytes * rates.dense_s_per_byte
    compute += (len(layout.sparse_layers) * layout.top_k * ex.compute_bytes
                * rates.expert_s_per_byte)
    n_steps += len(layout.sparse_layers)
    overhead = n_steps * rates.overhead_s_per_step
    serial = compute + overhead + expert_read_s
    disk_s = dense_read_s + expert_read_s
    s = max(serial, disk_s)
    return MoEProjection(budget, depth, resident_bytes, dense_bytes, int(cached),
                         cached / layout.expert_count, model, h,
                         misses * len(layout.sparse_layers) * ex.disk_bytes, expert_read_s, gbs,
                         dense_read_s, compute, overhead, s,
                         "disk" if disk_s >= serial else "serial")


def assumptions(rates: MoERates, disk_source: str, io_workers: int) -> list[str]:
    return [
        "a sparse layer: its dense unit computes, then its missing experts are read together "
        f"(up to {io_workers} in flight), then the experts compute; the next layer waits for "
        "them, so expert reads overlap nothing. s/token = max(dense reads + expert reads, "
        "compute + overhead + expert reads)",
        "dense units: the engine's own residency plan for this budget (routed experts as "
        "late-bound steps); streamed ones are prefetched behind compute at the sequential rate",
        "experts cached: the budget left beside the resident dense units, the streamed dense "
        "units' loads in flight and one layer's picks, in whole experts, spread evenly over "
        "the sparse layers",
        "hit rate: a frequency cache in steady state holding each layer's most popular experts, "
        "popularity Zipf r^-s (s = 0: a uniform router, the floor); 'measured': --hit-rate",
        f"disk: {disk_source}; each missed expert is one random O_DIRECT read of its bytes",
        f"compute: {rates.source}; s per compute-form byte the same at the target's size "
        "(decode is memory-bandwidth bound; a probe that fits CPU caches is optimistic, and "
        "its smaller experts make per-call costs weigh more)",
        f"overhead: {rates.overhead_s_per_step * 1e6:.0f} us per step; expert preparation "
        f"{rates.prepare_s_per_byte * 1e9:.3f} s/GB after its read",
        "batch 1, short context (attention over the KV cache ignored), nothing else on the "
        "disk or the CPUs",
    ]


def table(records: Sequence[dict]) -> str:
    from stream_run.bench.report import seconds

    head = ["budget", "dense resident", "experts cached", "hit model", "hit rate",
            "GB read/token", "expert reads (GB/s)", "dense reads", "compute + overhead",
            "s/token", "tok/s", "bound"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        lines.append("| " + " | ".join([
            "unlimited" if r["budget_bytes"] is None else format_size(r["budget_bytes"]),
            format_size(r["resident_bytes"]),
            f"{r['cached_experts']} ({100 * r['cached_share']:.1f} %)", r["hit_model"],
            f"{100 * r['hit_rate']:.1f} %", f"{r['bytes_per_token'] / 1e9:.3f}",
            f"{seconds(r['expert_read_s'])} ({r['expert_gbs']:.2f})",
            seconds(r["dense_read_s"]), seconds(r["compute_s"] + r["overhead_s"]),
            f"**{seconds(r['s_per_token'])}**", f"{r['tok_s']:.3g}", r["bound"]]) + " |")
    return "\n".join(lines)
