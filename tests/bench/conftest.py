"""Small synthetic models and helpers shared by the stream-bench tests."""

from __future__ import annotations

import json

import pytest

from stream_run.bench.synth import SynthSpec, synthesize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session")
def small_model(tmp_path_factory) -> str:
    """4 blocks of 0.5 MB (float32): every study runs on it in well under a second."""
    out = tmp_path_factory.mktemp("bench") / "small"
    synthesize(SynthSpec(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                         dtype="f32"), str(out))
    return str(out)


@pytest.fixture(scope="session")
def streaming_model(tmp_path_factory) -> str:
    """8 blocks of 26 MB (bf16, 214 MB): reads take longer than compute, and each read is
    long next to a thread wake-up on a loaded machine."""
    out = tmp_path_factory.mktemp("bench") / "streaming"
    synthesize(SynthSpec(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=16, vocab_size=2048),
               str(out))
    return str(out)


def read_records(path, kind: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    return [r for r in rows if kind is None or r["kind"] == kind]


def assert_png(path) -> None:
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC, path
    assert 1000 < path.stat().st_size < 400_000, path


def assert_meta(meta: dict) -> None:
    for key in ("time", "os", "cpu", "cpus", "ram_bytes", "python", "numpy", "git", "root",
                "loadavg", "transparent_hugepages"):
        assert key in meta, key
    assert meta["git"] and meta["cpus"] >= 1


def assert_one_line_error(capsys, match: str) -> None:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("stream-bench"), err
    assert match.lower() in err.lower(), err
