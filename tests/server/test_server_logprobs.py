"""stream-serve's logprobs, echo and n > 1 through the official openai client (issue 20 item 4).
The values are checked against stream-eval's scoring of the same ids (engine/perplexity.py's
token_nll on one forward pass), independent of the engine's logprob code."""

import numpy as np
import openai
import pytest

from stream_run.engine.perplexity import token_nll
from stream_run.server.app import ServerConfig
from tests.server.harness import ServerThread
from tests.tiny_models import write_tiny_model

NAME = "tiny"
PROMPT = "the quick brown fox jumps over"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("logprobs")
    write_tiny_model(path, "llama", n_layers=2)
    srv = ServerThread.for_model(path, ServerConfig(NAME, max_tokens_cap=64, max_n=4),
                                 prefill_chunk=4, max_batch=8)
    srv.wait_loaded()
    yield srv
    srv.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0,
                         timeout=60)


def scored(server, ids):
    """-log p(ids[p + 1] | ids[:p + 1]) for every p, and the log-softmax rows (float64)."""
    logits = server.call(server.engine.logits(ids)).astype(np.float64)
    rows = logits - logits.max(1, keepdims=True)
    rows -= np.log(np.exp(rows).sum(1, keepdims=True))
    return token_nll(logits[:-1], np.asarray(ids[1:])), rows


def test_chat_logprobs_streamed_and_not(server, client):
    messages = [{"role": "user", "content": PROMPT}]
    full = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = full.choices[0].logprobs.content
    assert len(content) == full.usage.completion_tokens
    prompt_ids = server.engine.encode_prompt(messages)
    gen_ids = server.call(server.engine.complete(messages, max_tokens=10)).token_ids
    assert len(gen_ids) == len(content)
    nll, rows = scored(server, prompt_ids + gen_ids)
    want = -nll[len(prompt_ids) - 1:]
    np.testing.assert_allclose([c.logprob for c in content], want, atol=1e-5)
    for i, c in enumerate(content):
        row = rows[len(prompt_ids) - 1 + i]
        assert len(c.top_logprobs) == 3
        np.testing.assert_allclose([t.logprob for t in c.top_logprobs],
                                   np.sort(row)[::-1][:3], atol=1e-5)
        assert c.top_logprobs[0].token == c.token  # greedy
        assert bytes(c.bytes).decode("utf-8", "replace") == c.token
    # the tokens' bytes make the answer (a token may hold part of a UTF-8 character)
    raw = b"".join(bytes(c.bytes) for c in content)
    assert raw.decode("utf-8", "replace") == full.choices[0].message.content

    chunks = list(client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=10, temperature=0, logprobs=True,
        top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(c.token, c.logprob) for c in content]

    plain = client.chat.completions.create(model=NAME, messages=messages, max_tokens=4,
                                           temperature=0)
    assert plain.choices[0].logprobs is None
    only = client.chat.completions.create(model=NAME, messages=messages, max_tokens=4,
                                          temperature=0, logprobs=True)
    assert all(c.top_logprobs == [] for c in only.choices[0].logprobs.content)


