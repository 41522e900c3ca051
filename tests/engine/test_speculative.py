"""Speculative decoding (engine/speculative.py): prompt-lookup and draft-model drafts verified
in one pass, KV rollback, the adaptive draft length, greedy identity with plain decoding, and
speculative sampling keeping the target's distribution."""

import asyncio

import numpy as np
import pytest
from scipy import stats as sps

from stream_run.engine import Engine, EngineConfig, GenerationParams
from stream_run.engine.sampling import Sampler, SamplingParams
from stream_run.engine.speculative import (
    DraftLength,
    PassCost,
    cut_for_cost,
    prompt_lookup,
    verify,
)
from tests.reference_model import reference_greedy
from tests.tiny_models import write_tiny_model

# a prompt that repeats itself: tiny random models then tend to continue the pattern, so
# prompt lookup finds drafts the target accepts (asserted, so no test passes vacuously)
PROMPT = [5, 17, 42, 99, 3, 250, 7] * 3
N_NEW = 40


def open_engine(path, **kw) -> Engine:
    return asyncio.run(Engine.open(str(path), EngineConfig(backend="numpy", **kw)))


async def complete(engine, prompt, **kw):
    params = GenerationParams(max_tokens=kw.pop("n", N_NEW), ignore_eos=True)
    return await engine.complete(prompt, params.replace(**kw))


def test_prompt_lookup_continues_the_latest_match_of_the_longest_ngram():
    hist = [1, 2, 3, 4, 9, 1, 2, 3, 5, 6, 7, 2, 3]
    assert prompt_lookup(hist, 3) == [5, 6, 7]  # (2, 3) last occurred before 5 6 7
    assert prompt_lookup([1, 2, 3, 9, 8, 1, 2, 3], 2) == [9, 8]  # 3-gram beats later 2-grams
    assert prompt_lookup([1, 2, 3, 4], 3) == []
    assert prompt_lookup([4, 4], 3) == []  # a 1-gram is not enough (NGRAM_MIN 2)
    assert prompt_lookup(hist, 0) == []


def test_draft_length_grows_shrinks_pauses_and_comes_back():
    d = DraftLength(6)
    assert d.want() == 3
    d.update(3, 3)
    assert d.want() == 4
    d.update(4, 1)
    assert d.want() == 3
    d.update(3, 0)
    d.update(1, 0)  # halved to 0: off for one pass, then again at 1
    assert [d.want() for _ in range(2)] == [0, 1]
    d.update(1, 0)  # failing again: the pause doubles
    assert [d.want() for _ in range(3)] == [0, 0, 1]
    d.update(1, 1)
    assert d.backoff == 1 and d.want() == 2


def test_pass_rows_follow_expected_tokens_per_second():
    """A pass's rows are the sweep size with the most expected tokens per measured second:
    draft rows that cost more than they are expected to yield are cut."""
    sure, coin = DraftLength(7), DraftLength(7)
    for _ in range(20):
        sure.update(4, 4)  # every draft token accepted: acceptance near 1
        coin.update(4, 1)  # one of four, then a rejection: acceptance near 0.5
    assert sure.expected_tokens(7) > 7.5 and sure.expected_tokens(0) == 1
    assert 1.4 < coin.expected_tokens(1) < 1.6
    cheap, dear = PassCost(), PassCost()
    for rows, seconds in ((1, 1.0), (2, 1.05), (4, 1.1), (8, 1.2)):  # read-bound passes
        cheap.add(rows, seconds)
    for rows, seconds in ((1, 1.0), (2, 1.6), (4, 2.17), (8, 5.5)):  # compute-bound (CPU 7B)
        dear.add(rows, seconds)
    assert cut_for_cost([(7, sure)], 1, cheap) == 8
    # acceptance 0.5: 1.875 tokens for 1.1 beats 1.99 for 1.2
    assert cut_for_cost([(7, coin)], 1, cheap) == 4
    assert cut_for_cost([(7, sure)], 1, dear) == 4  # 4 tokens for 2.17x beat 8 for 5.5x
    assert cut_for_cost([(7, coin)], 1, dear) == 1  # 2 tokens for 5.5x, 1.5 for 1.6x: none
    assert cut_for_cost([(3, coin)], 3, dear) == 4  # rows the sequences need stay
    unknown = PassCost()
    assert cut_for_cost([(7, coin)], 1, unknown) == 8  # nothing measured: every draft row
    unknown.add(1, 1.0)
    assert unknown.estimate(8) == 1.0  # an unmeasured size costs as the largest measured below
    for seconds in (1.0, 9.0, 1.2, 1.1):  # a spike does not move the median
        unknown.add(8, seconds)
    assert unknown.estimate(8) == pytest.approx(1.15)
    dear.decisions = 0
    cuts = [cut_for_cost([(7, coin)], 1, dear) for _ in range(32)]
    assert cuts.count(8) == 2 and cuts.count(1) == 30  # every 16th keeps all rows (exploration)


