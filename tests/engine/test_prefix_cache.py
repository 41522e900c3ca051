"""The conversation's KV reused between requests (issue 20, items 1, 2 and 5): the prefix cache's
books, a second turn that feeds only what is new and generates what a fresh engine generates,
sliding-window rings, concurrent requests, and prompt-cache files with their refusals."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest

from stream_run.cli import run as cli_run
from stream_run.engine import Engine, EngineConfig, GenerationParams
from stream_run.engine.prefix_cache import PrefixCache
from stream_run.kernels import available_backends
from tests.tiny_models import write_tiny_model

BACKENDS = ["numpy"] + (["mlx"] if "mlx" in available_backends() else [])
FIRST = [int(t) for t in np.random.default_rng(3).integers(3, 300, 30)]
MORE = [int(t) for t in np.random.default_rng(4).integers(3, 300, 9)]
GREEDY = GenerationParams(max_tokens=8, ignore_eos=True)


def state(n_tokens: int, nbytes_per_token: int = 8) -> list[dict[str, np.ndarray]]:
    return [{"k": np.zeros(n_tokens * nbytes_per_token // 4, np.float32)}]


def test_prefix_cache_books():
    cache = PrefixCache(budget_bytes=1000)
    assert cache.lookup([1, 2, 3]) == (None, 0)
    assert cache.put([1, 2, 3, 4], state(4))
    entry, n = cache.lookup([1, 2, 3, 4, 5])
    assert entry is not None and n == 4
    assert cache.lookup([1, 2, 3, 4])[1] == 3  # the last prompt token is always fed
    assert cache.lookup([9, 2])[1] == 0
    # a longer conversation supersedes its own prefix
    assert cache.put([1, 2, 3, 4, 5, 6], state(6)) and len(cache) == 1
    assert cache.put([7, 8], state(2)) and len(cache) == 2
    # least recently used goes first: touch [1..6], then overflow
    cache.lookup([1, 2, 3, 0])
    assert cache.put([5, 5, 5] * 10, state(30, 24))  # 720 + 240 bytes of ids
    assert cache.lookup([7, 8, 0])[1] == 0
    assert cache.nbytes <= cache.budget_bytes
    assert not cache.put(list(range(100)), state(100, 40))  # larger than the whole budget


async def two_turns(path, backend: str, budget: int, second: list[int] | None = None):
    """Turn 1 on FIRST, turn 2 on FIRST + its answer + MORE (or `second`); returns (answer 1,
    answer 2, turn 2's stats) from an engine with a prefix cache of budget bytes."""
    engine = await Engine.open(str(path), EngineConfig(backend=backend,
                                                       kv_cache_budget_bytes=budget))
    try:
        one = await engine.complete(FIRST, GREEDY)
        prompt = second if second is not None else FIRST + one.token_ids + MORE
        two = await engine.complete(prompt, GREEDY)
        return one.token_ids, two.token_ids, two.stats
    finally:
        await engine.aclose()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["qwen3", "llama"])
def test_second_turn_feeds_only_what_is_new(tmp_path, backend, variant):
    write_tiny_model(tmp_path, variant)
    one, two, stats = asyncio.run(two_turns(tmp_path, backend, 64 << 20))
    # turn 1 fed its prompt and 7 of its 8 tokens (the last was sampled, never fed)
    assert stats.prompt_tokens_reused == len(FIRST) + 7
    assert stats.prompt_tokens == len(FIRST) + 8 + len(MORE)
    # the reference: an engine without a prefix cache, the whole second prompt fed
    ref_one, ref_two, ref_stats = asyncio.run(two_turns(tmp_path, backend, 0))
    assert ref_stats.prompt_tokens_reused == 0
    assert (one, two) == (ref_one, ref_two)


def test_sliding_window_rings_reuse_only_what_they_hold(tmp_path):
    write_tiny_model(tmp_path, "mistral", config_overrides={"sliding_window": 7})
    _, _, stats = asyncio.run(two_turns(tmp_path, "numpy", 64 << 20))
    assert stats.prompt_tokens_reused == len(FIRST) + 7  # the ring holds the window at the end
    # a prompt leaving the first turn 10 tokens before its end: the ring has wrapped past
    # what position len(FIRST) - 10 needs, so nothing is reused, and the answer is right
    second = FIRST[:-10] + MORE
    one, two, stats = asyncio.run(two_turns(tmp_path, "numpy", 64 << 20, second))
    assert stats.prompt_tokens_reused == 0
    assert asyncio.run(two_turns(tmp_path, "numpy", 0, second))[1] == two


