"""stream-serve driven by the official openai client on localhost: chat and completions,
streaming and not, concurrent streams batched, disconnects, loading, and the CLI."""

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest

from stream_run.engine import Engine, EngineConfig
from stream_run.server.app import ServerConfig
from tests.server.harness import ServerThread
from tests.tiny_models import write_tiny_model

KEY = "test-key"
NAME = "tiny"
PROMPTS = ["hello world", "the quick brown fox", "what is the capital of france",
           "numbers 0 1 2 3", "tokens are pieces", "streaming layers from disk",
           "paris is the", "large models run on small machines"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve")
    write_tiny_model(path, "llama", n_layers=4)
    return path


@pytest.fixture(scope="module")
def server(model):
    probe = asyncio.run(Engine.open(str(model), EngineConfig(backend="numpy")))
    budget = max(probe.model_bytes // 2, 4 * probe.min_budget_bytes)  # layers stream
    probe.close()
    srv = ServerThread.for_model(model, ServerConfig(NAME, api_key=KEY, max_tokens_cap=64),
                                 memory_budget_bytes=budget, max_batch=8)
    engine = srv.wait_loaded()
    engine.reader.fault_hook = lambda *a: time.sleep(0.0005)  # passes last long enough to overlap
    yield srv
    srv.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0,
                         timeout=60)


def chat(client, content, **kw):
    return client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": content}], **kw)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list()] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    status, body = server.request("GET", "/health", key="")
    assert status == 200 and body["status"] == "ok" and body["model"] == NAME


def test_chat_non_streaming_and_streaming_agree(server, client):
    full = chat(client, PROMPTS[0], max_tokens=20, temperature=0)
    assert full.object == "chat.completion" and full.model == NAME
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    want = server.call(server.engine.complete([{"role": "user", "content": PROMPTS[0]}],
                                              max_tokens=20))
    assert choice.message.content == want.text and choice.finish_reason == want.finish_reason
    assert full.usage.completion_tokens == len(want.token_ids)
    assert full.usage.prompt_tokens == want.usage.prompt_tokens
    assert full.usage.total_tokens == want.usage.total_tokens

    chunks = list(chat(client, PROMPTS[0], max_tokens=20, temperature=0, stream=True,
                       stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == want.finish_reason and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_stop_seed_and_token_prompts(server, client):
    full = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=16,
                                     temperature=0)
    assert full.object == "text_completion" and full.usage.completion_tokens > 0
    text = full.choices[0].text
    streamed = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=16,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text
    if len(text) > 4:
        stop = text[2:4]
        cut = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=16,
                                        temperature=0, stop=[stop])
        assert cut.choices[0].finish_reason == "stop"
        assert cut.choices[0].text == text[:text.index(stop)]
    ids = server.engine.tokenizer.encode(PROMPTS[1])
    by_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=16, temperature=0)
    assert by_ids.choices[0].text == text
    a, b = (client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=16,
                                      temperature=1.0, top_p=0.95, seed=42) for _ in range(2))
    assert a.choices[0].text == b.choices[0].text


def test_eight_concurrent_streams_match_each_alone(server, client):
    alone = [chat(client, p, max_tokens=24, temperature=0).choices[0].message.content
             for p in PROMPTS]
    n_passes = len(server.engine.batcher.passes)

    async def stream(aclient, prompt):
        out = []
        async for c in await aclient.chat.completions.create(
                model=NAME, messages=[{"role": "user", "content": prompt}], max_tokens=24,
                temperature=0, stream=True):
            if c.choices and c.choices[0].delta.content:
                out.append(c.choices[0].delta.content)
        return "".join(out)

    async def all_at_once():
        async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key=KEY,
                                      max_retries=0, timeout=60) as aclient:
            return await asyncio.gather(*(stream(aclient, p) for p in PROMPTS))

    together = asyncio.run(all_at_once())
    assert together == alone
    passes = list(server.engine.batcher.passes)[n_passes:]
    assert max(r.n_seqs for r in passes) >= 4  # they shared passes
    server.wait_idle()
    assert server.engine.batcher.kv_bytes == 0