def test_greedy_verify_keeps_the_matching_prefix_and_the_correction():
    logits = np.full((4, 10), -1.0)
    for row, tok in enumerate([3, 4, 8, 1]):
        logits[row, tok] = 1.0
    s = Sampler(SamplingParams())
    assert verify(s, logits, [0], [3, 4, 5]) == [3, 4, 8]
    assert verify(s, logits, [0], [3, 4, 8]) == [3, 4, 8, 1]  # all accepted: a bonus token
    assert verify(s, logits, [0], [7, 4, 8]) == [3]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec")
    cfg, weights = write_tiny_model(path, "llama", n_layers=4)
    return path, cfg, weights


def test_prompt_lookup_greedy_matches_the_reference_and_rolls_back(llama):
    path, cfg, weights = llama
    engine = open_engine(path, num_draft_tokens=6)
    try:
        spec = asyncio.run(complete(engine, PROMPT, speculative="prompt_lookup"))
        plain = asyncio.run(complete(engine, PROMPT))
    finally:
        engine.close()
    assert spec.token_ids == plain.token_ids == reference_greedy(cfg, weights, PROMPT, N_NEW)
    s = spec.stats
    assert s.speculative == "prompt_lookup"
    assert s.accepted_tokens > 0 and s.draft_tokens > s.accepted_tokens  # some rolled back
    assert s.decode_passes < N_NEW and s.tokens_per_pass > 1
    assert s.bytes_per_token >= 0 and plain.stats.decode_passes == N_NEW - 1


def test_streamed_under_a_budget_reads_less_per_token(llama):
    path, cfg, weights = llama
    probe = open_engine(path)
    budget = probe.min_budget_bytes
    probe.close()
    engine = open_engine(path, memory_budget_bytes=budget, speculative="prompt_lookup")
    try:
        spec = asyncio.run(complete(engine, PROMPT))
        plain = asyncio.run(complete(engine, PROMPT, speculative="off"))
    finally:
        engine.close()
    assert spec.token_ids == plain.token_ids
    sp, pl = spec.stats, plain.stats
    assert sp.accepted_tokens > 0 and pl.bytes_per_token > 0
    # a verification pass reads what a plain pass reads: bytes per token fall with the
    # tokens per pass
    assert sp.decode_bytes_read / sp.decode_passes == pytest.approx(
        pl.decode_bytes_read / pl.decode_passes, rel=0.15)
    assert sp.bytes_per_token < pl.bytes_per_token


def test_concurrent_requests_share_passes_with_their_drafts(llama):
    path, cfg, weights = llama
    prompts = [PROMPT, [11, 12, 13] * 4, [200, 201, 202, 203] * 3, [7]]
    engine = open_engine(path, speculative="prompt_lookup", num_draft_tokens=3)

    async def run():
        return await asyncio.gather(*(complete(engine, p, n=24) for p in prompts))

    try:
        results = asyncio.run(run())
        passes = list(engine.batcher.passes)
    finally:
        engine.close()
    for p, r in zip(prompts, results, strict=True):
        assert r.token_ids == reference_greedy(cfg, weights, p, 24)
    # some pass carried several sequences and draft rows beside them
    assert any(r.n_seqs > 1 and r.n_tokens > r.n_seqs and r.n_prefill == 0 for r in passes)
    assert max(r.n_tokens for r in passes if r.n_prefill == 0) <= 8
    assert sum(r.stats.accepted_tokens for r in results) > 0


@pytest.mark.parametrize("variant", ["qwen2", "qwen3", "mistral", "llama3_rope"])
def test_greedy_identity_across_architectures(tmp_path, variant):
    cfg, weights = write_tiny_model(tmp_path, variant, n_layers=2)
    engine = open_engine(tmp_path)
    try:
        spec = asyncio.run(complete(engine, PROMPT, speculative="prompt_lookup"))
        plain = asyncio.run(complete(engine, PROMPT))
    finally:
        engine.close()
    assert spec.token_ids == plain.token_ids
    assert spec.stats.draft_tokens > 0


