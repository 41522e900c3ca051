"""stream-bench project on Mixture-of-Experts shapes (bench/moe_project.py): its unit sizes and
residency plan are the engine's, its hit-rate and read arithmetic hold on hand-made cases,
and the CLI reports every budget x hit-rate row (or a one-line error)."""

import asyncio

import numpy as np
import pytest

from stream_run.bench import moe_project as mp
from stream_run.bench.cli import main as bench_main
from stream_run.bench.synth import SynthSpec, synthesize
from stream_run.engine import Engine, EngineConfig
from stream_run.scheduler import SchedulerConfig
from tests.bench.conftest import assert_meta, assert_one_line_error, read_records

ARCHS = ("qwen3_moe", "mixtral", "deepseek_v3")


def tiny(arch: str) -> SynthSpec:
    inter = 64 if arch == "mixtral" else 256  # mixtral's experts are intermediate_size wide
    return SynthSpec(arch=arch, hidden_size=128, intermediate_size=inter, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2 if arch != "deepseek_v3"
                     else 4, vocab_size=512, head_dim=32, num_experts=8,
                     num_experts_per_tok=2, moe_intermediate_size=64)


@pytest.fixture(scope="module", params=ARCHS)
def converted(request, tmp_path_factory):
    from stream_run.convert.convert import convert_model

    root = tmp_path_factory.mktemp(f"moe-{request.param}")
    spec = tiny(request.param)
    synthesize(spec, str(root / "bf16"))
    convert_model(str(root / "bf16"), str(root / "q4"), bits=4, group_size=64, progress=False,
                  quantizer="rtn")
    return spec, str(root / "q4")


def test_layout_sizes_units_as_the_engine_does(converted):
    spec, path = converted
    layout = mp.moe_layout(spec, 4)

    async def sizes():
        async with await Engine.open(path, EngineConfig(backend="numpy")) as engine:
            u = engine.units
            return {k: (u.raw_nbytes(k), u.prepared_nbytes(k), u.transient_nbytes(k))
                    for k in engine.source.index.units}

    engine = asyncio.run(sizes())
    experts = {k: v for k, v in engine.items() if mp.EXPERT in k}
    assert len(experts) == layout.expert_count == 8 * len(layout.sparse_layers)
    e = layout.expert
    assert set(experts.values()) == {(e.disk_bytes, e.compute_bytes, e.transient_bytes)}
    assert {k: v for k, v in engine.items() if mp.EXPERT not in k} == {
        u.key: (u.disk_bytes, u.compute_bytes, u.transient_bytes) for u in layout.dense}
    assert [u.key for u in layout.dense][0] == "embed" and layout.dense[-1].key == "head"
    if spec.arch == "deepseek_v3":
        assert layout.sparse_layers == [1, 2]  # its first layer dense
    assert layout.disk_bytes == sum(v[0] for v in engine.values())


@pytest.mark.parametrize("fraction, depth", [(0.35, 0), (0.6, 2)])
def test_residency_plan_is_the_engine_plan(converted, fraction, depth):
    spec, path = converted
    layout = mp.moe_layout(spec, 4)
    budget = max(mp.min_budget(layout), int(fraction * layout.compute_bytes))

    async def engine_resident():
        cfg = EngineConfig(backend="numpy", memory_budget_bytes=budget,
                           scheduler=SchedulerConfig(prefetch_depth=depth))
        async with await Engine.open(path, cfg) as engine:
            await engine.forward(np.asarray([[1]]), engine.model.make_kv_cache(4))
            return {k for k in engine.scheduler.resident if mp.EXPERT not in k}

    assert mp.plan(layout, budget, depth) == asyncio.run(engine_resident())


def test_published_shapes_have_their_parameter_counts():
    for shape, total, active in (("qwen3-30b-a3b", 30.5e9, 3.3e9),
                                 ("qwen3-235b-a22b", 235e9, 22e9),
                                 ("deepseek-v3", 671e9, 37e9), ("kimi-k2", 1.03e12, 32.9e9)):
        layout = mp.moe_layout(mp.moe_spec(shape), 4, name=shape)
        assert layout.params == pytest.approx(total, rel=0.02), shape
        assert layout.active_params == pytest.approx(active, rel=0.03), shape


def test_hit_rate_of_a_frequency_cache():
    assert mp.hit_rate(32, 128, 0.0) == pytest.approx(0.25)  # uniform: the share held
    assert mp.hit_rate(0, 128, 1.0) == 0 and mp.hit_rate(128, 128, 1.0) == pytest.approx(1)
    assert mp.hit_rate(1, 4, 1.0) == pytest.approx(1 / (1 + 1 / 2 + 1 / 3 + 1 / 4))
    assert mp.hit_rate(1.5, 4, 1.0) == pytest.approx((1 + 0.25) / (1 + 1 / 2 + 1 / 3 + 1 / 4))
    rates = [mp.hit_rate(16, 128, s) for s in (0, 0.5, 1, 2)]
    assert rates == sorted(rates) and rates[0] < rates[-1]


def points(rand_gbs: dict[int, float], seq_gbs: float, block: int) -> list[dict]:
    pts = [{"pattern": "rand", "mode": "direct", "block_bytes": block, "threads": t,
            "gbs": g, "skipped": False} for t, g in rand_gbs.items()]
    return pts + [{"pattern": "seq", "mode": "direct", "block_bytes": b, "threads": 1,
                   "gbs": seq_gbs, "skipped": False} for b in (1 << 20, 64 << 20)]


