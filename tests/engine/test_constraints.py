"""The JSON-object constraint (engine/constraints.py) against Python's json module, and the
constrained sampler on a toy vocabulary."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from stream_run.engine.constraints import MAX_WS, JsonObjectConstraint
from stream_run.engine.sampling import Sampler, SamplingParams

VALID = ['{}', '{"a": 1}', ' {"a": [1, 2.5, -3e+2, 0.0E1, true, false, null]}',
         '{"k": {"n": {"m": []}}, "s": "x\\"y\\\\z\\u00e9\\n", "e": ""}',
         '{"a":[{},[],[[]],{"b":"}"}]}', '{"\u00e9t\u00e9": "caf\u00e9"}', '{"z": -0}']
INVALID = ['[]', '1', '"s"', '{a: 1}', '{"a" 1}', '{"a": 01}', '{"a": 1,}', '{"a": [1,]}',
           '{"a": tru}', '{"a": .5}', '{"a": 1.}', '{"a": "\\x"}', '{"a": "\\u12g4"}',
           '{"a": 1}}', '{"a": -}', '{"a": 1e}', '{"a": "line\nbreak"}', '{,}']


def run(text: str) -> JsonObjectConstraint | None:
    """Feed text one byte per token; None when a byte is refused."""
    raw = text.encode()
    c = JsonObjectConstraint([bytes([b]) for b in range(256)], [256])
    for b in raw:
        if not c.allows(b):
            return None
        c.advance(b)
    return c


@pytest.mark.parametrize("text", VALID)
def test_valid_objects_complete(text):
    assert isinstance(json.loads(text), dict)
    c = run(text)
    assert c is not None and c.complete and c.forced() == 256


@pytest.mark.parametrize("text", INVALID)
def test_invalid_text_is_refused_or_incomplete(text):
    c = run(text)
    assert c is None or not c.complete


def test_random_texts_agree_with_json():
    rng = np.random.default_rng(0)
    alphabet = list('{}[]":,  0123456789-.eE+truefalsn\\ua"')
    agree = 0
    for _ in range(20000):
        text = "{" + "".join(rng.choice(alphabet, size=rng.integers(1, 14)))
        c = run(text)
        try:
            ok = isinstance(json.loads(text), dict)
        except ValueError:
            ok = False
        assert (c is not None and c.complete) == ok, text
        agree += ok
    assert agree > 20  # the fuzz reached complete objects


def test_mutated_objects_agree_with_json():
    """One or two random edits of a valid object: the constraint completes exactly when
    json.loads gives an object."""
    rng = np.random.default_rng(1)
    alphabet = '{}[]":,  0123456789-.eE+truefalsn\\ua"'
    agree = 0
    for _ in range(10000):
        text = VALID[rng.integers(len(VALID))]
        for _ in range(rng.integers(1, 3)):
            i = int(rng.integers(len(text) + 1))
            ch = alphabet[rng.integers(len(alphabet))]
            text = [text[:i] + ch + text[i:], text[:i] + text[i + 1:],
                    text[:i] + ch + text[i + 1:]][rng.integers(3)]
        c = run(text)
        try:
            ok = isinstance(json.loads(text), dict)
        except ValueError:
            ok = False
        assert (c is not None and c.complete) == ok, text
        agree += ok
    assert agree > 500


def test_whitespace_is_bounded():
    assert run("{" + " " * MAX_WS) is not None
    assert run("{" + " " * (MAX_WS + 1)) is None
    assert run('{"a": "' + " " * 100) is not None  # inside a string it is text


def test_special_tokens_never_pass():
    c = JsonObjectConstraint([b"{", None, b"}"], [1])
    assert c.allows(0) and not c.allows(1)
    c.advance(0)
    assert c.allows(2) and not c.allows(1)


VOCAB = [b"{", b"}", b'"a"', b'"b', b'c"', b":", b" 1", b"2", b",", b" ", b"x", b"[", b"]",
         b"null", None]  # the last: EOS, never allowed by its bytes
EOS = len(VOCAB) - 1


@pytest.mark.parametrize("temperature", [0.0, 1.0, 2.0])
def test_constrained_sampler_writes_json_objects(temperature):
    factory = functools.partial(JsonObjectConstraint, VOCAB, [EOS])
    rng = np.random.default_rng(1)
    n_closed = 0
    for seed in range(30):
        s = Sampler(SamplingParams(temperature=temperature, seed=seed, constraint=factory))
        out = []
        for _ in range(40):
            tok = s(rng.normal(size=len(VOCAB)) * 3, out)
            if tok == EOS:
                break
            out.append(tok)
        text = b"".join(VOCAB[t] for t in out).decode()
        if tok == EOS:
            assert isinstance(json.loads(text), dict), text
            n_closed += 1
        else:
            assert run(text) is not None, text  # a valid prefix, cut by the step limit
    assert n_closed > 5


def test_without_a_constraint_sampling_is_unchanged():
    logits = np.random.default_rng(2).normal(size=50)
    a = [Sampler(SamplingParams(temperature=0.9, seed=3))(logits, []) for _ in range(5)]
    s = Sampler(SamplingParams(temperature=0.9, seed=3))
    assert a[0] == s(logits, [])
