"""Mixture-of-Experts models (issue 18) against HF transformers (float32) on tiny random
checkpoints: qwen3_moe, qwen2_moe (shared expert, a dense layer) and mixtral, from the
per-expert layout save_pretrained writes and from experts stacked in one tensor (transformers
v5's in-memory layout). Each routed expert is its own unit, read when the router picks it."""

from __future__ import annotations

import asyncio
import collections
import json
import subprocess
import sys

import numpy as np
import pytest

from stream_run.engine import Engine, EngineConfig, GenerationParams
from stream_run.kernels import available_backends
from stream_run.loaders import FormatError, MissingTensorError, TensorRef, layer_key
from stream_run.models import moe, open_model
from stream_run.models.base import Batch, SeqRows
from tests import model_checks
from tests.hf_reference import hf_greedy, hf_logits
from tests.tiny_models import VOCAB, write_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT = [5, 17, 42, 99, 3, 250, 7, 11]
N_NEW = 32
N_EXPERTS = 8
BACKENDS = ["numpy"] + (["mlx"] if "mlx" in available_backends() else [])
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
              initializer_range=0.2, bos_token_id=0, eos_token_id=2, pad_token_id=None,
              tie_word_embeddings=False)


def make_config(family: str, **overrides):
    cfg = {**COMMON, **overrides}
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**{
            "moe_intermediate_size": 32, "num_experts": N_EXPERTS, "num_experts_per_tok": 2,
            "intermediate_size": 96, "head_dim": 16, "norm_topk_prob": True, **cfg})
    if family == "qwen2_moe":  # layer 1 has a dense MLP (mlp_only_layers)
        return transformers.Qwen2MoeConfig(**{
            "moe_intermediate_size": 32, "num_experts": N_EXPERTS, "num_experts_per_tok": 2,
            "shared_expert_intermediate_size": 48, "intermediate_size": 96,
            "mlp_only_layers": [1], **cfg})
    return transformers.MixtralConfig(**{
        "intermediate_size": 32, "num_local_experts": N_EXPERTS, "num_experts_per_tok": 2, **cfg})


