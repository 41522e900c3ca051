"""Logprobs on chunks and of a prompt (issue 20 item 5): the model's own distribution (log-softmax
of the raw logits), checked against an HF transformers float32 forward of the same checkpoint
and against stream-eval's scoring (engine/perplexity.token_nll)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from stream_run.engine import Engine, EngineConfig, SamplingParams, sync
from stream_run.engine.perplexity import token_nll
from tests.tiny_models import write_tiny_model

PROMPT = [int(t) for t in np.random.default_rng(3).integers(3, 300, 23)]
N_NEW = 12
TOP = 4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("logprobs")
    write_tiny_model(path, "llama", n_layers=3)
    return path


@pytest.fixture(scope="module")
def hf_log_softmax(model):
    """ids -> (L, V) float64 log-softmax of HF's float32 logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    hf.eval()

    def run(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0].double()
        return torch.log_softmax(logits, -1).numpy()

    return run


def open_engine(model, **kw) -> Engine:
    # prefill_chunk 5: tiles of 5 rows
    return asyncio.run(Engine.open(str(model), EngineConfig(backend="numpy", prefill_chunk=5,
                                                            **kw)))


async def _generate(engine: Engine, **kw):
    return [c async for c in engine.generate(PROMPT, max_tokens=N_NEW, ignore_eos=True, **kw)]


def test_chunk_logprobs_are_the_models_distribution(model, hf_log_softmax):
    engine = open_engine(model)
    try:
        chunks = asyncio.run(_generate(engine, logprobs=TOP))
        plain = asyncio.run(_generate(engine))
    finally:
        engine.close()
    ids = [t for c in chunks for t in c.token_ids]
    assert len(ids) == N_NEW
    assert ids == [t for c in plain for t in c.token_ids]  # asking changes no token
    assert all(c.logprobs is None for c in plain)
    for c in chunks:
        assert [lp.token_id for lp in c.logprobs] == c.token_ids
    lps = [lp for c in chunks for lp in c.logprobs]
    ref = hf_log_softmax(PROMPT + ids)  # row p predicts token p + 1
    for i, lp in enumerate(lps):
        row = ref[len(PROMPT) - 1 + i]
        np.testing.assert_allclose(lp.logprob, row[lp.token_id], atol=1e-4)
        want = np.argsort(-row, kind="stable")[:TOP]
        assert [t for t, _ in lp.top] == list(want)
        np.testing.assert_allclose([v for _, v in lp.top], row[want], atol=1e-4)
        assert lp.top[0][0] == lp.token_id  # greedy picks the most likely


def test_logprobs_do_not_depend_on_the_sampling_settings(model, hf_log_softmax):
    engine = open_engine(model)
    try:
        chunks = asyncio.run(_generate(engine, logprobs=0, temperature=1.7,
                                       repetition_penalty=1.8, top_k=5, seed=11))
        done = asyncio.run(engine.complete(PROMPT, max_tokens=4, logprobs=1))
    finally:
        engine.close()
    ids = [t for c in chunks for t in c.token_ids]
    lps = [lp for c in chunks for lp in c.logprobs]
    ref = hf_log_softmax(PROMPT + ids)
    got = [lp.logprob for lp in lps]
    want = [ref[len(PROMPT) - 1 + i, t] for i, t in enumerate(ids)]
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert all(lp.top == () for lp in lps)
    assert [lp.token_id for lp in done.logprobs] == done.token_ids
    assert all(len(lp.top) == 1 for lp in done.logprobs)


def test_prompt_logprobs_match_hf_and_stream_eval(model, hf_log_softmax):
    engine = open_engine(model)
    try:
        lps = asyncio.run(engine.prompt_logprobs(PROMPT, top=2))
        logits = asyncio.run(engine.logits(PROMPT))
    finally:
        engine.close()
    assert len(lps) == len(PROMPT) and lps[0] is None
    assert [lp.token_id for lp in lps[1:]] == PROMPT[1:]
    ref = hf_log_softmax(PROMPT)
    got = np.array([lp.logprob for lp in lps[1:]])
    np.testing.assert_allclose(got, ref[np.arange(len(PROMPT) - 1), PROMPT[1:]], atol=1e-4)
    nll = token_nll(logits[:-1], np.asarray(PROMPT[1:]))  # stream-eval's scoring
    np.testing.assert_allclose(-got, nll, atol=1e-9)
    for p, lp in enumerate(lps[1:]):
        assert [t for t, _ in lp.top] == list(np.argsort(-ref[p], kind="stable")[:2])


def test_prompt_logprobs_in_several_passes_and_the_next_token(model, hf_log_softmax):
    """A prefill memory that holds the activations and logits of 8 rows: the 23-token prompt
    takes several passes, with the same values."""
    probe = open_engine(model)
    memory = probe.runner.activation_bytes([(0, 8)], 8)
    one = asyncio.run(probe.prompt_logprobs(PROMPT, top=1, next_token=True))
    probe.close()
    engine = open_engine(model, prefill_memory_bytes=memory)
    passes = []
    forward = engine.forward

    async def counted(ids, *args, **kw):
        passes.append(ids.shape[1])
        return await forward(ids, *args, **kw)

    engine.forward = counted
    try:
        lps = asyncio.run(engine.prompt_logprobs(PROMPT, top=1, next_token=True))
        greedy = asyncio.run(engine.complete(PROMPT, max_tokens=1))
    finally:
        engine.close()
    assert len(passes) >= 3 and sum(passes) == len(PROMPT) and max(passes) <= 8
    assert len(lps) == len(PROMPT) + 1
    np.testing.assert_allclose([lp.logprob for lp in lps[1:]], [lp.logprob for lp in one[1:]],
                               atol=1e-5)
    ref = hf_log_softmax(PROMPT)
    assert lps[-1].token_id == greedy.token_ids[0] == int(np.argmax(ref[-1]))
    np.testing.assert_allclose(lps[-1].logprob, ref[-1].max(), atol=1e-4)


def test_sync_api_and_bad_values(model):
    with sync.open(str(model), backend="numpy") as llm:
        chunks = list(llm.generate(PROMPT, max_tokens=3, logprobs=0, ignore_eos=True))
        assert sum(len(c.logprobs) for c in chunks) == 3
        assert llm.prompt_logprobs(PROMPT[:3])[0] is None
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="logprobs must be None or an integer >= 0"):
            SamplingParams(logprobs=bad)
    engine = open_engine(model)
    try:
        with pytest.raises(ValueError, match="empty"):
            asyncio.run(engine.prompt_logprobs([]))
    finally:
        engine.close()
