"""--memory-budget auto: the memory available (fake /proc and cgroup files), the pick, the
engine and the CLI; the baseline and the activations a pass reserves."""

import asyncio
import re

import numpy as np
import pytest

from stream_run.cache import BudgetError
from stream_run.cli import run as cli_run
from stream_run.engine import Engine, EngineConfig
from stream_run.engine.config import (
    MARGIN_BYTES,
    RESERVE_MAX,
    RESERVE_MIN,
    Headroom,
    memory_headroom,
    pick_budget,
)
from stream_run.kernels.kv_cache import ATTN_SCORE_BYTES
from stream_run.models.base import Batch, SeqRows
from tests.tiny_models import write_tiny_model

GB, MB = 10**9, 10**6
UNLIMITED_V1 = 9223372036854771712


def fake_proc(tmp_path, available_kb: int, cgroup: str) -> tuple:
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    root.mkdir()
    (proc / "meminfo").write_text(f"MemTotal:  99999999 kB\nMemFree:   1000 kB\n"
                                  f"MemAvailable:   {available_kb} kB\nBuffers: 12 kB\n")
    (proc / "self" / "cgroup").write_text(cgroup)
    return proc, root


def v1_group(root, path: str, limit: int, usage: int, inactive_file: int,
             hierarchical: int | None = None):
    d = root / "memory" / path
    d.mkdir(parents=True)
    (d / "memory.limit_in_bytes").write_text(f"{limit}\n")
    (d / "memory.usage_in_bytes").write_text(f"{usage}\n")
    (d / "memory.stat").write_text(
        f"cache 5\nrss 7\nhierarchical_memory_limit {hierarchical or limit}\n"
        f"inactive_file 1\ntotal_inactive_file {inactive_file}\n")


def v2_group(root, path: str, limit: str, usage: int, inactive_file: int):
    d = root / path if path else root
    d.mkdir(parents=True, exist_ok=True)
    (d / "memory.max").write_text(f"{limit}\n")
    (d / "memory.current").write_text(f"{usage}\n")
    (d / "memory.stat").write_text(f"anon 5\nfile 9\ninactive_file {inactive_file}\n")


def test_without_a_cgroup_limit_meminfo_decides(tmp_path):
    proc, root = fake_proc(tmp_path, 8_000_000, "4:memory:/a\n0::/\n")
    v1_group(root, "a", UNLIMITED_V1, 3 * GB, 0)
    got = memory_headroom(proc, root)
    assert got.available_bytes == 8_000_000 * 1024 and "MemAvailable" in got.source


def test_a_cgroup_v1_limit_counts_inactive_page_cache_as_available(tmp_path):
    proc, root = fake_proc(tmp_path, 8_000_000, "4:memory:/a/b\n1:cpu:/\n")
    v1_group(root, "a/b", 4 * GB, 3 * GB, 500 * MB)
    got = memory_headroom(proc, root)
    assert got.available_bytes == 4 * GB - 3 * GB + 500 * MB
    assert "cgroup limit 4.00 GB" in got.source


def test_a_smaller_limit_above_the_cgroup_wins_v1(tmp_path):
    proc, root = fake_proc(tmp_path, 8_000_000, "4:memory:/a\n")
    v1_group(root, "a", UNLIMITED_V1, 1 * GB, 0, hierarchical=2 * GB)
    assert memory_headroom(proc, root).available_bytes == 1 * GB


def test_cgroup_v2_takes_the_least_headroom_up_the_tree(tmp_path):
    proc, root = fake_proc(tmp_path, 8_000_000, "0::/outer/inner\n")
    (root / "cgroup.controllers").write_text("cpu memory\n")
    v2_group(root, "outer", "3000000000", 2 * GB, 100 * MB)  # 1.1 GB left
    v2_group(root, "outer/inner", "max", 2 * GB, 0)
    got = memory_headroom(proc, root)
    assert got.available_bytes == 3 * GB - 2 * GB + 100 * MB
    v2_group(root, "outer/inner", "2500000000", 2 * GB, 0)  # 0.5 GB left: tighter
    assert memory_headroom(proc, root).available_bytes == 500 * MB


def test_pick_leaves_kv_margin_and_reserve_and_caps_at_the_whole_model():
    room = Headroom(4 * GB, "cgroup limit 4.00 GB")
    got = pick_budget(room, kv_bytes=256 * MB, whole_bytes=100 * GB, min_bytes=500 * MB)
    reserve = 0.05 * 4 * GB
    assert got.budget_bytes == 4 * GB - 256 * MB - MARGIN_BYTES - reserve
    assert got.reserve_bytes == reserve
    assert "memory budget" not in got.describe() and "cgroup limit 4.00 GB" in got.describe()
    small = pick_budget(room, kv_bytes=0, whole_bytes=1 * GB, min_bytes=1)
    assert small.budget_bytes == 1 * GB and "all the model needs" in small.describe()
    assert pick_budget(Headroom(10**12, "x"), 0, 10**13, 1).reserve_bytes == RESERVE_MAX
    assert pick_budget(Headroom(GB, "x"), 0, GB, 1).reserve_bytes == RESERVE_MIN


def test_pick_refuses_less_than_the_model_minimum_by_name():
    with pytest.raises(BudgetError, match=r"memory budget auto: 300.00 MB available .* needs at "
                                          r"least 400.00 MB"):
        pick_budget(Headroom(300 * MB, "cgroup limit 512.00 MB"), 0, 10 * GB, 400 * MB)


