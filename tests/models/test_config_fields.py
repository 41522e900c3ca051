"""Config fields read the way transformers writes them, and refused by name where a model
cannot honour them (found in review: each was silently wrong or failed with a bare error)."""

from __future__ import annotations

import asyncio
import json

import pytest

from stream_run.engine import Engine, EngineConfig
from stream_run.loaders import FormatError
from tests.tiny_models import write_tiny_model


def open_engine(path):
    return asyncio.run(Engine.open(str(path), EngineConfig(backend="numpy")))


def rewrite_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))


def test_transformers5_rope_parameters_give_theta(tmp_path):
    write_tiny_model(tmp_path, "qwen2")
    rewrite_config(tmp_path, rope_theta=None,
                   rope_parameters={"rope_type": "default", "rope_theta": 123456.0})
    engine = open_engine(tmp_path)
    try:
        assert engine.spec.rope_theta == 123456.0
    finally:
        engine.close()


@pytest.mark.parametrize("params,match", [
    ({"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
     "partial rotary embeddings"),
    ({"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4, "partial_rotary_factor": 0.5},
     "partial rotary embeddings"),
    ({"full_attention": {"rope_type": "default", "rope_theta": 1e6},
      "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}, "per layer type"),
])
def test_llama_refuses_rope_parameters_it_cannot_honour(tmp_path, params, match):
    write_tiny_model(tmp_path, "llama")
    rewrite_config(tmp_path, rope_theta=None, rope_parameters=params)
    with pytest.raises(FormatError, match=match):
        open_engine(tmp_path)


@pytest.mark.parametrize("field,value", [("use_sliding_window", "false"),
                                         ("sliding_window", "4096"), ("layer_types", "full"),
                                         ("tie_word_embeddings", 1)])
def test_mistyped_optional_fields_are_named(tmp_path, field, value):
    write_tiny_model(tmp_path, "qwen3")
    rewrite_config(tmp_path, **{field: value})
    with pytest.raises(FormatError, match=rf"config.json: field '{field}' must be"):
        open_engine(tmp_path)
