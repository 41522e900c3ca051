"""Tiny random Llama-family checkpoints written as real HF directories (config.json,
safetensors single or sharded, tokenizer.json, tokenizer_config.json with a ChatML template).

Independent of the engine: only numpy, safetensors, tokenizers (and mlx.core.quantize for the
MLX-quantized variant).
"""

from __future__ import annotations

import json
import pathlib
import struct

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB = 320
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEXT = (
    "the quick brown fox jumps over the lazy dog while streaming layers from disk to memory "
    "and back again so that large models run on small machines with patience and care "
    "hello world what is the capital of france paris is the capital of france numbers 0 1 2 3 "
    "4 5 6 7 8 9 ten eleven twelve tokens are pieces of text that a model reads and writes"
)

BASE = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": VOCAB, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "bos_token_id": 0, "eos_token_id": 2,
        "tie_word_embeddings": False, "torch_dtype": "float32"}
VARIANTS = {
    "llama": {"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
    "llama_tied": {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                   "tie_word_embeddings": True},
    # head_dim 16 and theta 5e5 give wavelengths 6.3, 32, 168, ...: with an original context of
    # 64 (high/low wavelengths 16/64) every branch of the llama3 rule is taken.
    "llama3_rope": {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                    "rope_theta": 500000.0,
                    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 64}},
    "mistral": {"model_type": "mistral", "architectures": ["MistralForCausalLM"],
                "sliding_window": None},
    "qwen2": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
              "tie_word_embeddings": True},
    "qwen3": {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "head_dim": 32,
              "attention_bias": False},
}


def make_config(variant: str, n_layers: int, overrides: dict | None = None) -> dict:
    return {**BASE, **VARIANTS[variant], "num_hidden_layers": n_layers, **(overrides or {})}


