"""Bad input over raw HTTP: each gets a 4xx with an OpenAI error object, and the server keeps
serving; a full queue answers 429."""

import asyncio
import threading
import time

import pytest

from stream_run.engine import Engine, EngineConfig
from stream_run.server.app import ServerConfig
from tests.server.harness import ServerThread
from tests.tiny_models import write_tiny_model

KEY = "sekret"
NAME = "tiny"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "hello"}]
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("errors")
    write_tiny_model(path, "llama", n_layers=2)  # max_position_embeddings 256
    return path


@pytest.fixture(scope="module")
def server(model):
    srv = ServerThread.for_model(model, ServerConfig(NAME, api_key=KEY, max_tokens_cap=32,
                                                     max_body_bytes=MAX_BODY))
    srv.wait_loaded()
    yield srv
    srv.close()


def chat_body(**kw):
    return {"model": NAME, "messages": MESSAGES, "max_tokens": 4, **kw}


def assert_serves(server):
    status, body = server.request("POST", CHAT, chat_body())
    assert status == 200, body
    assert body["choices"][0]["message"]["role"] == "assistant"


def assert_error(status, body, want_status, param=None, code=None, match=""):
    assert status == want_status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and match in err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code


BAD_CHAT = [
    ({"messages": MESSAGES}, 400, "model", None, "'model'"),
    (chat_body(model=7), 400, "model", None, "'model'"),
    (chat_body(model="gpt-4"), 404, "model", "model_not_found", "gpt-4"),
    (chat_body(messages=[]), 400, "messages", None, "non-empty"),
    (chat_body(messages="hello"), 400, "messages", None, "non-empty"),
    (chat_body(messages=[{"role": "assistant", "content": None, "tool_calls": [{"x": 1}]}]),
     400, "messages[0].tool_calls[0]", None, "function"),
    (chat_body(messages=[{"role": "user"}]), 400, "messages[0].content", None, ""),
    (chat_body(messages=[{"role": "wizard", "content": "x"}]), 400, "messages[0].role", None,
     "wizard"),
    (chat_body(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400,
     "messages[0].content", None, "text"),
    (chat_body(max_tokens=-1), 400, "max_tokens", None, "positive"),
    (chat_body(max_tokens=0), 400, "max_tokens", None, "positive"),
    (chat_body(max_tokens="10"), 400, "max_tokens", None, "positive"),
    (chat_body(max_tokens=10**9), 400, "max_tokens", None, "limit of 32"),
    (chat_body(max_completion_tokens=1.5), 400, "max_completion_tokens", None, ""),
    (chat_body(temperature="hot"), 400, "temperature", None, "number"),
    (chat_body(temperature=5), 400, "temperature", None, "[0, 2]"),
    (chat_body(top_p=-0.1), 400, "top_p", None, ""),
    (chat_body(seed="x"), 400, "seed", None, "integer"),
    (chat_body(seed=True), 400, "seed", None, "integer"),
    (chat_body(stream="yes"), 400, "stream", None, "boolean"),
    (chat_body(stream_options=[]), 400, "stream_options", None, ""),
    (chat_body(stop=5), 400, "stop", None, "string"),
    (chat_body(stop=["a", "b", "c", "d", "e"]), 400, "stop", None, "4"),
    (chat_body(n=9), 400, "n", None, "[1, 8]"),  # above the server's cap (--max-n)
    (chat_body(n=0), 400, "n", None, "[1, 8]"),
    (chat_body(n="2"), 400, "n", None, "integer"),
    ([1, 2, 3], 400, None, None, "JSON object"),
    (chat_body(logprobs="yes"), 400, "logprobs", None, "boolean"),
    (chat_body(logprobs=True, top_logprobs=21), 400, "top_logprobs", None, "[0, 20]"),
    (chat_body(logprobs=True, top_logprobs=-1), 400, "top_logprobs", None, "[0, 20]"),
    (chat_body(logprobs=True, top_logprobs=2.5), 400, "top_logprobs", None, "integer"),
    (chat_body(top_logprobs=3), 400, "top_logprobs", None, "needs 'logprobs'"),
    (chat_body(tools="get_weather"), 400, "tools", None, "array"),
    (chat_body(tools=[{"type": "function", "function": {"name": "f", "parameters": "{not"}}]),
     400, "tools[0].function.parameters", None, "not JSON"),
    (chat_body(tools=[{"type": "function", "function": {"name": "f", "parameters": [1]}}]),
     400, "tools[0].function.parameters", None, "JSON Schema object"),
    (chat_body(tools=[{"type": "function", "function": {"name": "no spaces"}}]), 400,
     "tools[0].function.name", None, "letters"),
    (chat_body(tools=[{"name": "f"}]), 400, "tools[0]", None, "function"),
    # a well-formed tool for a template that never reads `tools` (the tiny ChatML one)
    (chat_body(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools", None,
     "does not render tools"),
    (chat_body(tool_choice="auto"), 400, "tool_choice", None, "no 'tools'"),
    (chat_body(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="required"),
     400, "tool_choice", None, "forcing a call is not supported"),
    (chat_body(functions=[{"name": "f"}]), 400, "functions", None, "deprecated"),
    (chat_body(response_format={"type": "json_object"}), 400, "messages", None, "json"),
    (chat_body(response_format={"type": "xml"}), 400, "response_format", None, "json_object"),
    (chat_body(response_format={"type": "json_schema", "json_schema": {}}), 400,
     "response_format", None, "only 'json_object'"),
]


@pytest.mark.parametrize("body,status,param,code,match", BAD_CHAT)
def test_bad_chat_requests(server, body, status, param, code, match):
    assert_error(*server.request("POST", CHAT, body), status, param, code, match)
    assert_serves(server)


BAD_COMPLETION = [
    ({"logprobs": 21}, "logprobs", "[0, 20]"), ({"logprobs": True}, "logprobs", "[0, 20]"),
    ({"echo": "yes"}, "echo", "boolean"), ({"max_tokens": 0}, "max_tokens", "positive"),
    ({"echo": True, "max_tokens": -1}, "max_tokens", ">= 0"), ({"n": 9}, "n", "[1, 8]"),
    ({"best_of": 3}, "best_of", "best_of = n"), ({"suffix": "x"}, "suffix", "not supported"),
    ({"prompt": ["a"] * 65}, "prompt", "limit of 64"),
]


@pytest.mark.parametrize("fields,param,match", BAD_COMPLETION)
def test_bad_completion_requests(server, fields, param, match):
    body = {"model": NAME, "prompt": "hello", "max_tokens": 2, **fields}
    assert_error(*server.request("POST", COMPLETIONS, body), 400, param, None, match)
    assert_serves(server)


@pytest.mark.parametrize("prompt,match", [
    ("", "empty"), ([], "non-empty"), ([1, 2, 10**6], "token ids"), (["a", ""], "empty"),
    ([[1, 2], []], "non-empty"), ({"text": "hi"}, "non-empty"), (None, "non-empty")])
def test_bad_completion_prompts(server, prompt, match):
    status, body = server.request("POST", COMPLETIONS,
                                  {"model": NAME, "prompt": prompt, "max_tokens": 2})
    assert_error(status, body, 400, "prompt", None, match)
    assert_serves(server)


def test_malformed_json(server):
    for raw in (b"{not json", b'{"model": "tiny", "messages": [', b"\xff\xfe", b""):
        assert_error(*server.request("POST", CHAT, raw=raw), 400, match="not valid JSON")
    assert_serves(server)


def test_deeply_nested_json_is_a_400_not_a_500(server, caplog):
    raw = b"[" * 20_000 + b"]" * 20_000  # within the test server's 64 KB body limit
    assert_error(*server.request("POST", CHAT, raw=raw), 400, match="nested too deeply")
    assert not [r for r in caplog.records if "RecursionError" in (r.exc_text or "")]
    assert_serves(server)


def test_harmless_defaults_of_unsupported_fields_pass(server):
    status, body = server.request("POST", CHAT, chat_body(logprobs=False, tools=[],
                                                          tool_choice="none"))
    assert status == 200, body


def test_prompt_longer_than_the_context(server):
    long_text = "hello world " * 300  # > 256 tokens
    assert_error(*server.request("POST", CHAT, chat_body(
        messages=[{"role": "user", "content": long_text}])), 400, "messages",
        "context_length_exceeded", "context is 256 tokens")
    assert_error(*server.request("POST", COMPLETIONS, {
        "model": NAME, "prompt": list(range(250)), "max_tokens": 10}), 400, "prompt",
        "context_length_exceeded")
    assert_serves(server)


def test_oversized_body(server):
    body = chat_body(messages=[{"role": "user", "content": "x" * (2 * MAX_BODY)}])
    assert_error(*server.request("POST", CHAT, body), 413, code="request_too_large",
                 match=f"limit of {MAX_BODY} bytes")
    assert_serves(server)


def test_api_key(server):
    assert_error(*server.request("POST", CHAT, chat_body(), key="wrong"), 401,
                 code="invalid_api_key")
    status, body = server.request("GET", "/v1/models", key="")
    assert_error(status, body, 401, code="invalid_api_key")
    assert server.request("GET", "/health", key="")[0] == 200  # health needs no key
    assert_serves(server)


def test_unknown_endpoint_and_method(server):
    assert_error(*server.request("POST", "/v1/embeddings", {}), 404, code="not_found")
    assert_error(*server.request("GET", CHAT), 405, code="method_not_allowed")
    assert_error(*server.request("GET", "/v1/models/gpt-4"), 404, code="model_not_found")
    assert_serves(server)


def test_full_queue_answers_429(model):
    probe = asyncio.run(Engine.open(str(model), EngineConfig(backend="numpy")))
    budget = max(probe.model_bytes // 2, 4 * probe.min_budget_bytes)  # every pass reads
    probe.close()
    srv = ServerThread.for_model(model, ServerConfig(NAME, max_tokens_cap=200),
                                 memory_budget_bytes=budget, max_batch=1, max_queue=0)
    engine = srv.wait_loaded()
    gate = threading.Event()
    engine.reader.fault_hook = lambda *a: gate.wait(30)  # reads stall until the gate opens
    first: dict = {}
    running = threading.Thread(target=lambda: first.update(reply=srv.request(
        "POST", COMPLETIONS, {"model": NAME, "prompt": "hello", "max_tokens": 8})))
    running.start()
    try:
        deadline = time.monotonic() + 30
        while engine.batcher.n_active == 0:  # the one slot is taken
            assert time.monotonic() < deadline
            time.sleep(0.005)
        status, err = srv.request("POST", COMPLETIONS,
                                  {"model": NAME, "prompt": "hi", "max_tokens": 2})
        assert_error(status, err, 429, code="rate_limit_exceeded", match="queue is full")
        gate.set()
        running.join(timeout=30)
        assert first["reply"][0] == 200
        status, ok = srv.request("POST", COMPLETIONS, {"model": NAME, "prompt": "hi",
                                                       "max_tokens": 2})
        assert status == 200 and ok["usage"]["completion_tokens"] >= 1
    finally:
        gate.set()
        srv.close()