def write_moe(path, family: str, stacked: bool = False, seed: int = 0, **overrides):
    """save_pretrained's checkpoint (one tensor per expert), or with stacked=True the model's
    own state dict (transformers v5: mlp.experts.gate_up_proj and down_proj per layer)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(make_config(family, **overrides))
    model = model.eval()
    model.save_pretrained(str(path), safe_serialization=True)
    if stacked:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer(path, json.loads((path / "config.json").read_text()))
    return model


def run_engine(path, backend: str = "numpy", budget: int | None = None):
    return model_checks.run_engine(path, PROMPT, N_NEW, backend, budget)


@pytest.mark.reference
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral"])
def test_moe_matches_transformers(tmp_path, family, backend):
    model = write_moe(tmp_path, family)
    logits, tokens, _, _ = run_engine(tmp_path, backend)
    np.testing.assert_allclose(logits, hf_logits(model, PROMPT * 3), rtol=1e-4, atol=1e-4)
    assert tokens == hf_greedy(model, PROMPT, N_NEW)


@pytest.mark.reference
def test_mixtral_sliding_window_matches_transformers(tmp_path):
    model = write_moe(tmp_path, "mixtral", sliding_window=6)
    logits, tokens, _, _ = run_engine(tmp_path)
    np.testing.assert_allclose(logits, hf_logits(model, PROMPT * 3), rtol=1e-4, atol=1e-4)
    assert tokens == hf_greedy(model, PROMPT, N_NEW)


@pytest.mark.reference
@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral"])
def test_stacked_experts_load_as_the_same_expert_units(tmp_path, family):
    model = write_moe(tmp_path / "stacked", family, stacked=True)
    write_moe(tmp_path / "per_expert", family)
    stacked = open_model(str(tmp_path / "stacked")).index
    per_expert = open_model(str(tmp_path / "per_expert")).index
    assert list(stacked.units) == list(per_expert.units)
    for key, unit in stacked.units.items():
        assert unit.nbytes == per_expert.units[key].nbytes, key
        assert sorted(unit.tensors) == sorted(per_expert.units[key].tensors), key
    logits, tokens, _, _ = run_engine(tmp_path / "stacked")
    np.testing.assert_allclose(logits, hf_logits(model, PROMPT * 3), rtol=1e-4, atol=1e-4)
    assert tokens == hf_greedy(model, PROMPT, N_NEW)


def test_tiled_prefill_and_concurrent_requests_give_the_tokens_of_single_runs(tmp_path):
    """A prompt in row tiles of 5 (every dense call tiled, each expert's rows too) computes
    the logits of HF's one call; requests decoded together in shared passes (each pass
    reading the union of their experts) give the tokens each gives alone."""
    model = write_moe(tmp_path, "qwen2_moe")
    prompts = [PROMPT, PROMPT[::-1], PROMPT[2:]]

    async def go():
        engine = await Engine.open(str(tmp_path), EngineConfig(backend="numpy",
                                                                prefill_chunk=5))
        try:
            logits = await engine.logits(PROMPT * 3)
            params = GenerationParams(max_tokens=12, ignore_eos=True)
            outs = await asyncio.gather(*(engine.complete(p, params) for p in prompts))
            return logits, [o.token_ids for o in outs], max(engine.batcher.passes,
                                                            key=lambda r: r.n_seqs).n_seqs
        finally:
            engine.close()

    logits, together, widest = asyncio.run(go())
    np.testing.assert_allclose(logits, hf_logits(model, PROMPT * 3), rtol=1e-4, atol=1e-4)
    assert widest >= 2
    assert together == [hf_greedy(model, p, 12) for p in prompts]


@pytest.mark.reference
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_moe_converts_to_8_bit_with_one_file_per_expert(tmp_path, family):
    """stream-convert writes each expert unit to a file of its own (one read per expert);
    the engine on it equals HF on the weights the packed files dequantize to."""
    from stream_run.kernels.quant import QuantizedWeight, dequantize

    model = write_moe(tmp_path / "hf", family)
    state, packed = model_checks.convert_8bit_reference(model, tmp_path / "hf",
                                                        tmp_path / "q8")
    assert (tmp_path / "q8" / "model-layers.2.mlp.experts.7.safetensors").exists()

    def weight(stem: str) -> np.ndarray:  # HF's stacked experts: rebuilt from the packed ones
        return dequantize(QuantizedWeight(packed[f"{stem}.weight"], packed[f"{stem}.scales"],
                                          packed[f"{stem}.biases"], 8, 32))

    for name in [n for n in state if n.endswith(moe.STACKED)]:
        parts = ["down_proj"] if name.endswith("down_proj") else ["gate_proj", "up_proj"]
        stem = name.rsplit(".", 1)[0]
        state[name] = torch.from_numpy(np.stack([
            np.concatenate([weight(f"{stem}.{e}.{p}") for p in parts])
            for e in range(N_EXPERTS)]))
    model.load_state_dict(state)
    logits, tokens, _, _ = run_engine(tmp_path / "q8")
    np.testing.assert_allclose(logits, hf_logits(model, PROMPT * 3), rtol=1e-4, atol=1e-4)
    assert tokens == hf_greedy(model, PROMPT, N_NEW)


def test_each_routed_expert_is_a_unit_of_its_own(tmp_path):
    write_moe(tmp_path, "qwen2_moe")
    units = open_model(str(tmp_path)).index.units
    experts = [k for k in units if ".mlp.experts." in k]
    # layer 1 is dense (mlp_only_layers): its MLP stays in the block, it has no experts
    assert experts == [moe.expert_key(i, e) for i in (0, 2) for e in range(N_EXPERTS)]
    for key in experts:
        assert sorted(units[key].tensors) == ["down_proj.weight", "gate_proj.weight",
                                              "up_proj.weight"]
    dense = units[layer_key(0)].tensors
    assert "mlp.gate.weight" in dense and "mlp.shared_expert_gate.weight" in dense
    assert not any(".experts." in n for n in dense)
    assert "mlp.gate_proj.weight" in units[layer_key(1)].tensors


def test_stacked_tensor_splits_into_contiguous_expert_ranges():
    """The name mapping alone: expert e's gate then up rows of gate_up_proj, its down_proj
    slice; mixtral's w1/w3/w2 under block_sparse_moe get qwen's names."""
    from stream_run.loaders import ModelSpec

    cfg = {"model_type": "qwen3_moe", "hidden_size": 4, "intermediate_size": 8,
           "num_hidden_layers": 1, "num_attention_heads": 1, "vocab_size": 8,
           "num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 3}
    spec = ModelSpec.from_dict(cfg)
    ref = TensorRef("mlp.experts.gate_up_proj", "f", 100, 2 * 6 * 4 * 4, "F32", (2, 6, 4))
    placed = moe.hf_units(spec, layer_key(0), ref)
    assert [(k, r.name, r.offset, r.nbytes, r.shape) for k, r in placed] == [
        ("layers.0.mlp.experts.0", "gate_proj.weight", 100, 48, (3, 4)),
        ("layers.0.mlp.experts.0", "up_proj.weight", 148, 48, (3, 4)),
        ("layers.0.mlp.experts.1", "gate_proj.weight", 196, 48, (3, 4)),
        ("layers.0.mlp.experts.1", "up_proj.weight", 244, 48, (3, 4))]
    mix = ModelSpec.from_dict({**cfg, "model_type": "mixtral", "num_local_experts": 2})
    w2 = TensorRef("block_sparse_moe.experts.1.w2.weight", "f", 0, 96, "F32", (4, 8))
    assert [(k, r.name) for k, r in moe.hf_units(mix, layer_key(0), w2)] == [
        ("layers.0.mlp.experts.1", "down_proj.weight")]


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_moe_streams_under_a_budget_with_the_tokens_of_a_resident_run(tmp_path, family):
    write_moe(tmp_path, family)
    _, resident, resident_read, model_bytes = run_engine(tmp_path)
    assert resident_read <= model_bytes  # resident: each unit read at most once
    for budget in (model_bytes // 2, "min"):
        if budget == "min":
            budget = asyncio.run(_min_budget(tmp_path))
            assert budget < model_bytes // 2
        _, streamed, bytes_read, _ = run_engine(tmp_path, budget=budget)
        assert streamed == resident
        assert bytes_read > model_bytes  # experts and blocks were read again and again


def test_stats_count_expert_hits_and_bytes(tmp_path):
    """Resident, each expert is read once (its first pick) and hit after; under half the
    model's bytes, experts are read again and their hit rate falls. The CLI prints both."""
    from stream_run.cli.common import stats_lines

    write_moe(tmp_path, "mixtral")
    index = open_model(str(tmp_path)).index
    expert_bytes = {k: u.nbytes for k, u in index.units.items() if ".experts." in k}

    async def go(budget):
        engine = await Engine.open(str(tmp_path), EngineConfig(backend="numpy",
                                                                memory_budget_bytes=budget))
        try:
            done = await engine.complete(PROMPT, GenerationParams(max_tokens=16,
                                                                  ignore_eos=True))
            return done.stats, engine.model_bytes
        finally:
            engine.close()

    resident, model_bytes = asyncio.run(go(None))
    n_layers = COMMON["num_hidden_layers"]
    # at least top-2 picks per layer in each of the 15 decode passes, beside the prompt pass
    assert resident.expert_hits + resident.expert_misses >= 15 * 2 * n_layers
    assert resident.expert_misses <= len(expert_bytes)
    assert 0 < resident.expert_bytes_read <= sum(expert_bytes.values())
    assert resident.expert_bytes_read < resident.bytes_read
    streamed, _ = asyncio.run(go(model_bytes // 2))
    assert streamed.expert_bytes_read > sum(expert_bytes.values())
    assert streamed.expert_hit_rate < resident.expert_hit_rate
    assert any(line.startswith("Experts: cache hit rate") for line in stats_lines(streamed, 1))


def test_the_whole_model_budget_keeps_every_expert_once_read(tmp_path):
    """The budget the engine names for keeping everything resident counts every expert (an
    auto budget is capped by it): at it, no unit is read twice."""
    write_moe(tmp_path, "qwen3_moe")

    async def whole() -> tuple[int, int]:
        engine = await Engine.open(str(tmp_path), EngineConfig(backend="numpy"))
        try:
            return engine.runner.whole_model_bytes, engine.model_bytes
        finally:
            engine.close()

    whole_bytes, model_bytes = asyncio.run(whole())
    assert whole_bytes >= model_bytes
    _, _, bytes_read, _ = run_engine(tmp_path, budget=whole_bytes)
    assert bytes_read <= open_model(str(tmp_path)).index.nbytes


async def _min_budget(path) -> int:
    engine = await Engine.open(str(path), EngineConfig(backend="numpy"))
    try:
        return engine.min_budget_bytes
    finally:
        engine.close()


def test_a_batched_pass_reads_the_union_of_its_sequences_experts_once(tmp_path):
    """Two sequences in one pass: every unit read once, and the experts read are exactly those
    the two sequences pick when each runs alone (with 16 experts, short prompts pick few)."""
    write_moe(tmp_path, "qwen3_moe", num_experts=16)
    prompts = [[5, 17, 42], [250, 7, 11, 99]]
    alone = [asyncio.run(_reads(tmp_path, [p])) for p in prompts]
    together = asyncio.run(_reads(tmp_path, prompts))
    assert max(collections.Counter(together).values()) == 1
    experts = [{k for k in reads if ".experts." in k} for reads in alone]
    assert {k for k in together if ".experts." in k} == experts[0] | experts[1]
    assert experts[0] != experts[1]


async def _reads(path, prompts: list[list[int]]) -> list[str]:
    """Units read by one pass (a cold, unlimited budget) over these prompts."""
    engine = await Engine.open(str(path), EngineConfig(backend="numpy"))
    try:
        kvs = [await engine.runner.make_kv_cache(16) for _ in prompts]
        engine.scheduler.record_intervals = True
        batch = Batch([SeqRows(np.asarray(p), kv) for p, kv in zip(prompts, kvs, strict=True)])
        logits, stats = await engine.runner.run(batch)
        assert logits.shape == (len(prompts), VOCAB)
        return [label for kind, label, _, _ in stats.intervals if kind == "read"]
    finally:
        engine.close()


def _edit(path, fn) -> None:
    from safetensors.numpy import load_file, save_file

    weights = load_file(str(path / "model.safetensors"))
    fn(weights)
    save_file(weights, str(path / "model.safetensors"))


def _config(path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **changes}))


