"""DeepSeek-V3 (deepseek_v3) against HF transformers (float32) on tiny random checkpoints: MLA
with and without q_lora_rank, interleaved and plain RoPE, yarn with mscale, sigmoid routing
with a correction bias over groups, shared experts, the first dense layers; the per-expert
layout save_pretrained writes and experts stacked in one tensor; resident and streamed. The
KV cache holds the compressed latent, not per-head keys and values."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import numpy as np
import pytest

from stream_run.engine import Engine, EngineConfig, GenerationParams
from stream_run.kernels import available_backends
from stream_run.loaders import FormatError, layer_key
from stream_run.models import deepseek, moe, open_model
from tests import model_checks
from tests.hf_reference import hf_greedy, hf_logits
from tests.tiny_models import VOCAB, write_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT = [5, 17, 42, 99, 3, 250, 7, 11]
N_NEW = 32
N_EXPERTS = 8
BACKENDS = ["numpy"] + (["mlx"] if "mlx" in available_backends() else [])
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
              n_routed_experts=N_EXPERTS, num_experts_per_tok=2, n_group=2, topk_group=1,
              n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=48,
              qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, routed_scaling_factor=2.5,
              max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.2,
              bos_token_id=0, eos_token_id=2, pad_token_id=None, tie_word_embeddings=False)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
        "original_max_position_embeddings": 64, "mscale": 0.707, "mscale_all_dim": 1.0,
        "beta_fast": 32, "beta_slow": 1}
VARIANTS = {
    # q through q_a/q_b (LoRA), 2 groups of 4 experts with one kept, a dense first layer
    "q_lora": {},
    # one q_proj, 4 groups pick 2, two shared experts, no dense layer, rotate-half RoPE
    "no_q_lora": dict(q_lora_rank=None, n_group=4, topk_group=2, n_shared_experts=2,
                      first_k_dense_replace=0, rope_interleave=False),
    # yarn (factor 4, mscale and mscale_all_dim: cos/sin and the softmax scale), top-3 of 8
    # in one group, no shared expert, two dense layers, unnormalized weights, q/kv/o biases
    "yarn": dict(rope_parameters=YARN, n_group=1, topk_group=1, num_experts_per_tok=3,
                 n_shared_experts=0, first_k_dense_replace=2, norm_topk_prob=False,
                 attention_bias=True, num_hidden_layers=4),
}


def write_deepseek(path, variant: str = "q_lora", stacked: bool = False, seed: int = 0,
                   **overrides):
    """save_pretrained's checkpoint (one tensor per expert), or with stacked=True the model's
    own state dict (transformers v5: mlp.experts.gate_up_proj and down_proj per layer). The
    routers' correction biases are random (HF initializes them to 0), so they steer routing."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = transformers.DeepseekV3Config(**{**COMMON, **VARIANTS[variant], **overrides})
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None:
                gate.e_score_correction_bias.copy_(torch.rand(N_EXPERTS) * 0.5)
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
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_deepseek_v3_matches_transformers(tmp_path, variant, backend):
    model = write_deepseek(tmp_path, variant)
    if variant == "yarn":
        assert model.model.rotary_emb.attention_scaling != 1.0
        assert model.model.layers[0].self_attn.scaling != 24**-0.5
    logits, tokens, _, _ = run_engine(tmp_path, backend)
    np.testing.assert_allclose(logits, hf_logits(model, PROMPT * 3), rtol=1e-4, atol=1e-4)
    assert tokens == hf_greedy(model, PROMPT, N_NEW)


@pytest.mark.reference
def test_stacked_experts_load_as_the_same_expert_units(tmp_path):
    model = write_deepseek(tmp_path / "stacked", stacked=True)
    write_deepseek(tmp_path / "per_expert")
    stacked = open_model(str(tmp_path / "stacked")).index
    per_expert = open_model(str(tmp_path / "per_expert")).index
    assert list(stacked.units) == list(per_expert.units)
    for key, unit in stacked.units.items():
        assert unit.nbytes == per_expert.units[key].nbytes, key
        assert sorted(unit.tensors) == sorted(per_expert.units[key].tensors), key
    logits, tokens, _, _ = run_engine(tmp_path / "stacked")
    np.testing.assert_allclose(logits, hf_logits(model, PROMPT * 3), rtol=1e-4, atol=1e-4)
    assert tokens == hf_greedy(model, PROMPT, N_NEW)