def test_concurrent_requests_share_a_cached_prefix(tmp_path):
    write_tiny_model(tmp_path, "qwen3")

    async def go():
        async with await Engine.open(str(tmp_path), kv_cache_budget_bytes=64 << 20) as engine:
            first = await engine.complete(FIRST, GREEDY)
            base = FIRST + first.token_ids
            outs = await asyncio.gather(*(engine.complete(base + MORE[:k], GREEDY)
                                          for k in (2, 5, 9)))
            return outs

    with_cache = asyncio.run(go())
    assert [o.stats.prompt_tokens_reused for o in with_cache] == [len(FIRST) + 7] * 3

    async def plain():
        async with await Engine.open(str(tmp_path)) as engine:
            first = await engine.complete(FIRST, GREEDY)
            base = FIRST + first.token_ids
            return [await engine.complete(base + MORE[:k], GREEDY) for k in (2, 5, 9)]

    assert [o.token_ids for o in with_cache] == [o.token_ids for o in asyncio.run(plain())]


# -- prompt-cache files -------------------------------------------------------------------------

async def save_after(path, cache_file, kv_bits=None, prompt=FIRST):
    async with await Engine.open(str(path), kv_cache_budget_bytes=64 << 20,
                                 kv_bits=kv_bits) as engine:
        out = await engine.complete(prompt, GREEDY)
        assert await engine.save_prompt_cache(cache_file) == len(prompt) + 7
        return out.token_ids


def test_prompt_cache_file_round_trip(tmp_path):
    model = tmp_path / "m"
    write_tiny_model(model, "qwen3")
    f = tmp_path / "conv.safetensors"
    answer = asyncio.run(save_after(model, f))
    second = FIRST + answer + MORE

    async def load_and_run():
        async with await Engine.open(str(model)) as engine:  # no budget: loading enables it
            ids = await engine.load_prompt_cache(f)
            out = await engine.complete(second, GREEDY)
            return ids, out

    ids, out = asyncio.run(load_and_run())
    assert ids == FIRST + answer[:7]
    assert out.stats.prompt_tokens_reused == len(ids)
    assert out.token_ids == asyncio.run(two_turns(model, "numpy", 0, second))[1]


def test_prompt_cache_file_refusals(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_tiny_model(a, "qwen3")
    write_tiny_model(b, "qwen3", seed=1)  # same shapes and types, other weights
    f = tmp_path / "a.safetensors"
    asyncio.run(save_after(a, f))

    async def load(model, path, **options):
        async with await Engine.open(str(model), **options) as engine:
            return await engine.load_prompt_cache(path)

    with pytest.raises(ValueError, match=r"a\.safetensors: made for model"):
        asyncio.run(load(b, f))
    with pytest.raises(ValueError, match=r"made for kv 'float32', this engine has '8-bit"):
        asyncio.run(load(a, f, kv_bits=8))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(f.read_bytes()[: os.path.getsize(f) // 2])
    with pytest.raises(ValueError, match=r"cut\.safetensors: cannot be read"):
        asyncio.run(load(a, cut))
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match=r"other\.safetensors: cannot be read"):
        asyncio.run(load(a, other))


def test_cli_prompt_cache_file(tmp_path, capsys):
    model = tmp_path / "m"
    write_tiny_model(model, "qwen3")
    f = tmp_path / "doc.safetensors"
    args = [str(model), "--ignore-chat-template", "--max-tokens", "4", "--prompt-cache-file",
            str(f)]
    assert cli_run.main([*args, "--prompt", "paris is the capital of france"]) == 0
    err = capsys.readouterr().err
    assert "saved" in err and os.path.exists(f)
    assert cli_run.main([*args, "--prompt", "paris is the capital of france numbers"]) == 0
    err = capsys.readouterr().err
    assert "reused)" in err and "prompt cache:" in err
    # another model's file: one line, exit 2, the file left as it was
    other = tmp_path / "o"
    write_tiny_model(other, "qwen3", seed=5)
    before = f.read_bytes()
    assert cli_run.main([str(other), "--prompt", "x", "--prompt-cache-file", str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "doc.safetensors: made for model" in err[0]
    assert f.read_bytes() == before


def test_longrope_reuses_only_short_prefixes(tmp_path):
    """Phi-3 longrope (original length 16 here): keys cached from passes past it carry the long
    factors, a fresh short prompt would not (and the other way round), so only a prefix whose
    passes and new prompt all stay short is reused; the answers match a plain engine."""
    pytest.importorskip("transformers")
    from tests.models.test_phi3 import CASES, write_phi3

    write_phi3(tmp_path, CASES["longrope"])
    params = GenerationParams(max_tokens=4, ignore_eos=True)

    async def turns(budget: int, first: list[int]):
        async with await Engine.open(str(tmp_path), kv_cache_budget_bytes=budget) as engine:
            one = await engine.complete(first, params)
            return await engine.complete(first + one.token_ids + MORE[:2], params)

    short = asyncio.run(turns(64 << 20, FIRST[:8]))  # 8 + 3 fed, then 14 tokens: all short
    assert short.stats.prompt_tokens_reused == 11
    long = asyncio.run(turns(64 << 20, FIRST))  # 30 tokens: past 16
    assert long.stats.prompt_tokens_reused == 0
    assert [short.token_ids, long.token_ids] == [asyncio.run(turns(0, FIRST[:8])).token_ids,
                                                 asyncio.run(turns(0, FIRST)).token_ids]
