"""Test helpers for stream-convert: an independent reader of packed directories (safetensors +
a bitstream unpacker written here, mlx-lm's reading of the "quantization" section), and tiny
GGUF files with K-quant blocks.

Independent of the engine: only numpy, safetensors, gguf-py and tokenizers.
"""

from __future__ import annotations

import hashlib
import json
import pathlib

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from tokenizers import pre_tokenizers


def unpack_bits(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    """uint32 rows -> n unsigned values per row: element j is bits [j*bits, (j+1)*bits) of the
    row's little-endian bitstream (MLX's layout)."""
    stream = np.unpackbits(words.astype("<u4").view(np.uint8), axis=1, bitorder="little")
    values = stream.reshape(words.shape[0], n, bits)  # (rows, n, bits), lowest bit first
    pad = np.zeros((words.shape[0], n, 8 - bits), np.uint8)
    return np.packbits(np.concatenate([values, pad], axis=-1), axis=-1, bitorder="little")[..., 0]


def module_params(quantization: dict, module: str) -> tuple[int, int]:
    """(bits, group_size) for a packed module, as mlx-lm's class_predicate reads config.json."""
    entry = quantization.get(module)
    src = entry if isinstance(entry, dict) else quantization
    return src["bits"], src["group_size"]


_NUMPY = {"F32": "<f4", "F16": "<f2", "U32": "<u4", "BF16": "<u2"}


def raw_tensors(path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """A safetensors file's tensors as (dtype, shape, stored bytes), parsed here."""
    data = pathlib.Path(path).read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    return {name: (h["dtype"], tuple(h["shape"]),
                   data[8 + n + h["data_offsets"][0]:8 + n + h["data_offsets"][1]])
            for name, h in header.items()}


def as_array(dtype: str, shape: tuple[int, ...], raw: bytes) -> np.ndarray:
    """Stored bytes -> numpy: uint32 words, float16, float32; bfloat16 widened to float32."""
    arr = np.frombuffer(raw, dtype=_NUMPY[dtype]).reshape(shape)
    return (arr.astype(np.uint32) << 16).view(np.float32) if dtype == "BF16" else arr


def load_packed(path) -> tuple[dict, dict[str, np.ndarray]]:
    """A packed (or any MLX/HF) directory -> (config.json, float32 weights by full HF name),
    packed weights dequantized here: w = scales * q + biases per group."""
    path = pathlib.Path(path)
    cfg = json.loads((path / "config.json").read_text())
    out = {}
    for f in sorted(path.glob("model*.safetensors")):
        out.update(load_weights(f, cfg))
    return cfg, out


def load_weights(path, cfg: dict) -> dict[str, np.ndarray]:
    """One safetensors file's weights as float32, packed ones dequantized with cfg's
    quantization section."""
    raw = {n: as_array(*t) for n, t in raw_tensors(path).items()}
    out = {}
    for name, arr in raw.items():
        module, _, part = name.rpartition(".")
        if part in ("scales", "biases"):
            continue
        if arr.dtype == np.uint32:
            bits, group = module_params(cfg["quantization"], module)
            n = arr.shape[1] * 32 // bits
            q = unpack_bits(arr, bits, n).astype(np.float32)
            s = np.repeat(raw[f"{module}.scales"].astype(np.float32), group, axis=1)
            b = np.repeat(raw[f"{module}.biases"].astype(np.float32), group, axis=1)
            out[name] = s * q + b
        else:
            out[name] = arr.astype(np.float32)
    return out


def manifest_matches_files(path) -> bool:
    """Every unit file's size and sha256 (hashlib here) equal manifest.json's, and the files'
    tensors are exactly the manifest's."""
    path = pathlib.Path(path)
    manifest = json.loads((path / "manifest.json").read_text())
    for unit in manifest["units"].values():
        data = (path / unit["file"]).read_bytes()
        if len(data) != unit["nbytes"] or hashlib.sha256(data).hexdigest() != unit["sha256"]:
            return False
        listed = {n: (t["dtype"], tuple(t["shape"])) for n, t in unit["tensors"].items()}
        in_file = raw_tensors(path / unit["file"])
        if {n: (dtype, shape) for n, (dtype, shape, _) in in_file.items()} != listed:
            return False
    return True


# --- tiny GGUF files with any block type ----------------------------------------------------

E, INTER, N_HEAD, N_KV, N_LAYERS = 256, 512, 4, 2, 2
D = E // N_HEAD
SPECIALS = ["<|bos|>", "<|eos|>"]
# byte offsets of the float16 fields in each 256-element K-quant block (ggml-common.h)
F16_FIELDS = {QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2),
              QT.Q6_K: (208,)}
# the types gguf-py can quantize
QUANTIZABLE = (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0)
TYPES_BY_LAYER = [
    {"attn_q": QT.Q4_K, "attn_k": QT.Q5_K, "attn_v": QT.Q6_K, "attn_output": QT.Q4_K,
     "ffn_gate": QT.Q5_K, "ffn_up": QT.Q2_K, "ffn_down": QT.Q6_K},
    {"attn_q": QT.Q3_K, "attn_k": QT.Q4_0, "attn_v": QT.Q5_0, "attn_output": QT.Q5_1,
     "ffn_gate": QT.Q4_1, "ffn_up": QT.Q8_0, "ffn_down": QT.Q4_K},
]


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute (HF -> GGUF row order), on whole rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def random_blocks(rng, qtype, rows: int, n: int) -> np.ndarray:
    """Random (rows, row bytes) blocks of qtype: random bits, sane float16 scales."""
    if qtype in QUANTIZABLE:
        return gguf.quants.quantize(rng.standard_normal((rows, n)).astype(np.float32) * 0.05,
                                    qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (rows * n // block, size), dtype=np.uint8)
    for at in F16_FIELDS[qtype]:
        d = rng.uniform(2e-5, 1e-4, data.shape[0]).astype("<f2")
        data[:, at:at + 2] = d.view(np.uint8).reshape(-1, 2)
    return data.reshape(rows, -1)


def write_kquant_gguf(path, seed: int = 0, types_by_layer: list[dict] | None = None,
                      embed_type=QT.Q6_K, output_type=QT.Q8_0) -> dict[str, np.ndarray]:
    """A 2-layer llama GGUF whose linears use types_by_layer (default TYPES_BY_LAYER: K-quants
    and the classic types), token_embd and output embed_type/output_type; returns the HF-layout
    float32 weights gguf-py dequantizes them to (q/k un-permuted), by full HF name."""
    rng = np.random.default_rng(seed)
    tokens = SPECIALS + pre_tokenizers.ByteLevel.alphabet()
    V = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    for key, val in {"block_count": N_LAYERS, "context_length": 256, "embedding_length": E,
                     "feed_forward_length": INTER, "attention.head_count": N_HEAD,
                     "attention.head_count_kv": N_KV}.items():
        w.add_uint32(f"llama.{key}", val)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "default")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.merges", [])
    w.add_array("tokenizer.ggml.token_type", [3, 3] + [1] * (V - 2))
    w.add_uint32("tokenizer.ggml.bos_token_id", 0)
    w.add_uint32("tokenizer.ggml.eos_token_id", 1)
    hf: dict[str, np.ndarray] = {}

    def add(gguf_name: str, hf_name: str, qtype, rows: int, n: int, n_head: int = 0) -> None:
        data = random_blocks(rng, qtype, rows, n)
        w.add_tensor(gguf_name, data, raw_dtype=qtype)
        dense = gguf.quants.dequantize(data, qtype).reshape(rows, n)
        hf[hf_name] = unpermute(dense, n_head) if n_head else dense

    add("token_embd.weight", "model.embed_tokens.weight", embed_type, V, E)
    add("output.weight", "lm_head.weight", output_type, V, E)
    norm = (1 + 0.1 * rng.standard_normal(E)).astype(np.float32)
    w.add_tensor("output_norm.weight", norm)
    hf["model.norm.weight"] = norm
    shapes = {"attn_q": (E, E), "attn_k": (N_KV * D, E), "attn_v": (N_KV * D, E),
              "attn_output": (E, E), "ffn_gate": (INTER, E), "ffn_up": (INTER, E),
              "ffn_down": (E, INTER)}
    hf_names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    for i, types in enumerate(types_by_layer or TYPES_BY_LAYER):
        for short, qtype in types.items():
            heads = {"attn_q": N_HEAD, "attn_k": N_KV}.get(short, 0)
            add(f"blk.{i}.{short}.weight", f"model.layers.{i}.{hf_names[short]}.weight", qtype,
                *shapes[short], n_head=heads)
        for short, hf_norm in (("attn_norm", "input_layernorm"),
                               ("ffn_norm", "post_attention_layernorm")):
            norm = (1 + 0.1 * rng.standard_normal(E)).astype(np.float32)
            w.add_tensor(f"blk.{i}.{short}.weight", norm)
            hf[f"model.layers.{i}.{hf_norm}.weight"] = norm
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def kquant_config() -> dict:
    """The HF config the reference model needs for write_kquant_gguf's model."""
    return {"model_type": "llama", "hidden_size": E, "intermediate_size": INTER,
            "num_hidden_layers": N_LAYERS, "num_attention_heads": N_HEAD,
            "num_key_value_heads": N_KV, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "vocab_size": len(SPECIALS) + len(pre_tokenizers.ByteLevel.alphabet())}
