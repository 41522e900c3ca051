"""One registry (models/): config model_types, GGUF architectures and Model classes."""

import pytest

from stream_run.loaders import FormatError
from stream_run.models import REGISTRY, model_class
from stream_run.models.rope import inv_freq


def test_every_registered_type_has_a_model_and_an_architecture():
    for model_type in REGISTRY.model_types:
        assert model_class(model_type).__name__ == "Model"
        arch = REGISTRY.for_model_type(model_type, "config.json")
        assert arch.model_type == model_type
        assert REGISTRY.hf_class(model_type).endswith(("ForCausalLM",
                                                       "ForConditionalGeneration"))


def test_gguf_architectures_resolve_to_model_types():
    assert REGISTRY.for_gguf("llama", "x.gguf").model_type == "llama"
    assert REGISTRY.for_gguf("qwen3", "x.gguf").model_type == "qwen3"
    assert REGISTRY.for_gguf("gemma3", "x.gguf").model_type == "gemma3_text"
    with pytest.raises(FormatError, match=r"x.gguf: unsupported GGUF architecture 'gemma9'; "
                                          r"supported: llama, qwen2, qwen3, phi3"):
        REGISTRY.for_gguf("gemma9", "x.gguf")


def test_unknown_model_type_lists_supported():
    with pytest.raises(ValueError, match=r"unsupported model_type 'gpt2'; supported: llama"):
        model_class("gpt2")
    assert REGISTRY.model_types[:11] == ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2",
                                         "gemma3_text", "gemma3", "qwen3_moe", "qwen2_moe",
                                         "mixtral"]
    with pytest.raises(FormatError, match=r"^cfg.json: unsupported model_type 'bert'; "
                                          rf"supported: {', '.join(REGISTRY.model_types)}$"):
        REGISTRY.for_model_type("bert", "cfg.json")


def test_unknown_rope_scaling_is_named():
    with pytest.raises(ValueError, match=r"unsupported rope_scaling type 'yarn'"):
        inv_freq(64, 10000.0, {"rope_type": "yarn", "factor": 4.0})
