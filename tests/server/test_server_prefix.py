"""A chat front-end's second turn through stream-serve with --kv-cache-budget (issue 20): the
conversation's earlier tokens come from the prefix cache, usage reports them as OpenAI reports
its prompt caching (prompt_tokens_details.cached_tokens), and the answers are those of a
server without the cache."""

import openai
import pytest

from stream_run.server.app import ServerConfig
from tests.server.harness import ServerThread
from tests.tiny_models import write_tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("prefix")
    write_tiny_model(path, "qwen3", n_layers=2)
    return path


def conversation(model, budget: int):
    srv = ServerThread.for_model(model, ServerConfig("tiny", max_tokens_cap=64),
                                 kv_cache_budget_bytes=budget)
    srv.wait_loaded()
    try:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0,
                               timeout=60)
        messages = [{"role": "user", "content": "hello world what is the capital of france"}]
        replies = []
        for follow_up in ("paris is the capital", "numbers 0 1 2 3"):
            r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6,
                                               temperature=0)
            replies.append(r)
            messages += [{"role": "assistant", "content": r.choices[0].message.content},
                         {"role": "user", "content": follow_up}]
        stream = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=6, temperature=0, stream=True,
            stream_options={"include_usage": True})
        chunks = list(stream)
        return replies, chunks
    finally:
        srv.close()


def test_second_turn_reports_cached_tokens_and_answers_alike(model):
    replies, chunks = conversation(model, 16 << 20)
    first, second = (r.usage for r in replies)
    assert first.prompt_tokens_details.cached_tokens == 0
    # turn 2's prompt starts with turn 1's (the template renders the earlier turn again)
    assert 0 < second.prompt_tokens_details.cached_tokens < second.prompt_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0
    plain, plain_chunks = conversation(model, 0)
    assert [r.choices[0].message.content for r in replies] == \
        [r.choices[0].message.content for r in plain]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(c.choices[0].delta.content or "" for c in plain_chunks if c.choices)
    assert plain_chunks[-1].usage.prompt_tokens_details.cached_tokens == 0


def post(srv, body):
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(srv.base_url + "/v1/prompt_cache", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_prompt_cache_files_through_the_server(model, tmp_path_factory):
    files = tmp_path_factory.mktemp("files")
    other = tmp_path_factory.mktemp("other")
    write_tiny_model(other, "qwen3", n_layers=2, seed=7)
    messages = [{"role": "user", "content": "hello world what is the capital of france"}]

    def serve(path, **options):
        srv = ServerThread.for_model(path, ServerConfig("tiny", max_tokens_cap=64,
                                                        prompt_cache_dir=str(files)), **options)
        srv.wait_loaded()
        return srv, openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)

    srv, client = serve(model, kv_cache_budget_bytes=16 << 20)
    try:
        r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6,
                                           temperature=0)
        status, saved = post(srv, {"action": "save", "name": "conv"})
        assert status == 200 and saved["tokens"] > 0
    finally:
        srv.close()
    srv, client = serve(model)  # a fresh server, no cache budget: loading makes room
    try:
        assert post(srv, {"action": "load", "name": "conv"}) == (
            200, {"name": "conv", "tokens": saved["tokens"]})
        messages += [{"role": "assistant", "content": r.choices[0].message.content},
                     {"role": "user", "content": "and germany"}]
        again = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4,
                                               temperature=0)
        assert again.usage.prompt_tokens_details.cached_tokens > 0
        cut = files / "cut.safetensors"
        cut.write_bytes((files / "conv.safetensors").read_bytes()[:100])
        for body, code, text in [
                ({"action": "load", "name": "cut"}, 400, "cut.safetensors: cannot be read"),
                ({"action": "load", "name": "absent"}, 404, "absent.safetensors: not in"),
                ({"action": "load", "name": "../conv"}, 400, "name must be"),
                ({"action": "drop", "name": "conv"}, 400, "action must be")]:
            status, err = post(srv, body)
            assert status == code and text in err["error"]["message"], err
        assert client.chat.completions.create(model="tiny", messages=messages,
                                              max_tokens=2).choices  # still serving
    finally:
        srv.close()
    srv, client = serve(other)
    try:
        status, err = post(srv, {"action": "load", "name": "conv"})
        assert status == 400 and "conv.safetensors: made for model" in err["error"]["message"]
        assert client.chat.completions.create(model="tiny", messages=messages,
                                              max_tokens=2).choices
    finally:
        srv.close()