def test_sliding_window_layers_stop_drafting_before_their_ring_wraps(tmp_path):
    """A sliding layer that has wrapped cannot roll back several positions: drafts stop there
    (KVCache.rollback_room) and the tokens stay those of plain decoding."""
    cfg, weights = write_tiny_model(tmp_path, "mistral", n_layers=2,
                                    config_overrides={"sliding_window": 30})
    engine = open_engine(tmp_path)
    try:
        spec = asyncio.run(complete(engine, PROMPT, speculative="prompt_lookup"))
        plain = asyncio.run(complete(engine, PROMPT))
    finally:
        engine.close()
    assert spec.token_ids == plain.token_ids
    assert spec.stats.decode_passes >= N_NEW - (30 - len(PROMPT)) - 1


def test_a_bad_request_setting_is_named():
    with pytest.raises(ValueError, match="speculative must be one of"):
        GenerationParams(speculative="lookup")
    with pytest.raises(ValueError, match="num_draft_tokens must be an int in 1..7"):
        GenerationParams(num_draft_tokens=8)
    with pytest.raises(ValueError, match="needs draft_model"):
        EngineConfig(speculative="draft_model")


def test_draft_model_requests_need_an_engine_with_one(llama):
    engine = open_engine(llama[0])
    try:
        with pytest.raises(ValueError, match="has no draft model"):
            engine.submit(PROMPT, max_tokens=8, speculative="draft_model")
    finally:
        engine.close()


# -- speculative sampling keeps the target's distribution ----------------------------------

def _chi2_p(counts: np.ndarray, probs: np.ndarray) -> float:
    keep = probs > 0
    assert counts[~keep].sum() == 0  # nothing outside the support
    return float(sps.chisquare(counts[keep], counts.sum() * probs[keep]).pvalue)


@pytest.mark.parametrize("draft_kind", ["point", "model"])
def test_speculative_sampling_keeps_the_target_distribution(llama, draft_kind):
    """The tiny model's logits for two positions (the target p0, p1); drafts of two tokens,
    either fixed (prompt lookup: q a point mass) or drawn from another distribution q (a
    draft model). Over many seeds the first token must follow p0, and the second, given the
    first was the drafted one, p1 (chi-square, p > 1e-3)."""
    path, _, _ = llama
    engine = open_engine(path)
    params = SamplingParams(temperature=1.5, top_k=6)
    ctx = PROMPT[:7]
    s = Sampler(params)
    try:
        row0 = asyncio.run(engine.logits(ctx))[-1]
        p0 = s.probs(row0, ctx)
        d1 = int(np.argsort(-p0)[1])  # a likely but not the likeliest token
        row1 = asyncio.run(engine.logits(ctx + [d1]))[-1]
    finally:
        engine.close()
    p1 = s.probs(row1, ctx + [d1])
    rng = np.random.default_rng(0)
    V, n = p0.size, 6000
    first, second = np.zeros(V), np.zeros(V)
    q = None
    for seed in range(n):
        s = Sampler(SamplingParams(temperature=1.5, top_k=6, seed=seed))
        if draft_kind == "model":  # a different, flatter distribution over the same support
            q0 = np.where(p0 > 0, 1.0, 0.0) + rng.random(V) * (p0 > 0)
            q = np.stack([q0 / q0.sum(), np.full(V, 1.0 / V)])
            draft = [int(rng.choice(V, p=q[0])), int(rng.choice(V, p=q[1]))]
        else:
            draft = [d1, 5]
        # row 1 is right only after d1; the checks below use it only then
        rows = np.stack([row0, row1, row1])
        out = verify(s, rows, ctx, draft, q)
        first[out[0]] += 1
        if out[0] == d1 and len(out) > 1 and draft[0] == d1:
            second[out[1]] += 1
    assert _chi2_p(first, p0) > 1e-3
    if second.sum() > 200:
        assert _chi2_p(second, p1) > 1e-3


# -- a draft model ---------------------------------------------------------------------------

def test_a_draft_model_sharing_the_tokenizer_drafts_what_the_target_accepts(llama, tmp_path):
    """The target as its own draft (what a low-bit copy approximates): every greedy draft
    token is accepted, and the output is the reference's."""
    path, cfg, weights = llama
    engine = open_engine(path, speculative="draft_model", draft_model=str(path),
                         num_draft_tokens=4)
    try:
        done = asyncio.run(complete(engine, PROMPT))
        sampled = asyncio.run(complete(engine, PROMPT, temperature=0.8, seed=3))
    finally:
        engine.close()
    assert done.token_ids == reference_greedy(cfg, weights, PROMPT, N_NEW)
    s = done.stats
    assert s.speculative == "draft_model" and s.draft_tokens > 0
    assert s.accepted_tokens == s.draft_tokens and s.tokens_per_pass > 2.5
    # sampling with q == p accepts every draft token too (min(1, p/q) = 1)
    assert sampled.stats.accepted_tokens == sampled.stats.draft_tokens > 0


