"""stream-bench project: the cost model's byte accounting is the engine's, its pipeline
simulation is right on hand-made cases, and its prediction matches a measured run."""

import asyncio
import os

import pytest

from stream_run.bench import project
from stream_run.bench.cli import main as bench_main
from stream_run.bench.streaming import PointConfig, measure_disk, run_point
from stream_run.bench.synth import SynthSpec, synthesize
from stream_run.engine import Engine, EngineConfig
from stream_run.scheduler import SchedulerConfig
from tests.bench.conftest import assert_meta, assert_one_line_error, assert_png, read_records

DIMS = (128, 256, 3, 4, 2, 512)  # hidden, intermediate, layers, heads, kv heads, vocab


@pytest.fixture(scope="module")
def bf16_and_q4(tmp_path_factory):
    from stream_run.convert.convert import convert_model

    root = tmp_path_factory.mktemp("project")
    E, I, L, H, KV, V = DIMS
    src, q4 = str(root / "bf16"), str(root / "q4")
    synthesize(SynthSpec(hidden_size=E, intermediate_size=I, num_hidden_layers=L,
                         num_attention_heads=H, num_key_value_heads=KV, vocab_size=V), src)
    convert_model(src, q4, bits=4, group_size=64, progress=False, quantizer="rtn")
    return src, q4


@pytest.mark.parametrize("bits", [16, 4])
def test_shape_layout_sizes_units_as_the_engine_does(bf16_and_q4, bits):
    path = bf16_and_q4[0 if bits == 16 else 1]
    from_shape = project.layout_from_shape("x", DIMS, bits)
    from_model = project.layout_from_model(path)
    assert [(u.key, u.disk_bytes, u.compute_bytes, u.transient_bytes)
            for u in from_shape.units] == [
        (u.key, u.disk_bytes, u.compute_bytes, u.transient_bytes) for u in from_model.units]
    assert from_shape.params == from_model.params and from_model.bits == bits


@pytest.mark.parametrize("fraction, depth", [(0.3, 0), (0.5, 2), (1.0, 2)])
def test_residency_plan_is_the_engine_plan(streaming_model, fraction, depth):
    layout = project.layout_from_model(streaming_model)
    budget = int(fraction * layout.compute_bytes)

    async def engine_resident():
        cfg = EngineConfig(backend="numpy", memory_budget_bytes=budget,
                           scheduler=SchedulerConfig(prefetch_depth=depth))
        async with await Engine.open(streaming_model, cfg) as engine:
            return set(engine.scheduler.resident)

    assert project.plan_resident(layout, budget, depth) == asyncio.run(engine_resident())


def test_simulated_pipeline_on_hand_made_cases():
    steps = [("a",), ("b",), ("c",)]
    # nothing streamed: compute in series
    assert project.simulate(steps, [1.0, 2.0, 3.0], {}, depth=2) == pytest.approx(6.0)
    # every unit streamed, deep window: the disk is the bottleneck, 4 s per unit
    reads = {k: (4.0, 0.0) for k in "abc"}
    assert project.simulate(steps, [1.0] * 3, reads, depth=2) == pytest.approx(12.0)
    # depth 0: b's read starts when a starts computing (1 s of overlap), and so on
    reads = {"b": (3.0, 0.0)}
    assert project.simulate(steps, [1.0] * 3, reads, depth=0) == pytest.approx(5.0)
    # preparation delays the unit, not the disk
    reads = {k: (1.0, 0.5) for k in "abc"}
    assert project.simulate(steps, [0.1] * 3, reads, depth=2) == pytest.approx(3.0)
    # one ring slot: the next read waits until the unit in the slot has computed
    reads = {k: (1.0, 0.0) for k in "abc"}
    assert project.simulate(steps, [1.0] * 3, reads, depth=2, slots=1) == pytest.approx(6.0)
    assert project.simulate(steps, [1.0] * 3, reads, depth=2, slots=2) == pytest.approx(3.0)