def test_disconnected_client_frees_its_slot(server, client):
    engine = server.engine
    cancelled = engine.batcher.finished["cancelled"]
    gate = threading.Event()
    gate.set()
    engine.reader.fault_hook = lambda *a: gate.wait(30)
    conn = socket.create_connection(("127.0.0.1", server.port))
    try:
        body = json.dumps({"model": NAME, "messages": [{"role": "user", "content": "hi"}],
                           "max_tokens": 64, "temperature": 0, "stream": True}).encode()
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        got = b""
        while got.count(b"data:") < 3:  # the role chunk and two tokens: it is decoding
            got += conn.recv(65536)
        gate.clear()  # the next read stalls, so the request is still running when we leave
        assert engine.batcher.n_active == 1 and engine.batcher.kv_bytes > 0
        conn.close()
        server.wait_idle()  # the pass is cancelled while its read is still blocked
        assert engine.batcher.finished["cancelled"] == cancelled + 1
        assert engine.batcher.kv_bytes == 0 and engine.scheduler._inflight == {}
    finally:
        gate.set()
        conn.close()
        engine.reader.fault_hook = lambda *a: time.sleep(0.0005)
    assert chat(client, "hi", max_tokens=4, temperature=0).usage.completion_tokens >= 1


def test_models_answer_while_the_model_loads(model):
    gate = threading.Event()

    async def slow_open():
        await asyncio.to_thread(gate.wait, 30)
        return await Engine.open(str(model), EngineConfig(backend="numpy"))

    srv = ServerThread(ServerConfig(NAME), slow_open)
    try:
        assert srv.request("GET", "/v1/models")[1]["data"][0]["id"] == NAME
        assert srv.request("GET", "/health") == (503, {"status": "loading"})
        status, body = srv.request("POST", "/v1/chat/completions", {
            "model": NAME, "messages": [{"role": "user", "content": "hi"}]})
        assert status == 503 and body["error"]["code"] == "model_loading"
        gate.set()
        srv.wait_loaded()
        status, body = srv.request("POST", "/v1/completions",
                                   {"model": NAME, "prompt": "hi", "max_tokens": 2})
        assert status == 200 and body["usage"]["completion_tokens"] >= 1
    finally:
        gate.set()
        srv.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stream_serve_cli(model):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "stream_run.cli.serve", str(model), "--port",
                             str(port), "--backend", "numpy", "--model-name", NAME],
                            stderr=subprocess.PIPE, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                               max_retries=0, timeout=30)
        deadline = time.monotonic() + 60
        while True:
            try:
                reply = client.completions.create(model=NAME, prompt="hello", max_tokens=3)
                break
            except (openai.APIConnectionError, openai.InternalServerError):
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
        assert reply.usage.completion_tokens >= 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130  # 128 + SIGINT, as shells report Ctrl-C
        assert "ready (llama, 4 layers" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_stream_serve_cli_reports_a_bad_model(tmp_path):
    (tmp_path / "empty").mkdir()
    for model in (tmp_path / "missing", tmp_path / "empty"):
        proc = subprocess.run([sys.executable, "-m", "stream_run.cli.serve", str(model),
                               "--port", str(_free_port())],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("stream-serve: error:") and str(model) in last
        message = last.removeprefix("stream-serve: error: ")
        assert proc.stderr.count(message) == 1  # said once, not logged and printed


@pytest.mark.slow
def test_smollm2_chat_end_to_end(smollm2_gguf):
    srv = ServerThread.for_model(smollm2_gguf, ServerConfig("smollm2"))
    try:
        srv.wait_loaded()
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "What is the capital of "
                                        "France?"}], max_tokens=24, temperature=0)
        assert "Paris" in reply.choices[0].message.content
        assert reply.choices[0].finish_reason == "stop"
    finally:
        srv.close()



@pytest.mark.parametrize("flags,message", [
    (["--max-batch", "0"], "--max-batch must be >= 1"),
    (["--max-queue", "-1"], "--max-queue must be >= 0"),
    (["--max-n", "0"], "--max-n must be >= 1"),
    (["--max-body", "lots"], "--max-body: not a size"),
    (["--memory-budget", "1KB"], "memory budget"),
])
def test_stream_serve_flag_errors(model, capsys, flags, message):
    from stream_run.cli import serve

    assert serve.main([str(model), "--port", "0", *flags]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("stream-serve: error:") and message in last