def test_a_draft_model_with_another_vocabulary_is_refused(llama, tmp_path):
    import json
    import shutil

    path = llama[0]
    other = tmp_path / "other"
    shutil.copytree(path, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[40:42]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # the same strings, two ids swapped
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match=r"draft model .*other: its vocabulary .* is not the "
                                         r"target's"):
        open_engine(path, draft_model=str(other))


# -- stream-run --------------------------------------------------------------------------------

def test_stream_run_prints_the_speculative_stats_line(llama, tmp_path):
    from tests.engine.test_cli import run_cli

    path = llama[0]
    text = "the quick brown fox jumps over the lazy dog " * 3
    r = run_cli(path, "--prompt", text, "--max-tokens", "24", "--ignore-chat-template",
                "--prompt-lookup", "--num-draft-tokens", "4")
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stderr.splitlines() if x.startswith("Decode: "))
    assert "per pass" in line and "read per generated token" in line
    assert "speculative (prompt lookup):" in line and "accepted per pass" in line


@pytest.mark.parametrize("flags, message", [
    (["--num-draft-tokens", "0"], "--num-draft-tokens must be in 1..7, got 0"),
    (["--draft-budget", "10MB"], "--draft-budget needs --draft-model"),
    (["--draft-model", "/no/such/model"], "--draft-model /no/such/model: no such file"),
    (["--prompt-lookup", "--draft-model", "x"], "choose one"),
])
def test_stream_run_bad_speculative_flags_exit_2(llama, flags, message):
    from tests.engine.test_cli import run_cli

    r = run_cli(llama[0], "--max-tokens", "2", *flags)
    assert r.returncode == 2 and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_stream_run_refuses_a_draft_model_with_another_vocabulary(llama, tmp_path):
    import json
    import shutil

    from tests.engine.test_cli import run_cli

    other = tmp_path / "other"
    shutil.copytree(llama[0], other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[40:42]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    r = run_cli(llama[0], "--max-tokens", "2", "--draft-model", other)
    assert r.returncode == 2, r.stderr
    assert "its vocabulary" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# -- stream-serve ------------------------------------------------------------------------------

def test_stream_serve_default_and_per_request_override(llama):
    """The server's setting (EngineConfig.speculative) is the default; a request's
    "speculative" overrides it; a bad value is a 400 and the server keeps serving."""
    import openai

    from stream_run.server.app import ServerConfig
    from tests.server.harness import ServerThread

    path, cfg, weights = llama
    server = ServerThread.for_model(path, ServerConfig("tiny", max_tokens_cap=64),
                                    speculative="prompt_lookup")
    try:
        engine = server.wait_loaded()
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0,
                               timeout=60)

        def ids(**extra):
            r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24,
                                          temperature=0, extra_body=extra)
            return r.choices[0].text

        default = ids()
        drafted = sum(r.n_tokens - r.n_seqs for r in engine.batcher.passes if not r.n_prefill)
        off = ids(speculative="off")
        assert sum(r.n_tokens - r.n_seqs for r in engine.batcher.passes
                   if not r.n_prefill) == drafted  # no draft rows with "off"
        assert default == off and drafted > 0
        with pytest.raises(openai.BadRequestError, match="speculative must be one of"):
            ids(speculative="sometimes")
        assert ids(speculative="prompt_lookup") == off
    finally:
        server.close()


@pytest.mark.parametrize("case", ["phi3-plain", "phi3-longrope", "gemma2", "gemma3"])
@pytest.mark.parametrize("prompt", [PROMPT, [5, 17, 42] * 3])  # the second crosses 16
def test_greedy_identity_on_hf_written_models(tmp_path, case, prompt):
    """Phi-3 (longrope picks its factors by the length a pass sees: 16 here) and Gemma
    (sliding layers of window 5: drafts stop once the rings wrap), written by
    transformers."""
    arch, _, name = case.partition("-")
    if arch == "phi3":
        from tests.models.test_phi3 import CASES, write_phi3
        write_phi3(tmp_path, CASES[name])
    else:
        from tests.models.test_gemma import write_gemma
        write_gemma(tmp_path, arch)
    engine = open_engine(tmp_path)
    try:
        spec = asyncio.run(complete(engine, prompt, speculative="prompt_lookup"))
        plain = asyncio.run(complete(engine, prompt))
    finally:
        engine.close()
    assert spec.token_ids == plain.token_ids
    if case.startswith("phi3"):
        assert spec.stats.draft_tokens > 0