def test_units_dense_layers_shared_experts_and_mtp_layers(tmp_path):
    """Layer 0 (first_k_dense_replace=1) keeps its MLP; a sparse layer's dense unit holds the
    router, its correction bias and the shared experts; each routed expert is a unit of its
    own; a multi-token-prediction layer stored after the last layer is not read."""
    from safetensors.numpy import load_file, save_file

    write_deepseek(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    mtp = {k.replace("model.layers.2.", "model.layers.3."): v for k, v in weights.items()
           if k.startswith("model.layers.2.")}
    mtp.update({"model.layers.3.eh_proj.weight": np.zeros((64, 128), np.float32),
                "model.layers.3.enorm.weight": np.ones(64, np.float32)})
    save_file({**weights, **mtp}, str(tmp_path / "model.safetensors"))
    units = open_model(str(tmp_path)).index.units
    experts = [k for k in units if ".mlp.experts." in k]
    assert experts == [moe.expert_key(i, e) for i in (1, 2) for e in range(N_EXPERTS)]
    assert not any(k.startswith("layers.3") for k in units)
    assert "mlp.gate_proj.weight" in units[layer_key(0)].tensors
    dense = units[layer_key(1)].tensors
    assert {"mlp.gate.weight", "mlp.gate.e_score_correction_bias",
            "mlp.shared_experts.down_proj.weight"} <= set(dense)
    assert not any(".experts." in n and "shared" not in n for n in dense)


@pytest.mark.parametrize("variant", ["q_lora", "no_q_lora"])
def test_streams_under_a_budget_with_the_tokens_of_a_resident_run(tmp_path, variant):
    write_deepseek(tmp_path, variant)
    _, resident, resident_read, model_bytes = run_engine(tmp_path)
    assert resident_read <= model_bytes
    budget = asyncio.run(_min_budget(tmp_path))
    assert budget < model_bytes // 2
    for b in (model_bytes // 2, budget):
        _, streamed, bytes_read, _ = run_engine(tmp_path, budget=b)
        assert streamed == resident
        assert bytes_read > model_bytes  # experts and blocks were read again and again


async def _min_budget(path) -> int:
    engine = await Engine.open(str(path), EngineConfig(backend="numpy"))
    try:
        return engine.min_budget_bytes
    finally:
        engine.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_cache_holds_the_latent_not_expanded_heads(tmp_path, backend):
    """(kv_lora_rank + qk_rope_head_dim) float32 per position and layer, in the cache and in
    the engine's accounting: 40 floats here, where expanded keys and values would be
    4 heads x (24 + 12)."""
    write_deepseek(tmp_path)

    async def go():
        engine = await Engine.open(str(tmp_path), EngineConfig(backend=backend))
        try:
            kv = await engine.runner.make_kv_cache(100)
            return kv.nbytes, engine.runner.kv_bytes(100), len(kv.layers)
        finally:
            engine.close()

    nbytes, accounted, n_layers = asyncio.run(go())
    assert n_layers == COMMON["num_hidden_layers"]
    assert nbytes == accounted == 3 * 100 * (32 + 8) * 4
    with pytest.raises(ValueError, match="--kv-bits 8: not supported for deepseek_v3"):
        asyncio.run(Engine.open(str(tmp_path), EngineConfig(backend="numpy", kv_bits=8)))


def test_prefix_cache_state_round_trips_the_latent(tmp_path):
    """A cache's state (what a prefix cache or prompt-cache file keeps) loads into a fresh
    cache and continues as the original."""
    write_deepseek(tmp_path)

    async def go():
        engine = await Engine.open(str(tmp_path), EngineConfig(backend="numpy"))
        try:
            from stream_run.models.base import Batch, SeqRows
            kv = await engine.runner.make_kv_cache(32)
            await engine.runner.run(Batch([SeqRows(np.asarray(PROMPT), kv)]))  # advances kv
            assert kv.offset == len(PROMPT)
            fresh = await engine.runner.make_kv_cache(32)
            fresh.load_state(kv.state(), len(PROMPT))
            outs = []
            for cache in (kv, fresh):
                logits, _ = await engine.runner.run(Batch([SeqRows(np.asarray([9]), cache)]))
                outs.append(logits)
            return outs
        finally:
            engine.close()

    a, b = asyncio.run(go())
    np.testing.assert_array_equal(a, b)


def test_router_matches_transformers_topk_router():
    """route() against DeepseekV3TopkRouter on random logits: groups, bias, scaling."""
    cfg = transformers.DeepseekV3Config(**{**COMMON, "n_routed_experts": 16, "n_group": 4,
                                           "topk_group": 2, "num_experts_per_tok": 4})
    router = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3TopkRouter(cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        router.weight.normal_()
        router.e_score_correction_bias.normal_(std=0.3)
        x = torch.randn(50, 64)
        logits, want_w, want_i = router(x)
    ds = deepseek.deepseek_args(cfg.to_dict())
    idx, weight = deepseek.route(logits.numpy(), router.e_score_correction_bias.numpy(), ds)
    order = np.argsort(want_i.numpy(), axis=-1)
    mine = np.argsort(idx, axis=-1)
    np.testing.assert_array_equal(np.take_along_axis(idx, mine, -1),
                                  np.take_along_axis(want_i.numpy(), order, -1))
    np.testing.assert_allclose(np.take_along_axis(weight, mine, -1),
                               np.take_along_axis(want_w.numpy(), order, -1), rtol=1e-6)


def _config(path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **changes}))


BAD_CONFIG = {
    "n_group": (dict(n_group=3), ["'n_group'", "does not divide"]),
    "topk_group": (dict(topk_group=5), ["'topk_group'"]),
    "kv_lora_rank": (dict(kv_lora_rank="32"), ["'kv_lora_rank'", "positive int"]),
    "q_lora_rank": (dict(q_lora_rank=0), ["'q_lora_rank'"]),
    "num_experts_per_tok": (dict(num_experts_per_tok=5), ["'num_experts_per_tok'"]),
    "routed_scaling_factor": (dict(routed_scaling_factor=None), ["'routed_scaling_factor'"]),
    "scoring_func": (dict(scoring_func="softmax"), ["'scoring_func'"]),
    "quantization_config": (dict(quantization_config={"quant_method": "fp8",
                                                      "weight_block_size": [128, 128]}),
                            ["'quantization_config'", "fp8", "bf16"]),
    "first_k_dense_replace": (dict(first_k_dense_replace=2),
                              ["'model.layers.1.mlp.experts.", "first_k_dense_replace=2"]),
}


@pytest.mark.parametrize("field", sorted(BAD_CONFIG))
def test_bad_config_field_is_named(tmp_path, field):
    write_deepseek(tmp_path)
    changes, words = BAD_CONFIG[field]
    _config(tmp_path, **changes)
    with pytest.raises(FormatError) as exc:
        open_model(str(tmp_path))
    for word in words:
        assert word in str(exc.value)


@pytest.mark.parametrize("field", ["n_group", "kv_lora_rank"])
def test_bad_config_field_exits_2_with_one_line(tmp_path, field):
    write_deepseek(tmp_path)
    changes, words = BAD_CONFIG[field]
    _config(tmp_path, **changes)
    run = subprocess.run([sys.executable, "-m", "stream_run.cli.run", str(tmp_path), "-p", "hi"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    for word in [*words, "config.json"]:
        assert word in run.stderr


@pytest.mark.reference
@pytest.mark.parametrize("backend", BACKENDS)
def test_converts_to_8_bit_with_one_file_per_expert(tmp_path, backend):
    """stream-convert packs every linear (kv_b_proj too: attention then absorbs what it
    dequantizes to) and writes each expert unit to a file of its own; the engine on it equals
    HF on the weights the packed files dequantize to."""
    from stream_run.kernels.quant import QuantizedWeight, dequantize

    model = write_deepseek(tmp_path / "hf", v_head_dim=16, q_lora_rank=64)  # groups of 32
    state, packed = model_checks.convert_8bit_reference(model, tmp_path / "hf",
                                                        tmp_path / "q8")
    assert (tmp_path / "q8" / "model-layers.2.mlp.experts.7.safetensors").exists()
    assert "model.layers.1.self_attn.kv_b_proj.scales" in packed

    def weight(stem: str) -> np.ndarray:  # HF's stacked experts: rebuilt from the packed ones
        return dequantize(QuantizedWeight(packed[f"{stem}.weight"], packed[f"{stem}.scales"],
                                          packed[f"{stem}.biases"], 8, 32))

    for name in [n for n in state if n.endswith(deepseek.STACKED)]:
        parts = ["down_proj"] if name.endswith("down_proj") else ["gate_proj", "up_proj"]
        stem = name.rsplit(".", 1)[0]
        state[name] = torch.from_numpy(np.stack([
            np.concatenate([weight(f"{stem}.{e}.{p}") for p in parts])
            for e in range(N_EXPERTS)]))
    model.load_state_dict(state)
    logits, tokens, _, _ = run_engine(tmp_path / "q8", backend)
    np.testing.assert_allclose(logits, hf_logits(model, PROMPT * 3), rtol=1e-4, atol=1e-4)
    assert tokens == hf_greedy(model, PROMPT, N_NEW)


def test_synth_named_shapes():
    """stream-bench synth --arch deepseek_v3: deepseek-v3 has DeepSeek-V3's 671B parameters
    (its MTP layer aside), kimi-k2 Kimi K2's 1.03T; deepseek-v3-mini is about 2.4B."""
    from stream_run.bench.synth import SynthSpec

    big = SynthSpec.from_shape("deepseek-v3", arch="deepseek_v3")
    assert 670e9 < big.nbytes / 2 < 672e9
    assert 2.3e9 < SynthSpec.from_shape("deepseek-v3-mini", arch="deepseek_v3").nbytes / 2 < 2.5e9
    kimi = SynthSpec.from_shape("kimi-k2", arch="deepseek_v3")  # Kimi K2: about 1.03T
    assert 1.02e12 < kimi.nbytes / 2 < 1.03e12
    with pytest.raises(ValueError, match="'num_experts_per_tok' is 9"):
        SynthSpec(arch="deepseek_v3", num_experts=16, num_experts_per_tok=9,
                  moe_intermediate_size=32)


@pytest.mark.reference
def test_synth_tiny_runs_in_the_engine_as_in_transformers(tmp_path):
    """The tiny synth (float32, a skewed router) in the engine and in transformers."""
    from stream_run.bench.synth import SynthSpec, synthesize

    spec = SynthSpec.from_shape("tiny-moe", arch="deepseek_v3", dtype="f32", router_skew=1.0)
    synthesize(spec, str(tmp_path / "m"))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "m"), dtype=torch.float32).eval()
    logits, tokens, _, _ = run_engine(tmp_path / "m")
    np.testing.assert_allclose(logits, hf_logits(model, PROMPT * 3), rtol=1e-4, atol=1e-4)
    assert tokens == hf_greedy(model, PROMPT, N_NEW)


def test_tiled_prefill_and_concurrent_requests_give_the_tokens_of_single_runs(tmp_path):
    """A prompt in row tiles of 5 computes HF's logits of one call; requests decoded together
    in shared passes (each sequence attending over its own latent cache) give the tokens each
    gives alone."""
    from stream_run.engine import GenerationParams

    model = write_deepseek(tmp_path)
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
def test_gguf_synth_runs_as_in_transformers(tmp_path):
    """stream-bench synth --format gguf --arch deepseek_v3: llama.cpp's deepseek2 keys and
    stacked experts (one attn_kv_b); HF on the weights gguf-py dequantizes the file to gives
    the engine's logits."""
    gguf = pytest.importorskip("gguf")
    from stream_run.bench.synth import SynthSpec
    from stream_run.bench.synth_gguf import synthesize_gguf
    from tests.loaders.test_gguf_deepseek import set_weights

    spec = SynthSpec.from_shape("tiny-moe", arch="deepseek_v3", router_skew=1.0)
    path = tmp_path / "m.gguf"
    synthesize_gguf(spec, "q8_0", str(path))
    r = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert meta["general.architecture"] == "deepseek2"
    assert (meta["deepseek2.expert_gating_func"], meta["deepseek2.expert_weights_norm"],
            meta["deepseek2.attention.kv_lora_rank"]) == (2, True, 64)
    held = {}
    for t in r.tensors:
        shape = tuple(reversed([int(d) for d in t.shape]))
        held[t.name] = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
    assert "blk.1.attn_kv_b.weight" in held and "blk.1.exp_probs_b.bias" in held
    cfg = SynthSpec.from_shape("tiny-moe", arch="deepseek_v3", dtype="f32").config()
    hf_cfg = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.items()
                                                  if k != "architectures"})
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    set_weights(model, held)
    logits, tokens, _, _ = run_engine(path)
    np.testing.assert_allclose(logits, hf_logits(model, PROMPT * 3), rtol=1e-4, atol=1e-4)
    assert tokens == hf_greedy(model, PROMPT, N_NEW)