EXPERT_1 = "model.layers.1.mlp.experts.3.up_proj.weight"
ROUTER_1 = "model.layers.1.mlp.gate.weight"
BAD_INPUT = {
    # the config counts fewer experts than the file holds: the first one beyond is named
    "fewer_experts_in_config": (lambda p: _config(p, num_local_experts=N_EXPERTS - 2),
                                FormatError, ["'model.layers.0.mlp.experts.6.",
                                              "num_local_experts=6"]),
    # more than the file holds: the router's shape (checked first) disagrees
    "more_experts_in_config": (lambda p: _config(p, num_local_experts=N_EXPERTS + 1),
                               FormatError, ["'mlp.gate.weight'", "[8, 64]", "[9, 64]"]),
    "missing_expert_tensor": (lambda p: _edit(p, lambda w: w.pop(EXPERT_1)),
                              MissingTensorError, ["'layers.1.mlp.experts.3'", "'up_proj.weight'"]),
    "router_of_the_wrong_shape": (
        lambda p: _edit(p, lambda w: w.update({ROUTER_1: w[ROUTER_1][:-1]})),
        FormatError, ["'mlp.gate.weight'", "'layers.1'", "[7, 64]", "[8, 64]"]),
    "experts_in_a_layer_the_config_makes_dense": (
        lambda p: _config(p, mlp_only_layers=[1]),
        FormatError, ["'model.layers.1.mlp.experts.0.", "layer 1 dense", "mlp_only_layers"]),
    "top_k_above_the_expert_count": (lambda p: _config(p, num_experts_per_tok=N_EXPERTS + 1),
                                     FormatError, ["'num_experts_per_tok'"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_moe_input_is_named(tmp_path, case):
    write_moe(tmp_path, "qwen3_moe")
    edit, error, words = BAD_INPUT[case]
    edit(tmp_path)
    with pytest.raises(error) as exc:
        open_model(str(tmp_path))
    for word in words:
        assert word in str(exc.value)


@pytest.mark.parametrize("case", ["fewer_experts_in_config", "missing_expert_tensor",
                                  "router_of_the_wrong_shape"])
def test_bad_moe_input_exits_2_with_one_line(tmp_path, case):
    write_moe(tmp_path, "qwen3_moe")
    edit, _, words = BAD_INPUT[case]
    edit(tmp_path)
    run = subprocess.run([sys.executable, "-m", "stream_run.cli.run", str(tmp_path), "-p", "hi"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    for word in words:
        assert word in run.stderr


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_lfru_expert_cache_streams_with_the_tokens_of_a_resident_run(tmp_path, family):
    """--expert-cache lfru changes only which experts stay: under half the model and at the
    smallest budget the tokens are the resident run's, and its experts are read again."""
    write_moe(tmp_path, family)
    _, resident, _, model_bytes = run_engine(tmp_path)

    async def go(budget):
        cfg = EngineConfig(backend="numpy", memory_budget_bytes=budget, expert_cache="lfru")
        async with await Engine.open(str(tmp_path), cfg) as engine:
            assert engine.cache.compute.evict_order.name == "lfru"
            done = await engine.complete(PROMPT, GenerationParams(max_tokens=N_NEW,
                                                                  ignore_eos=True))
            return done.token_ids, done.stats

    tokens, stats = asyncio.run(go(model_bytes // 2))
    assert tokens == resident
    assert 0 < stats.expert_hit_rate < 1
    tokens, _ = asyncio.run(go(asyncio.run(_min_budget(tmp_path))))
    assert tokens == resident
    with pytest.raises(ValueError, match="expert_cache must be lru or lfru, got 'lfu'"):
        EngineConfig(expert_cache="lfu")


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_expert_lookahead_reads_guesses_early_with_the_tokens_of_a_plain_run(tmp_path, family):
    """--expert-lookahead: each sparse layer's dense call guesses the next sparse layer's
    experts (that layer's router on this layer's hidden state) and the scheduler reads them
    early. The tokens are the plain run's, resident, under half the model and at the smallest
    budget; every guessed read is counted picked or wasted, and its pin is given back (the
    smallest budget would run out of room otherwise)."""
    write_moe(tmp_path, family, num_experts=16)
    _, plain, _, model_bytes = run_engine(tmp_path)

    async def go(budget):
        cfg = EngineConfig(backend="numpy", memory_budget_bytes=budget, expert_lookahead=True)
        async with await Engine.open(str(tmp_path), cfg) as engine:
            assert engine.model.lookahead
            done = await engine.complete(PROMPT, GenerationParams(max_tokens=N_NEW,
                                                                  ignore_eos=True))
            assert not engine.scheduler._orphans and not engine.scheduler._guessed
            # no guess kept its pin (the plan pins its resident dense units)
            assert [k for k in engine.cache.compute.pinned() if ".experts." in k] == []
            return done.token_ids, done.stats

    for budget in (None, model_bytes // 2, asyncio.run(_min_budget(tmp_path))):
        tokens, stats = asyncio.run(go(budget))
        assert tokens == plain, budget
        if budget is None:  # cold: the guesses for layers 1.. are read before their router
            assert stats.lookahead_reads > 0
        assert 0 <= stats.lookahead_used <= stats.lookahead_reads
        wasted = stats.lookahead_reads - stats.lookahead_used
        assert (stats.lookahead_wasted_bytes > 0) == (wasted > 0)


def test_expert_lookahead_flag_and_its_stats_line(tmp_path):
    """--expert-lookahead reaches EngineConfig (off without it), and the CLI's Experts line
    reports the guessed reads, those picked and the bytes wasted."""
    import argparse

    from stream_run.cli.common import add_engine_flags, engine_config, expert_line
    from stream_run.engine.stats import GenerationStats

    p = argparse.ArgumentParser()
    add_engine_flags(p)
    assert engine_config(p.parse_args(["--expert-lookahead"])).expert_lookahead
    assert not engine_config(p.parse_args([])).expert_lookahead
    s = GenerationStats(prompt_tokens=4, generation_tokens=4, expert_hits=30, expert_misses=10,
                        expert_bytes_read=8 << 20, lookahead_reads=12, lookahead_used=9,
                        lookahead_wasted_bytes=3 << 20)
    assert "lookahead: 9 of 12 guessed reads picked, 3.15 MB wasted" in expert_line(s)
    assert "lookahead" not in expert_line(GenerationStats(expert_hits=1))