def make_weights(cfg: dict, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    E, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    H, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = cfg.get("head_dim") or E // H

    def mat(out, inn):
        return (rng.standard_normal((out, inn)) / np.sqrt(inn)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    # A tied head scores h against the input embeddings, so with a 2-layer random model a large
    # embedding makes the last token its own argmax and greedy repeats it forever; a small
    # embedding plus a large final norm keeps the run varied (test_greedy_run_is_not_degenerate).
    tied = cfg["tie_word_embeddings"]
    emb_std = 0.02 if tied else 0.25
    w = {"model.embed_tokens.weight": (emb_std * rng.standard_normal((V, E))).astype(np.float32)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(E)
        w[p + "post_attention_layernorm.weight"] = norm(E)
        w[p + "self_attn.q_proj.weight"] = mat(H * D, E)
        w[p + "self_attn.k_proj.weight"] = mat(Hkv * D, E)
        w[p + "self_attn.v_proj.weight"] = mat(Hkv * D, E)
        w[p + "self_attn.o_proj.weight"] = mat(E, H * D)
        w[p + "mlp.gate_proj.weight"] = mat(I, E)
        w[p + "mlp.up_proj.weight"] = mat(I, E)
        w[p + "mlp.down_proj.weight"] = mat(E, I)
        if cfg["model_type"] == "qwen2":
            for name, n in (("q", H * D), ("k", Hkv * D), ("v", Hkv * D)):
                w[p + f"self_attn.{name}_proj.bias"] = (0.1 * rng.standard_normal(n)).astype(
                    np.float32)
        if cfg["model_type"] == "qwen3":
            w[p + "self_attn.q_norm.weight"] = norm(D)
            w[p + "self_attn.k_norm.weight"] = norm(D)
    w["model.norm.weight"] = norm(E) * np.float32(10.0 if tied else 1.0)
    if not tied:
        w["lm_head.weight"] = mat(V, E) * 4
    return w


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even."""
    u = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def from_bf16_bits(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


def save_raw_safetensors(path: pathlib.Path, tensors: dict[str, tuple[str, tuple, bytes]]
                         ) -> None:
    """Write a safetensors file from (dtype, shape, raw bytes) per tensor (for BF16)."""
    header, offset, blobs = {}, 0, []
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def write_tokenizer(path: pathlib.Path, cfg: dict) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg["vocab_size"], special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([TEXT] * 3, trainer=trainer)
    assert tok.get_vocab_size() <= cfg["vocab_size"]
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "chat_template": CHATML,
        "add_bos_token": False, "model_max_length": cfg["max_position_embeddings"],
    }))


def _write_shards(path: pathlib.Path, tensors: dict, n_shards: int, writer) -> None:
    names = list(tensors)
    parts = [names[i::n_shards] for i in range(n_shards)]
    weight_map, total = {}, 0
    for i, part in enumerate(parts):
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        writer(path / fname, {n: tensors[n] for n in part})
        for n in part:
            weight_map[n] = fname
    for n in names:
        t = tensors[n]
        total += len(t[2]) if isinstance(t, tuple) else t.nbytes
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))


def write_tiny_model(path, variant: str, *, sharded: bool = False, dtype: str = "float32",
                     seed: int = 0, n_layers: int = 2, config_overrides: dict | None = None
                     ) -> tuple[dict, dict[str, np.ndarray]]:
    """Write a tiny HF checkpoint; return (config, the float32 weights as stored).

    Args:
        path: the directory (created if needed).
        variant: a key of VARIANTS ("llama", "llama_tied", "llama3_rope", "mistral", "qwen2",
            "qwen3").
        sharded: three shards plus model.safetensors.index.json instead of model.safetensors.
        dtype: "float32", "float16" or "bfloat16". float16 goes through safetensors.numpy;
            bfloat16 (numpy has no such dtype) is rounded to nearest even by hand and written by
            save_raw_safetensors as "BF16" bytes, so no torch is needed (the selfcheck compares
            the rounding with torch's and loads the file in transformers).
        config_overrides: config.json keys to set on top of the variant (e.g. sliding_window).

    Returns:
        The config dict and the stored values widened to float32 (what a reference should use).
    """
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"write_tiny_model: dtype {dtype!r}, expected float32/float16/bfloat16")
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = make_config(variant, n_layers, config_overrides)
    cfg["torch_dtype"] = dtype
    weights = make_weights(cfg, seed)
    if dtype == "bfloat16":
        bits = {k: to_bf16_bits(v) for k, v in weights.items()}
        weights = {k: from_bf16_bits(b) for k, b in bits.items()}
        tensors = {k: ("BF16", b.shape, b.tobytes()) for k, b in bits.items()}
        writer = save_raw_safetensors
    else:
        np_dtype = {"float32": np.float32, "float16": np.float16}[dtype]
        tensors = {k: v.astype(np_dtype) for k, v in weights.items()}
        weights = {k: v.astype(np.float32) for k, v in tensors.items()}
        def writer(p, t):
            save_file(t, str(p))
    if sharded:
        _write_shards(path, tensors, 3, writer)
    else:
        writer(path / "model.safetensors", tensors)
    (path / "config.json").write_text(json.dumps(cfg))
    write_tokenizer(path, cfg)
    return cfg, weights


def write_mlx_quantized_model(path, variant: str, bits: int, group_size: int,
                              n_layers: int = 2, *, seed: int = 0
                              ) -> tuple[dict, dict[str, np.ndarray]]:
    """An MLX-quantized checkpoint (mlx-lm layout) made with mlx.core.quantize; returns the
    config and the weights as mx.dequantize gives them back (the reference's weights)."""
    import mlx.core as mx

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = make_config(variant, n_layers)
    cfg["quantization"] = {"group_size": group_size, "bits": bits}
    weights = make_weights(cfg, seed)
    tensors, ref = {}, {}
    for name, w in weights.items():
        if w.ndim == 2:
            q, s, b = mx.quantize(mx.array(w), group_size=group_size, bits=bits)
            prefix = name.removesuffix(".weight")
            tensors[name] = np.array(q)
            tensors[prefix + ".scales"] = np.array(s)
            tensors[prefix + ".biases"] = np.array(b)
            ref[name] = np.array(mx.dequantize(q, s, b, group_size=group_size, bits=bits))
        else:
            tensors[name] = w
            ref[name] = w
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg))
    write_tokenizer(path, cfg)
    return cfg, ref