def test_gguf_synth_router_skew_makes_some_experts_popular(tmp_path):
    """--router-skew on a deepseek2 GGUF synth concentrates the routers' picks."""
    from stream_run.bench import synth_moe
    from stream_run.bench.synth import SynthSpec
    from stream_run.bench.synth_gguf import synthesize_gguf
    from tests.bench.test_synth_moe import expert_picks

    shares = {}
    for skew in (0.0, 2.0):
        spec = SynthSpec.from_shape("tiny-moe", arch="deepseek_v3", router_skew=skew)
        synthesize_gguf(spec, "q8_0", str(tmp_path / f"{skew}.gguf"))
        counts = expert_picks(tmp_path / f"{skew}.gguf")[1:]  # layer 0 is dense
        shares[skew] = synth_moe.popularity(counts)["top10pct_share"]
    assert shares[0.0] < 0.2 < 0.3 < shares[2.0], shares


def test_stream_serve_requests_share_passes(tmp_path):
    """Through stream-serve: concurrent completions share passes and equal the ones run one at
    a time (each sequence with its own latent cache)."""
    pytest.importorskip("openai")
    write_deepseek(tmp_path)
    model_checks.assert_requests_share_passes(tmp_path, [PROMPT, PROMPT[::-1], PROMPT[2:],
                                                         PROMPT[:5]])


