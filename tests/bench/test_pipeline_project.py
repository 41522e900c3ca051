"""stream-bench project --hosts: stages cut as stream-run --pipeline cuts a model, and the
pipeline's figures follow from each stage's own projection on hand-made rates."""

import pytest

from stream_run.bench import pipeline_project as pp
from stream_run.bench import project
from stream_run.loaders import EMBED, HEAD

DIMS = (256, 512, 8, 4, 2, 1024)  # hidden, intermediate, layers, heads, kv heads, vocab
MiB = 2**20
POINTS = [{"mode": "direct", "pattern": "seq", "block_bytes": b, "threads": t, "gbs": 1.0,
           "skipped": False} for b in (64 * 1024, MiB, 64 * MiB) for t in (1, 2, 4)]
RATES = project.ComputeRates(block_s_per_byte=1e-9, head_s_per_byte=1e-9, embed_s=1e-5,
                             overhead_s_per_step=1e-5, prepare_s_per_byte=0.0, source="hand")


def test_stages_cover_the_model_once_rank0_holds_embed_and_head():
    layout = project.layout_from_shape("x", DIMS, 4)
    parts = pp.stages(layout, 3)
    keys = [u.key for p in parts for u in p.units]
    assert sorted(keys) == sorted(u.key for u in layout.units)
    assert {EMBED, HEAD} <= {u.key for u in parts[0].units}
    assert all(p.steps() and EMBED not in {u.key for u in p.units} for p in parts[1:])


def test_one_stream_sums_compute_and_hops_when_resident():
    layout = project.layout_from_shape("x", DIMS, 4)
    one = project.predict(layout, None, 2, 8, RATES, POINTS)
    p = pp.predict_pipeline(layout, DIMS[0], 2, 10.0, 1e-3, None, 2, 8, RATES, POINTS)
    assert max(p.stage_read_s) == 0  # unlimited budget: nothing streamed
    # the same compute as one host (plus one overhead per step, the same steps), plus 2 hops
    assert p.s_per_token == pytest.approx(one.compute_s + one.overhead_s + 2 * p.hop_s)
    assert p.hop_s == pytest.approx(1e-3 + 4 * DIMS[0] / 10e9 * 8)
    assert p.batched_tok_s == pytest.approx(4 / (p.s_per_token + 2 * 3 * 4 * DIMS[0] * 8 / 10e9))


def test_streamed_stage_reads_bound_the_token():
    layout = project.layout_from_shape("x", DIMS, 4)
    budget = project.min_budget(pp.stages(layout, 2)[0])  # the least rank 0 runs with
    p = pp.predict_pipeline(layout, DIMS[0], 2, 10.0, 0.0, budget, 2, 8, RATES, POINTS)
    assert max(p.stage_read_s) > 0
    assert p.s_per_token >= max(p.stage_read_s)
