"""In mmap mode every pass first measures the model's files: a file truncated between two
generations is the project's ReadError for an API caller (resident units' mapped pages would
raise SIGBUS when touched), and the engine serves again once the file is restored."""

from __future__ import annotations

import asyncio
import os
import shutil

import pytest

from stream_run.engine import Engine, EngineConfig, GenerationParams
from stream_run.loaders import LoaderConfig, ReadError
from tests.tiny_models import write_tiny_model


def test_a_truncated_file_is_a_read_error_before_the_next_pass(tmp_path):
    write_tiny_model(tmp_path / "m", "llama", n_layers=2)
    path = tmp_path / "m" / "model.safetensors"

    async def go():
        engine = await Engine.open(str(tmp_path / "m"), EngineConfig(
            backend="numpy", loader=LoaderConfig(read_mode="mmap")))  # every unit resident
        try:
            params = GenerationParams(max_tokens=4, ignore_eos=True)
            first = await engine.complete([5, 6, 7], params)
            shutil.copy(path, f"{path}.bak")
            os.truncate(path, os.path.getsize(path) // 2)
            with pytest.raises(ReadError, match=rf"{path}: the file was truncated while the "
                                                r"engine ran"):
                await engine.complete([5, 6, 7], params)
            shutil.copy(f"{path}.bak", path)  # restored in place
            again = await engine.complete([5, 6, 7], params)
            return first.token_ids, again.token_ids
        finally:
            await engine.aclose()

    first, again = asyncio.run(go())
    assert first == again