def test_completions_echo_scores_the_prompt(server, client):
    ids = server.engine.tokenizer.encode(PROMPT)
    nll, rows = scored(server, ids)
    for max_tokens in (0, 1):
        out = client.completions.create(model=NAME, prompt=ids, max_tokens=max_tokens,
                                        temperature=0, echo=True, logprobs=2)
        choice = out.choices[0]
        lp = choice.logprobs
        assert len(lp.tokens) == len(ids) + max_tokens
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        np.testing.assert_allclose(lp.token_logprobs[1:len(ids)], -nll, atol=1e-5)
        for p in range(1, len(ids)):
            assert len(lp.top_logprobs[p]) <= 2
            np.testing.assert_allclose(max(lp.top_logprobs[p].values()), rows[p - 1].max(),
                                       atol=1e-5)
        assert choice.text.startswith(server.engine.tokenizer.decode(ids))
        assert lp.text_offset[0] == 0
        assert lp.text_offset[-1] + len(lp.tokens[-1]) == len(choice.text)
        assert out.usage.prompt_tokens == len(ids)
        assert out.usage.completion_tokens == max_tokens
        assert choice.finish_reason == "length"
    last = lp.token_logprobs[-1]  # the greedy token's: the scoring pass's last row
    np.testing.assert_allclose(last, rows[-1].max(), atol=1e-5)
    plain = client.completions.create(model=NAME, prompt=ids, max_tokens=1, temperature=0,
                                      logprobs=2)  # through the batcher
    assert choice.text == server.engine.tokenizer.decode(ids) + plain.choices[0].text
    assert plain.choices[0].logprobs.tokens == lp.tokens[-1:]
    np.testing.assert_allclose(plain.choices[0].logprobs.token_logprobs[0], last, atol=1e-5)
    assert plain.choices[0].finish_reason == choice.finish_reason
    token_text = plain.choices[0].text
    if token_text:  # a stop string inside the one token cuts it, as the batcher does
        kw = {"model": NAME, "prompt": ids, "max_tokens": 1, "temperature": 0,
              "stop": [token_text[-1]], "logprobs": 0}
        cut = client.completions.create(echo=True, **kw).choices[0]
        via_batcher = client.completions.create(**kw).choices[0]
        assert cut.finish_reason == via_batcher.finish_reason == "stop"
        assert cut.text == server.engine.tokenizer.decode(ids) + via_batcher.text
    passes = len(server.engine.batcher.passes)
    client.completions.create(model=NAME, prompt=ids, max_tokens=1, temperature=0, echo=True,
                              logprobs=1)
    assert len(server.engine.batcher.passes) == passes  # one scoring pass, no generation
    sampled = client.completions.create(model=NAME, prompt=ids, max_tokens=1, temperature=0.5,
                                        seed=1, echo=True, logprobs=1)
    assert len(server.engine.batcher.passes) > passes  # not greedy: a generation
    assert len(sampled.choices[0].logprobs.tokens) == len(ids) + 1

    text = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=3, temperature=0,
                                     echo=True)
    assert text.choices[0].text.startswith(PROMPT) and text.choices[0].logprobs is None
    streamed = list(client.completions.create(model=NAME, prompt=ids, max_tokens=1,
                                              temperature=0, echo=True, logprobs=2,
                                              stream=True))
    got = [v for c in streamed if c.choices and c.choices[0].logprobs
           for v in c.choices[0].logprobs.token_logprobs]
    assert got == lp.token_logprobs


def test_n_choices_and_several_prompts(server, client):
    messages = [{"role": "user", "content": PROMPT}]
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8,
                                         temperature=1.0, seed=5, n=3)
    assert [c.index for c in out.choices] == [0, 1, 2]
    wants = [server.call(server.engine.complete(messages, max_tokens=8, temperature=1.0,
                                                seed=5 + j)) for j in range(3)]
    for c, want in zip(out.choices, wants, strict=True):  # choice j: the seed + j one
        assert c.message.content == want.text
    assert out.usage.completion_tokens == sum(len(w.token_ids) for w in wants)
    assert out.usage.prompt_tokens == wants[0].usage.prompt_tokens  # the prompt counts once
    assert len({c.message.content for c in out.choices}) > 1

    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    for chunk in client.chat.completions.create(model=NAME, messages=messages, max_tokens=8,
                                                temperature=1.0, seed=5, n=3, stream=True):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert texts == {c.index: c.message.content for c in out.choices}
    assert finishes == {c.index: c.finish_reason for c in out.choices}

    many = client.completions.create(model=NAME, prompt=["hello world", "paris is the"],
                                     max_tokens=5, temperature=0, n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    for i, p in enumerate(["hello world", "paris is the"]):
        alone = client.completions.create(model=NAME, prompt=p, max_tokens=5, temperature=0)
        assert many.choices[2 * i].text == many.choices[2 * i + 1].text == alone.choices[0].text
    server.wait_idle()
    assert server.engine.batcher.kv_bytes == 0


def test_n_above_the_cap_is_a_400_and_the_server_serves(server, client):
    with pytest.raises(openai.BadRequestError, match=r"\[1, 4\]"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}],
                                       max_tokens=2, n=5)
    with pytest.raises(openai.BadRequestError, match=r"top_logprobs"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}],
                                       max_tokens=2, logprobs=True, top_logprobs=21)
    ok = client.completions.create(model=NAME, prompt="x", max_tokens=2)
    assert ok.choices[0].finish_reason in ("stop", "length")
