"""Sampling: greedy, temperature, top-k, top-p, min-p, repetition penalty, seeded; and the
logprobs of the sampled tokens.

Logprobs are of the model's own distribution: log-softmax of the raw logits in float64, before
the repetition penalty, temperature and top-k/p/min-p (vLLM's default "raw_logprobs"), so they
do not depend on the sampling settings and equal a scoring pass's (stream-eval's) values.

A constraint (engine/constraints.py: a JSON object) limits which tokens may be picked: greedy
takes the likeliest allowed token, sampling the first allowed one in a Gumbel-perturbed order
(a draw from the sampling distribution restricted to the allowed tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    repetition_context: int = 64  # how many recent tokens the penalty looks at
    seed: int | None = None
    # None: no logprobs; k >= 0: each sampled token's logprob and the k most likely tokens'
    logprobs: int | None = None
    # makes each request's Constraint (e.g. JsonObjectConstraint via functools.partial)
    constraint: Callable[[], Constraint] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        checks = [
            ("temperature", self.temperature >= 0, ">= 0"),
            ("top_k", self.top_k >= 0, ">= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("min_p", 0 <= self.min_p < 1, "in [0, 1)"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
            ("repetition_context", self.repetition_context >= 0, ">= 0"),
            # numpy's generator takes seeds >= 0 only; say so before any model is loaded
            ("seed", self.seed is None or (isinstance(self.seed, int) and self.seed >= 0),
             "an integer >= 0"),
            ("logprobs", self.logprobs is None or (
                isinstance(self.logprobs, int) and not isinstance(self.logprobs, bool)
                and self.logprobs >= 0), "None or an integer >= 0"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"{name} must be {want}, got {getattr(self, name)!r}")


class Constraint(Protocol):
    """Which tokens may come next; told each token picked (engine/constraints.py)."""

    def forced(self) -> int | None: ...
    def allows(self, token: int) -> bool: ...
    def advance(self, token: int) -> None: ...


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model, and the top-k alternatives at its position
    (most likely first; empty when none were asked for)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64."""
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def token_logprobs(logits: np.ndarray, tokens: Sequence[int], top: int = 0
                   ) -> list[TokenLogprob]:
    """The logprob of tokens[i] under logits[i] (rows (L, V)), with the top most likely."""
    out = []
    for row, tok in zip(logits, tokens, strict=True):
        lp = log_softmax(row)
        best: tuple[tuple[int, float], ...] = ()
        if top:
            k = min(top, lp.size)
            idx = np.argpartition(-lp, k - 1)[:k]
            idx = idx[np.lexsort((idx, -lp[idx]))]  # most likely first, ties by id
            best = tuple((int(i), float(lp[i])) for i in idx)
        out.append(TokenLogprob(int(tok), float(lp[tok]), best))
    return out


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self.constraint = params.constraint() if params.constraint is not None else None

    def logprob(self, logits: np.ndarray, token: int) -> TokenLogprob | None:
        """The sampled token's logprob under (V,) logits, or None when not asked for."""
        k = self.params.logprobs
        return None if k is None else token_logprobs(logits[None], [token], k)[0]

    def __call__(self, logits: np.ndarray, history: Sequence[int]) -> int:
        """Pick the next token from (V,) logits; history is the ids so far (for the penalty)."""
        if self.constraint is not None:
            tok = self._constrained(self.penalized(logits, history))
            self.constraint.advance(tok)
            return tok
        if self.params.temperature == 0:
            return int(np.argmax(self.penalized(logits, history)))
        return self.draw(self.probs(logits, history))

    def penalized(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """(V,) logits as float64 with the repetition penalty applied."""
        p = self.params
        logits = logits.astype(np.float64)
        if p.repetition_penalty != 1.0 and history and p.repetition_context:
            ids = np.unique(np.asarray(history[-p.repetition_context:], dtype=np.int64))
            vals = logits[ids]
            logits[ids] = np.where(vals > 0, vals / p.repetition_penalty,
                                   vals * p.repetition_penalty)
        return logits

    def probs(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """The (V,) distribution a token is drawn from (temperature > 0): penalty,
        temperature, top-k, top-p, min-p. Speculative sampling compares drafts against it."""
        return self._filtered(self.penalized(logits, history))

    def _filtered(self, logits: np.ndarray) -> np.ndarray:
        """The sampling distribution of penalized logits: temperature, then top-k, top-p and
        min-p."""
        p = self.params
        logits = logits / p.temperature
        if p.top_k and p.top_k < logits.size:
            kth = np.partition(logits, -p.top_k)[-p.top_k]
            logits = np.where(logits < kth, -np.inf, logits)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cum, p.top_p)) + 1]  # smallest set with mass >= p
            mask = np.zeros_like(probs, dtype=bool)
            mask[keep] = True
            probs = np.where(mask, probs, 0.0)
        if p.min_p > 0:
            probs = np.where(probs >= p.min_p * probs.max(), probs, 0.0)
        return probs / probs.sum()

    def _constrained(self, logits: np.ndarray) -> int:
        """The likeliest allowed token (greedy), or a draw restricted to the allowed ones; when
        the sampling filters leave none, the likeliest allowed token of the raw order."""
        c = self.constraint
        assert c is not None
        forced = c.forced()
        if forced is not None:
            return forced
        if self.params.temperature == 0:
            keys = logits
        else:
            with np.errstate(divide="ignore"):
                keys = np.log(self._filtered(logits)) + self.rng.gumbel(size=logits.size)
        order = np.argsort(-keys, kind="stable")
        for tok in order:
            if not np.isfinite(keys[tok]):
                break
            if c.allows(int(tok)):
                return int(tok)
        for tok in np.argsort(-logits, kind="stable"):
            if c.allows(int(tok)):
                return int(tok)
        raise RuntimeError("the constraint allows no token")

    def draw(self, probs: np.ndarray) -> int:
        """A token drawn from a (V,) distribution with this sampler's generator."""
        return int(self.rng.choice(probs.size, p=probs))

    def uniform(self) -> float:
        return float(self.rng.random())
