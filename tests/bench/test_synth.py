"""Synthetic models are real HF checkpoints that the engine (and transformers) can run."""

import asyncio
import json

import numpy as np
import pytest

from stream_run.bench.cli import main as bench_main
from stream_run.bench.synth import SynthSpec, synthesize
from stream_run.engine import Engine, EngineConfig, GenerationParams


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_synthetic_model_runs_in_the_engine(tmp_path, arch):
    spec = SynthSpec(arch=arch, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=300, dtype="bf16")
    out = tmp_path / "m"
    synthesize(spec, str(out), shard_bytes=40_000)  # force several shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    total = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert spec.nbytes <= total < spec.nbytes + 4096 * len(set(index["weight_map"].values()))

    async def run():
        async with await Engine.open(str(out), EngineConfig(backend="numpy")) as eng:
            logits = await eng.logits([1, 2, 3])
            n = 0
            async for chunk in eng.generate("hi", GenerationParams(max_tokens=5,
                                                                   ignore_eos=True)):
                n += len(chunk.token_ids)
            return logits, n

    logits, n = asyncio.run(run())
    assert np.isfinite(logits).all() and logits.std() > 0 and n == 5


def test_cli_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    assert bench_main(["synth", "--shape", "tiny", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_cli_custom_shape_needs_all_fields(tmp_path, capsys):
    rc = bench_main(["synth", "--shape", "custom", "--hidden-size", "64", "--out",
                     str(tmp_path / "x")])
    assert rc == 2 and "--shape custom needs" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_writes_tiny_shape(tmp_path):
    out = tmp_path / "tiny"
    assert bench_main(["synth", "--shape", "tiny", "--dtype", "f16", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 4 and cfg["torch_dtype"] == "float16"
    assert not list(tmp_path.glob(".synth-*"))  # the temp dir was renamed into place
