"""A short run of the header fuzzer (python -m stream_run.bench.fuzz_headers runs the long
one): mutated GGUF, safetensors and config.json files end in a loader error or open cleanly,
never in another exception or a stall."""

from stream_run.bench.fuzz_headers import fuzz


def test_mutated_headers_give_only_loader_errors():
    result = fuzz(inputs=300, seed=1)
    assert min(result["inputs"].values()) >= 300
    assert result["unexpected"] == {}, result["examples"]