def _edit(path, fn) -> None:
    from safetensors.numpy import load_file, save_file

    weights = load_file(str(path / "model.safetensors"))
    fn(weights)
    save_file(weights, str(path / "model.safetensors"))


ROUTER = "model.layers.1.mlp.gate.weight"
BIAS = "model.layers.2.mlp.gate.e_score_correction_bias"
BAD_EXPERTS = {
    # n_group=2 keeps 6 experts in groups of 3: expert 6 is beyond them
    "fewer_experts_in_config": (dict(n_routed_experts=6), ["'model.layers.1.mlp.experts.6.",
                                                           "n_routed_experts=6"]),
    "missing_expert_tensor": (lambda w: w.pop("model.layers.2.mlp.experts.5.down_proj.weight"),
                              ["'layers.2.mlp.experts.5'", "'down_proj.weight'"]),
    "router_of_the_wrong_shape": (lambda w: w.update({ROUTER: w[ROUTER][:-1]}),
                                  ["'mlp.gate.weight'", "'layers.1'", "[7, 64]", "[8, 64]"]),
    "correction_bias_of_the_wrong_shape": (lambda w: w.update({BIAS: w[BIAS][:4]}),
                                           ["'mlp.gate.e_score_correction_bias'", "[4]", "[8]"]),
}


