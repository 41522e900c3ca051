"""A short run of the header fuzzer (python -m stream_run.bench.fuzz_headers runs the long
one): mutated GGUF, safetensors, config.json, manifest.json, tokenizer.json,
tokenizer_config.json and GGUF tokenizer.ggml.* metadata end in a project error or open
cleanly, never in another exception or a stall."""

from stream_run.bench.fuzz_headers import fuzz


def test_mutated_headers_give_only_loader_errors():
    result = fuzz(inputs=300, seed=1)
    assert len(result["inputs"]) == 7 and min(result["inputs"].values()) >= 300
    assert result["unexpected"] == {}, result["examples"]
