"""Tools and response_format json_object in stream-serve (issue 20 item 4).

The prompt side is real: tools and tool-call turns go through a Qwen 2.5 (Hermes) and a
Llama 3.1 style chat template, and the ids the engine is given must be HF transformers'
rendering of the same request. A tiny random model writes no tool calls, so the answers are
scripted: engine.submit is replaced by a generation that yields given text pieces."""

from __future__ import annotations

import json
import pathlib

import openai
import pytest

from stream_run.engine.request import Chunk
from stream_run.engine.stats import GenerationStats
from stream_run.server.app import ServerConfig
from stream_run.server.tools import ToolStream, parse_tool_calls
from tests.server.harness import ServerThread
from tests.tiny_models import write_tiny_model

NAME = "tiny"
DATA = pathlib.Path(__file__).parent / "data"
QWEN = (DATA / "qwen2_5_tools.jinja").read_text()  # Qwen 2.5's tool parts (Hermes format)
LLAMA = (DATA / "llama3_1_tools.jinja").read_text()  # Llama 3.1's JSON tool calls, shortened
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CONVERSATION = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp_c\": 18}"},
    {"role": "user", "content": "And in Rome?"},
]


def write_with_template(path, template: str):
    write_tiny_model(path, "llama", n_layers=1,
                     config_overrides={"max_position_embeddings": 2048})
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module", params=["qwen", "llama"])
def family(request, tmp_path_factory):
    path = write_with_template(tmp_path_factory.mktemp(request.param),
                               QWEN if request.param == "qwen" else LLAMA)
    srv = ServerThread.for_model(path, ServerConfig(NAME, max_tokens_cap=32))
    srv.wait_loaded()
    yield request.param, path, srv
    srv.close()


class Scripted:
    """A Generation that yields the given text pieces, then finishes with reason."""

    def __init__(self, ids: list[int], pieces: list[str], reason: str) -> None:
        stats = GenerationStats(prompt_tokens=len(ids), generation_tokens=len(pieces))
        self.chunks = [Chunk(p, [5]) for p in pieces] + [Chunk("", [], reason, stats)]

    async def __aenter__(self) -> Scripted:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass

    def __aiter__(self) -> Scripted:
        return self

    async def __anext__(self) -> Chunk:
        if not self.chunks:
            raise StopAsyncIteration
        return self.chunks.pop(0)


@pytest.fixture
def script(family, monkeypatch):
    """script(pieces, reason="stop"): the next generations answer with those pieces; returns
    the prompt ids each got."""
    engine = family[2].engine
    seen: list[list[int]] = []

    def set_script(pieces: list[str], reason: str = "stop") -> list[list[int]]:
        def submit(ids, params=None, **kw):
            seen.append(list(ids))
            return Scripted(list(ids), pieces, reason)
        monkeypatch.setattr(engine, "submit", submit)
        return seen

    return set_script


@pytest.fixture
def client(family):
    return openai.OpenAI(base_url=family[2].base_url + "/v1", api_key="x", max_retries=0,
                         timeout=60)


def chat(client, messages=CONVERSATION, **kw):
    return client.chat.completions.create(model=NAME, messages=messages, tools=[WEATHER, TIME],
                                          max_tokens=16, **kw)


def pieces(text: str, n: int = 3) -> list[str]:
    return [text[i:i + n] for i in range(0, len(text), n)]


def call_text(fam: str, name: str, args: dict) -> str:
    if fam == "qwen":
        return f"<tool_call>\n{json.dumps({'name': name, 'arguments': args})}\n</tool_call>"
    return json.dumps({"name": name, "parameters": args})


def test_tools_and_tool_turns_render_as_hf_does(family, script, client):
    transformers = pytest.importorskip("transformers")
    fam, path, srv = family
    seen = script(["Hello"])
    chat(client)
    hf = transformers.AutoTokenizer.from_pretrained(str(path))
    hf_messages = [dict(m) for m in CONVERSATION]
    hf_messages[1] = {**CONVERSATION[1], "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    want = hf.apply_chat_template(hf_messages, tools=[WEATHER, TIME], tokenize=False,
                                  add_generation_prompt=True)
    assert "get_time" in want and '"city": "Paris"' in want
    assert srv.engine.tokenizer.decode(seen[-1]) == want


