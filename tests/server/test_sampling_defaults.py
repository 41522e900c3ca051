"""Request defaults from the model (generation_config.json, GGUF general.sampling.*), as HF and
vLLM take them; OpenAI's where the model ships none. /v1/models says which apply."""

from __future__ import annotations

import asyncio
import json

import pytest

from stream_run.engine import Engine, EngineConfig
from stream_run.loaders import FormatError
from stream_run.loaders.generation import defaults_from_gguf
from stream_run.server.app import ServerConfig
from tests.server.harness import ServerThread
from tests.tiny_models import write_tiny_model

NAME = "tiny"
CHAT = "/v1/chat/completions"


def serve(path):
    server = ServerThread.for_model(path, ServerConfig(NAME, max_tokens_cap=32))
    server.wait_loaded()
    return server


def ask(server, **kw):
    status, body = server.request("POST", CHAT, {
        "model": NAME, "messages": [{"role": "user", "content": "the quick brown fox"}],
        "max_tokens": 12, **kw})
    assert status == 200, body
    return body["choices"][0]["message"]["content"]


def test_generation_config_sets_unset_fields(tmp_path):
    write_tiny_model(tmp_path, "llama")
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.0, "top_k": 5, "do_sample": False, "max_new_tokens": 9}))
    server = serve(tmp_path)
    try:
        _, card = server.request("GET", "/v1/models")
        assert card["data"][0]["sampling_defaults"] == {"temperature": 0.0, "top_p": 1.0,
                                                         "top_k": 5}
        greedy = ask(server, temperature=0)
        assert {ask(server, seed=s) for s in (1, 2, 3)} == {greedy}  # the model's 0.0
    finally:
        server.close()


def test_without_one_the_openai_defaults_stay(tmp_path):
    write_tiny_model(tmp_path, "llama")
    server = serve(tmp_path)
    try:
        _, card = server.request("GET", "/v1/models")
        assert card["data"][0]["sampling_defaults"] == {"temperature": 1.0, "top_p": 1.0}
        assert len({ask(server, seed=s) for s in (1, 2, 3, 4)}) > 1  # sampled at 1.0
    finally:
        server.close()


def test_a_mistyped_generation_config_field_is_named(tmp_path):
    write_tiny_model(tmp_path, "llama")
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": "hot"}))
    with pytest.raises(FormatError, match=r"generation_config.json: field 'temperature' must "
                                          r"be a number in \[0, 2\], got 'hot'"):
        asyncio.run(Engine.open(str(tmp_path), EngineConfig(backend="numpy")))


def test_gguf_sampling_keys():
    meta = {"general.sampling.temp": 0.6, "general.sampling.top_p": 0.9,
            "general.sampling.top_k": 20}
    assert defaults_from_gguf(meta, "m.gguf") == {"temperature": 0.6, "top_p": 0.9, "top_k": 20}
    with pytest.raises(FormatError, match="m.gguf: field 'general.sampling.top_p'"):
        defaults_from_gguf({"general.sampling.top_p": 7.0}, "m.gguf")
