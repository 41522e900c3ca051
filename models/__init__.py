"""The model registry: every architecture the engine runs, in one table.

A model_type maps to the file in models/ that implements it (mlx-lm style: several HF types
may share a file), the class name stream-convert writes into config.json, and llama.cpp's name
for it in GGUF files. Each model file provides `Model` (the pass; see models/base.py) and
`architecture(model_type)` (its tensors' names and shapes for the loaders). Adding an
architecture is that file, one entry here, the kernel ops it lacks, and tests.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from stream_run.loaders import Architecture, FormatError, ModelSource
from stream_run.loaders import open_model as _open_model


@dataclass(frozen=True)
class Entry:
    module: str  # models/<module>.py
    hf_class: str  # config.json "architectures", as stream-convert writes it
    gguf_arch: str | None = None  # GGUF general.architecture (llama.cpp's name), if any
    gguf_experts: bool = False  # the GGUF of this type sets {gguf_arch}.expert_count


ARCHITECTURES: dict[str, Entry] = {
    "llama": Entry("llama", "LlamaForCausalLM", "llama"),
    "mistral": Entry("llama", "MistralForCausalLM"),  # llama.cpp writes Mistral as "llama"
    "qwen2": Entry("llama", "Qwen2ForCausalLM", "qwen2"),
    "qwen3": Entry("llama", "Qwen3ForCausalLM", "qwen3"),
    "phi3": Entry("phi3", "Phi3ForCausalLM", "phi3"),
    "gemma2": Entry("gemma", "Gemma2ForCausalLM", "gemma2"),
    "gemma3_text": Entry("gemma", "Gemma3ForCausalLM", "gemma3"),
    "gemma3": Entry("gemma", "Gemma3ForConditionalGeneration"),  # its text model only
    "qwen3_moe": Entry("moe", "Qwen3MoeForCausalLM", "qwen3moe", True),
    "qwen2_moe": Entry("moe", "Qwen2MoeForCausalLM", "qwen2moe", True),
    "mixtral": Entry("moe", "MixtralForCausalLM", "llama", True),  # llama with experts
    "deepseek_v3": Entry("deepseek", "DeepseekV3ForCausalLM", "deepseek2", True),
    "gpt_oss": Entry("gpt_oss", "GptOssForCausalLM", "gpt-oss", True),
}


class ModelRegistry:
    """Resolves config model_types and GGUF architectures (the loaders' Registry protocol)."""

    def __init__(self, entries: dict[str, Entry]) -> None:
        self.entries = dict(entries)

    @property
    def model_types(self) -> list[str]:
        return list(self.entries)

    def register(self, model_type: str, entry: Entry) -> None:
        """Add (or replace) an architecture; its module must be importable as
        stream_run.models.<module> or by its full dotted name."""
        self.entries[model_type] = entry

    def module(self, model_type: Any, source: str | None = None) -> ModuleType:
        entry = self.entries.get(model_type) if isinstance(model_type, str) else None
        if entry is None:
            where = f"{source}: " if source else ""
            raise FormatError(f"{where}unsupported model_type {model_type!r}; supported: "
                              f"{', '.join(self.entries)}")
        name = entry.module if "." in entry.module else f"{__package__}.{entry.module}"
        return importlib.import_module(name)

    def model_class(self, model_type: str) -> type:
        return self.module(model_type).Model

    def for_model_type(self, model_type: Any, source: str) -> Architecture:
        return self.module(model_type, source).architecture(model_type)

    def for_gguf(self, gguf_arch: Any, source: str, experts: bool = False) -> Architecture:
        """experts: the file sets {arch}.expert_count; where one llama.cpp name covers a dense
        and an expert family ("llama": llama and mixtral) it picks the family."""
        types = [t for t, e in self.entries.items() if e.gguf_arch and e.gguf_arch == gguf_arch]
        if not types:
            known = dict.fromkeys(e.gguf_arch for e in self.entries.values() if e.gguf_arch)
            raise FormatError(f"{source}: unsupported GGUF architecture {gguf_arch!r}; "
                              f"supported: {', '.join(k for k in known if k)}")
        picked = [t for t in types if self.entries[t].gguf_experts == experts] or types
        return self.for_model_type(picked[0], source)

    def hf_class(self, model_type: str) -> str:
        self.module(model_type)  # raises for an unknown type
        return self.entries[model_type].hf_class


REGISTRY = ModelRegistry(ARCHITECTURES)


def model_class(model_type: str) -> type:
    """The Model class for an HF model_type.

    Raises:
        FormatError (a ValueError): unknown model_type, listing the supported ones.
    """
    return REGISTRY.model_class(model_type)


def open_model(path: str) -> ModelSource:
    """loaders.open_model with this registry: a model directory or .gguf file, indexed and
    checked against its architecture's tensors (headers only, no tensor data)."""
    return _open_model(path, REGISTRY)
