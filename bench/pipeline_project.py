"""Cost model of a pipeline over hosts (issue 21): `stream-bench project --hosts N --link-gbps X`.

The model's layers are split over N hosts as `stream-run --pipeline` splits them (by bytes,
rank 0 also holding the embedding and the head: engine.pipeline.split_layers). Each host has
its own disk (the same curve), its own budget and CPUs (the same compute rates), and streams
its own units: bench.project.predict on the stage's units gives each stage's read, compute
and steady-state s/token. A hop carries the hidden state of the pass's rows over the link.

    one stream      s/token = max(sum of the stages' compute + N hops, the slowest stage's read)
                    (a token visits the stages in turn; a stage's prefetch reads while the
                    others compute, so its disk has the whole token to read its share)
    B streams,      one pass carries all B rows (the engine batches concurrent requests):
    one pass        tok/s = B / (one stream's s/token + B rows' extra hop bytes)
    micro-batches   B groups in flight, stage k on one while k+1 on another (not built):
    (upper bound)   tok/s = B / max(B x the slowest stage's compute + hops, slowest read)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from stream_run.bench.project import ComputeRates, Layout, predict
from stream_run.engine.pipeline import layer_of, split_layers
from stream_run.loaders import EMBED, HEAD


@dataclass
class PipelineProjection:
    hosts: int
    link_gbps: float
    link_latency_s: float
    layers_per_host: list[int]
    stage_read_s: list[float]
    stage_compute_s: list[float]  # compute + overhead
    stage_s: list[float]  # each stage's own steady state (bench.project.predict)
    hop_s: float  # one hop of one row
    s_per_token: float  # one stream
    streams: int
    batched_tok_s: float  # `streams` streams in one pass
    microbatch_tok_s: float  # upper bound with micro-batching

    def to_dict(self) -> dict:
        return {"kind": "project-pipeline", **asdict(self)}


def stages(layout: Layout, hosts: int) -> list[Layout]:
    """The layout cut as stream-run --pipeline cuts a model (by compute-form bytes)."""
    blocks = [u for u in layout.units if u.key not in (EMBED, HEAD)]
    fixed = sum(u.compute_bytes for u in layout.units if u.key in (EMBED, HEAD))
    ranges = split_layers([u.compute_bytes for u in blocks], fixed, hosts)
    out = []
    for rank, (a, b) in enumerate(ranges):
        units = [u for u in layout.units
                 if (rank == 0 and u.key in (EMBED, HEAD))
                 or (layer_of(u.key) is not None and a <= layer_of(u.key) < b)]  # type: ignore
        out.append(Layout(f"{layout.name} stage {rank}", units, layout.tied, layout.params,
                          layout.bits))
    return out


def predict_pipeline(layout: Layout, hidden: int, hosts: int, link_gbps: float,
                     link_latency_s: float, budget: int | None, depth: int, io_workers: int,
                     rates: ComputeRates, disk_points: list, streams: int = 4
                     ) -> PipelineProjection:
    parts = stages(layout, hosts)
    preds = [predict(p, budget, depth, io_workers, rates, disk_points) for p in parts]
    read = [p.read_s for p in preds]
    compute = [p.compute_s + p.overhead_s for p in preds]
    row_bytes = 4 * hidden  # float32 hidden state per row
    hop = link_latency_s + row_bytes / (link_gbps * 1e9 / 8)
    one = max(sum(compute) + hosts * hop, max(read))
    extra = hosts * (streams - 1) * row_bytes / (link_gbps * 1e9 / 8)
    batched = streams / (one + extra)
    micro = streams / max(streams * max(compute) + hosts * hop, max(read))
    return PipelineProjection(hosts, link_gbps, link_latency_s,
                              [sum(1 for u in p.units if layer_of(u.key) is not None)
                               for p in parts],
                              read, compute, [p.s_per_token for p in preds], hop, one, streams,
                              batched, micro)


def assumptions(hosts: int, link_gbps: float, link_latency_s: float) -> list[str]:
    return [
        f"{hosts} hosts, each with its own disk (the same curve as above), its own budget "
        "(--budget, per host) and the same compute rates; layers split by compute-form bytes "
        "as `stream-run --pipeline` splits them (rank 0 also holds the embedding and the head)",
        f"link: {link_gbps:g} Gb/s and {link_latency_s * 1e3:g} ms per hop (--link-latency-ms; "
        "the ring backend measured about 1 ms per message on this loaded machine's loopback); "
        "a hop carries float32 hidden rows, N hops per token (the last back to rank 0)",
        "one stream: the stages compute in turn; a stage's reads overlap the others' compute "
        "(its prefetch wraps into the next token), so a token takes the larger of the summed "
        "compute + hops and the slowest stage's read",
        "batched: concurrent streams share each pass (what the engine does today), decode "
        "compute taken as independent of the rows (matrix-vector, memory bound)",
        "micro-batched: an upper bound for stages working on different groups at once (not "
        "built): the slowest stage's compute per group, or its read, sets the rate",
    ]