@pytest.mark.parametrize("case", sorted(BAD_EXPERTS))
def test_bad_expert_input_is_named(tmp_path, case):
    from stream_run.loaders import MissingTensorError

    write_deepseek(tmp_path)
    edit, words = BAD_EXPERTS[case]
    if isinstance(edit, dict):
        _config(tmp_path, **edit)
    else:
        _edit(tmp_path, edit)
    with pytest.raises((FormatError, MissingTensorError)) as exc:
        open_model(str(tmp_path))
    for word in words:
        assert word in str(exc.value)


def test_speculative_decoding_gives_the_greedy_tokens(tmp_path):
    """Draft-model speculation (another random deepseek_v3 as the draft): verification passes
    of several rows through the latent cache, the rejected rows trimmed; the tokens are HF's
    greedy ones."""
    from stream_run.engine import GenerationParams

    model = write_deepseek(tmp_path / "target")
    write_deepseek(tmp_path / "draft", seed=1)

    async def go():
        cfg = EngineConfig(backend="numpy", speculative="draft_model",
                           draft_model=str(tmp_path / "draft"), num_draft_tokens=4)
        engine = await Engine.open(str(tmp_path / "target"), cfg)
        try:
            return await engine.complete(PROMPT, GenerationParams(max_tokens=N_NEW,
                                                                  ignore_eos=True))
        finally:
            engine.close()

    done = asyncio.run(go())
    assert done.stats.draft_tokens > done.stats.accepted_tokens  # some drafts rolled back
    assert done.token_ids == hf_greedy(model, PROMPT, N_NEW)


