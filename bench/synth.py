"""Synthetic models: real HF layouts and shapes with random weights, written shard by shard.

These are the large models for streaming tests and benchmarks on machines without downloads.
Random data comes from one pre-generated pool, sliced at random offsets, so writing is bounded
by the disk rather than the random generator, and RAM use stays at a few pool-sized buffers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np

from stream_run.bench import synth_moe
from stream_run.loaders import ModelSpec
from stream_run.loaders.hf import full_name
from stream_run.models import REGISTRY

# (hidden, intermediate, layers, heads, kv_heads, vocab): the Llama-2 7B/13B and Llama-3 70B
SHAPES = {
    "7b": (4096, 11008, 32, 32, 32, 32000),
    "13b": (5120, 13824, 40, 40, 40, 32000),
    "70b": (8192, 28672, 80, 64, 8, 128256),
    "tiny": (64, 128, 4, 4, 2, 320),
}
DTYPES = {"bf16": ("BF16", 2), "f16": ("F16", 2), "f32": ("F32", 4),
          "mxfp4": ("BF16", 2)}  # gpt_oss: experts MXFP4 (uint8 blocks + scales), the rest bf16
POOL_VALUES = 1 << 22  # 4M values per pool slice; chunks are slices of it
SHARD_BYTES = 2 * 10**9


@dataclass(frozen=True)
class SynthSpec:
    arch: str = "llama"
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 320
    dtype: str = "bf16"
    seed: int = 0
    # Mixture-of-Experts (bench.synth_moe; 0: a dense model) and head_dim (0: hidden / heads)
    head_dim: int = 0
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    router_skew: float = 0.0  # Zipf exponent of expert popularity (0: uniform)

    def __post_init__(self) -> None:
        if self.arch not in REGISTRY.model_types:
            raise ValueError(f"--arch must be one of {', '.join(REGISTRY.model_types)}, "
                             f"got {self.arch!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads or (
                self.num_attention_heads % self.num_key_value_heads):
            raise ValueError("hidden_size must divide by heads, and heads by kv heads")
        synth_moe.check(self)

    @classmethod
    def from_shape(cls, shape: str, **kw) -> SynthSpec:
        if shape in synth_moe.SHAPES:
            return cls(**{**kw, **synth_moe.shape_fields(shape, kw.get("arch", "llama"))})
        if shape not in SHAPES:
            raise ValueError(f"--shape must be one of {', '.join([*SHAPES, *synth_moe.SHAPES])}"
                             f", got {shape!r}")
        e, i, n, h, kv, v = SHAPES[shape]
        return cls(hidden_size=e, intermediate_size=i, num_hidden_layers=n,
                   num_attention_heads=h, num_key_value_heads=kv, vocab_size=v, **kw)

    def tensors(self) -> Iterator[tuple[str, tuple[int, ...], float]]:
        """(HF name, shape, std) in file order; std 0 means a norm weight (ones). The tensors
        are the ones the architecture's model file expects (models/ registry)."""
        arch = REGISTRY.for_model_type(self.arch, "stream-bench synth")
        spec = ModelSpec.from_dict({**self.config(), **arch.config_overrides})
        units = arch.expected_shapes(spec)
        if self.arch in synth_moe.FUSED_ARCHS:
            units = synth_moe.fuse_experts(units, self.num_experts)
        for key, shapes in units.items():
            for rel, shape in shapes.items():
                yield synth_moe.hf_name(self.arch, full_name(key, rel)), shape, _std(rel, shape)

    @property
    def nbytes(self) -> int:
        return sum(math.prod(s) * _dtype(self, n)[1] for n, s, _ in self.tensors())

    def config(self) -> dict:
        return {
            "model_type": self.arch, "architectures": [REGISTRY.hf_class(self.arch)],
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "vocab_size": self.vocab_size,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "bos_token_id": 256, "eos_token_id": 257,
            "torch_dtype": {"bf16": "bfloat16", "f16": "float16", "f32": "float32",
                            "mxfp4": "bfloat16"}[self.dtype],
            "stream_run_synthetic": asdict(self),
            **({"head_dim": self.head_dim} if self.head_dim else {}),
            **(synth_moe.config_fields(self) if self.arch in synth_moe.MOE_ARCHS else {}),
        }


