"""Checks the test references themselves: tests/reference_model.py against HF transformers'
own models loaded with from_pretrained from the tiny checkpoints of tests/tiny_models.py.

Tolerance: transformers runs with dtype=float64 on identical weights (f16/bf16 checkpoints are
upcast exactly), but its RMSNorm, RoPE tables (inv_freq, cos/sin) and softmax compute in
float32 whatever the model dtype (modeling_llama.py), so logits of std ~2-4 differ by up to
~5e-6 (measured over every variant, 44 positions); the test allows atol=2e-5, rtol=1e-5.
test_tolerance_catches_small_mistakes shows that the small mistakes a reference could make
(eps, theta, a RoPE factor, one norm weight) move the logits by far more than that.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tests.reference_model import reference_greedy, reference_logits
from tests.tiny_models import (
    VARIANTS,
    from_bf16_bits,
    to_bf16_bits,
    write_mlx_quantized_model,
    write_tiny_model,
)

PROMPT = [5, 17, 42, 99, 3, 250, 7, 11, 64, 128, 31]
RTOL, ATOL = 1e-5, 2e-5


def hf_model(path, dtype="float64"):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def hf_logits(path, ids: list[int]) -> np.ndarray:
    model = hf_model(path)  # skips first when torch or transformers is missing
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.reference
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_reference_logits_match_transformers(tmp_path, variant):
    cfg, weights = write_tiny_model(tmp_path, variant)
    ids = PROMPT * 3  # 33 positions: past the llama3 rule's original context of 16..64
    np.testing.assert_allclose(reference_logits(cfg, weights, ids), hf_logits(tmp_path, ids),
                               rtol=RTOL, atol=ATOL)


@pytest.mark.reference
@pytest.mark.parametrize(("variant", "dtype", "sharded"), [
    ("qwen2", "float32", True), ("llama", "bfloat16", False), ("qwen3", "float16", True),
    ("llama_tied", "bfloat16", True)])
def test_reference_logits_match_transformers_sharded_and_half(tmp_path, variant, dtype, sharded):
    cfg, weights = write_tiny_model(tmp_path, variant, dtype=dtype, sharded=sharded, seed=3)
    np.testing.assert_allclose(reference_logits(cfg, weights, PROMPT), hf_logits(tmp_path, PROMPT),
                               rtol=RTOL, atol=ATOL)


@pytest.mark.reference
@pytest.mark.parametrize(("variant", "overrides"), [
    ("mistral", {"sliding_window": 4}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 3,
               "layer_types": ["sliding_attention", "full_attention"]})])
def test_sliding_window_matches_transformers(tmp_path, variant, overrides):
    cfg, weights = write_tiny_model(tmp_path, variant, config_overrides=overrides)
    full = {k: v for k, v in cfg.items() if k not in overrides}
    ref = reference_logits(cfg, weights, PROMPT)
    np.testing.assert_allclose(ref, hf_logits(tmp_path, PROMPT), rtol=RTOL, atol=ATOL)
    assert np.abs(ref - reference_logits(full, weights, PROMPT)).max() > 1e-2  # window applied


@pytest.mark.reference
@pytest.mark.parametrize("variant", ["llama3_rope", "qwen3"])
def test_reference_reads_transformers5_configs(tmp_path, variant):
    # transformers 5 writes rope_parameters (and drops rope_scaling); the reference must read it
    cfg, weights = write_tiny_model(tmp_path, variant)
    saved = hf_model(tmp_path).config.to_dict()
    assert "rope_parameters" in saved
    ids = PROMPT * 3
    np.testing.assert_array_equal(reference_logits(saved, weights, ids),
                                  reference_logits(cfg, weights, ids))


@pytest.mark.reference
@pytest.mark.parametrize(("variant", "dtype", "sharded"), [
    ("llama", "bfloat16", True), ("qwen2", "float16", False), ("llama_tied", "float32", True)])
def test_transformers_loads_exactly_the_returned_weights(tmp_path, variant, dtype, sharded):
    torch = pytest.importorskip("torch")
    cfg, weights = write_tiny_model(tmp_path, variant, dtype=dtype, sharded=sharded)
    model = hf_model(tmp_path, "auto")
    state = {k: v for k, v in model.state_dict().items()
             if not (cfg["tie_word_embeddings"] and k == "lm_head.weight")}
    assert sorted(state) == sorted(weights)
    for name, tensor in state.items():
        assert tensor.dtype == getattr(torch, dtype), name
        np.testing.assert_array_equal(tensor.float().numpy(), weights[name], err_msg=name)


def test_bf16_rounding_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    a = np.concatenate([rng.standard_normal(10_000).astype(np.float32) * 3,
                        np.float32([0.0, -0.0, 1.0, 65504.0, 1e-30, -1e-40, 3.0e38])])
    # ties: halfway between two bf16 values, both parities of the kept bit
    ties = (np.arange(1, 200, dtype=np.uint32) << 16 | 0x8000).view(np.float32)
    a = np.concatenate([a, ties, -ties])
    want = torch.from_numpy(a).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(to_bf16_bits(a), want)
    np.testing.assert_array_equal(from_bf16_bits(want), torch.from_numpy(want.view(np.int16))
                                  .view(torch.bfloat16).float().numpy())


def test_tolerance_catches_small_mistakes(tmp_path):
    # Each of these is a plausible reference bug; each must move the logits well past ATOL.
    cfg, weights = write_tiny_model(tmp_path, "llama3_rope")
    ids = PROMPT * 3
    base = reference_logits(cfg, weights, ids)
    scaling = cfg["rope_scaling"]
    mistakes = {
        "eps x10": {**cfg, "rms_norm_eps": cfg["rms_norm_eps"] * 10},
        "theta x1.1": {**cfg, "rope_theta": cfg["rope_theta"] * 1.1},
        "llama3 high_freq_factor": {**cfg, "rope_scaling": {**scaling, "high_freq_factor": 3.0}},
        "no rope scaling": {k: v for k, v in cfg.items() if k != "rope_scaling"},
    }
    for name, bad in mistakes.items():
        assert np.abs(reference_logits(bad, weights, ids) - base).max() > 100 * ATOL, name
    nudged = dict(weights)
    nudged["model.norm.weight"] = weights["model.norm.weight"] * np.float32(1.001)
    assert np.abs(reference_logits(cfg, nudged, ids) - base).max() > 100 * ATOL


def test_llama3_variant_takes_every_branch():
    # wavelengths below high_wl keep their frequency, above low_wl are divided, between smoothed
    cfg = VARIANTS["llama3_rope"]
    s, D = cfg["rope_scaling"], 64 // 4
    wavelen = 2 * math.pi * cfg["rope_theta"] ** (np.arange(0, D, 2) / D)
    high_wl = s["original_max_position_embeddings"] / s["high_freq_factor"]
    low_wl = s["original_max_position_embeddings"] / s["low_freq_factor"]
    assert (wavelen < high_wl).any() and (wavelen > low_wl).any()
    assert ((wavelen >= high_wl) & (wavelen <= low_wl)).any()


def test_reference_refuses_what_it_does_not_implement(tmp_path):
    cfg, weights = write_tiny_model(tmp_path, "llama")
    yarn = {**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(NotImplementedError, match="yarn"):
        reference_logits(yarn, weights, PROMPT)
    with pytest.raises(NotImplementedError, match="gemma"):
        reference_logits({**cfg, "model_type": "gemma"}, weights, PROMPT)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_run_is_not_degenerate(tmp_path, variant):
    cfg, weights = write_tiny_model(tmp_path, variant)
    logits = reference_logits(cfg, weights, PROMPT)
    assert np.all(np.isfinite(logits))
    assert 0.3 < logits.std() < 30
    toks = reference_greedy(cfg, weights, PROMPT, 32)
    assert len(toks) == 32
    assert len(set(toks)) >= 5, toks


def test_sharded_index_is_consistent(tmp_path):
    from safetensors import safe_open

    write_tiny_model(tmp_path, "llama", sharded=True)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    total, seen = 0, {}
    for shard in shards:
        with safe_open(str(tmp_path / shard), "np") as f:
            for name in f.keys():
                seen[name] = shard
                total += f.get_tensor(name).nbytes
    assert seen == index["weight_map"]
    assert total == index["metadata"]["total_size"]
    assert not (tmp_path / "model.safetensors").exists()


def test_tokenizer_fits_vocab_and_renders_chatml(tmp_path):
    from tokenizers import Tokenizer

    cfg, _ = write_tiny_model(tmp_path, "qwen2")
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert max(tok.get_vocab().values()) < cfg["vocab_size"]
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert tok.token_to_id(special) is not None
    assert tok.token_to_id("<|endoftext|>") == cfg["bos_token_id"]
    assert tok.token_to_id("<|im_end|>") == cfg["eos_token_id"]
    text = "the capital of france is paris, 42!"
    assert tok.decode(tok.encode(text).ids) == text
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    chat = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                  add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tiny_model_dir_fixture(tiny_model_dir):
    a, cfg, weights = tiny_model_dir("qwen3", dtype="float16")
    b, _, _ = tiny_model_dir("qwen3")
    assert a != b
    assert json.loads((a / "config.json").read_text()) == cfg
    assert weights["model.norm.weight"].dtype == np.float32


@pytest.mark.parametrize(("bits", "group"), [(4, 64), (8, 32)])
def test_mlx_quantized_writer_layout(tmp_path, bits, group):
    # Unpack the uint32 words by hand (little-endian bit order, as mlx packs them) and check
    # w = scales * q + biases reproduces the weights the writer returns.
    pytest.importorskip("mlx.core")
    from safetensors.numpy import load_file

    cfg, ref = write_mlx_quantized_model(tmp_path, "llama", bits, group)
    assert cfg["quantization"] == {"group_size": group, "bits": bits}
    stored = load_file(str(tmp_path / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight",
                 "lm_head.weight"):
        prefix = name.removesuffix(".weight")
        words = stored[name]
        assert words.dtype == np.uint32
        shifts = np.arange(0, 32, bits, dtype=np.uint32)
        q = ((words[..., None] >> shifts) & ((1 << bits) - 1)).reshape(words.shape[0], -1)
        scales, biases = stored[prefix + ".scales"], stored[prefix + ".biases"]
        g = q.reshape(q.shape[0], -1, group).astype(np.float32)
        w = (g * scales[..., None] + biases[..., None]).reshape(q.shape)
        np.testing.assert_allclose(w, ref[name], rtol=1e-6, atol=1e-6)


def test_references_import_none_of_our_packages():
    # The references are only worth comparing against if they do not share the engine's code.
    import ast
    import pathlib

    ours = {"engine", "kernels", "loaders", "cache", "scheduler", "bench"}
    root = pathlib.Path(__file__).parent
    for name in ("reference_model.py", "tiny_models.py", "make_smollm2_reference.py",
                 "conftest.py", "test_reference_selfcheck.py"):
        tree = ast.parse((root / name).read_text())
        mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert {m.split(".")[0] for m in mods} & ours == set(), name