def test_auto_and_a_size_together_are_refused():
    with pytest.raises(ValueError, match="memory_budget_auto picks the budget"):
        EngineConfig(memory_budget_auto=True, memory_budget_bytes=GB)


@pytest.fixture
def tiny(tmp_path):
    write_tiny_model(tmp_path, "llama")
    return str(tmp_path)


def test_engine_with_auto_budget_picks_it_when_it_opens(tiny):
    async def go():
        engine = await Engine.open(tiny, EngineConfig(backend="numpy", memory_budget_auto=True,
                                                      auto_kv_tokens=64))
        try:
            choice = engine.runner.budget_choice
            assert choice is not None and choice.kv_bytes == engine.runner.kv_bytes(64)
            assert engine.cache.compute.budget_bytes == choice.budget_bytes
            assert choice.budget_bytes >= engine.runner.whole_model_bytes  # a tiny model fits
            assert engine.cache.resident == set(engine.source.index.units)
            assert engine.runner.baseline_rss_bytes > 0
            out = await engine.complete([1, 2, 3], max_tokens=3, ignore_eos=True)
            assert len(out.token_ids) == 3
        finally:
            await engine.aclose()
    asyncio.run(go())


def test_stream_run_memory_budget_auto_says_what_it_picked(tiny, capsys):
    assert cli_run.main([tiny, "-p", "hi", "-m", "2", "--memory-budget", "auto",
                         "--ignore-chat-template", "--backend", "numpy"]) == 0
    err = capsys.readouterr().err
    assert "stream-run: memory budget auto: " in err and "available, minus KV cache" in err
    # in-process, VmHWM is this pytest's: tests/test_memory_promise.py checks the figures
    assert re.search(r"^Memory: peak RSS [\d.]+ MB (<=|>) [\d.]+ MB = baseline [\d.]+ MB \+ "
                     r"budget [\d.]+ MB \+ KV cache [\d.]+ MB \+ margin 67.1 MB$", err, re.M)


def test_set_memory_budget_refuses_less_than_a_step(tiny):
    async def go():
        engine = await Engine.open(tiny, EngineConfig(backend="numpy"))
        try:
            with pytest.raises(BudgetError, match="smaller than the largest unit set"):
                engine.runner.set_memory_budget(engine.min_budget_bytes - 1)
            engine.runner.set_memory_budget(engine.min_budget_bytes)
            assert engine.cache.compute.budget_bytes == engine.min_budget_bytes
        finally:
            await engine.aclose()
    asyncio.run(go())


def test_activations_are_reserved_for_prefill_chunks_only(tiny):
    async def go():
        engine = await Engine.open(tiny, EngineConfig(backend="numpy"))
        try:
            runner, spec = engine.runner, engine.spec
            kv = runner.model.make_kv_cache(4096)
            decode = Batch([SeqRows(np.arange(8), kv)])
            assert runner.scratch_bytes(decode) == 0
            sizes = [runner.scratch_bytes(Batch([SeqRows(np.zeros(n, np.int64), kv)]))
                     for n in (512, 1024, 2048)]
            assert sizes == sorted(sizes) and sizes[-1] > 0  # beyond the margin: reserved
            need = [runner.activation_bytes([(0, n)], 1) for n in (512, 1024, 2048)]
            assert need[0] < need[1] < need[2]  # grows with the rows
            assert sizes[-1] == need[-1] - 16 * 2**20
            # attention runs in query blocks of at most ATTN_SCORE_BYTES of scores, and the
            # MLP in tiles of prefill_chunk rows: no rows x keys score matrix per head, no
            # rows x intermediate activations
            heads = spec.num_attention_heads
            assert sizes[-1] < 4 * heads * 2048 * 2048
            long = runner.activation_bytes([(0, 65536)], 1)
            assert long < 4 * 65536 * (spec.hidden_size + spec.head_dim) + 2 * ATTN_SCORE_BYTES \
                + 4 * 512 * (3 * spec.intermediate_size + 6 * spec.hidden_size) \
                + 4 * spec.vocab_size + 16 * 2**20
        finally:
            await engine.aclose()
    asyncio.run(go())


def test_prefill_activations_count_the_quantized_cache_widened_for_attention(tmp_path):
    """With --kv-bits, a prompt's attention widens the cached keys and values to float32
    (NumpyQuantizedKV.update): the activation bound holds them. An 8k prompt on a 7B at a
    4 GiB limit was OOM-killed before they were counted."""
    from stream_run.bench.synth import SynthSpec, synthesize

    model = str(tmp_path / "m")  # head_dim 32: --kv-bits groups need a multiple of 32
    synthesize(SynthSpec(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=320), model)

    async def go():
        plain = await Engine.open(model, EngineConfig(backend="numpy"))
        quant = await Engine.open(model, EngineConfig(backend="numpy", kv_bits=8))
        try:
            spec, n = quant.spec, 2048
            kv = quant.runner.model.make_kv_cache(n)
            Hkv, D = spec.num_key_value_heads, spec.head_dim
            x = np.zeros((1, Hkv, n, D), np.float32)
            keys, values = kv.layers[0].update(0, x, x)  # what a prompt's attention holds
            extra = (quant.runner.activation_bytes([(0, n)], 1)
                     - plain.runner.activation_bytes([(0, n)], 1))
            assert extra >= keys.nbytes + values.nbytes > 0
        finally:
            await plain.aclose()
            await quant.aclose()
    asyncio.run(go())