def _dtype(spec: SynthSpec, name: str) -> tuple[str, int]:
    """A tensor's safetensors dtype and element size: MXFP4 blocks and scales are bytes."""
    if spec.dtype == "mxfp4" and name.endswith(("_blocks", "_scales")):
        return "U8", 1
    return DTYPES[spec.dtype]


def _std(name: str, shape: tuple[int, ...]) -> float:
    """Random scale of a synthetic tensor: norms are ones (0), biases small, matrices
    1/sqrt(fan-in) so activations keep their size through the blocks."""
    if len(shape) == 1:
        return 0.0 if name.endswith("norm.weight") else 0.02
    return 1.0 if name.endswith("embed_tokens.weight") else shape[1] ** -0.5


class _Pool:
    """Random values of one dtype, pre-generated once; chunks are random slices of it."""

    def __init__(self, dtype: str, seed: int) -> None:
        dtype = "bf16" if dtype == "mxfp4" else dtype  # its dense tensors
        self.rng = np.random.default_rng(seed)
        vals = self.rng.standard_normal(2 * POOL_VALUES, dtype=np.float32)
        self.values = _encode(vals, dtype)
        self.ones = _encode(np.ones(POOL_VALUES, np.float32), dtype)
        self.dtype = dtype

    def chunk(self, n: int, std: float) -> np.ndarray:
        if std == 0.0:
            return self.ones[:n]
        start = int(self.rng.integers(0, POOL_VALUES))
        base = self.values[start:start + n]
        if std == 1.0:
            return base
        return _encode(_decode(base, self.dtype) * np.float32(std), self.dtype)


def _encode(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "f32":
        return a.astype(np.float32)
    if dtype == "f16":
        return a.astype(np.float16)
    u = a.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even


def _decode(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bf16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


def _shards(spec: SynthSpec, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...], float]]]:
    shards: list[list] = [[]]
    used = 0
    for name, shape, std in spec.tensors():
        nbytes = math.prod(shape) * _dtype(spec, name)[1]
        if shards[-1] and used + nbytes > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, shape, std))
        used += nbytes
    return shards


def _write_shard(path: str, tensors: list, spec: SynthSpec, pool: _Pool,
                 progress: Callable[[int], None]) -> None:
    header, offset = {}, 0
    for name, shape, _ in tensors:
        st_dtype, size = _dtype(spec, name)
        n = math.prod(shape) * size
        header[name] = {"dtype": st_dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, shape, std in tensors:
            edit = synth_moe.skew_edit(spec, name, shape, 1)
            left, at = math.prod(shape), 0
            while left:
                n = min(left, POOL_VALUES)
                data = synth_moe.mxfp4_chunk(name, pool.values.view(np.uint8), pool.rng, n) \
                    if spec.dtype == "mxfp4" else None
                if data is None:
                    data = pool.chunk(n, std)
                if edit is not None:
                    data = _encode(edit(at, _decode(data, pool.dtype)), pool.dtype)
                f.write(data.tobytes())
                progress(data.nbytes)
                left -= n
                at += n


def make_tokenizer():
    """A byte-level tokenizer with no merges (ids 0..255 are bytes, then <s>, </s>): the one
    every synthetic model carries (tokenizer.json, or GGUF tokenizer.ggml.* metadata)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    return tok


def write_tokenizer(out: str) -> None:
    """tokenizer.json and tokenizer_config.json of make_tokenizer() (BOS added)."""
    make_tokenizer().save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}, f)


def synthesize(spec: SynthSpec, out: str, progress: Callable[[int], None] = lambda n: None,
               shard_bytes: int = SHARD_BYTES) -> None:
    """Write the model into a temp dir beside `out`, then rename it into place.

    Raises:
        FileExistsError: out exists (never overwritten).
    """
    if os.path.exists(out):
        raise FileExistsError(f"{out}: already exists; choose a new --out directory")
    parent = os.path.dirname(os.path.abspath(out))
    tmp = tempfile.mkdtemp(prefix=".synth-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the model is an ordinary dir
    try:
        pool = _Pool(spec.dtype, spec.seed)
        shards = _shards(spec, shard_bytes)
        weight_map = {}
        for i, tensors in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _write_shard(os.path.join(tmp, name), tensors, spec, pool, progress)
            weight_map.update({t[0]: name for t in tensors})
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": spec.nbytes}, "weight_map": weight_map}, f)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(spec.config(), f, indent=1)
        write_tokenizer(tmp)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
