import numpy as np
import pytest

from stream_run.engine.sampling import Sampler, SamplingParams

LOGITS = np.log(np.array([0.5, 0.25, 0.15, 0.07, 0.03]))


def draw(params, n=4000, history=()):
    s = Sampler(params)
    return np.bincount([s(LOGITS, list(history)) for _ in range(n)], minlength=5)


def test_greedy_is_argmax():
    assert Sampler(SamplingParams())(np.array([0.1, 3.0, -1.0]), []) == 1


def test_temperature_one_matches_distribution():
    counts = draw(SamplingParams(temperature=1.0, seed=0))
    np.testing.assert_allclose(counts / counts.sum(), np.exp(LOGITS), atol=0.03)


def test_top_k_keeps_k_most_likely():
    counts = draw(SamplingParams(temperature=1.0, top_k=2, seed=1))
    assert counts[2:].sum() == 0 and counts[0] > counts[1] > 0


def test_top_p_keeps_smallest_set_reaching_p():
    counts = draw(SamplingParams(temperature=1.0, top_p=0.7, seed=2))  # 0.5 + 0.25 >= 0.7
    assert counts[2:].sum() == 0 and counts[1] > 0


def test_min_p_drops_tokens_below_fraction_of_max():
    counts = draw(SamplingParams(temperature=1.0, min_p=0.2, seed=3))  # keep p >= 0.1
    assert counts[3:].sum() == 0 and counts[2] > 0


def test_repetition_penalty_hf_semantics():
    s = Sampler(SamplingParams(repetition_penalty=2.0))
    logits = np.array([2.0, 1.5, -1.0])
    assert s(logits, []) == 0
    assert s(logits, [0]) == 1  # 2.0 / 2 = 1.0 < 1.5


def test_seed_makes_sampling_reproducible():
    a = draw(SamplingParams(temperature=0.8, seed=42), n=50)
    b = draw(SamplingParams(temperature=0.8, seed=42), n=50)
    assert a.tolist() == b.tolist()


@pytest.mark.parametrize("kw, match", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"), ({"min_p": 1.0}, "min_p"), ({"repetition_penalty": 0}, "repetition"),
])
def test_bad_params_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)