def test_prediction_arithmetic():
    layout = mp.moe_layout(tiny("qwen3_moe"), 4)
    e = layout.expert
    rates = mp.MoERates(dense_s_per_byte=1e-9, expert_s_per_byte=2e-9, head_s_per_byte=1e-9,
                        embed_s=1e-4, overhead_s_per_step=1e-5, prepare_s_per_byte=0.0)
    pts = points({1: 0.5, 2: 1.0, 4: 2.0}, 3.0, e.disk_bytes // 4096 * 4096)
    compute = (1e-4 + sum(u.compute_bytes for u in layout.dense if u.key != "embed") * 1e-9
               + 3 * 2 * e.compute_bytes * 2e-9)
    overhead = (len(layout.dense) + 3) * 1e-5
    # everything held: no reads, compute and overhead alone
    p = mp.predict(layout, None, 2, 8, rates, pts)
    assert p.hit_rate == 1 and p.expert_bytes_read == 0 and p.streamed_dense_bytes == 0
    assert p.s_per_token == pytest.approx(compute + overhead)
    # a measured hit rate of 0.5: a layer misses one pick (chance 1/2, read at the 1-thread
    # rate) or both (1/4, read together at the 2-thread rate)
    budget = mp.min_budget(layout) + layout.compute_bytes // 2
    p = mp.predict(layout, budget, 2, 8, rates, pts, measured_hit=0.5)
    b = e.disk_bytes
    assert p.hit_model == "measured"
    assert p.expert_bytes_read == pytest.approx(3 * 1 * b)
    assert p.expert_read_s == pytest.approx(3 * (0.5 * b / 0.5e9 + 0.25 * 2 * b / 1e9))
    assert p.expert_gbs == pytest.approx(b / (0.5 * b / 0.5 + 0.25 * 2 * b / 1.0))
    assert p.s_per_token == pytest.approx(compute + overhead + p.expert_read_s)
    # no hits: both picks read together, at the 2-thread rate
    p0 = mp.predict(layout, budget, 2, 8, rates, pts, measured_hit=0.0)
    assert p0.expert_gbs == 1.0 and p0.expert_read_s == pytest.approx(3 * 2 * b / 1e9)
    # more hits never wait longer
    waits = [mp.predict(layout, budget, 2, 8, rates, pts, measured_hit=h).expert_read_s
             for h in (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)]
    assert waits == sorted(waits, reverse=True) and waits[-1] == 0
    # a uniform router: the hit rate is the share of experts the budget holds
    pu = mp.predict(layout, budget, 2, 8, rates, pts, skew=0.0)
    assert pu.hit_rate == pytest.approx(pu.cached_share) and 0 < pu.cached_share < 1
    with pytest.raises(ValueError, match="random-read"):
        mp.predict(layout, budget, 2, 8, rates, [q for q in pts if q["pattern"] == "seq"],
                   measured_hit=0.5)
    with pytest.raises(ValueError, match="below what one step"):
        mp.predict(layout, 1000, 2, 8, rates, pts)


def test_cli_projects_every_budget_and_hit_rate(tmp_path, capsys, small_model):
    log = tmp_path / "p.jsonl"
    assert bench_main(["disk", small_model, "--quick", "--modes", "direct", "--patterns",
                       "seq,rand", "--blocks", "64KiB,1MiB", "--threads", "1,2",
                       "--json", str(log)]) == 0
    capsys.readouterr()
    rc = bench_main(["project", "--shape", "qwen3-30b-a3b", "--budget", "4GiB,none",
                     "--quick", "--probe-width", "256", "--router-skew", "0,1",
                     "--hit-rate", "0.8", "--disk-json", str(log), "--scratch", str(tmp_path),
                     "--json", str(log)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "qwen3-30b-a3b (qwen3_moe, 31B parameters, 3.4B active; 128 experts" in out
    assert "assumptions:" in out and f"read from {log}" in out
    rows = read_records(log, "project_moe")
    assert [(r["budget_bytes"], r["hit_model"]) for r in rows] == [
        (4 << 30, "zipf 0"), (4 << 30, "zipf 1"), (4 << 30, "measured"),
        (None, "zipf 0"), (None, "zipf 1"), (None, "measured")]
    uniform, skewed, measured = rows[:3]
    assert uniform["hit_rate"] == pytest.approx(uniform["cached_share"])
    assert skewed["hit_rate"] > uniform["hit_rate"] and measured["hit_rate"] == 0.8
    assert skewed["bytes_per_token"] < uniform["bytes_per_token"]
    assert rows[3]["hit_rate"] == 1 and rows[3]["bytes_per_token"] == 0
    for r in rows:
        assert r["s_per_token"] >= r["compute_s"] + r["overhead_s"] > 0
        assert_meta(r["meta"])
    assert not list(tmp_path.glob("stream-bench-moe-probe-*"))  # the probe was removed


@pytest.mark.parametrize("args, match", [
    (["--router-skew", "x"], "--router-skew must be numbers"),
    (["--hit-rate", "1.5"], "--hit-rate values must be in 0..1"),
    (["--budget", "1MB"], "below the model's minimum"),
    (["--hosts", "4"], "--hosts is not supported for MoE shapes"),
])
def test_cli_bad_input_is_one_line(capsys, args, match):
    base = {"--budget": "4GiB"}
    argv = ["project", "--shape", "qwen3-30b-a3b", "--quick"]
    flags = dict(zip(args[::2], args[1::2], strict=True))
    for k, v in {**base, **flags}.items():
        argv += [k, v]
    assert bench_main(argv) == 2
    assert_one_line_error(capsys, match)


def test_hit_rate_on_a_dense_shape_is_one_line(capsys):
    assert bench_main(["project", "--shape", "7b", "--budget", "4GB", "--hit-rate", "0.5",
                       "--quick"]) == 2
    assert_one_line_error(capsys, "--hit-rate is for Mixture-of-Experts shapes")