def test_rollback_room_of_full_and_sliding_layers():
    from stream_run.kernels.numpy_backend import NumpyKVCache

    kv = NumpyKVCache(2, 1, 1, 4, 64, windows=[None, 8])
    assert kv.rollback_room(8)
    kv.advance(5)
    assert kv.rollback_room(3) and not kv.rollback_room(4)  # 5 + 4 would wrap the ring
    full = NumpyKVCache(2, 1, 1, 4, 64)
    full.advance(60)
    assert full.rollback_room(4)


def test_the_incremental_lookup_finds_what_the_scan_finds():
    from stream_run.engine.speculative import PromptLookup

    rng = np.random.default_rng(0)
    for _ in range(20):
        hist = rng.integers(0, 6, 200).tolist()  # a small alphabet: many repeats
        lookup = PromptLookup()
        for n in range(1, len(hist) + 1, 3):
            assert lookup(hist[:n], 5) == prompt_lookup(hist[:n], 5)


def test_sampled_generations_through_the_engine_keep_the_joint_distribution(llama):
    """End to end (batcher, verification pass, KV rollback): three sampled tokens with
    prompt-lookup drafts (made after the first token) follow the target's joint
    distribution p(t1) p(t2 | t1) p(t3 | t1, t2), computed from its logits (top-k 2: 8
    outcomes)."""
    path = llama[0]
    sampling = SamplingParams(temperature=1.5, top_k=2)
    engine = open_engine(path, speculative="prompt_lookup")
    n = 800
    try:
        s = Sampler(sampling)
        # a prompt ending in 5 that holds (5, t) for both likely next tokens t, so a draft
        # follows whichever t1 is sampled
        ctx, top = [5], [17, 42]
        for _ in range(6):
            ctx = [5, top[0], 7, 5, top[1], 8, 5]
            new = sorted(np.flatnonzero(s.probs(asyncio.run(engine.logits(ctx))[-1], ctx)))
            if new == sorted(top):
                break
            top = [int(t) for t in new]
        assert new == sorted(top)

        def probs(prefix):
            ids = ctx + list(prefix)
            return s.probs(asyncio.run(engine.logits(ids))[-1], ids)

        joint = {(): 1.0}
        for _ in range(3):
            joint = {k + (int(t),): pk * p[t] for k, pk in joint.items()
                     for p in [probs(k)] for t in np.flatnonzero(p)}

        async def draw_all():
            out = []
            for seed in range(n):
                done = await engine.complete(ctx, GenerationParams(
                    max_tokens=3, ignore_eos=True,
                    sampling=SamplingParams(temperature=1.5, top_k=2, seed=seed)))
                out.append((tuple(done.token_ids), done.stats.draft_tokens))
            return out

        draws = asyncio.run(draw_all())
    finally:
        engine.close()
    assert sum(d > 0 for _, d in draws) > n // 10  # verification passes, not only plain ones
    keys = sorted(joint)
    counts = np.array([sum(ids == k for ids, _ in draws) for k in keys], dtype=float)
    assert counts.sum() == n  # nothing outside the support
    assert _chi2_p(counts, np.array([joint[k] for k in keys])) > 1e-3


def test_a_draft_model_that_disagrees_backs_off_and_keeps_the_output(llama, tmp_path):
    """Another random model with the same tokenizer as the draft: nearly every draft token is
    rejected, both KV caches roll back, the draft length falls to off and stays off for
    longer and longer, and the tokens are the reference's."""
    path, cfg, weights = llama
    other = tmp_path / "other"
    write_tiny_model(other, "llama", n_layers=4, seed=7)
    engine = open_engine(path, speculative="draft_model", draft_model=str(other))
    try:
        done = asyncio.run(complete(engine, PROMPT, n=48))
    finally:
        engine.close()
    assert done.token_ids == reference_greedy(cfg, weights, PROMPT, 48)
    s = done.stats
    assert s.accepted_tokens <= s.draft_tokens // 4
    assert 0 < s.draft_tokens < s.decode_passes // 2  # mostly plain passes once it backs off
