"""What the loaders need to know about an architecture, handed in by the model registry.

Loaders stay a leaf: the model files (models/) describe their tensors with an Architecture and
the registry resolves a config's model_type, or a GGUF's general.architecture, to one. The
loaders then index, rename and check a checkpoint by it, with no list of families of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from stream_run.loaders.index import TensorRef
from stream_run.loaders.spec import ModelSpec

Shapes = dict[str, dict[str, tuple[int, ...]]]  # unit key -> name inside the unit -> shape


@dataclass(frozen=True)
class Architecture:
    """One model_type as the loaders see it.

    expected_shapes: every tensor of every unit with its logical (unquantized) shape; the
        check is exact, as nanoGPT's from_pretrained: no tensor missing, none unexpected.
    gguf_names: GGUF tensor name template ("blk.{bid}.attn_q.weight", gguf-py style) ->
        (unit template: "embed", "layers.{bid}" or "head"; name inside the unit).
    gguf_permuted: names inside a block whose rows llama.cpp's converter permuted for its
        interleaved RoPE -> "q" (by n_heads) or "k" (by n_kv_heads); undone at read.
    config_overrides: config values the family implies whatever the file says (qwen2 always
        has q/k/v biases).
    hf_prefixes: prefixes a checkpoint may put before "model." (Gemma 3's multimodal
        checkpoints keep the text model under "language_model."); tensors under none of them
        (a vision tower) are not part of the model.
    hf_config: config.json as read -> the config the spec is built from, where the family's
        config.json is not one flat HF text config (a multimodal checkpoint nests the text
        model's under "text_config"; HF's class defaults fill what a sparse one leaves out).
        May raise ValueError, which the loader reports with the path.
    gguf_config: the HF-style config built from GGUF metadata -> the config the spec is built
        from, for what a GGUF of the family leaves to llama.cpp's code (values it derives from
        the model size, weights its converter changed). May raise ValueError likewise.
    hf_units: (spec, unit key, tensor as indexed) -> where it goes: [(unit key, tensor)].
        A Mixture-of-Experts file gives each routed expert its own unit ("layers.{i}.mlp.
        experts.{e}"), and splits a tensor stacking every expert ("mlp.experts.gate_up_proj",
        transformers v5) into each expert's byte sub-ranges. None: every tensor stays in the
        unit its name gives. GGUF files go through it too: the gguf_names table maps a stacked
        "ffn_gate_exps" to a name hf_units splits. May raise FormatError, which the loader
        reports with the path;
        the units it may name are those of expected_shapes.
    """

    model_type: str
    expected_shapes: Callable[[ModelSpec], Shapes]
    gguf_names: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    gguf_permuted: Mapping[str, str] = field(default_factory=dict)
    config_overrides: Mapping[str, Any] = field(default_factory=dict)
    hf_prefixes: tuple[str, ...] = ("",)
    hf_config: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    gguf_config: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    hf_units: Callable[[ModelSpec, str, TensorRef], list[tuple[str, TensorRef]]] | None = None


class Registry(Protocol):
    """Resolves names to Architectures (models/ implements it)."""

    def for_model_type(self, model_type: Any, source: str) -> Architecture:
        """The Architecture of a config.json model_type.

        Raises:
            FormatError: an unknown model_type, naming source and listing the known ones.
        """
        ...

    def for_gguf(self, gguf_arch: Any, source: str, experts: bool = False) -> Architecture:
        """The Architecture of a GGUF general.architecture (FormatError likewise); experts:
        the file sets {arch}.expert_count (llama.cpp writes Mixtral as "llama")."""
        ...
