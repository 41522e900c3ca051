"""Model registry: HF model_type -> model implementation (mlx-lm style alias table)."""

from __future__ import annotations

import importlib

# model_type -> module in engine.models; one file per architecture family.
MODEL_MODULES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama"}


def model_class(model_type: str) -> type:
    """The Model class for an HF model_type.

    Raises:
        ValueError: unknown model_type, listing the supported ones.
    """
    name = MODEL_MODULES.get(model_type)
    if name is None:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(MODEL_MODULES)}"
        )
    return importlib.import_module(f".{name}", __package__).Model