def test_a_tool_call_comes_back_as_tool_calls(family, script, client):
    fam = family[0]
    answer = call_text(fam, "get_weather", {"city": "Rome"})
    script(pieces(answer))
    out = chat(client)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Rome"}

    script(pieces(answer, 2))
    calls: dict[int, dict] = {}
    content, finish = "", None
    for chunk in chat(client, stream=True):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert content == "" and finish == "tool_calls"
    assert [c["name"] for c in calls.values()] == ["get_weather"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Rome"}


def test_text_before_hermes_calls_and_two_calls(family, script, client):
    if family[0] != "qwen":
        pytest.skip("the Llama 3 JSON format has no text beside its calls")
    answer = ("Let me look both up.\n" + call_text("qwen", "get_weather", {"city": "Rome"})
              + "\n" + call_text("qwen", "get_time", {"city": "Rome"}))
    script(pieces(answer, 4))
    out = chat(client)
    assert out.choices[0].message.content == "Let me look both up."
    assert [c.function.name for c in out.choices[0].message.tool_calls] == ["get_weather",
                                                                           "get_time"]
    script(pieces(answer, 4))
    streamed = list(chat(client, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in streamed)
    assert text.strip() == "Let me look both up."
    first_call = next(i for i, c in enumerate(streamed) if c.choices[0].delta.tool_calls)
    assert any(c.choices[0].delta.content for c in streamed[:first_call])  # text went first
    names = [tc.function.name for c in streamed for tc in c.choices[0].delta.tool_calls or []]
    assert names == ["get_weather", "get_time"]


@pytest.mark.parametrize("answer", ["The weather is fine.", '{"answer": 42}',
                                    "<tool_call>\n{not json}\n</tool_call>", "{broken"])
def test_answers_that_are_not_calls_stay_content(family, script, client, answer):
    script(pieces(answer))
    out = chat(client)
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].message.content == answer and not out.choices[0].message.tool_calls
    script(pieces(answer))
    text = "".join(c.choices[0].delta.content or "" for c in chat(client, stream=True))
    assert text == answer


def test_tool_choice_none_renders_no_tools(family, script, client):
    seen = script(call_text(family[0], "get_weather", {"city": "Rome"}).split(" "))
    out = chat(client, tool_choice="none")
    assert out.choices[0].finish_reason == "stop" and not out.choices[0].message.tool_calls
    assert "get_time" not in family[2].engine.tokenizer.decode(seen[-1])


JSON_ASK = [{"role": "user", "content": "Answer in JSON."}]


def test_json_object_answers_are_constrained(family, client):
    """The real (random) model under the constraint: an answer that ends is a JSON object, one
    cut by max_tokens is a prefix of one."""
    finishes = set()
    for seed in range(4):
        for stream in (False, True):
            kw = {"model": NAME, "messages": JSON_ASK, "max_tokens": 32, "seed": seed,
                  "temperature": 1.0 if seed else 0.0,
                  "response_format": {"type": "json_object"}}
            if stream:
                chunks = list(client.chat.completions.create(**kw, stream=True))
                text = "".join(c.choices[0].delta.content or "" for c in chunks)
                finish = chunks[-1].choices[0].finish_reason
            else:
                out = client.chat.completions.create(**kw)
                text, finish = out.choices[0].message.content, out.choices[0].finish_reason
            finishes.add(finish)
            if finish == "stop":
                assert isinstance(json.loads(text), dict), text
            else:
                assert finish == "length" and text.lstrip().startswith("{"), text


@pytest.mark.slow
def test_smollm2_json_object(smollm2_gguf):
    srv = ServerThread.for_model(smollm2_gguf, ServerConfig("smollm2"))
    try:
        srv.wait_loaded()
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0,
                               timeout=300)
        messages = [{"role": "system", "content": "You answer in JSON."},
                    {"role": "user", "content": "What is the capital of France?"}]
        free = client.chat.completions.create(model="smollm2", max_tokens=60, temperature=0,
                                              messages=messages)
        out = client.chat.completions.create(model="smollm2", max_tokens=60, temperature=0,
                                             messages=messages,
                                             response_format={"type": "json_object"})
        print(f"\nSmolLM2, free: {free.choices[0].message.content!r}; json_object: "
              f"{out.choices[0].message.content!r}")
        assert not free.choices[0].message.content.lstrip().startswith("{")  # prose
        assert out.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(out.choices[0].message.content), dict)
    finally:
        srv.close()


@pytest.mark.parametrize("deltas,content,calls", [
    (["Hi ", "<tool", "s> are ", "fine"], "Hi <tools> are fine", []),
    (["  {", '"name": "f", "arguments": {}}'], "", ["f"]),
    (["<|python_", 'tag|>{"name": "f", "parameters": {"a": 1}}'], "", ["f"]),
    (["<|pyth", "on is nice"], "<|python is nice", []),
    (['{"name": "g", "arguments": {}}'], '{"name": "g", "arguments": {}}', []),  # unknown name
    (["a<tool_call>", '{"name": "x", "arguments": {}}', "</tool_call>b"], "ab", ["x"]),
])
def test_tool_stream(deltas, content, calls):
    ts = ToolStream({"f"})
    sent = "".join(ts.feed(d) for d in deltas)
    rest, got = ts.finish()
    assert sent + rest == content
    assert [c["name"] for c in got] == calls
    assert parse_tool_calls("".join(deltas), {"f"})[1] == got
