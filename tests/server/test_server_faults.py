"""A disk fault while serving: a 503 naming the file (not a 500 with a traceback), /health in
an error state while it lasts, and correct answers once the file reads again."""

from __future__ import annotations

import asyncio

import pytest

from stream_run.engine import Engine, EngineConfig
from stream_run.server.app import ServerConfig
from tests.server.harness import ServerThread
from tests.tiny_models import write_tiny_model

BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8,
        "temperature": 0}


@pytest.fixture
def server(tmp_path):
    write_tiny_model(tmp_path, "llama", n_layers=4)
    probe = asyncio.run(Engine.open(str(tmp_path), EngineConfig(backend="numpy")))
    budget = probe.model_bytes // 2  # layers stream, so every request reads
    probe.close()
    srv = ServerThread.for_model(tmp_path, ServerConfig("tiny", max_tokens_cap=32),
                                 memory_budget_bytes=budget)
    srv.wait_loaded()
    yield srv
    srv.close()


def fail_reads(path, offset, nbytes):
    raise OSError(5, "Input/output error")


def test_read_fault_is_a_503_and_health_says_so_until_reads_work(server, caplog):
    status, good = server.request("POST", "/v1/chat/completions", BODY)
    assert status == 200
    server.engine.reader.fault_hook = fail_reads
    for stream in (False, True):
        status, body = server.request("POST", "/v1/chat/completions", {**BODY, "stream": stream})
        if stream:  # headers went out first: the error is an event of the stream
            assert status == 200 and "model_read_error" in body and "model.safetensors" in body
        else:
            assert status == 503 and body["error"]["code"] == "model_read_error"
            assert "model.safetensors" in body["error"]["message"]
        health_status, health = server.request("GET", "/health")
        assert health_status == 503 and health["status"] == "error"
    assert not [r for r in caplog.records if r.exc_info]  # one line each, no traceback
    server.engine.reader.fault_hook = None
    status, again = server.request("POST", "/v1/chat/completions", BODY)
    assert status == 200 and again["choices"][0]["message"] == good["choices"][0]["message"]
    assert server.request("GET", "/health")[1]["status"] == "ok"
    server.wait_idle()
    assert server.engine.cache.compute.reserved_bytes == 0
