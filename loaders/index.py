"""LayerIndex: where every unit's tensors live on disk, without reading tensor data.

A unit is what the weight cache holds and the scheduler asks for: the embedding table
("embed"), one transformer block ("layers.{i}"), the final norm with the output head ("head").
Tensor names inside a unit are the HF names relative to it (e.g. "self_attn.q_proj.weight").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stream_run.loaders.spec import ModelSpec

EMBED = "embed"
HEAD = "head"


def layer_key(layer_idx: int) -> str:
    return f"layers.{layer_idx}"


@dataclass(frozen=True)
class TensorRef:
    """One tensor on disk.

    dtype is the storage type: "F32", "F16", "BF16", "U32" (MLX packed), "I8", or a GGUF
    block type ("Q4_0", "Q4_1", "Q8_0"). shape is the logical HF shape (out, in) for linears.
    unpermute_heads: GGUF llama stores q/k rows permuted for interleaved RoPE; this is the
    head count to undo that permutation at read time (None: no permutation).
    """

    name: str
    path: str
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    unpermute_heads: int | None = None


@dataclass(frozen=True)
class HostTensor:
    """A tensor's raw bytes in RAM (or an mmap view) plus what is needed to interpret them."""

    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray  # uint8, exactly the on-disk bytes (after any row un-permutation)


@dataclass
class Unit:
    key: str
    tensors: dict[str, TensorRef] = field(default_factory=dict)
    # MLX-quantized units: {"bits", "group_size"} plus per-tensor overrides keyed by the
    # relative prefix ("self_attn.q_proj": {"bits": 8, "group_size": 64}); None otherwise.
    quantization: dict | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def files(self) -> list[str]:
        return sorted({t.path for t in self.tensors.values()})


@dataclass
class LayerIndex:
    """The model's spec and its units in execution order: embed, layers.0..N-1, head."""

    spec: ModelSpec
    units: dict[str, Unit]
    source: str  # the model path as the user gave it, for messages
    # packed (stream-convert) directories: {unit file path: sha256} from manifest.json
    checksums: dict[str, str] | None = None

    @property
    def nbytes(self) -> int:
        return sum(u.nbytes for u in self.units.values())

    def block_keys(self) -> list[str]:
        return [layer_key(i) for i in range(self.spec.num_hidden_layers)]
