"""Checks the test references themselves: tests/reference_model.py against HF transformers'
own models loaded with from_pretrained from the tiny checkpoints of tests/tiny_models.py.

Tolerance: transformers runs with dtype=float64 on identical weights (f16/bf16 checkpoints are
upcast exactly), but its RMSNorm, RoPE tables (inv_freq, cos/sin) and softmax compute in
float32 whatever the model dtype (modeling_llama.py), so logits of std ~2-5 differ by up to
~3e-6; the test allows atol=2e-5, rtol=1e-5. A wrong RoPE layout, missing bias or norm shows
up as differences of order 1.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.reference_model import reference_greedy, reference_logits
from tests.tiny_models import VARIANTS, write_mlx_quantized_model, write_tiny_model

PROMPT = [5, 17, 42, 99, 3, 250, 7, 11, 64, 128, 31]
RTOL, ATOL = 1e-5, 2e-5


def hf_logits(path, ids: list[int]) -> np.ndarray:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.reference
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_reference_logits_match_transformers(tmp_path, variant):
    cfg, weights = write_tiny_model(tmp_path, variant)
    np.testing.assert_allclose(reference_logits(cfg, weights, PROMPT), hf_logits(tmp_path, PROMPT),
                               rtol=RTOL, atol=ATOL)


@pytest.mark.reference
@pytest.mark.parametrize(("variant", "dtype", "sharded"), [
    ("qwen2", "float32", True), ("llama", "bfloat16", False), ("qwen3", "float16", True)])
def test_reference_logits_match_transformers_sharded_and_half(tmp_path, variant, dtype, sharded):
    cfg, weights = write_tiny_model(tmp_path, variant, dtype=dtype, sharded=sharded, seed=3)
    np.testing.assert_allclose(reference_logits(cfg, weights, PROMPT), hf_logits(tmp_path, PROMPT),
                               rtol=RTOL, atol=ATOL)


def test_llama3_rope_scaling_changes_the_logits(tmp_path):
    # Guards against the rope_scaling branch silently not applying (positions > 16 matter).
    cfg, weights = write_tiny_model(tmp_path, "llama3_rope")
    ids = PROMPT * 3
    plain = {k: v for k, v in cfg.items() if k != "rope_scaling"}
    diff = np.abs(reference_logits(cfg, weights, ids) - reference_logits(plain, weights, ids))
    assert diff.max() > 1e-3


@pytest.mark.parametrize("variant", ["llama", "qwen3"])
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
    text = "the capital of france is paris, 42!"
    assert tok.decode(tok.encode(text).ids) == text
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    chat = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                  add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


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
