import pytest

from stream_run.loaders import SUPPORTED_MODEL_TYPES
from stream_run.models import MODEL_MODULES, model_class
from stream_run.models.rope import inv_freq


def test_loader_and_engine_agree_on_supported_model_types():
    assert set(SUPPORTED_MODEL_TYPES) == set(MODEL_MODULES)


def test_unknown_model_type_lists_supported():
    with pytest.raises(ValueError, match=r"unsupported model_type 'gpt2'; supported: llama"):
        model_class("gpt2")


def test_unknown_rope_scaling_is_named():
    with pytest.raises(ValueError, match=r"unsupported rope_scaling type 'yarn'"):
        inv_freq(64, 10000.0, {"rope_type": "yarn", "factor": 4.0})
