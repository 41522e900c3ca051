"""A model's own sampling defaults: generation_config.json (HF) or general.sampling.* (GGUF).

Servers take a request's unset sampling fields from them, as HF and vLLM do, so a model whose
makers ship "temperature": 0.6 is not run at OpenAI's 1.0. Only the fields every sampler here
understands are read; a present but mistyped one is a FormatError naming it.
"""

from __future__ import annotations

import os
from typing import Any

from stream_run.loaders.errors import FormatError

# our name -> (generation_config.json key, GGUF key, lowest, highest)
FIELDS = {
    "temperature": ("temperature", "general.sampling.temp", 0.0, 2.0),
    "top_p": ("top_p", "general.sampling.top_p", 0.0, 1.0),
    "top_k": ("top_k", "general.sampling.top_k", 0, 1 << 31),
    "min_p": ("min_p", "general.sampling.min_p", 0.0, 0.999),
    "repetition_penalty": ("repetition_penalty", "general.sampling.penalty_repeat", 0.01, 10.0),
}


def _checked(values: dict[str, Any], key_of: dict[str, str], source: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, key in key_of.items():
        value = values.get(key)
        if value is None:
            continue
        lo, hi = FIELDS[name][2], FIELDS[name][3]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
            raise FormatError(f"{source}: field {key!r} must be a number in [{lo:g}, {hi:g}], "
                              f"got {value!r}")
        out[name] = int(value) if name == "top_k" else float(value)
    return out


def defaults_from_dir(model_dir: str) -> dict[str, float]:
    """generation_config.json's sampling fields ({} when the file is absent)."""
    from stream_run.loaders.hf import read_json

    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.exists(path):
        return {}
    return _checked(read_json(path), {n: f[0] for n, f in FIELDS.items()}, path)


def defaults_from_gguf(metadata: dict[str, Any], path: str) -> dict[str, float]:
    """llama.cpp's general.sampling.* keys ({} when the file has none)."""
    return _checked(metadata, {n: f[1] for n, f in FIELDS.items()}, path)