@pytest.mark.reference
def test_legacy_rope_scaling_config_as_deepseek_ships_it(tmp_path):
    """DeepSeek-V3's own config.json spells yarn transformers-4 style: top-level rope_theta and
    rope_scaling {"type": "yarn", ...} (mscale == mscale_all_dim, as DeepSeek-V3 and Kimi K2
    have them); the engine reads it as transformers 5 does."""
    write_deepseek(tmp_path, "yarn", n_shared_experts=1,
                   rope_parameters={**YARN, "mscale": 1.0})
    cfg = json.loads((tmp_path / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    params["type"] = params.pop("rope_type")
    cfg["rope_scaling"] = params
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path),
                                                              dtype=torch.float32).eval()
    assert model.config.rope_parameters["rope_type"] == "yarn"
    assert model.model.layers[0].self_attn.scaling != 24**-0.5
    logits, tokens, _, _ = run_engine(tmp_path)
    np.testing.assert_allclose(logits, hf_logits(model, PROMPT * 3), rtol=1e-4, atol=1e-4)
    assert tokens == hf_greedy(model, PROMPT, N_NEW)


def test_expert_lookahead_guesses_with_the_grouped_router_and_keeps_the_tokens(tmp_path):
    """--expert-lookahead on deepseek_v3 guesses the next layer's experts with its own grouped,
    bias-corrected choice (layers 1 and 2 are sparse); the tokens are the plain run's, cold
    and at the smallest budget, and most guesses are picked (the residual stream changes
    little between layers of this tiny model)."""
    write_deepseek(tmp_path)
    _, plain, _, _ = run_engine(tmp_path)

    async def go(budget):
        cfg = EngineConfig(backend="numpy", memory_budget_bytes=budget, expert_lookahead=True)
        async with await Engine.open(str(tmp_path), cfg) as engine:
            done = await engine.complete(PROMPT, GenerationParams(max_tokens=N_NEW,
                                                                  ignore_eos=True))
            return done.token_ids, done.stats

    tokens, stats = asyncio.run(go(None))
    assert tokens == plain
    assert 0 < stats.lookahead_used <= stats.lookahead_reads
    tokens, _ = asyncio.run(go(asyncio.run(_min_budget(tmp_path))))
    assert tokens == plain