def test_prediction_matches_a_measured_run(streaming_model):
    """Measure the disk and the compute, predict at half the model, then run the engine
    there: the bytes it streams per token are exactly the prediction's, every token. (How
    close the predicted seconds come is a benchmark's figure, `stream-bench project`, not a
    test's: on a shared 2-core machine a wall-clock bound failed under load.)"""
    layout = project.layout_from_model(streaming_model)
    block = max(u.disk_bytes for u in layout.units if u.key.startswith("layers."))
    files = sorted({os.path.join(streaming_model, f) for f in os.listdir(streaming_model)
                    if f.endswith(".safetensors")})
    budget, depth, tokens = int(0.5 * layout.compute_bytes), 2, 8
    disk_run = measure_disk(files, 256 * 2**20, 0.5, blocks=(block // 4096 * 4096,),
                            threads=(1, 2, 3))
    if disk_run.best is None or disk_run.best.mode != "direct":
        pytest.skip("the filesystem under tmp_path refuses O_DIRECT")
    rates = project.measure_compute(streaming_model, tokens=tokens)
    pred = project.predict(layout, budget, depth, 8, rates, disk_run.points)
    point = run_point(PointConfig(streaming_model, budget, depth, tokens))
    assert point.bytes_per_token == [pred.streamed_bytes] * tokens
    assert pred.s_per_token > 0 and all(s > 0 for s in point.s_per_token)


def test_cli_with_a_disk_curve_from_json(bf16_and_q4, tmp_path, capsys):
    log, plots = tmp_path / "p.jsonl", tmp_path / "plots"
    assert bench_main(["disk", bf16_and_q4[0], "--quick", "--modes", "direct", "--patterns",
                       "seq", "--json", str(log)]) == 0
    capsys.readouterr()
    # 70b at 4 bits holds 39.7 GB (float16 scales kept as read): both budgets stream
    rc = bench_main(["project", "--shape", "70b", "--bits", "4", "--budget", "24GB,36GB",
                     "--prefetch-depth", "0,2", "--disk-json", str(log), "--quick",
                     "--scratch", str(tmp_path), "--json", str(log), "--plot", str(plots)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "70b (hidden 8192, intermediate 28672, 80 layers" in out and "assumptions:" in out
    assert f"read from {log}" in out
    rows = read_records(log, "project")
    assert [(r["budget_bytes"], r["prefetch_depth"]) for r in rows] == [
        (24 * 10**9, 0), (24 * 10**9, 2), (36 * 10**9, 0), (36 * 10**9, 2)]
    for r in rows:
        assert r["s_per_token"] >= r["bound_s"] * (1 - 1e-9) > 0
        assert r["bound_s"] == pytest.approx(max(r["read_s"], r["compute_s"] + r["overhead_s"]))
        assert r["streamed_bytes"] > 0 and r["resident_bytes"] <= r["budget_bytes"]
        assert r["params"] == pytest.approx(70.6e9, rel=0.01)
        assert_meta(r["meta"])
    assert rows[2]["streamed_bytes"] < rows[0]["streamed_bytes"]  # more budget, fewer reads
    assert not list(tmp_path.glob("stream-bench-probe-*"))  # the probe model was removed
    assert_png(plots / "project.png")


def test_cli_measures_the_disk_when_no_curve_is_given(bf16_and_q4, capsys):
    assert bench_main(["project", "--model", bf16_and_q4[1], "--budget", "0.5",
                       "--quick"]) == 0
    out = capsys.readouterr().out
    assert f"measured now on {bf16_and_q4[1]}" in out and "| 2 |" in out


def test_speculative_projection_divides_a_pass_by_its_tokens(bf16_and_q4, capsys):
    """--verify-rows k: a pass of k rows reads what one row's does and computes the measured
    factor more; its s/token is that pass over the tokens it keeps, and the tokens per pass
    that halve plain s/token are 2 x pass / plain."""
    layout = project.layout_from_model(bf16_and_q4[1])
    rates = project.measure_compute(bf16_and_q4[1], tokens=3, verify_rows=(4,))
    assert rates.rows_factor[4] > 0
    from stream_run.bench.disk import DiskPoint

    points = [DiskPoint("direct", "seq", 2**20, t, gbs=1.0) for t in (1, 2, 4)]
    budget = int(0.5 * layout.compute_bytes)
    plain = project.predict(layout, budget, 2, 8, rates, points)
    pass4 = project.predict(layout, budget, 2, 8, rates, points, rows=4)
    spec = project.predict(layout, budget, 2, 8, rates, points, rows=4, tokens_per_pass=2.5)
    assert spec.s_per_token == pytest.approx(pass4.s_per_token / 2.5)
    assert pass4.read_s == pytest.approx(plain.read_s)  # the same bytes whatever the rows
    e = rates.embed_s  # the embedding is the only step not scaled
    assert pass4.compute_s == pytest.approx((plain.compute_s - e) * rates.rows_factor[4] + e)
    assert bench_main(["project", "--model", bf16_and_q4[1], "--budget", "0.5", "--quick",
                       "--verify-rows", "4", "--tokens-per-pass", "1.5,3"]) == 0
    out = capsys.readouterr().out
    assert "speculative decoding: passes of 4 rows" in out and "| 3 tok/pass |" in out
    assert "tok/pass to halve s/token" in out


@pytest.mark.parametrize("args, match", [
    (["project", "--shape", "3b", "--budget", "1GB"], "--shape must be one of"),
    (["project", "--shape", "70b", "--budget", "1GB", "--verify-rows", "9"],
     "--verify-rows must be 2..8"),
    (["project", "--shape", "70b", "--budget", "1GB", "--tokens-per-pass", "2"],
     "--tokens-per-pass needs --verify-rows"),
    (["project", "--shape", "70b", "--budget", "1GB", "--verify-rows", "4",
      "--tokens-per-pass", "5"], "--tokens-per-pass values must be 1..4"),
    (["project", "--shape", "70b", "--budget", "1GB", "--verify-rows", "4",
      "--tokens-per-pass", "x"], "--tokens-per-pass must be numbers"),
    (["project", "--shape", "70b", "--bits", "7", "--budget", "1GB"], "--bits must be"),
    (["project", "--shape", "70b", "--budget", "1MB"], "below the model's minimum"),
    (["project", "--shape", "70b", "--budget", "big"], "not a size"),
    (["project", "--shape", "custom", "--hidden-size", "64", "--budget", "1GB"],
     "--shape custom needs"),
    (["project", "--model", "/nonexistent", "--budget", "1GB"], "no such file or directory"),
    (["project", "--shape", "70b", "--budget", "30GB", "--disk-json", "/nonexistent.jsonl"],
     "no such file"),
])
def test_bad_input_is_one_line(capsys, args, match):
    assert bench_main(args) == 2
    assert_one_line_error(capsys, match)
